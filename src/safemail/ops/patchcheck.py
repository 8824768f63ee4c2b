"""The host-side patch watcher: which updates are pending, security first. Installs nothing.

Runs on every service host from a systemd timer (role ``patch_monitor``). It refreshes the apt
lists from the internal mirror (the hosts' only source), simulates an upgrade with
``apt-get -s upgrade --with-new-pkgs`` (what a patch run applies) and writes what it found to
``/var/lib/safemail/patch-status.json`` plus one line to syslog (tag ``safemail-patch-check``,
which the admin log collects).

This file is copied to the hosts as a standalone script and run by Debian's ``/usr/bin/python3``:
it imports nothing but the standard library. The parsing is pure and unit-tested
(tests/test_ops_patchcheck.py); the I/O sits in :func:`run_check` and :func:`main`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
DEFAULT_STATUS = Path("/var/lib/safemail/patch-status.json")
REBOOT_FLAG = Path("/run/reboot-required")
REBOOT_PKGS = Path("/run/reboot-required.pkgs")
SYSLOG_TAG = "safemail-patch-check"
# Origins whose origin, label or suite contain this are security updates (as Debian's
# "Debian-Security:12/stable-security" and unattended-upgrades' own rule).
SECURITY_MARK = "security"

# "Inst NAME [INSTALLED] (CANDIDATE ORIGIN, ORIGIN [ARCH])"; a new package has no [INSTALLED].
_INST = re.compile(
    r"^Inst (?P<name>\S+)"
    r"(?: \[(?P<installed>[^\]]*)\])?"
    r" \((?P<candidate>\S+)(?P<origins>.*?)(?: \[(?P<arch>[^\]]+)\])?\)"
)


class CheckError(Exception):
    """The check could not run (apt failed); the status records the message."""


@dataclass(frozen=True)
class Pending:
    package: str
    installed: str | None
    candidate: str
    origins: tuple[str, ...]
    security: bool
    arch: str | None = None


@dataclass
class Status:
    host: str
    checked_at: str
    ok: bool
    pending: list[Pending] = field(default_factory=list)
    reboot_required: bool = False
    reboot_packages: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = SCHEMA
        data["pending"] = [
            {**asdict(p), "origins": list(p.origins)} for p in self.pending
        ]
        data["pending_count"] = len(self.pending)
        data["security_count"] = sum(1 for p in self.pending if p.security)
        return data


def is_security(origins: Iterable[str]) -> bool:
    """True if any origin (``Origin:Version/Suite``) names a security archive."""
    return any(SECURITY_MARK in o.lower() for o in origins)


def parse_simulation(output: str) -> list[Pending]:
    """Pending upgrades from ``apt-get -s upgrade`` output (LC_ALL=C), security first.

    Only ``Inst`` lines count; ``Conf``/``Remv`` and chatter are ignored. An unparseable
    ``Inst`` line raises ValueError: better a failed check than a silently short list.
    """
    found: dict[str, Pending] = {}
    for line in output.splitlines():
        if not line.startswith("Inst "):
            continue
        match = _INST.match(line.strip())
        if match is None:
            raise ValueError(f"unexpected apt-get simulation line: {line!r}")
        origins = tuple(o.strip() for o in match["origins"].split(",") if o.strip())
        found[match["name"]] = Pending(
            package=match["name"],
            installed=match["installed"] or None,
            candidate=match["candidate"],
            origins=origins,
            security=is_security(origins),
            arch=match["arch"],
        )
    return sorted(found.values(), key=lambda p: (not p.security, p.package))


def parse_reboot_packages(text: str) -> list[str]:
    return sorted({line.strip() for line in text.splitlines() if line.strip()})


def summary_line(status: Status) -> str:
    """The one syslog line per check: counts and package names, nothing else."""
    if not status.ok:
        return f"patch check failed: {status.error}"
    sec = [p.package for p in status.pending if p.security]
    other = [p.package for p in status.pending if not p.security]
    return (
        f"patch check: pending={len(status.pending)} security={len(sec)} "
        f"reboot_required={'yes' if status.reboot_required else 'no'}"
        + (f" security_packages={','.join(sec)}" if sec else "")
        + (f" other_packages={','.join(other)}" if other else "")
    )


def build_status(
    host: str,
    now: dt.datetime,
    simulation: str | None,
    *,
    reboot_flag: bool,
    reboot_pkgs: str = "",
    error: str | None = None,
) -> Status:
    """The status record from the check's raw inputs (pure)."""
    checked_at = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if error is not None or simulation is None:
        return Status(host, checked_at, ok=False, reboot_required=reboot_flag,
                      reboot_packages=parse_reboot_packages(reboot_pkgs),
                      error=error or "no simulation output")
    try:
        pending = parse_simulation(simulation)
    except ValueError as exc:
        return Status(host, checked_at, ok=False, reboot_required=reboot_flag, error=str(exc))
    return Status(host, checked_at, ok=True, pending=pending, reboot_required=reboot_flag,
                  reboot_packages=parse_reboot_packages(reboot_pkgs))


