"""Running system commands for the lab: quiet when they work, clear when they fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from safemail.errors import SafeMailError

# Tool -> Debian package, for the "not installed" hint.
TOOL_PACKAGES = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "qemu-system-x86_64": "qemu-system-x86",
    "mkfs.ext4": "e2fsprogs",
    "apt-ftparchive": "apt-utils",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "nft": "nftables",
}


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = sorted({TOOL_PACKAGES.get(t, t) for t in missing})
        raise SafeMailError(
            f"{', '.join(missing)} not installed",
            hint=f"run `make setup` (or apt-get install {' '.join(pkgs)})",
        )


def require_root() -> None:
    import os

    if os.geteuid() != 0:
        raise SafeMailError("the lab needs root (network namespaces, machines, mounts)",
                            hint="run it as root, e.g. sudo safemail lab up")


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None,
        capture: bool = True, timeout: float | None = 120,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a short command; on failure raise with the command and its stderr."""
    try:
        proc = subprocess.run(list(cmd), input=input, text=True, timeout=timeout,
                              capture_output=capture, cwd=cwd)
    except FileNotFoundError as exc:
        require_tools(cmd[0])
        raise SafeMailError(f"cannot run {cmd[0]}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise SafeMailError(f"`{' '.join(cmd)}` did not finish within {timeout} s") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip()
        raise SafeMailError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {detail}")
    return proc


def run_logged(title: str, cmd: Sequence[str], log: Path, *, hints: dict[str, str] | None = None,
               timeout: float = 3600, heartbeat: float = 15.0) -> None:
    """Run a long step with its output in `log`, a heartbeat on stderr, the log tail on failure.

    `hints` maps a text that may appear in the log to the advice shown when it does.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    info(f"  {title} ...")
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        next_beat = start + heartbeat
        while proc.poll() is None:
            time.sleep(0.5)
            now = time.monotonic()
            if now - start > timeout:
                proc.kill()
                proc.wait()
                raise SafeMailError(f"{title}: no result after {timeout:.0f} s",
                                    hint=f"see {log}")
            if now >= next_beat:
                info(f"    ... {title}: {now - start:.0f} s")
                next_beat = now + heartbeat
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        text = log.read_text(errors="replace")
        tail = "\n".join(text.splitlines()[-15:])
        hint = f"full log: {log}"
        for needle, advice in (hints or {}).items():
            if needle in text:
                hint = f"{advice} (full log: {log})"
                break
        raise SafeMailError(f"{title} failed (exit {proc.returncode}) after {elapsed:.0f} s:\n"
                            f"{tail}", hint=hint)
    info(f"  {title}: done in {elapsed:.0f} s")
