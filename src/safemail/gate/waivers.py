"""Waivers (verify/waivers.yml): a signed, bounded, expiring exception for one requirement.

File shape: a YAML list (an empty list when there are none)::

    - id: AV-02
      justification: why the requirement cannot hold yet, and what replaces it meanwhile
      granted: 2026-12-06        # first day it holds
      expires: 2027-03-01        # last day it holds; at most waiver_max_days after granted
      signatures:                # ssh-keygen -Y sign -n safemail-waiver, one per waiver role
        - |
          -----BEGIN SSH SIGNATURE-----
          ...

``safemail approval request --waiver AV-02 --justification ... --expires ...`` prints the
exact text to sign. Who signed is read from the signatures (release/allowed_signers), never
from a field. An active waiver turns a failing requirement into "waived" in the report. An
expired one waives nothing. Requirements the catalogue marks ``waivable: false`` (and the
baseline of :data:`safemail.gate.catalogue.NEVER_WAIVABLE`) cannot be waived at all.

:func:`parse_waivers` checks the shape (pure: the JSON Schema
``safemail/gate/schemas/waivers.schema.json``, then what a schema cannot say);
:func:`check_signatures` checks lifetime and signatures against the approval policy (runs
ssh-keygen). :func:`load_waivers` does both when given a policy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from safemail.errors import SafeMailError
from safemail.gate import schema

if TYPE_CHECKING:
    from safemail.gate.approvals import Policy

DEFAULT_WAIVERS = Path("verify/waivers.yml")

_REQUIRED = ("id", "justification", "granted", "expires", "signatures")
MIN_JUSTIFICATION = 20  # characters: "n/a" or "tbd" is not a written justification


class WaiverError(SafeMailError):
    """The waiver file is malformed, a waiver is not allowed, or not signed as required."""


@dataclass(frozen=True)
class Waiver:
    id: str
    justification: str
    approver: str  # who signed, filled in by check_signatures (display only)
    expires: dt.date
    granted: dt.date | None = None
    signatures: tuple[str, ...] = field(default=(), repr=False)

    def is_active(self, today: dt.date) -> bool:
        if self.granted is not None and today < self.granted:
            return False
        return today <= self.expires

    def message(self) -> bytes:
        from safemail.gate.approvals import waiver_message

        return waiver_message(self.id, self.justification, self.granted or self.expires,
                              self.expires)

    def to_dict(self, today: dt.date | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "justification": self.justification,
            "approver": self.approver,
            "expires": self.expires.isoformat(),
        }
        if today is not None:
            out["active"] = self.is_active(today)
        return out


def _as_date(value: Any) -> dt.date | None:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            return None
    return None


def _json_view(value: Any) -> Any:
    """The parsed YAML as JSON would have it: YAML's dates become YYYY-MM-DD text."""
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _json_view(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_view(v) for v in value]
    return value


def _entry_problems(where: str, entry: Any, found: list[schema.Violation]) -> list[str]:
    """A waiver's violations of the schema, in the words the waiver's author needs."""
    if not isinstance(entry, dict):
        return [f"{where}: must be a mapping with {', '.join(_REQUIRED)}"]
    out: list[str] = []
    missing = {str(v.key) for v in found if v.kind == "required"}
    for v in found:
        name = v.path[1] if len(v.path) > 1 else None
        if name is None:
            continue
        if entry.get(name) in (None, "", []):
            missing.add(str(name))  # present but empty says the same as absent
        elif name in ("granted", "expires"):
            out.append(f"{where}: {name} {entry[name]!r} is not a date (write YYYY-MM-DD)")
        elif name == "signatures":
            out.append(f"{where}: signatures must be a list of armored SSH signatures")
        else:
            out.append(f"{where}: {name} must be text")
    problems: list[str] = []
    if missing:
        what = ", ".join(f for f in _REQUIRED if f in missing)
        if "signatures" in missing:
            what += " (an unsigned waiver waives nothing: `safemail approval request --waiver`)"
        problems.append(f"{where}: missing field(s): {what}")
    unknown = sorted(str(v.key) for v in found if v.kind == "additionalProperties")
    if unknown:
        extra = " (who approved is read from the signatures)" if "approver" in unknown else ""
        problems.append(f"{where}: unknown field(s): {', '.join(unknown)}{extra}")
    return problems + list(dict.fromkeys(out))


