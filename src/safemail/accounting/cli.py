"""``safemail-accounting``: the relay's subsidy accounting (ACC-01..04).

Reads its settings from ``/etc/safemail/accounting.yml`` (rendered by roles/accounting):

.. code-block:: yaml

    log: /var/log/safemail/mail.log            # Postfix's log (maillog_file)
    ledger: /var/log/safemail/accounting/ledger.sqlite
    require_mount: /var/log/safemail            # refuse to work while the volume is locked
    directory: {uri: ldap://auth1, base: ou=participants,..., bind_dn: ..., password: ...,
                cafile: /etc/safemail/tls/ca.crt}
    policy: {rate_sent_cents: 10, rate_received_cents: 10, cap_cents: 5000}
    statement_retention_days: 400
    raw_retention_days: 120
    window_hours: 4

Commands: collect (timer), counts, bill, statement, purge (timer), window, status.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import fcntl
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from safemail.accounting.ledger import (
    Ledger,
    Participant,
    Policy,
    normalise_quarter,
    quarter_of,
    require_closed,
)
from safemail.errors import SafeMailError

DEFAULT_CONFIG = Path("/etc/safemail/accounting.yml")


def _euro(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def load_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SafeMailError(f"no configuration at {path}",
                            "run the accounting role, or give --config") from None
    except (OSError, yaml.YAMLError) as exc:
        raise SafeMailError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SafeMailError(f"{path} is not a mapping of settings")
    missing = [k for k in ("log", "ledger", "policy") if k not in data]
    if missing:
        raise SafeMailError(f"{path} lacks {', '.join(missing)}")
    return data


def _policy(config: dict[str, Any]) -> Policy:
    p = config["policy"]
    if not isinstance(p, dict):
        raise SafeMailError("policy must be a mapping of rate_sent_cents, rate_received_cents, "
                            "cap_cents")
    try:
        return Policy(p["rate_sent_cents"], p["rate_received_cents"], p["cap_cents"])
    except KeyError as exc:
        raise SafeMailError(f"policy lacks {exc.args[0]}") from None


def _int_setting(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SafeMailError(f"{key} must be a whole number >= 0, not {value!r}")
    return value


def _replica_uris(settings: dict[str, Any]) -> tuple[str, ...]:
    """AV-02: the directory's read-only replicas (optional list of URIs)."""
    value = settings.get("replica_uris") or []
    if not isinstance(value, list) or not all(isinstance(u, str) and u for u in value):
        raise SafeMailError(f"directory replica_uris must be a list of URIs, not {value!r}",
                            "run the accounting role (it writes this file)")
    return tuple(value)


