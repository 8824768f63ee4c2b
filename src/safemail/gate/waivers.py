"""Waivers (verify/waivers.yml): a written, approved, expiring exception for one requirement.

File shape: a YAML list (an empty list when there are none)::

    - id: AV-02
      justification: why the requirement cannot hold yet, and what replaces it meanwhile
      approver: name of the person who approved (head of IT with the security team)
      expires: 2026-12-31        # the waiver holds through this day, not after

An active waiver turns a failing requirement into "waived" in the report. An expired waiver
waives nothing: the requirement counts as failing again, and the report says so.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from safemail.errors import SafeMailError

DEFAULT_WAIVERS = Path("verify/waivers.yml")

_FIELDS = ("id", "justification", "approver", "expires")
MIN_JUSTIFICATION = 20  # characters: "n/a" or "tbd" is not a written justification


class WaiverError(SafeMailError):
    """The waiver file is malformed."""


@dataclass(frozen=True)
class Waiver:
    id: str
    justification: str
    approver: str
    expires: dt.date

    def is_active(self, today: dt.date) -> bool:
        return today <= self.expires

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


def parse_waivers(
    data: Any, origin: str = "<memory>", known_ids: Iterable[str] | None = None
) -> list[Waiver]:
    """Validate parsed YAML; raise WaiverError listing every problem."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise WaiverError(
            f"{origin}: expected a YAML list of waivers, got {type(data).__name__}",
            "write `[]` when there are no waivers; see the header of verify/waivers.yml",
        )
    known = set(known_ids) if known_ids is not None else None
    problems: list[str] = []
    waivers: list[Waiver] = []
    seen: set[str] = set()
    for index, entry in enumerate(data, start=1):
        where = f"{origin}: waiver {index}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a mapping with {', '.join(_FIELDS)}")
            continue
        req_id = entry.get("id")
        if isinstance(req_id, str):
            where = f"{where} ({req_id})"
        missing = [f for f in _FIELDS if entry.get(f) in (None, "")]
        if missing:
            problems.append(f"{where}: missing field(s): {', '.join(missing)}")
        unknown = sorted(set(map(str, entry)) - set(_FIELDS))
        if unknown:
            problems.append(f"{where}: unknown field(s): {', '.join(unknown)}")
        if missing:
            continue
        if not isinstance(req_id, str):
            problems.append(f"{where}: id must be text")
            continue
        if known is not None and req_id not in known:
            problems.append(f"{where}: id {req_id} is not in the requirement catalogue")
        if req_id in seen:
            problems.append(f"{where}: a second waiver for {req_id}; keep one")
        seen.add(req_id)
        justification = " ".join(str(entry["justification"]).split())
        if len(justification) < MIN_JUSTIFICATION:
            problems.append(
                f"{where}: justification too short ({len(justification)} characters); "
                f"write at least {MIN_JUSTIFICATION}"
            )
        expires = _as_date(entry["expires"])
        if expires is None:
            problems.append(
                f"{where}: expires {entry['expires']!r} is not a date (write YYYY-MM-DD)"
            )
            continue
        waivers.append(
            Waiver(
                id=req_id,
                justification=justification,
                approver=" ".join(str(entry["approver"]).split()),
                expires=expires,
            )
        )
    if problems:
        raise WaiverError(
            f"waiver file is invalid ({len(problems)} problem(s)):\n  " + "\n  ".join(problems),
            f"fix {origin}: each waiver needs {', '.join(_FIELDS)}",
        )
    return waivers


def load_waivers(
    path: Path | str = DEFAULT_WAIVERS, known_ids: Iterable[str] | None = None
) -> list[Waiver]:
    """Read the waiver file. A missing file means no waivers."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise WaiverError(f"{path} is not valid YAML: {exc}", "fix the file's syntax") from exc
    except OSError as exc:
        raise WaiverError(f"cannot read waiver file {path}: {exc}") from exc
    return parse_waivers(data, origin=str(path), known_ids=known_ids)


def by_id(waivers: Sequence[Waiver]) -> dict[str, Waiver]:
    return {w.id: w for w in waivers}