def parse_waivers(
    data: Any,
    origin: str = "<memory>",
    known_ids: Iterable[str] | None = None,
    never_waivable: Iterable[str] = (),
) -> list[Waiver]:
    """Validate parsed YAML; raise WaiverError listing every problem.

    The shape is ``schemas/waivers.schema.json``; this adds what a schema cannot say (catalogue
    ids, one waiver per id, a written justification, real calendar dates in order).
    """
    if data is None:
        return []
    if not isinstance(data, list):
        raise WaiverError(
            f"{origin}: expected a YAML list of waivers, got {type(data).__name__}",
            "write `[]` when there are no waivers; see the header of verify/waivers.yml",
        )
    by_entry: dict[int, list[schema.Violation]] = {}
    for v in schema.violations("waivers", _json_view(data)):
        by_entry.setdefault(int(v.path[0]), []).append(v)
    known = set(known_ids) if known_ids is not None else None
    forbidden = set(never_waivable)
    problems: list[str] = []
    waivers: list[Waiver] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):
        where = f"{origin}: waiver {index + 1}"
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            where = f"{where} ({entry['id']})"
        bad = by_entry.get(index, [])
        problems.extend(_entry_problems(where, entry, bad))
        if not isinstance(entry, dict) or any(v.kind == "required" for v in bad):
            continue
        req_id = entry["id"]
        if not isinstance(req_id, str) or not req_id:
            continue
        if known is not None and req_id not in known:
            problems.append(f"{where}: id {req_id} is not in the requirement catalogue")
        if req_id in forbidden:
            problems.append(
                f"{where}: {req_id} can never be waived (the catalogue marks it waivable: false)"
            )
        if req_id in seen:
            problems.append(f"{where}: a second waiver for {req_id}; keep one")
        seen.add(req_id)
        if bad:
            continue
        justification = " ".join(entry["justification"].split())
        if len(justification) < MIN_JUSTIFICATION:
            problems.append(
                f"{where}: justification too short ({len(justification)} characters); "
                f"write at least {MIN_JUSTIFICATION}"
            )
        granted = _as_date(entry["granted"])
        expires = _as_date(entry["expires"])
        for name, value in (("granted", granted), ("expires", expires)):
            if value is None:  # the schema saw YYYY-MM-DD; the calendar has no such day
                problems.append(
                    f"{where}: {name} {entry[name]!r} is not a date (write YYYY-MM-DD)"
                )
        if granted is None or expires is None:
            continue
        if expires < granted:
            problems.append(f"{where}: expires {expires} lies before granted {granted}")
        waivers.append(
            Waiver(req_id, justification, "unverified", expires, granted,
                   tuple(entry["signatures"]))
        )
    if problems:
        raise WaiverError(
            f"waiver file is invalid ({len(problems)} problem(s)):\n  " + "\n  ".join(problems),
            f"fix {origin}: each waiver needs {', '.join(_REQUIRED)}",
        )
    return waivers


def check_signatures(waivers: Sequence[Waiver], policy: Policy, origin: str) -> list[Waiver]:
    """Check every waiver's lifetime and signatures; return them with ``approver`` filled in.

    Raise WaiverError naming every waiver that is too long or not signed by the waiver roles.
    """
    from safemail.gate import approvals

    problems: list[str] = []
    out: list[Waiver] = []
    for w in waivers:
        where = f"{origin}: waiver {w.id}"
        assert w.granted is not None  # parse_waivers requires it
        days = (w.expires - w.granted).days
        if days > policy.waiver_max_days:
            problems.append(
                f"{where}: lasts {days} days ({w.granted} to {w.expires}); "
                f"the most allowed is {policy.waiver_max_days} (waiver_max_days)"
            )
        labels = {f"{w.id}#{n}": s for n, s in enumerate(w.signatures, start=1)}
        result = approvals.check(
            policy, labels, w.message(), approvals.WAIVER_NAMESPACE, policy.waiver_roles
        )
        problems.extend(f"{where}: {p}" for p in result.problems)
        out.append(replace(w, approver=result.describe() or "nobody"))
    if problems:
        raise WaiverError(
            f"waiver file is invalid ({len(problems)} problem(s)):\n  " + "\n  ".join(problems),
            "each waiver needs a signature of every waiver role over the text that "
            "`safemail approval request --waiver ID ...` prints",
        )
    return out


def load_waivers(
    path: Path | str = DEFAULT_WAIVERS,
    known_ids: Iterable[str] | None = None,
    *,
    never_waivable: Iterable[str] = (),
    policy: Policy | None = None,
) -> list[Waiver]:
    """Read the waiver file (a missing file means no waivers); with a policy, check the
    signatures and lifetimes too."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise WaiverError(f"{path} is not valid YAML: {exc}", "fix the file's syntax") from exc
    except OSError as exc:
        raise WaiverError(f"cannot read waiver file {path}: {exc}") from exc
    waivers = parse_waivers(
        data, origin=str(path), known_ids=known_ids, never_waivable=never_waivable
    )
    if policy is not None and waivers:
        waivers = check_signatures(waivers, policy, str(path))
    return waivers


def by_id(waivers: Sequence[Waiver]) -> dict[str, Waiver]:
    return {w.id: w for w in waivers}
