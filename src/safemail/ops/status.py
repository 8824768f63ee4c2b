"""`safemail patch status`: collect every host's patch status and show it as a table.

Hosts come from the stage's inventory through ``ansible-inventory --list`` (the same reader
the report uses: no second host list). The status files are read in parallel, one ``ssh`` per
host, with the command line Ansible's own ssh plugin builds for that host (ops/sshcmd.py): the
same key, user, known_hosts, bastion and ControlPersist as a playbook run.
The table logic is pure (:func:`rows`, :func:`render_table`) and unit-tested.
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemail.errors import SafeMailError
from safemail.inventory import Host, read_inventory
from safemail.ops import sshcmd
from safemail.ops.patchcheck import DEFAULT_STATUS, Status, load_status
from safemail.project import project_root

SERVICE_GROUP = "service"
NO_STATUS = 3  # the remote command's exit code when the status file does not exist
READ_TIMEOUT = 90  # seconds for one host, connection included (ConnectTimeout is Ansible's)


@dataclass(frozen=True)
class HostResult:
    host: str
    status: Status | None = None
    error: str | None = None  # unreachable, no status file, unreadable status

    @property
    def reachable(self) -> bool:
        return self.error is None or not self.error.startswith("unreachable")


def select_hosts(hosts: Iterable[Host], group: str = SERVICE_GROUP,
                 names: Sequence[str] | None = None) -> list[Host]:
    """The hosts of `group` (all service hosts), or exactly `names` (each must exist there)."""
    pool = [h for h in hosts if group in h.groups]
    if not names:
        return pool
    known = {h.name: h for h in pool}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SafeMailError(
            f"not a host of group {group!r} in the inventory: {', '.join(unknown)}",
            f"known hosts: {', '.join(sorted(known))}",
        )
    return [known[n] for n in names]


def parse_status_text(host: str, text: str | None) -> HostResult:
    if text is None:
        return HostResult(host, error="no patch status yet (is the patch_monitor role applied?)")
    try:
        return HostResult(host, status=load_status(json.loads(text)))
    except (ValueError, KeyError, TypeError) as exc:
        return HostResult(host, error=f"unreadable patch status: {exc}")


def collect(hosts: Sequence[Host], status_file: Path = DEFAULT_STATUS,
            repo: Path | None = None) -> list[HostResult]:
    """Read every host's status file in parallel, over the SSH connection Ansible would make.

    The ssh command lines come from Ansible's own ssh plugin (:mod:`safemail.ops.sshcmd`), so
    a bastion, a known_hosts file or a ControlPersist in ansible.cfg or the inventory applies
    here exactly as in a playbook run. ``BatchMode`` is added so that a host asking for a
    password fails instead of waiting for one.
    """
    if not hosts:
        return []
    path = shlex.quote(str(status_file))
    outcomes = sshcmd.run_everywhere(
        repo or project_root(), {h.name: h.vars for h in hosts},
        lambda _name, _hv: f"test -e {path} || exit {NO_STATUS}; cat {path}", READ_TIMEOUT)
    results = []
    for h in hosts:
        out = outcomes[h.name]
        if out.unreachable:
            results.append(HostResult(h.name, error=f"unreachable ({out.unreachable})"))
        elif out.rc == NO_STATUS:
            results.append(parse_status_text(h.name, None))
        elif out.rc != 0:
            why = (out.stderr.strip().splitlines() or [f"exit {out.rc}"])[-1]
            results.append(HostResult(h.name, error=f"cannot read {status_file}: {why}"))
        else:
            results.append(parse_status_text(h.name, out.stdout))
    return results


def _age(checked_at: str, now: dt.datetime) -> str:
    try:
        when = dt.datetime.strptime(checked_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return checked_at
    minutes = int((now - when).total_seconds() // 60)
    ago = f"{minutes} min ago" if minutes < 120 else f"{minutes // 60} h ago"
    return f"{checked_at} ({ago})"


def rows(results: Sequence[HostResult], now: dt.datetime) -> list[dict[str, str]]:
    """Table rows: host, pending, security, reboot, last check, note."""
    out = []
    for r in results:
        if r.status is None:
            out.append({"host": r.host, "pending": "-", "security": "-", "reboot": "-",
                        "last check": "-", "note": r.error or ""})
            continue
        s = r.status
        sec = [p.package for p in s.pending if p.security]
        note = "" if s.ok else f"check failed: {s.error}"
        if s.ok and s.pending:
            note = ", ".join(f"{p.package} {p.installed or '(new)'} -> {p.candidate}"
                             for p in s.pending[:4]) + (" ..." if len(s.pending) > 4 else "")
        out.append({
            "host": r.host,
            "pending": str(len(s.pending)) if s.ok else "?",
            "security": str(len(sec)) if s.ok else "?",
            "reboot": "yes" if s.reboot_required else "no",
            "last check": _age(s.checked_at, now),
            "note": note,
        })
    return out


COLUMNS = ("host", "pending", "security", "reboot", "last check", "note")


def render_table(table: Sequence[Mapping[str, str]]) -> str:
    widths = {c: max([len(c), *(len(r[c]) for r in table)]) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS).rstrip()]
    for r in table:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip())
    return "\n".join(lines)


def exit_code(results: Sequence[HostResult]) -> int:
    """0 all hosts answered with a good status; 3 any host unreachable; 4 any check failed
    or status missing (unreachable wins)."""
    if any(not r.reachable for r in results):
        return 3
    if any(r.status is None or not r.status.ok for r in results):
        return 4
    return 0


def to_json(results: Sequence[HostResult]) -> list[dict[str, Any]]:
    return [{"host": r.host, "error": r.error,
             "status": r.status.to_json() if r.status else None} for r in results]


def inventory_hosts(inventory: Path, names: Sequence[str] | None = None) -> list[Host]:
    return select_hosts(read_inventory(inventory), names=names)


def quoted(items: Iterable[str]) -> str:
    return " ".join(shlex.quote(i) for i in items)
