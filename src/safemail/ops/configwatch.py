"""Record changes to service configuration on hosts without a kernel audit subsystem.

systemd-nspawn containers have no kernel audit, so auditd cannot watch /etc/postfix & co.
there. The ``admin_log`` role instead starts this script from a ``systemd.path`` unit whenever
a watched path changes. It compares a manifest (path, sha256, owner, mode) with the previous
one and writes one syslog line per changed file (tag ``safemail-config``): the file NAME and
what happened, never its content. The admin log collects the lines.

Standalone host-side script: standard library only (Debian's /usr/bin/python3). The diff is
pure and unit-tested (tests/test_ops_configwatch.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

DEFAULT_STATE = Path("/var/lib/safemail/config-manifest.json")
SYSLOG_TAG = "safemail-config"
MAX_FILES = 20000

Entry = dict[str, object]


def _file_entry(path: Path, st: os.stat_result) -> Entry:
    entry: Entry = {"uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode)}
    if stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(65536), b""):
                    digest.update(chunk)
            entry["sha256"] = digest.hexdigest()
        except OSError:
            entry["sha256"] = "unreadable"
    elif stat.S_ISLNK(st.st_mode):
        entry["link"] = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        entry["dir"] = True
    return entry


def manifest(roots: Iterable[Path]) -> dict[str, Entry]:
    """path -> entry for every file, link and directory under the roots (missing roots skip)."""
    out: dict[str, Entry] = {}
    for root in roots:
        try:
            st = root.lstat()
        except FileNotFoundError:
            continue
        out[str(root)] = _file_entry(root, st)
        if not stat.S_ISDIR(st.st_mode):
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted([*dirnames, *filenames]):
                p = Path(dirpath) / name
                try:
                    out[str(p)] = _file_entry(p, p.lstat())
                except FileNotFoundError:
                    continue
                if len(out) > MAX_FILES:
                    return out
    return out


def diff(old: Mapping[str, Entry], new: Mapping[str, Entry]) -> list[tuple[str, str]]:
    """(path, what) for each change: created, removed, content changed, owner/mode changed."""
    changes: list[tuple[str, str]] = []
    for path in sorted(set(old) | set(new)):
        before, after = old.get(path), new.get(path)
        if before == after:
            continue
        if before is None:
            changes.append((path, "created"))
        elif after is None:
            changes.append((path, "removed"))
        else:
            content = {k: v for k, v in before.items() if k not in ("uid", "gid", "mode")} != {
                k: v for k, v in after.items() if k not in ("uid", "gid", "mode")
            }
            changes.append((path, "content changed" if content else "owner/mode changed"))
    return changes


def within(entries: Mapping[str, Entry], roots: Iterable[Path]) -> dict[str, Entry]:
    """Only the entries under the watched roots: a root dropped from the watch list (or a
    manifest from an older list) must not be reported as "removed" file by file."""
    prefixes = [str(r) for r in roots]
    return {p: e for p, e in entries.items()
            if any(p == r or p.startswith(r.rstrip("/") + "/") for r in prefixes)}


def lines(changes: Sequence[tuple[str, str]], *, first_run: bool) -> list[str]:
    if first_run:
        return ["config watch: baseline recorded"]
    return [f"config change: {path} {what}" for path, what in changes]


def _load(path: Path) -> dict[str, Entry] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(path: Path, data: Mapping[str, Entry]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-manifest-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, sort_keys=True)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safemail-config-watch",
        description="Log which watched configuration files changed (names only).",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="files or directories to watch")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE,
                        help=f"manifest of the last run (default {DEFAULT_STATE})")
    parser.add_argument("--no-syslog", action="store_true", help="print instead of syslog")
    args = parser.parse_args(argv)
    old = _load(args.state)
    new = manifest(args.paths)
    out = lines(diff(within(old or {}, args.paths), new), first_run=old is None)
    if args.no_syslog:
        for line in out:
            print(line)
    else:
        import syslog

        syslog.openlog(SYSLOG_TAG, 0, syslog.LOG_AUTHPRIV)
        for line in out:
            syslog.syslog(syslog.LOG_NOTICE, line)
        syslog.closelog()
    _save(args.state, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
