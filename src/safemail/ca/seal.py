"""The journal sealer: a separate account signs each CA journal entry (CA-05, issue 18).

Why: the CA account writes the journal. A key that account can read (the old HMAC key in its
state directory) lets it, or anyone who takes it over, rewrite the journal and re-sign it. The
sealer runs as its own system user (``safemail-ca-seal``) with its own state directory::

    seal.key      Ed25519 private key (0600, sealer only; made on the host; leaves it only
                  inside the signer's encrypted backup, docs/availability.md)
    head.json     the last sealed head {"host","seq","hash","sig","time"} (0644, public)
    seal.lock     serialises sealing

It signs an entry only if it is the *continuation* of the head it sealed last (seq + 1 and
``prev_hash`` = the last hash), after recomputing the entry's hash itself. So the CA account
can still append, but cannot get a second version of an entry sealed, nor re-seal a rewritten
history. After each seal the head goes to syslog as ``safemail-ca-seal`` (the admin log, which
the CA account cannot write) and into ``head.json``, from where the controller collects it
(``playbooks/ca-journal-check.yml``). Root on the host can read the seal key: against root, the
heads already held off the host (controller) are the evidence (``journal.check_heads``).

Transport: a UNIX socket that only the CA account (and root) may connect to; systemd starts one
``safemail ca journal seal-serve`` per connection as the sealer user (socket activation,
``Accept=yes``), which reads one entry line and answers one JSON line.
"""

from __future__ import annotations

import json
import os
import socket
import syslog
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from safemail.ca import _fs
from safemail.ca.errors import CaError
from safemail.ca.journal import GENESIS, HOSTNAME_RE, JournalKey, entry_hash

MAX_LINE = 8192
SYSLOG_IDENT = "safemail-ca-seal"


class Sealer:
    """The sealer's side: its state directory, its key, its last head."""

    def __init__(self, state_dir: Path, *, log: bool | Callable[[str], None] = True) -> None:
        self.state_dir = state_dir
        self.key_path = state_dir / "seal.key"
        self.head_path = state_dir / "head.json"
        self.heads_path = state_dir / "heads.jsonl"
        self._lock = state_dir / "seal.lock"
        self.log = log

    def keygen(self, public_path: Path | None = None) -> bool:
        """Create the seal key once (never overwritten); write the public key. True if new."""
        created = False
        if not self.key_path.exists():
            key = ed25519.Ed25519PrivateKey.generate()
            _fs.create_exclusive(
                self.key_path,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                0o600,
            )
            created = True
        if public_path is not None:
            pub = self._key().public_key()
            data = pub.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if not public_path.exists() or public_path.read_bytes() != data:
                _fs.atomic_write_bytes(public_path, data, 0o644)
        return created

    def _key(self) -> ed25519.Ed25519PrivateKey:
        try:
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except OSError as exc:
            raise CaError(
                f"cannot read the seal key {self.key_path}: {exc.strerror}",
                "run 'safemail ca journal seal-keygen' as the sealer user (the ca_hosts role does)",
            ) from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise CaError(f"{self.key_path} is not an Ed25519 key")
        return key

    def head(self) -> dict[str, Any] | None:
        if not self.head_path.exists():
            return None
        return _fs.read_json(self.head_path)  # type: ignore[no-any-return]

    def seal(self, line: bytes) -> dict[str, str]:
        """Seal one journal entry (its JSON line, without ``sig``); return the signature."""
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise CaError("the entry to seal is not JSON") from exc
        if not isinstance(entry, dict) or "sig" in entry:
            raise CaError("the entry to seal is not an unsealed journal entry")
        try:
            seq, prev, digest = int(entry["seq"]), str(entry["prev_hash"]), str(entry["hash"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CaError("the entry to seal lacks seq, prev_hash or hash") from exc
        if entry_hash(entry) != digest:
            raise CaError("the entry's hash does not match its content; not sealed")
        host = entry.get("host") or ""
        if not isinstance(host, str) or (host and not HOSTNAME_RE.match(host)):
            # The host goes into the admin-log line below: a crafted one could make that line
            # read as another (older) head, or split it.
            # Not echoed: the CA account's error output reaches the admin log too.
            raise CaError("the entry's host is not a host name; not sealed")
        with _fs.locked(self._lock):
            last = self.head()
            adopted = False
            if last is None:
                # First seal on this host: a fresh journal, or one written before sealing
                # existed (its history is then pinned by this entry's prev_hash).
                adopted = not (seq == 1 and prev == GENESIS)
            elif seq != int(last["seq"]) + 1 or prev != last["hash"]:
                raise CaError(
                    f"refusing to seal seq {seq}: the last sealed entry is seq {last['seq']} "
                    f"({str(last['hash'])[:16]}...); a journal entry may be sealed once, in order",
                    "someone tried to seal a rewritten or reordered journal: run "
                    "'safemail ca verify-journal' and report the finding",
                )
            sig = JournalKey(ed_private=self._key()).sign(digest)
            head = {
                "host": host,
                "seq": seq,
                "hash": digest,
                "sig": sig,
                "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            line_out = json.dumps(head, sort_keys=True, separators=(",", ":")) + "\n"
            _fs.atomic_write_bytes(self.head_path, line_out.encode(), 0o644)
            with self.heads_path.open("a", encoding="utf-8") as fh:
                fh.write(line_out)
        text = f"journal head host={host or '-'} seq={seq} hash={digest} sig={sig['value']}" + (
            " (first seal, earlier entries adopted)" if adopted else ""
        )
        if callable(self.log):
            self.log(text)  # the service: stderr -> journald as safemail-ca-seal -> admin log
        elif self.log:
            syslog.openlog(SYSLOG_IDENT, 0, syslog.LOG_AUTHPRIV)
            syslog.syslog(syslog.LOG_NOTICE, text)
        return sig


def serve(sealer: Sealer, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Answer one request on a socket-activated connection: entry line in, JSON line out."""
    line = stdin.readline(MAX_LINE + 1)
    try:
        if len(line) > MAX_LINE:
            raise CaError("the entry to seal is too long")
        reply: dict[str, Any] = {"sig": sealer.seal(line)}
        code = 0
    except CaError as exc:
        reply = {"error": exc.message}
        code = 3
    stdout.write(json.dumps(reply).encode() + b"\n")
    stdout.flush()
    return code


class SocketSealer:
    """The CA account's side: ask the sealer over its UNIX socket (journal ``key=``)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def seal(self, entry: dict[str, Any]) -> dict[str, str]:
        body = {k: v for k, v in entry.items() if k != "sig"}
        line = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(os.fspath(self.path))
                s.sendall(line.encode() + b"\n")
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
        except OSError as exc:
            raise CaError(
                f"the journal sealer at {self.path} did not answer: {exc}",
                "check 'systemctl status safemail-ca-seal.socket'; CA steps are not taken "
                "without a sealed journal entry",
            ) from exc
        try:
            reply = json.loads(data)
        except ValueError as exc:
            raise CaError("the journal sealer's answer is not JSON") from exc
        if "error" in reply or "sig" not in reply:
            raise CaError(f"the journal sealer refused: {reply.get('error', reply)}")
        return reply["sig"]  # type: ignore[no-any-return]
