"""`safemail patch status`: collect every host's patch status and show it as a table.

Hosts come from the stage's inventory through ``ansible-inventory --list`` (the same reader
the report uses: no second host list). The status files are read in parallel with pyinfra
(one SSH connection per host, gevent), with the inventory's key, user and known_hosts.
The table logic is pure (:func:`rows`, :func:`render_table`) and unit-tested.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemail.errors import SafeMailError
from safemail.inventory import Host, read_inventory
from safemail.ops.patchcheck import DEFAULT_STATUS, Status, load_status

SERVICE_GROUP = "service"


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


def ssh_settings(host: Host) -> dict[str, Any]:
    """pyinfra SSH connector data from the host's Ansible variables."""
    hv = host.vars
    data: dict[str, Any] = {
        "ssh_hostname": hv.get("ansible_host", host.name),
        "ssh_user": hv.get("ansible_user", "root"),
        "ssh_port": int(hv.get("ansible_port", 22)),
    }
    if hv.get("ansible_ssh_private_key_file"):
        data["ssh_key"] = str(hv["ansible_ssh_private_key_file"])
    args = " ".join(str(hv.get(k, "")) for k in ("ansible_ssh_common_args",
                                                  "ansible_ssh_extra_args"))
    match = re.search(r"UserKnownHostsFile=(\S+)", args)
    if match:
        data["ssh_known_hosts_file"] = match.group(1)
    match = re.search(r"StrictHostKeyChecking=(\S+)", args)
    if match:
        data["ssh_strict_host_key_checking"] = match.group(1)
    return data


def parse_status_text(host: str, text: str | None) -> HostResult:
    if text is None:
        return HostResult(host, error="no patch status yet (is the patch_monitor role applied?)")
    try:
        return HostResult(host, status=load_status(json.loads(text)))
    except (ValueError, KeyError, TypeError) as exc:
        return HostResult(host, error=f"unreadable patch status: {exc}")


def collect(hosts: Sequence[Host], status_file: Path = DEFAULT_STATUS) -> list[HostResult]:
    """Read every host's status file in parallel with pyinfra."""
    if not hosts:
        return []
    # pyinfra pulls in gevent; import it only when a collection really runs.
    from pyinfra.api import Config, Inventory, State
    from pyinfra.api.connect import connect_all, disconnect_all
    from pyinfra.api.exceptions import PyinfraError
    from pyinfra.api.facts import get_facts
    from pyinfra.facts.files import FileContents

    inventory = Inventory(([(h.name, ssh_settings(h)) for h in hosts], {}))
    state = State(inventory, Config(CONNECT_TIMEOUT=10, FAIL_PERCENT=100))
    results: dict[str, HostResult] = {}
    try:
        try:
            connect_all(state)
        except PyinfraError:
            pass  # every host failed: reported below as unreachable
        active = {h.name for h in state.activated_hosts if h not in state.failed_hosts}
        for h in hosts:
            if h.name not in active:
                results[h.name] = HostResult(h.name, error="unreachable (SSH failed)")
        if active:
            facts = get_facts(state, FileContents, kwargs={"path": str(status_file)})
            for pyhost, lines in facts.items():
                text = None if lines is None else "\n".join(lines)
                results[pyhost.name] = parse_status_text(pyhost.name, text)
    finally:
        disconnect_all(state)
    return [results.get(h.name, HostResult(h.name, error="unreachable (no answer)"))
            for h in hosts]


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
