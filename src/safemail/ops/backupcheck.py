#!/usr/bin/python3
"""AV-01: the backup state of this client, as one JSON line (roles/backup installs it as
/usr/local/sbin/safemail-backup-status; `safemail backup status` runs it over SSH).

It asks the repository itself (``safemail-borg list --json``: SSH to the backup host, the
client's key and passphrase), so "reachable" means the repository answered and decrypted.
Standard library only; always exits 0 and reports errors in the JSON.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

BORG = "/usr/local/sbin/safemail-borg"


def parse_list(text: str, now: dt.datetime) -> dict:
    """The status from ``borg list --json`` output (archive times are the host's local time)."""
    archives = json.loads(text).get("archives", [])
    out: dict = {"reachable": True, "archives": len(archives), "last_archive": None,
                 "last_time": None, "age_seconds": None, "error": None}
    if archives:
        last = max(archives, key=lambda a: a.get("time") or a.get("start") or "")
        stamp = (last.get("time") or last.get("start"))[:19]
        when = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S")
        out.update(last_archive=last.get("name"), last_time=stamp,
                   age_seconds=int((now - when).total_seconds()))
    return out


def main() -> int:
    try:
        proc = subprocess.run([BORG, "list", "--json"], capture_output=True, text=True,
                              timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(json.dumps({"reachable": False, "error": f"borg did not run: {exc}"}))
        return 0
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or [f"borg exited {proc.returncode}"])[-1]
        print(json.dumps({"reachable": False, "error": err[:300]}))
        return 0
    try:
        print(json.dumps(parse_list(proc.stdout, dt.datetime.now())))
    except (ValueError, KeyError, TypeError) as exc:
        print(json.dumps({"reachable": True, "error": f"unreadable borg output: {exc}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
