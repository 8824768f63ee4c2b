"""Tamper-evident, hash-chained journal of CA process runs (requirement CA-05).

One JSON object per line::

    {"seq": 3, "time": "2025-...Z", "host": "ca-ra", "action": "approve", "actor": "alice",
     "participant": "123456789", "request": "9f...", "prev_hash": "<hash of seq 2>",
     "hash": "<sha256>", "sig": {"alg": "hmac-sha256", "value": "..."}}

``hash`` is SHA-256 over the canonical JSON (sorted keys, no spaces, UTF-8) of the entry
without ``hash`` and ``sig``; ``prev_hash`` links to the previous entry (64 zeros for the
first). With a host journal key, ``sig`` authenticates ``hash``: HMAC-SHA256 with a secret, or
Ed25519 with a private key (verified with the public key), so that rewriting the file and
recomputing all hashes is detected too.

Entries carry only minimal subject fields (participant number, serial, mailbox, request id and
a short detail); any other field, and anything that looks like key material, is refused.

Sealing (issue 18): on the CA hosts the entries are sealed by a separate account
(:mod:`safemail.ca.seal`): an Ed25519 signature made with a key the CA account cannot read,
by a helper that signs only the continuation of the head it sealed last. Verified with the
public key (``--key journal-seal.pub``): from the first sealed entry on, every entry must
carry a valid seal; older entries (HMAC-signed or unsigned, from before sealing) are held by
the chain, since the first sealed entry's ``prev_hash`` pins them.

A chain cannot show that its *last* entries were cut off, and whoever holds the seal key
(root on the host) can rewrite and re-seal everything. Both are caught by heads exported off
the host: :func:`check_heads` compares the journal with every head (seq, hash, seal) seen
before, e.g. collected on the controller (``safemail ca verify-journal --heads``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from safemail.ca.errors import CaError

GENESIS = "0" * 64
SUBJECT_FIELDS = ("participant", "serial", "mailbox", "request", "detail")
_CORE_FIELDS = ("seq", "time", "host", "action", "actor", "prev_hash")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
_FORBIDDEN_CONTENT = re.compile(r"-----BEGIN|PRIVATE KEY", re.IGNORECASE)
_MAX_VALUE_LEN = 200


class JournalKey:
    """A host journal key: an HMAC secret, or an Ed25519 private or public key."""

    def __init__(
        self,
        *,
        hmac_secret: bytes | None = None,
        ed_private: ed25519.Ed25519PrivateKey | None = None,
        ed_public: ed25519.Ed25519PublicKey | None = None,
    ) -> None:
        if ed_private is not None and ed_public is None:
            ed_public = ed_private.public_key()
        self.hmac_secret = hmac_secret
        self.ed_private = ed_private
        self.ed_public = ed_public

    @property
    def alg(self) -> str:
        return "hmac-sha256" if self.hmac_secret is not None else "ed25519"

    @classmethod
    def load(cls, path: Path) -> JournalKey:
        """Load a key file: Ed25519 PEM (private or public) or a hex HMAC secret (>= 32 bytes)."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CaError(f"cannot read journal key {path}: {exc.strerror}") from exc
        if b"-----BEGIN" in raw:
            try:
                if b"PRIVATE KEY" in raw:
                    priv = serialization.load_pem_private_key(raw, password=None)
                    if isinstance(priv, ed25519.Ed25519PrivateKey):
                        return cls(ed_private=priv)
                else:
                    pub = serialization.load_pem_public_key(raw)
                    if isinstance(pub, ed25519.Ed25519PublicKey):
                        return cls(ed_public=pub)
            except ValueError as exc:
                raise CaError(f"journal key {path} is not a readable PEM key") from exc
            raise CaError(f"journal key {path} is a PEM key but not Ed25519")
        try:
            secret = bytes.fromhex(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise CaError(
                f"journal key {path} is neither an Ed25519 PEM key nor a hex HMAC secret"
            ) from exc
        if len(secret) < 32:
            raise CaError(f"journal HMAC secret in {path} is shorter than 32 bytes")
        return cls(hmac_secret=secret)

    def sign(self, digest_hex: str) -> dict[str, str]:
        msg = digest_hex.encode("ascii")
        if self.hmac_secret is not None:
            mac = hmac.new(self.hmac_secret, msg, hashlib.sha256).digest()
            return {"alg": "hmac-sha256", "value": base64.b64encode(mac).decode()}
        if self.ed_private is None:
            raise CaError("an Ed25519 public key can verify the journal but not sign it")
        return {"alg": "ed25519", "value": base64.b64encode(self.ed_private.sign(msg)).decode()}

    def seal(self, entry: dict[str, Any]) -> dict[str, str]:
        """Seal one entry (the journal's sealer interface; see safemail.ca.seal)."""
        return self.sign(str(entry["hash"]))

    def check(self, digest_hex: str, sig: Any) -> str | None:
        """Return None if ``sig`` is a valid signature of ``digest_hex``, else what is wrong."""
        if not isinstance(sig, dict) or "value" not in sig:
            return "missing signature"
        if sig.get("alg") != self.alg:
            return f"signature algorithm {sig.get('alg')!r}, expected {self.alg}"
        try:
            value = base64.b64decode(sig["value"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            return "signature is not valid base64"
        msg = digest_hex.encode("ascii")
        if self.hmac_secret is not None:
            good = hmac.new(self.hmac_secret, msg, hashlib.sha256).digest()
            return None if hmac.compare_digest(good, value) else "bad signature"
        assert self.ed_public is not None
        try:
            self.ed_public.verify(value, msg)
        except InvalidSignature:
            return "bad signature"
        return None


def canonical(entry: dict[str, Any]) -> bytes:
    body = {k: v for k, v in entry.items() if k not in ("hash", "sig")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(entry)).hexdigest()


def _check_fields(action: str, actor: str, subject: dict[str, Any]) -> dict[str, str | int]:
    if not _NAME_RE.match(action):
        raise CaError(f"journal action {action!r} is not a short name")
    if not actor or len(actor) > 64 or _FORBIDDEN_CONTENT.search(actor):
        raise CaError(f"journal actor {actor!r} is not a valid operator name")
    out: dict[str, str | int] = {}
    for key, value in subject.items():
        if value is None:
            continue
        if key not in SUBJECT_FIELDS:
            raise CaError(
                f"journal field {key!r} is not allowed",
                f"journal entries carry only {', '.join(SUBJECT_FIELDS)}",
            )
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise CaError(f"journal field {key!r} must be text or a number")
        if isinstance(value, str) and (
            len(value) > _MAX_VALUE_LEN or _FORBIDDEN_CONTENT.search(value)
        ):
            raise CaError(f"journal field {key!r} is too long or looks like key material")
        out[key] = value
    return out


def _last_line(fh: Any) -> bytes | None:
    """Return the last non-empty line of an open binary file (reads from the end)."""
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    if end == 0:
        return None
    chunk = 4096
    buf = b""
    pos = end
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        fh.seek(pos)
        buf = fh.read(step) + buf
        stripped = buf.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    return buf.rstrip(b"\n") or None


@contextlib.contextmanager
def _locked_append(path: Path) -> Iterator[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
    with os.fdopen(fd, "r+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield fh
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def append(
    path: Path,
    action: str,
    actor: str,
    *,
    host: str | None = None,
    key: Any = None,
    now: datetime | None = None,
    **subject: Any,
) -> dict[str, Any]:
    """Append one entry under an exclusive lock and return it.

    Safe for concurrent appenders (processes or threads): the lock covers reading the last
    entry and writing the new one. The write is flushed to disk before the lock is released.
    """
    fields = _check_fields(action, actor, subject)
    with _locked_append(path) as fh:
        last = _last_line(fh)
        if last is None:
            seq, prev = 1, GENESIS
        else:
            try:
                prev_entry = json.loads(last)
                seq, prev = int(prev_entry["seq"]) + 1, str(prev_entry["hash"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CaError(
                    f"the last line of journal {path} is damaged; refusing to append",
                    f"run 'safemail ca journal verify {path}' and report the finding",
                ) from exc
        entry: dict[str, Any] = {
            "seq": seq,
            "time": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "host": host or socket.gethostname(),
            "action": action,
            "actor": actor,
            **fields,
            "prev_hash": prev,
        }
        entry["hash"] = entry_hash(entry)
        if key is not None:
            # JournalKey (a key on this host) or a sealer (safemail.ca.seal.SocketSealer)
            entry["sig"] = key.seal(entry)
        line = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        fh.seek(0, os.SEEK_END)
        fh.write(line.encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    return entry


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`. ``seq`` is the position (1-based) of the first broken entry."""

    ok: bool
    entries: int
    seq: int | None = None
    problem: str | None = None
    head: str | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.entries} entries, chain intact, head {self.head}"
        return f"BROKEN at seq {self.seq}: {self.problem}"


def verify(path: Path, key: JournalKey | None = None) -> VerifyResult:
    """Check the whole chain; return OK or the first broken entry and what is wrong.

    Checks, in this order for each line: valid JSON with all fields, hash matches content
    (``hash mismatch``), sequence number continues (``seq gap``), ``prev_hash`` matches the
    previous entry (``broken link``), and, with ``key``, the signature (``bad signature``).

    With an Ed25519 public key (the seal key), entries from before sealing started are held
    by the chain alone; from the first sealed entry on every entry must be sealed, and so must
    the last one (``not sealed``).
    """
    seal_mode = key is not None and key.hmac_secret is None
    sealed_seen = False
    unsealed_tail: int | None = None
    prev = GENESIS
    count = 0
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CaError(f"journal {path} does not exist") from exc
    for count, raw in enumerate(data.splitlines(), start=1):  # noqa: B007
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict) or any(f not in entry for f in (*_CORE_FIELDS, "hash")):
                raise ValueError("missing fields")
        except ValueError:
            return VerifyResult(False, count - 1, count, "not a complete journal entry")
        found = entry["seq"]
        if entry_hash(entry) != entry["hash"]:
            return VerifyResult(
                False, count - 1, count, f"hash mismatch: entry seq {found} was altered"
            )
        if found != count:
            return VerifyResult(
                False, count - 1, count, f"seq gap: expected seq {count}, found {found}"
            )
        if entry["prev_hash"] != prev:
            return VerifyResult(
                False,
                count - 1,
                count,
                "broken link: prev_hash does not match the previous entry's hash",
            )
        sig = entry.get("sig")
        is_sealed = isinstance(sig, dict) and sig.get("alg") == "ed25519"
        if key is not None and (not seal_mode or is_sealed or sealed_seen):
            problem = key.check(entry["hash"], sig)
            if problem:
                return VerifyResult(False, count - 1, count, problem)
        if seal_mode:
            sealed_seen = sealed_seen or is_sealed
            unsealed_tail = None if is_sealed else (unsealed_tail or count)
        prev = entry["hash"]
    if seal_mode and count and unsealed_tail is not None:
        return VerifyResult(
            False,
            unsealed_tail - 1,
            unsealed_tail,
            f"not sealed: entries from seq {unsealed_tail} on carry no seal signature",
        )
    return VerifyResult(True, count, head=prev)


@dataclass(frozen=True)
class Head:
    """A journal head exported off the host: the sealed (seq, hash) at some moment."""

    seq: int
    hash: str
    sig: dict[str, Any] | None = None
    host: str | None = None
    source: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {"host": self.host, "seq": self.seq, "hash": self.hash, "sig": self.sig},
            sort_keys=True,
            separators=(",", ":"),
        )


# The line the sealer writes to syslog (the admin log) after each sealed entry.
# A journal host name as the sealer accepts it (and writes into its admin-log line): one DNS
# name, labels of letters, digits and inner hyphens; nothing the line parser could misread.
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_HEAD_MARK = "journal head "
# The sealer's admin-log line, matched whole from the mark to the end of the line: a line that
# carries the mark but is not exactly this is a finding (parse_heads raises), never a head.
_HEAD_LOG_RE = re.compile(
    r"journal head host=(?P<host>-|[A-Za-z0-9.-]{1,253}) seq=(?P<seq>\d{1,18}) "
    r"hash=(?P<hash>[0-9a-f]{64}) sig=(?P<sig>[A-Za-z0-9+/]{86}==)"
    r"(?: \(first seal, earlier entries adopted\))?$"
)


def parse_heads(text: str, source: str = "") -> list[Head]:
    """Heads from a heads file: JSON lines (head.json, a heads store) or admin-log lines."""
    heads = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        mark = line.find(_HEAD_MARK)
        if mark >= 0 and not line.startswith("{"):
            m = _HEAD_LOG_RE.fullmatch(line, mark)
            if not m or line.count(_HEAD_MARK) != 1:
                raise CaError(
                    f"{source}:{n} is not a journal head as the sealer writes it: {line[:200]!r}",
                    "a line under the sealer's tag that the sealer did not write: find out who "
                    "logged it (any local user can 'logger -t safemail-ca-seal'); docs/ca.md",
                )
            sig = {"alg": "ed25519", "value": m["sig"]}
            heads.append(Head(int(m["seq"]), m["hash"], sig, m["host"], f"{source}:{n}"))
            continue
        if not line.startswith("{"):
            continue  # other admin-log lines
        try:
            d = json.loads(line)
            heads.append(
                Head(int(d["seq"]), str(d["hash"]), d.get("sig"), d.get("host"), f"{source}:{n}")
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CaError(f"{source}:{n} is not a journal head") from exc
    return heads


def check_heads(path: Path, heads: list[Head], key: JournalKey | None = None) -> VerifyResult:
    """Verify the journal, then compare it with heads exported earlier.

    A head whose seq is beyond the journal's end means the journal was truncated; a head whose
    hash differs from the journal's entry at that seq means it was rewritten. With ``key``
    every head's seal is checked too (a forged head is a finding of its own).
    """
    result = verify(path, key)
    if not result.ok:
        return result
    hashes = [json.loads(raw)["hash"] for raw in path.read_bytes().splitlines()]
    for h in sorted(heads, key=lambda x: x.seq):
        if key is not None and h.sig is not None:
            problem = key.check(h.hash, h.sig)
            if problem:
                return VerifyResult(
                    False, result.entries, h.seq, f"exported head {h.source}: {problem}"
                )
        if h.seq > len(hashes):
            return VerifyResult(
                False,
                result.entries,
                h.seq,
                f"truncated: head seq {h.seq} was exported ({h.source}) but the journal ends "
                f"at seq {len(hashes)}",
            )
        if h.seq >= 1 and hashes[h.seq - 1] != h.hash:
            return VerifyResult(
                False,
                result.entries,
                h.seq,
                f"rewritten: entry seq {h.seq} differs from the head exported ({h.source})",
            )
    return result


def head(path: Path) -> tuple[int, str]:
    """Return (seq, hash) of the last entry, or (0, GENESIS) for an empty journal."""
    if not path.exists():
        return 0, GENESIS
    with path.open("rb") as fh:
        last = _last_line(fh)
    if last is None:
        return 0, GENESIS
    entry = json.loads(last)
    return int(entry["seq"]), str(entry["hash"])


def generate_hmac_key(path: Path) -> None:
    """Write a new random 32-byte HMAC journal key (hex, mode 0600); never overwrite one."""
    from safemail.ca._fs import create_exclusive

    create_exclusive(path, os.urandom(32).hex().encode() + b"\n", 0o600)


class Journal:
    """A host's journal: path, host name and optional key or sealer bound together."""

    def __init__(self, path: Path, host: str | None = None, key: Any = None):
        self.path = path
        self.host = host
        self.key = key

    def record(self, action: str, actor: str, **subject: Any) -> dict[str, Any]:
        return append(self.path, action, actor, host=self.host, key=self.key, **subject)