def directory_resolver(settings: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Addresses -> participants, from the directory (mail -> employeeNumber,
    businessCategory), one connection per run."""
    from safemail.participant.directory import DirectoryConfig, LdapCertificateDirectory

    missing = [k for k in ("uri", "base", "bind_dn", "password", "cafile")
               if not settings.get(k)]
    if missing:
        raise SafeMailError(f"directory settings lack {', '.join(missing)}",
                            "run the accounting role (it writes all of them)")
    config = DirectoryConfig(
        uri=settings["uri"], bind_dn=settings["bind_dn"], password=settings["password"],
        base=settings["base"], cafile=Path(settings["cafile"]),
        replica_uris=_replica_uris(settings),
    )

    def resolve(addresses: Iterable[str]) -> dict[str, Participant]:
        found: dict[str, Participant] = {}
        with LdapCertificateDirectory(config) as d:
            for address in addresses:
                entries = d.search("mail", address, ["employeeNumber", "businessCategory"])
                if len(entries) != 1:
                    continue  # not a participant's mailbox (or ambiguous: never guess)
                number = entries[0].get("employeenumber", [b""])[0].decode()
                group = entries[0].get("businesscategory", [b""])[0].decode()
                if number and group:
                    found[address] = Participant(number, group)
        return found

    return resolve


@contextlib.contextmanager
def _open_ledger(args: argparse.Namespace, config: dict[str, Any]) -> Iterator[Ledger]:
    mount = config.get("require_mount")
    if mount and not args.ledger and not os.path.ismount(mount):
        raise SafeMailError(
            f"{mount} is not mounted (is the encrypted volume locked?): nothing was read or "
            "written", "unlock the volume (safemail-storage unlock), then run this again")
    path = Path(args.ledger or config["ledger"])
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock = open(lock_path, "a")  # noqa: SIM115 -- held for the whole command
    except OSError as exc:
        raise SafeMailError(f"cannot open {lock_path}: {exc.strerror}",
                            "run the accounting role, or give --ledger") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one command at a time (timer and operator)
        with Ledger(path) as ledger:
            yield ledger


def _now() -> datetime.datetime:
    return datetime.datetime.now()


def _collect(args: argparse.Namespace, config: dict[str, Any], ledger: Ledger) -> str:
    log = Path(args.log or config["log"])
    result = ledger.collect(log, directory_resolver(config.get("directory") or {}), _now())
    return f"collect {log}: {result.summary()}"


def cmd_collect(args: argparse.Namespace, config: dict[str, Any]) -> int:
    with _open_ledger(args, config) as ledger:
        print(_collect(args, config, ledger))
    return 0


def cmd_counts(args: argparse.Namespace, config: dict[str, Any]) -> int:
    quarter = normalise_quarter(args.quarter or quarter_of(_now()))
    with _open_ledger(args, config) as ledger:
        rows = ledger.counts(quarter)
        billed = ledger.billed_quarters()
    if args.json:
        print(json.dumps({"quarter": quarter, "billed": quarter in billed, "participants": [
            {"number": c.number, "specialty": c.specialty, "sent": c.sent,
             "received": c.received} for c in rows]}, indent=2))
        return 0
    if quarter in billed:
        print(f"{quarter} was billed on {billed[quarter]}: its counts are in its statement")
        return 0
    print(f"{quarter}: {len(rows)} participants with mail (mails to oneself not counted)")
    for c in rows:
        print(f"  {c.number:>10}  {c.specialty:<8} sent {c.sent:>6}  received {c.received:>6}")
    return 0


def cmd_bill(args: argparse.Namespace, config: dict[str, Any]) -> int:
    quarter = normalise_quarter(args.quarter)
    policy = _policy(config)
    days = _int_setting(config, "statement_retention_days", 400)
    now = _now()
    require_closed(quarter, now)  # before touching anything (the ledger checks it again)
    with _open_ledger(args, config) as ledger:
        if not args.no_collect:
            print(_collect(args, config, ledger), file=sys.stderr)
        lines = ledger.bill(quarter, policy, now, days)
    total = sum(cents for _, cents, _ in lines)
    if args.json:
        print(json.dumps({"quarter": quarter, "payout_cents": total, "participants": [
            {"number": c.number, "specialty": c.specialty, "sent": c.sent,
             "received": c.received, "payout_cents": cents, "capped": capped}
            for c, cents, capped in lines]}, indent=2))
    else:
        print(f"{quarter} billed: {len(lines)} participants, payout {_euro(total)} EUR "
              f"(rates {policy.rate_sent_cents}/{policy.rate_received_cents} ct per "
              f"sent/received mail, cap {_euro(policy.cap_cents)} EUR)")
        for c, cents, capped in lines:
            print(f"  {c.number:>10}  {c.specialty:<8} sent {c.sent:>6}  received "
                  f"{c.received:>6}  {_euro(cents):>9} EUR{'  (capped)' if capped else ''}")
        print(f"records of {quarter} anonymised: participant numbers deleted, specialty "
              f"groups kept; the statement is kept {days} days")
    return 0


def cmd_statement(args: argparse.Namespace, config: dict[str, Any]) -> int:
    with _open_ledger(args, config) as ledger:
        rows = ledger.statement(args.quarter)
    fields = ("number", "specialty", "sent", "received", "payout_cents", "capped")
    if args.format == "json":
        print(json.dumps([dict(zip(fields, r, strict=True)) for r in rows], indent=2))
    elif args.format == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow((*fields[:4], "payout_eur", "capped"))
        for n, g, s, r, c, k in rows:
            writer.writerow((n, g, s, r, _euro(c), "yes" if k else "no"))
        print(out.getvalue(), end="")
    else:
        for n, g, s, r, c, k in rows:
            print(f"{n:>10}  {g:<8} sent {s:>6}  received {r:>6}  {_euro(c):>9} EUR"
                  f"{'  (capped)' if k else ''}")
    return 0


def cmd_purge(args: argparse.Namespace, config: dict[str, Any]) -> int:
    raw_days = _int_setting(config, "raw_retention_days", 120)
    with _open_ledger(args, config) as ledger:
        deleted, expired, dropped = ledger.purge(_now(), raw_days)
    print(f"purge: statements deleted: {', '.join(deleted) or 'none'}; "
          f"quarters anonymised unbilled after {raw_days} days: {', '.join(expired) or 'none'}; "
          f"stale queue ids dropped: {dropped}")
    if expired:
        print(f"warning: {', '.join(expired)} ended more than {raw_days} days ago and was "
              "never billed: its records are anonymised, no payout can be computed any more",
              file=sys.stderr)
    return 0


def cmd_window(args: argparse.Namespace, config: dict[str, Any]) -> int:
    hours = args.hours or _int_setting(config, "window_hours", 4)
    with _open_ledger(args, config) as ledger:
        w = ledger.window(hours)
    if args.json:
        print(json.dumps({"start_weekday": w.start_weekday, "start_hour": w.start_hour,
                          "hours": w.hours, "window": w.describe(), "mails": w.mails,
                          "total": w.total, "weeks": w.weeks}, indent=2))
    else:
        print(f"maintenance window ({w.hours} h, least traffic): {w.describe()}; "
              f"{w.mails} of {w.total} anonymised mails over {w.weeks} weeks fell in it")
    return 0


def cmd_status(args: argparse.Namespace, config: dict[str, Any]) -> int:
    with _open_ledger(args, config) as ledger:
        status = ledger.status()
    print(json.dumps(status, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="safemail-accounting",
        description="Count sent and received mails per participant from the relay's log, "
                    "bill closed quarters with the cap, anonymise after billing, and plan the "
                    "maintenance window from the anonymised records (ACC-01..04).")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"settings file (default {DEFAULT_CONFIG})")
    p.add_argument("--ledger", help="ledger file instead of the configured one (no mount check)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("collect", help="record the deliveries logged since the last run")
    s.add_argument("--log", help="read this log instead of the configured one")
    s.set_defaults(func=cmd_collect)
    s = sub.add_parser("counts", help="sent/received per participant of a quarter")
    s.add_argument("--quarter", help="YYYYQn (default: the running quarter)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_counts)
    s = sub.add_parser("bill", help="bill a closed quarter, then anonymise its records")
    s.add_argument("--quarter", required=True, help="YYYYQn, a quarter that is over")
    s.add_argument("--no-collect", action="store_true",
                   help="do not read the log first (default: collect, then bill)")
    s.add_argument("--log", help="collect from this log instead of the configured one")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bill)
    s = sub.add_parser("statement", help="the billing statement of a quarter, while kept")
    s.add_argument("--quarter", required=True)
    s.add_argument("--format", choices=("text", "csv", "json"), default="text")
    s.set_defaults(func=cmd_statement)
    s = sub.add_parser("purge", help="apply the deletion schedule (statements, unbilled "
                                     "records past retention)")
    s.set_defaults(func=cmd_purge)
    s = sub.add_parser("window", help="the maintenance window with least traffic")
    s.add_argument("--hours", type=int, help="length in hours (default: window_hours)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_window)
    s = sub.add_parser("status", help="cursor, records per quarter, billed quarters (JSON)")
    s.set_defaults(func=cmd_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    umask = os.umask(0o077)  # the ledger and its lock are root's only
    try:
        config = load_config(args.config)
        return args.func(args, config)
    except SafeMailError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    finally:
        os.umask(umask)


if __name__ == "__main__":
    sys.exit(main())
