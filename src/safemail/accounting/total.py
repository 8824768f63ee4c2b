"""The quarter's payout over every relay (AV-02): the cap applies to the sum.

With two or more relays (docs/availability.md) each relay counts the deliveries it handed on
and bills its own ledger: its statement (``safemail-accounting statement --format csv``)
holds the participant's sent/received counts *on that relay* and a payout capped per relay.
The subsidy is capped per participant and quarter, not per relay, so the payable figure is::

    min(cap, (sum of sent over the relays) * rate_sent + (sum of received) * rate_received)

:func:`combine` computes it from the relays' statements; ``playbooks/accounting-bill.yml``
runs ``python -m safemail.accounting.total`` on the controller after fetching them and writes
``reports/accounting/<quarter>.csv`` (the statement to pay from). The per-relay payouts in the
relays' own statements are ignored here: only their counts are read.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from safemail.accounting.ledger import Policy
from safemail.errors import SafeMailError

__all__ = ["TotalLine", "combine", "main", "parse_statement", "render_csv"]

# The header `safemail-accounting statement --format csv` writes (cli.cmd_statement).
HEADER = ("number", "specialty", "sent", "received", "payout_eur", "capped")


@dataclass(frozen=True)
class RelayLine:
    number: str
    specialty: str
    sent: int
    received: int
    # What the relay billed for its own counts (cents) and whether its cap cut it: checked
    # against the site's policy in :func:`combine`, then not used.
    payout_cents: int = -1
    capped: bool | None = None


@dataclass(frozen=True)
class TotalLine:
    number: str
    specialty: str
    sent: int
    received: int
    payout_cents: int
    capped: bool
    relays: tuple[str, ...]


def _digits(value: str) -> bool:
    # ASCII only: str.isdigit() also takes '١٢' or '²', and a participant number written
    # in other digits would be a second participant in the sum (a cap walked around).
    return value.isascii() and value.isdigit()


def _cents(value: str, where: str) -> int:
    euros, dot, cents = value.partition(".")
    if not (_digits(euros) and dot and len(cents) == 2 and _digits(cents)):
        raise SafeMailError(f"{where}: payout_eur {value!r} is not euros.cents",
                            "use the statement exactly as the relay printed it")
    return int(euros) * 100 + int(cents)


def _count(value: str, what: str, where: str) -> int:
    if not _digits(value):
        raise SafeMailError(f"{where}: {what} {value!r} is not a whole number >= 0",
                            "use the statement exactly as the relay printed it")
    return int(value)


def parse_statement(relay: str, text: str) -> list[RelayLine]:
    """One relay's statement CSV (as ``statement --format csv`` prints it)."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or tuple(rows[0]) != HEADER:
        raise SafeMailError(f"statement of {relay}: the first line is not {','.join(HEADER)}",
                            "use `safemail-accounting statement --format csv` of that relay")
    lines, seen = [], set()
    for n, row in enumerate(rows[1:], start=2):
        where = f"statement of {relay}, line {n}"
        if len(row) != len(HEADER):
            raise SafeMailError(f"{where}: {len(row)} fields, not {len(HEADER)}")
        number, specialty, sent, received, payout, capped = row
        if not _digits(number):
            raise SafeMailError(f"{where}: participant number {number!r} is not digits")
        if number in seen:
            raise SafeMailError(f"{where}: participant {number} appears twice",
                                "a relay's statement has one line per participant")
        seen.add(number)
        if capped not in ("yes", "no"):
            raise SafeMailError(f"{where}: capped {capped!r} is not yes or no")
        lines.append(RelayLine(number, specialty, _count(sent, "sent", where),
                               _count(received, "received", where), _cents(payout, where),
                               capped == "yes"))
    return lines


def combine(statements: Mapping[str, list[RelayLine]], policy: Policy) -> list[TotalLine]:
    """Sum each participant's counts over the relays, then apply rates and the cap once."""
    if not statements:
        raise SafeMailError("no relay statement to combine",
                            "bill the quarter on every relay first")
    sums: dict[str, list[int]] = {}
    groups: dict[str, set[str]] = {}
    relays: dict[str, list[str]] = {}
    for relay in sorted(statements):
        for line in statements[relay]:
            # The relay billed its own counts with its own copy of the rates: it must be the
            # site's policy (a relay left at old rates, a quarter billed there before a rate
            # change, or counts edited without the payout are refused, not summed).
            if line.payout_cents >= 0 and (line.payout_cents, line.capped) != policy.payout(
                    line.sent, line.received):
                raise SafeMailError(
                    f"statement of {relay}, participant {line.number}: the relay billed "
                    f"{_euro(line.payout_cents)} EUR for sent {line.sent}, received "
                    f"{line.received}; the site's rates and cap give "
                    f"{_euro(policy.payout(line.sent, line.received)[0])} EUR",
                    "every relay must bill with the site's safemail_subsidy: compare "
                    "/etc/safemail/accounting.yml on that relay; do not edit statements")
            total = sums.setdefault(line.number, [0, 0])
            total[0] += line.sent
            total[1] += line.received
            groups.setdefault(line.number, set()).add(line.specialty)
            relays.setdefault(line.number, []).append(relay)
    out = []
    for number in sorted(sums, key=lambda n: (len(n), n)):
        sent, received = sums[number]
        cents, capped = policy.payout(sent, received)
        # The group a relay resolved at collect time; a change within the quarter shows both.
        out.append(TotalLine(number, "+".join(sorted(groups[number])), sent, received, cents,
                             capped, tuple(relays[number])))
    return out


def _euro(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def render_csv(lines: list[TotalLine]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow((*HEADER, "relays"))
    for t in lines:
        writer.writerow((t.number, t.specialty, t.sent, t.received, _euro(t.payout_cents),
                         "yes" if t.capped else "no", " ".join(t.relays)))
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safemail.accounting.total",
        description="The quarter's statement over every relay: each participant's counts "
                    "summed, the cap applied to the sum (AV-02). Reads JSON on stdin: "
                    '{"policy": {"rate_sent_cents": N, "rate_received_cents": N, '
                    '"cap_cents": N}, "statements": {"<relay>": "<statement CSV>", ...}}; '
                    "prints the combined statement as CSV.")
    parser.parse_args(argv)
    try:
        data = json.load(sys.stdin)
        p = data["policy"]
        # Whole numbers (or their digits, as the accounting role's int options take them);
        # int() alone would quietly turn a rate of 2.5 into 2. Policy refuses the rest.
        policy = Policy(*(int(v) if isinstance(v, str) and _digits(v) else v for v in (
            p["rate_sent_cents"], p["rate_received_cents"], p["cap_cents"])))
        statements = {str(relay): parse_statement(str(relay), str(text))
                      for relay, text in dict(data["statements"]).items()}
        print(render_csv(combine(statements, policy)), end="")
    except (ValueError, KeyError, TypeError) as exc:
        print(f"error: the input is not the expected JSON ({exc!r})", file=sys.stderr)
        return 2
    except SafeMailError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
