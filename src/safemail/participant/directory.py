"""Recipient certificates from the SafeMail directory (LDAP, StartTLS, bound as the participant).

The CA's distribution host publishes each participant's certificate into the directory
(``userCertificate;binary`` of ``uid=<number>,ou=participants,<base>``); the directory lets a
participant, bound as its own entry, read other participants' ``mail``, ``cn`` and
certificate and nothing else (roles/auth). This module is the client side of that lookup.

It speaks the three LDAPv3 operations it needs (RFC 4511: StartTLS, simple bind, one-level
search with an equality filter) over the standard library's socket and ssl, so the participant
hosts need no further package. TLS is mandatory (StartTLS on ``ldap://``, or ``ldaps://``) and
the server is verified against a CA file; the bind password never travels before TLS is up.

:func:`encode_*` and :func:`decode_message` are pure (unit-tested byte for byte);
:class:`LdapCertificateDirectory` is the network edge.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from safemail.errors import SafeMailError
from safemail.participant.message import certificate_mailboxes

__all__ = [
    "CERT_ATTRIBUTE",
    "DirectoryConfig",
    "LdapCertificateDirectory",
    "LdapMessage",
    "decode_message",
    "encode_bind",
    "encode_search",
    "encode_starttls",
    "encode_unbind",
    "parent_dn",
]

CERT_ATTRIBUTE = "userCertificate;binary"
STARTTLS_OID = "1.3.6.1.4.1.1466.20037"
_MAX_MESSAGE = 16 * 1024 * 1024  # a search answer with a few certificates is a few KB

# Result codes worth a specific hint (RFC 4511 appendix A).
_RESULT_HINTS = {
    13: ("the directory requires TLS", "this client always starts TLS; check the URI"),
    32: ("the search base does not exist", "check --directory-base"),
    34: ("the DN is not valid", "check --directory-bind-dn / --directory-base"),
    49: ("the directory refused the bind (wrong DN or password)",
         "bind as your participant entry (uid=NUMBER,ou=participants,...) with your mail "
         "password"),
    50: ("the directory denied access", "bind as a participant entry, not anonymously"),
}

# --- BER (the subset LDAP uses: low tag numbers, definite lengths) -------------------------

_SEQUENCE, _SET, _INTEGER, _OCTETS, _ENUM, _BOOL = 0x30, 0x31, 0x02, 0x04, 0x0A, 0x01
_APP_BIND_REQ, _APP_BIND_RESP, _APP_UNBIND = 0x60, 0x61, 0x42
_APP_SEARCH_REQ, _APP_SEARCH_ENTRY, _APP_SEARCH_DONE, _APP_SEARCH_REF = 0x63, 0x64, 0x65, 0x73
_APP_EXT_REQ, _APP_EXT_RESP = 0x77, 0x78
_CTX_SIMPLE, _CTX_EXT_NAME, _FILTER_EQUALITY = 0x80, 0x80, 0xA3


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _length(len(value)) + value


def _int(tag: int, n: int) -> bytes:
    return _tlv(tag, n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big", signed=True))


def _str(value: str | bytes, tag: int = _OCTETS) -> bytes:
    return _tlv(tag, value.encode("utf-8") if isinstance(value, str) else value)


def _message(message_id: int, op: bytes) -> bytes:
    return _tlv(_SEQUENCE, _int(_INTEGER, message_id) + op)


def encode_starttls(message_id: int) -> bytes:
    """ExtendedRequest for StartTLS (RFC 4511 4.14)."""
    return _message(message_id, _tlv(_APP_EXT_REQ, _str(STARTTLS_OID, _CTX_EXT_NAME)))


def encode_bind(message_id: int, dn: str, password: str) -> bytes:
    """LDAPv3 simple BindRequest."""
    body = _int(_INTEGER, 3) + _str(dn) + _str(password, _CTX_SIMPLE)
    return _message(message_id, _tlv(_APP_BIND_REQ, body))


def encode_search(
    message_id: int, base: str, attribute: str, value: str, attributes: Iterable[str],
    *, size_limit: int = 10, time_limit: int = 30,
) -> bytes:
    """A one-level SearchRequest with the filter ``(attribute=value)``.

    The value travels as the raw octets of an equality assertion, so no filter escaping is
    involved (RFC 4515 escaping is only for the string form of a filter).
    """
    assertion = _tlv(_FILTER_EQUALITY, _str(attribute) + _str(value))
    body = (
        _str(base)
        + _int(_ENUM, 1)  # scope: singleLevel (participants sit directly under the base)
        + _int(_ENUM, 0)  # derefAliases: never
        + _int(_INTEGER, size_limit)
        + _int(_INTEGER, time_limit)
        + _tlv(_BOOL, b"\x00")  # typesOnly: false
        + assertion
        + _tlv(_SEQUENCE, b"".join(_str(a) for a in attributes))
    )
    return _message(message_id, _tlv(_APP_SEARCH_REQ, body))


def encode_unbind(message_id: int) -> bytes:
    return _message(message_id, _tlv(_APP_UNBIND, b""))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def read(self) -> tuple[int, bytes]:
        data, pos = self.data, self.pos
        if pos + 2 > len(data):
            raise ValueError("truncated BER element")
        tag, first = data[pos], data[pos + 1]
        if tag & 0x1F == 0x1F:
            raise ValueError("high tag numbers are not used by LDAP")
        pos += 2
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or pos + count > len(data):
                raise ValueError("bad BER length")
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > len(data):
            raise ValueError("truncated BER element")
        self.pos = pos + length
        return tag, data[pos : pos + length]

    def expect(self, tag: int) -> bytes:
        got, value = self.read()
        if got != tag:
            raise ValueError(f"expected BER tag {tag:#x}, got {got:#x}")
        return value


@dataclass
class LdapMessage:
    """The parts of a server message this client reads."""

    message_id: int
    op: int  # the protocolOp's tag
    result_code: int | None = None  # LDAPResult responses
    diagnostic: str = ""
    dn: str = ""  # SearchResultEntry
    attributes: dict[str, list[bytes]] = field(default_factory=dict)


def _ldap_result(r: _Reader) -> tuple[int, str]:
    code = int.from_bytes(r.expect(_ENUM), "big")
    r.expect(_OCTETS)  # matchedDN
    diagnostic = r.expect(_OCTETS).decode("utf-8", "replace")
    return code, diagnostic


def decode_message(data: bytes) -> LdapMessage:
    """Decode one complete LDAPMessage; raise ValueError on anything malformed."""
    outer = _Reader(data)
    inner = _Reader(outer.expect(_SEQUENCE))
    message_id = int.from_bytes(inner.expect(_INTEGER), "big", signed=True)
    op, value = inner.read()
    msg = LdapMessage(message_id, op)
    body = _Reader(value)
    if op in (_APP_BIND_RESP, _APP_SEARCH_DONE, _APP_EXT_RESP):
        msg.result_code, msg.diagnostic = _ldap_result(body)
    elif op == _APP_SEARCH_ENTRY:
        msg.dn = body.expect(_OCTETS).decode("utf-8", "replace")
        attrs = _Reader(body.expect(_SEQUENCE))
        while not attrs.done():
            item = _Reader(attrs.expect(_SEQUENCE))
            name = item.expect(_OCTETS).decode("utf-8", "replace")
            values = _Reader(item.expect(_SET))
            msg.attributes.setdefault(name, [])
            while not values.done():
                msg.attributes[name].append(values.expect(_OCTETS))
    return msg


def parent_dn(dn: str) -> str:
    """The DN one level up (``uid=1,ou=participants,dc=x`` -> ``ou=participants,dc=x``)."""
    escaped = False
    for i, ch in enumerate(dn):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            return dn[i + 1 :].strip()
    raise SafeMailError(f"{dn!r} has no parent entry", "give --directory-base explicitly")


# --- the network edge ---------------------------------------------------------------------


@dataclass(frozen=True)
class DirectoryConfig:
    """Where the directory is and how the participant binds to it."""

    uri: str
    bind_dn: str
    password: str
    base: str | None = None  # default: the bind DN's parent (ou=participants,...)
    cafile: Path | None = None
    timeout: float = 30.0

    @property
    def search_base(self) -> str:
        return self.base or parent_dn(self.bind_dn)


class LdapCertificateDirectory:
    """Recipient certificates from the directory; one connection, opened on first use.

    Implements :class:`safemail.participant.message.CertificateDirectory`. Only certificates
    that name the looked-up mailbox are returned; with ``issuer`` set, only those the SafeMail
    CA signed (a directory entry cannot slip in a key of someone else's choosing).
    """

    def __init__(self, config: DirectoryConfig, issuer: x509.Certificate | None = None) -> None:
        self.config = config
        self.issuer = issuer
        self._sock: socket.socket | None = None
        self._next_id = 1
        parts = urlsplit(config.uri)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
            raise SafeMailError(
                f"{config.uri!r} is not an ldap:// or ldaps:// URI",
                "give the directory as ldap://HOST (StartTLS) or ldaps://HOST",
            )
        self._host = parts.hostname
        self._tls_now = parts.scheme == "ldaps"
        self._port = parts.port or (636 if self._tls_now else 389)

    # context manager: close the connection after the lookups
    def __enter__(self) -> LdapCertificateDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _where(self) -> str:
        return f"the directory {self.config.uri}"

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        assert self._sock is not None
        chunks, got = [], 0
        while got < n:
            chunk = self._sock.recv(min(n - got, 65536))
            if not chunk:
                raise SafeMailError(f"{self._where()} closed the connection", "try again")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _recv(self) -> LdapMessage:
        head = self._recv_exact(2)
        extra = b""
        if head[1] & 0x80:
            count = head[1] & 0x7F
            if count == 0 or count > 4:
                raise SafeMailError(f"{self._where()} sent a malformed message", "try again")
            extra = self._recv_exact(count)
        length = int.from_bytes(extra, "big") if extra else head[1]
        if length > _MAX_MESSAGE:
            raise SafeMailError(f"{self._where()} sent an oversized message", "try again")
        data = head + extra + self._recv_exact(length)
        try:
            msg = decode_message(data)
        except ValueError as exc:
            raise SafeMailError(f"{self._where()} sent a malformed message: {exc}",
                                "is the URI really an LDAP server?") from exc
        if msg.message_id == 0:  # notice of disconnection
            raise SafeMailError(f"{self._where()} ended the session: {msg.diagnostic}",
                                "try again")
        return msg

    def _request(self, encode) -> int:  # type: ignore[no-untyped-def]
        message_id, self._next_id = self._next_id, self._next_id + 1
        self._send(encode(message_id))
        return message_id

    def _check(self, msg: LdapMessage, what: str) -> None:
        if msg.result_code == 0:
            return
        text, hint = _RESULT_HINTS.get(msg.result_code or -1, (f"{what} failed", "try again"))
        raise SafeMailError(
            f"{self._where()}: {text} (result {msg.result_code}"
            + (f": {msg.diagnostic}" if msg.diagnostic else "") + ")",
            hint,
        )

    def _context(self) -> ssl.SSLContext:
        cafile = self.config.cafile
        try:
            ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        except (OSError, ssl.SSLError) as exc:
            raise SafeMailError(f"cannot load CA file {cafile}: {exc}",
                                "give the service CA as PEM with --cafile") from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def connect(self) -> None:
        """Connect, start TLS (verified), bind as the participant."""
        if self._sock is not None:
            return
        try:
            raw = socket.create_connection((self._host, self._port), timeout=self.config.timeout)
        except OSError as exc:
            raise SafeMailError(f"cannot reach {self._where()}: {exc}",
                                "is the directory reachable from this host?") from exc
        self._sock = raw
        try:
            if not self._tls_now:
                mid = self._request(encode_starttls)
                reply = self._recv()
                if reply.message_id != mid or reply.op != _APP_EXT_RESP:
                    raise SafeMailError(f"{self._where()} did not answer StartTLS", "try again")
                self._check(reply, "StartTLS")
            self._sock = self._context().wrap_socket(raw, server_hostname=self._host)
            mid = self._request(lambda i: encode_bind(i, self.config.bind_dn,
                                                      self.config.password))
            reply = self._recv()
            if reply.message_id != mid or reply.op != _APP_BIND_RESP:
                raise SafeMailError(f"{self._where()} did not answer the bind", "try again")
            self._check(reply, "bind")
        except ssl.SSLError as exc:
            self.close()
            raise SafeMailError(f"TLS with {self._where()} failed: {exc}",
                                "check --cafile (the service TLS CA) and the host name") from exc
        except OSError as exc:
            self.close()
            raise SafeMailError(f"{self._where()}: {exc}", "try again") from exc
        except SafeMailError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is None:
            return
        try:
            self._send(encode_unbind(self._next_id))
        except OSError:
            pass
        self._sock.close()
        self._sock = None

    def search_certificates(self, mailbox: str) -> list[bytes]:
        """The DER values of ``userCertificate;binary`` of every entry with ``mail=mailbox``."""
        self.connect()
        mid = self._request(lambda i: encode_search(
            i, self.config.search_base, "mail", mailbox, [CERT_ATTRIBUTE]))
        found: list[bytes] = []
        try:
            while True:
                msg = self._recv()
                if msg.message_id != mid:
                    continue
                if msg.op == _APP_SEARCH_ENTRY:
                    for name, values in msg.attributes.items():
                        if name.lower().split(";")[0] == "usercertificate":
                            found.extend(values)
                elif msg.op == _APP_SEARCH_DONE:
                    self._check(msg, "search")
                    return found
                # references and intermediate responses: nothing to follow here
        except OSError as exc:
            self.close()
            raise SafeMailError(f"{self._where()}: {exc}", "try again") from exc

    def certificates_for(self, mailbox: str) -> list[x509.Certificate]:
        certs = []
        for der in self.search_certificates(mailbox):
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                continue  # a damaged value is no certificate; the others may serve
            if mailbox.lower() not in certificate_mailboxes(cert):
                continue
            if self.issuer is not None and not _issued_by(cert, self.issuer):
                continue
            certs.append(cert)
        return certs


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