def load_status(data: Mapping[str, Any]) -> Status:
    """Read a status JSON document back (the controller uses this)."""
    if data.get("schema") != SCHEMA:
        raise ValueError(f"unknown patch status schema {data.get('schema')!r}")
    pending = [
        Pending(p["package"], p.get("installed"), p["candidate"], tuple(p.get("origins", ())),
                bool(p.get("security")), p.get("arch"))
        for p in data.get("pending", [])
    ]
    return Status(
        host=str(data["host"]),
        checked_at=str(data["checked_at"]),
        ok=bool(data["ok"]),
        pending=pending,
        reboot_required=bool(data.get("reboot_required")),
        reboot_packages=list(data.get("reboot_packages", [])),
        error=data.get("error"),
    )


# --- I/O edge -------------------------------------------------------------------------------

APT_ENV = {"LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
APT_OPTS = ("-o", "DPkg::Lock::Timeout=300", "-o", "Acquire::Retries=2")


def _apt(args: Sequence[str], timeout: int) -> str:
    env = {**os.environ, **APT_ENV}
    try:
        proc = subprocess.run(["apt-get", *APT_OPTS, *args], capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CheckError(f"apt-get {' '.join(args)}: {exc}") from exc
    # apt-get update exits 0 with "W:"/"E:" lines for unreachable sources: treat E: as failure.
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")]
    if proc.returncode != 0 or errors:
        detail = "; ".join(errors) or proc.stderr.strip()[-300:]
        raise CheckError(f"apt-get {' '.join(args)} failed (rc={proc.returncode}): {detail}")
    return proc.stdout


def run_check(*, refresh: bool = True) -> Status:
    host = socket.gethostname()
    now = dt.datetime.now(dt.UTC)
    reboot = REBOOT_FLAG.exists()
    reboot_pkgs = REBOOT_PKGS.read_text() if REBOOT_PKGS.exists() else ""
    try:
        if refresh:
            _apt(["-q", "update"], timeout=600)
        # Simulation only (-s): apt takes no lock and changes nothing.
        simulation = _apt(["-s", "-q", "upgrade", "--with-new-pkgs"], timeout=300)
    except CheckError as exc:
        return build_status(host, now, None, reboot_flag=reboot, reboot_pkgs=reboot_pkgs,
                            error=str(exc))
    return build_status(host, now, simulation, reboot_flag=reboot, reboot_pkgs=reboot_pkgs)


def write_status(status: Status, path: Path) -> None:
    """Write atomically (readers never see half a file), mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".patch-status-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(status.to_json(), handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def log_line(text: str) -> None:
    import syslog

    syslog.openlog(SYSLOG_TAG, 0, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_NOTICE, text)
    syslog.closelog()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safemail-patch-check",
        description="Refresh apt lists and record pending updates (security first). "
                    "Installs nothing.",
    )
    parser.add_argument("--status-file", type=Path, default=DEFAULT_STATUS,
                        help=f"where to write the status (default {DEFAULT_STATUS})")
    parser.add_argument("--no-refresh", action="store_true",
                        help="do not run apt-get update (use the current lists)")
    parser.add_argument("--no-syslog", action="store_true", help="do not write the log line")
    args = parser.parse_args(argv)
    status = run_check(refresh=not args.no_refresh)
    write_status(status, args.status_file)
    line = summary_line(status)
    if not args.no_syslog:
        log_line(line)
    print(line)
    return 0 if status.ok else 1


if __name__ == "__main__":
    sys.exit(main())
