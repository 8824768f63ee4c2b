"""Delete the mailboxes of removed participants once their keeping period is over.

``playbooks/participant-remove.yml`` removes a participant from the directory (no login, no
mail from then on) and leaves a removal marker on the store:
``<mail root>/.safemail-removed/<mailbox>.json`` = ``{"mailbox", "removed_at"}`` (UTC, ISO
8601). The mailbox itself stays ``keep_days`` (``mailstore_removed_retention_days``, in
``/etc/safemail/mailbox-purge.json`` with ``mail_root``) so the participant can still ask for
it; then this job (``safemail-mailbox-purge.timer``, daily, role ``mailstore``) deletes
``<mail root>/<domain>/<local part>`` and the marker. The period is read at every run, so a
changed setting applies to mailboxes removed before.

A mailbox that is a directory user again (re-added participant, ``doveadm user`` finds it) is
never deleted: its marker is dropped and the mailbox kept. Markers and mailboxes live on the
encrypted volume; the log line (syslog tag ``safemail-mailbox-purge``, which the admin log
collects) carries counts only, no address.

This file is copied to the store as a standalone script and run by Debian's
``/usr/bin/python3``: standard library only. :func:`plan` and :func:`mailbox_home` are pure
(tests/test_ops_mailboxpurge.py); the I/O is in :func:`run`.

Exit codes: 0 done (also: nothing due), 1 a mailbox could not be deleted or a marker is
unreadable (the others are still handled), 2 bad command line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SYSLOG_TAG = "safemail-mailbox-purge"
MARKER_DIR = ".safemail-removed"
# A mailbox as the directory and Dovecot's home template (%d/%n) use it: nothing that could
# leave the mail root.
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+=?^_`{|}~-]+)*$")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})+$")


class MarkerError(ValueError):
    """A marker that cannot be acted on (bad JSON, fields, mailbox)."""


@dataclass(frozen=True)
class Marker:
    path: Path
    mailbox: str
    removed_at: dt.datetime


def _time(value: object, field: str) -> dt.datetime:
    if not isinstance(value, str):
        raise MarkerError(f"{field} missing")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise MarkerError(f"{field} is not an ISO time: {value!r}") from exc
    if parsed.tzinfo is None:
        raise MarkerError(f"{field} has no time zone: {value!r}")
    return parsed.astimezone(dt.UTC)


def mailbox_home(root: Path, mailbox: str) -> Path:
    """``root/<domain>/<local part>`` (Dovecot's home, lower case); refuses anything that
    could leave the root."""
    local, sep, domain = mailbox.rpartition("@")
    if not sep or not _LOCAL.match(local) or not _DOMAIN.match(domain):
        raise MarkerError(f"not a mailbox address: {mailbox!r}")
    return root / domain.lower() / local.lower()  # Dovecot: auth_username_format %Lu


def parse_marker(path: Path, text: str) -> Marker:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise MarkerError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("mailbox"), str):
        raise MarkerError("no mailbox")
    mailbox = data["mailbox"]
    if path.name != f"{mailbox}.json":
        raise MarkerError(f"file name does not match its mailbox {mailbox!r}")
    mailbox_home(Path("/"), mailbox)  # validates
    return Marker(path, mailbox, _time(data.get("removed_at"), "removed_at"))


@dataclass(frozen=True)
class Plan:
    delete: tuple[Marker, ...]
    keep_readded: tuple[Marker, ...]
    waiting: tuple[Marker, ...]
    unknown: tuple[Marker, ...]  # due, but the userdb did not answer: try again next run


def delete_after(marker: Marker, keep_days: int) -> dt.datetime:
    return marker.removed_at + dt.timedelta(days=keep_days)


def plan(markers: Iterable[Marker], now: dt.datetime, keep_days: int,
         is_user: Callable[[str], bool | None]) -> Plan:
    """Which mailboxes go now: due ones the userdb says are no users (again).

    ``is_user``: True (a directory user again: keep the mailbox, drop the marker), False (go),
    None (no answer: keep both, try again next run)."""
    delete, readded, waiting, unknown = [], [], [], []
    for m in sorted(markers, key=lambda m: m.mailbox):
        if now < delete_after(m, keep_days):
            waiting.append(m)
            continue
        known = is_user(m.mailbox)
        if known is None:
            unknown.append(m)
        elif known:
            readded.append(m)
        else:
            delete.append(m)
    return Plan(tuple(delete), tuple(readded), tuple(waiting), tuple(unknown))


def _doveadm_user(mailbox: str) -> bool | None:
    """Whether Dovecot's userdb (the directory) knows the mailbox: exit 0 yes, 67 (EX_NOUSER)
    no, anything else (directory down, doveadm missing) no answer."""
    try:
        done = subprocess.run(["doveadm", "user", "-u", mailbox], capture_output=True,
                              check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {0: True, 67: False}.get(done.returncode)


def run(root: Path, now: dt.datetime, keep_days: int,
        is_user: Callable[[str], bool | None], log: Callable[[str], None]) -> int:
    marker_dir = root / MARKER_DIR
    markers, problems = [], 0
    for path in sorted(marker_dir.glob("*.json")) if marker_dir.is_dir() else []:
        try:
            markers.append(parse_marker(path, path.read_text(encoding="utf-8")))
        except (OSError, MarkerError) as exc:
            problems += 1
            print(f"error: marker {path.name}: {exc}", file=sys.stderr)
    todo = plan(markers, now, keep_days, is_user)
    deleted = 0
    for m in todo.delete:
        home = mailbox_home(root, m.mailbox)
        try:
            if home.is_symlink():
                raise OSError(f"{home} is a symbolic link")
            if home.exists():
                shutil.rmtree(home)
            m.path.unlink()
            deleted += 1
        except OSError as exc:
            problems += 1
            print(f"error: could not delete a removed mailbox: {exc}", file=sys.stderr)
    for m in todo.keep_readded:
        m.path.unlink(missing_ok=True)
    if todo.unknown:
        problems += len(todo.unknown)
        print(f"error: the userdb did not answer for {len(todo.unknown)} due mailbox(es); "
              "kept until the next run", file=sys.stderr)
    log(f"mailbox purge: deleted={deleted} kept_readded={len(todo.keep_readded)} "
        f"waiting={len(todo.waiting)} unknown={len(todo.unknown)} problems={problems}")
    return 1 if problems else 0


def _syslog(text: str) -> None:
    import syslog

    syslog.openlog(SYSLOG_TAG, 0, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_NOTICE, text)
    syslog.closelog()


DEFAULT_CONFIG = Path("/etc/safemail/mailbox-purge.json")


def load_config(path: Path) -> tuple[Path, int]:
    """(mail root, keep days) from the role's settings file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    root, keep = data.get("mail_root"), data.get("keep_days")
    if not isinstance(root, str) or not root.startswith("/"):
        raise ValueError("mail_root must be an absolute path")
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise ValueError("keep_days must be a whole number >= 0")
    return Path(root), keep


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safemail-mailbox-purge",
        description="Delete mailboxes of removed participants whose keeping period is over "
        "(markers in <mail root>/.safemail-removed/, written by participant-remove.yml).",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help=f"JSON with mail_root and keep_days (default {DEFAULT_CONFIG})")
    parser.add_argument("--mail-root", type=Path, default=None,
                        help="another mail root than the config's (a test copy)")
    parser.add_argument("--now", default=None,
                        help="act as if it were this ISO time (tests: a copy moved forward)")
    parser.add_argument("--no-syslog", action="store_true", help="print the log line instead")
    args = parser.parse_args(argv)
    try:
        root, keep_days = load_config(args.config)
        now = _time(args.now, "--now") if args.now else dt.datetime.now(dt.UTC)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("hint: the mailstore role writes /etc/safemail/mailbox-purge.json", file=sys.stderr)
        return 2
    root = args.mail_root or root
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        print("hint: is the encrypted volume open and mounted?", file=sys.stderr)
        return 2
    log = print if args.no_syslog else _syslog
    return run(root, now, keep_days, _doveadm_user, log)


if __name__ == "__main__":
    sys.exit(main())
