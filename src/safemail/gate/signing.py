"""SSH signatures (``ssh-keygen -Y``) and SSH key fingerprints: the bottom layer of release trust.

Approvers sign with their own SSH keys; signatures are checked against an ``allowed_signers``
file (OpenSSH's format, see ssh-keygen(1) "ALLOWED SIGNERS"). ``safemail verify`` seals its
report with the stage's own SSH identity (the key that reaches the stage's hosts). Nothing
here decides whether a signature is enough: that is :mod:`safemail.gate.approvals`.

Fingerprints are OpenSSH's ``SHA256:<base64 without padding>`` of the public key blob, so they
compare equal to what ``ssh-keygen -lf`` prints.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safemail.errors import SafeMailError

ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
ARMOR_END = "-----END SSH SIGNATURE-----"


class SigningError(SafeMailError):
    """A signature cannot be made or read."""


def fingerprint_of_blob(blob: bytes) -> str:
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def fingerprint_of_public_key(line: str) -> str | None:
    """Fingerprint of an OpenSSH public key line (``type base64 [comment]``, options allowed
    in front as in known_hosts or allowed_signers); None if the line holds no key."""
    for index, part in enumerate(parts := line.split()):
        if part.startswith(("ssh-", "ecdsa-", "sk-")) and index + 1 < len(parts):
            try:
                return fingerprint_of_blob(base64.b64decode(parts[index + 1], validate=True))
            except (binascii.Error, ValueError):
                return None
    return None


def known_hosts_fingerprints(text: str, names: Iterable[str]) -> dict[str, set[str]]:
    """Fingerprints per host name from a known_hosts text (plain, not hashed, host lists).

    Markers (@revoked, @cert-authority) are not host keys and are skipped.
    """
    wanted = set(names)
    found: dict[str, set[str]] = {n: set() for n in wanted}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "@")):
            continue
        hosts, _, rest = line.partition(" ")
        fp = fingerprint_of_public_key(rest)
        if fp is None:
            continue
        for host in hosts.split(","):
            host = host.strip("[]").split("]:")[0]
            if host in wanted:
                found[host].add(fp)
    return found


def _ssh_keygen() -> str:
    found = shutil.which("ssh-keygen")
    if not found:
        raise SigningError(
            "ssh-keygen not found",
            "install OpenSSH's client tools (apt-get install openssh-client)",
        )
    return found


def _run(args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            [_ssh_keygen(), *args], input=data, capture_output=True, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SigningError(f"cannot run ssh-keygen {' '.join(args[:2])}: {exc}") from exc


def sign(key: Path, namespace: str, data: bytes) -> str:
    """An armored SSH signature of ``data`` with the private key file ``key``."""
    proc = _run(["-Y", "sign", "-q", "-f", str(key), "-n", namespace], data)
    text = proc.stdout.decode("ascii", errors="replace")
    if proc.returncode != 0 or ARMOR_BEGIN not in text:
        raise SigningError(
            f"ssh-keygen could not sign with {key}: "
            f"{proc.stderr.decode(errors='replace').strip() or proc.returncode}",
            "is the key readable (and the agent unlocked)?",
        )
    return text


@dataclass(frozen=True)
class SignatureInfo:
    """What an armored signature says about itself (not yet whether it is valid)."""

    namespace: str
    key_fingerprint: str


def _read_string(blob: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(blob):
        raise ValueError("truncated")
    size = int.from_bytes(blob[pos : pos + 4], "big")
    end = pos + 4 + size
    if end > len(blob):
        raise ValueError("truncated")
    return blob[pos + 4 : end], end


def signature_info(armored: str) -> SignatureInfo:
    """Namespace and signer key fingerprint of an SSHSIG (PROTOCOL.sshsig); SigningError if it
    is not one."""
    text = armored.strip()
    if not text.startswith(ARMOR_BEGIN) or not text.endswith(ARMOR_END):
        raise SigningError("not an SSH signature (no BEGIN/END SSH SIGNATURE lines)")
    body = "".join(text[len(ARMOR_BEGIN) : -len(ARMOR_END)].split())
    try:
        blob = base64.b64decode(body, validate=True)
        if not blob.startswith(b"SSHSIG"):
            raise ValueError("bad magic")
        pos = 6 + 4  # magic, version
        public_key, pos = _read_string(blob, pos)
        namespace, pos = _read_string(blob, pos)
    except (binascii.Error, ValueError) as exc:
        raise SigningError(f"unreadable SSH signature: {exc}") from exc
    return SignatureInfo(namespace.decode("utf-8", "replace"), fingerprint_of_blob(public_key))


def find_principals(allowed_signers: Path, armored: str) -> list[str]:
    """Principals of ``allowed_signers`` whose key made the signature (not yet verified)."""
    with tempfile.TemporaryDirectory(prefix="safemail-sig-") as tmp:
        sig = Path(tmp) / "msg.sig"
        sig.write_text(armored.strip() + "\n", encoding="ascii")
        proc = _run(["-Y", "find-principals", "-s", str(sig), "-f", str(allowed_signers)], b"")
    if proc.returncode != 0:
        return []
    return [p for p in proc.stdout.decode("utf-8", "replace").split() if p]


def verify(
    allowed_signers: Path, principal: str, namespace: str, armored: str, data: bytes
) -> bool:
    """True if ``armored`` is ``principal``'s valid signature of ``data`` in ``namespace``."""
    with tempfile.TemporaryDirectory(prefix="safemail-sig-") as tmp:
        sig = Path(tmp) / "msg.sig"
        sig.write_text(armored.strip() + "\n", encoding="ascii")
        proc = _run(
            [
                "-Y", "verify", "-f", str(allowed_signers), "-I", principal,
                "-n", namespace, "-s", str(sig),
            ],
            data,
        )
    return proc.returncode == 0


def verify_with_key(public_key: str, namespace: str, armored: str, data: bytes) -> bool:
    """True if ``armored`` is a valid signature of ``data`` by exactly this public key."""
    fields = public_key.split()
    if len(fields) < 2:
        return False
    with tempfile.TemporaryDirectory(prefix="safemail-sig-") as tmp:
        signers = Path(tmp) / "allowed_signers"
        signers.write_text(f"stage {fields[0]} {fields[1]}\n", encoding="ascii")
        return verify(signers, "stage", namespace, armored, data)
