"""`safemail backup status`: per backup client, the newest archive, its age and whether the
repository answers (AV-01, docs/availability.md).

Clients are the stage's service hosts without the `backup` group (the same inventory reader as
`safemail patch status`). On each client the status helper the backup role installs
(/usr/local/sbin/safemail-backup-status, src/safemail/ops/backupcheck.py) asks the repository
itself with the client's key and passphrase, so "reachable" means the backup host answered and
the repository decrypted. The table logic is pure and unit-tested.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemail.inventory import Host, read_inventory
from safemail.ops import sshcmd
from safemail.project import project_root

HELPER = "/usr/local/sbin/safemail-backup-status"
DEFAULT_STALE_HOURS = 26.0


@dataclass(frozen=True)
class BackupResult:
    host: str
    reachable: bool = False  # the repository answered (SSH to the client and borg both worked)
    archives: int | None = None
    last_archive: str | None = None
    last_time: str | None = None
    age_seconds: int | None = None
    error: str | None = None

    def stale(self, max_age_hours: float) -> bool:
        return self.age_seconds is None or self.age_seconds > max_age_hours * 3600

    def to_json(self, max_age_hours: float) -> dict[str, Any]:
        return {"host": self.host, "reachable": self.reachable, "archives": self.archives,
                "last_archive": self.last_archive, "last_time": self.last_time,
                "age_seconds": self.age_seconds, "stale": self.stale(max_age_hours),
                "error": self.error}


def clients(hosts: Sequence[Host], names: Sequence[str] | None = None) -> list[Host]:
    """Backup clients: service hosts that are not in the `backup` group (or exactly `names`)."""
    from safemail.errors import SafeMailError

    pool = [h for h in hosts if "service" in h.groups and "backup" not in h.groups]
    if not names:
        return pool
    known = {h.name: h for h in pool}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SafeMailError(f"not a backup client in the inventory: {', '.join(unknown)}",
                            f"backup clients: {', '.join(sorted(known)) or 'none'}")
    return [known[n] for n in names]


def parse_helper(host: str, text: str | None) -> BackupResult:
    """One client's result from the helper's JSON line (None: the helper gave nothing)."""
    if not text or not text.strip():
        return BackupResult(host, error="no answer from the status helper (is roles/backup "
                                        "applied?)")
    try:
        data = json.loads(text.strip().splitlines()[-1])
        if not isinstance(data, dict):
            raise TypeError("not an object")
        age = data.get("age_seconds")
        archives = data.get("archives")
        return BackupResult(
            host, reachable=bool(data.get("reachable")),
            archives=int(archives) if archives is not None else None,
            last_archive=data.get("last_archive"), last_time=data.get("last_time"),
            age_seconds=int(age) if age is not None else None, error=data.get("error"))
    except (ValueError, TypeError) as exc:
        return BackupResult(host, error=f"unreadable status helper output: {exc}")


def collect(hosts: Sequence[Host], repo: Path | None = None) -> list[BackupResult]:
    """Run the status helper on every client in parallel, over the SSH connection Ansible
    would make (safemail.ops.sshcmd); a named admin (not root) runs it with ``sudo -n``, as
    the helper reads root-only files."""
    if not hosts:
        return []

    def remote(_name: str, hv: Mapping[str, Any]) -> str:
        sudo = "" if str(hv.get("ansible_user", "root")) == "root" else "sudo -n "
        return f"{sudo}{HELPER} 2>/dev/null || true"

    outcomes = sshcmd.run_everywhere(repo or project_root(), {h.name: h.vars for h in hosts},
                                     remote)
    results = []
    for h in hosts:
        out = outcomes[h.name]
        if out.unreachable:
            results.append(BackupResult(h.name, error=f"client unreachable ({out.unreachable})"))
        else:
            results.append(parse_helper(h.name, out.stdout))
    return results


def _age(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0:
        return "in the future?"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 3 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


COLUMNS = ("host", "repository", "archives", "last archive", "age", "state")


def rows(results: Sequence[BackupResult], max_age_hours: float) -> list[dict[str, str]]:
    out = []
    for r in results:
        if not r.reachable:
            state = f"FAIL: {r.error or 'repository unreachable'}"
        elif r.archives == 0 or r.last_time is None:
            state = "STALE: no archive yet"
        elif r.stale(max_age_hours):
            state = f"STALE: older than {max_age_hours:g} h"
        else:
            state = "ok"
        out.append({"host": r.host,
                    "repository": "reachable" if r.reachable else "UNREACHABLE",
                    "archives": "-" if r.archives is None else str(r.archives),
                    "last archive": r.last_time or "-",
                    "age": _age(r.age_seconds),
                    "state": state})
    return out


def render_table(table: Sequence[Mapping[str, str]]) -> str:
    widths = {c: max([len(c), *(len(r[c]) for r in table)]) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS).rstrip()]
    for r in table:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip())
    return "\n".join(lines)


def exit_code(results: Sequence[BackupResult], max_age_hours: float) -> int:
    """0 every client has a fresh archive; 3 a repository or client unreachable; 4 a backup
    stale or missing (unreachable wins)."""
    if any(not r.reachable for r in results):
        return 3
    if any(r.stale(max_age_hours) for r in results):
        return 4
    return 0


def inventory_clients(inventory: Path, names: Sequence[str] | None = None) -> list[Host]:
    return clients(read_inventory(inventory), names)
