"""Recipient certificates: from the CA's distribution point (HTTP) or the directory (LDAP).

Two sources behind one interface (:class:`safemail.participant.message.CertificateDirectory`,
used as a context manager):

* :class:`HttpCertificateDirectory` -- the participant default. The CA's distribution host
  (ca_dist, front segment) serves ``ca.pem``, ``crl.der``/``crl.pem`` and
  ``certs/<mailbox>.pem`` over HTTP inside SafeNet (roles/ca_hosts, safemail.ca.dist). The
  transport is not trusted: a certificate is used only if the SafeMail CA (``--smime-ca``)
  signed it, it names the mailbox, it is valid now and its serial is not on the CA's CRL
  (itself checked against the CA and not expired).
* :class:`LdapCertificateDirectory` -- for service-side use. The distribution host also
  publishes each participant's certificate into the directory (``userCertificate;binary`` of
  ``uid=<number>,ou=participants,<base>``); this client binds and searches there. The
  directory sits on the back segment, which SafeNet cannot reach (SYS-01), so participants
  do not use it.

The LDAP client speaks the three LDAPv3 operations it needs (RFC 4511: StartTLS, simple bind,
one-level search with an equality filter) over the standard library's socket and ssl, so no
further package is needed. TLS is mandatory (StartTLS on ``ldap://``, or ``ldaps://``) and
the server is verified against a CA file; the bind password never travels before TLS is up.

:func:`encode_*` and :func:`decode_message` are pure (unit-tested byte for byte);
:class:`LdapCertificateDirectory` and :class:`HttpCertificateDirectory` are the network edge.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from safemail.errors import SafeMailError
from safemail.participant.keys import validate_mailbox
from safemail.participant.message import certificate_mailboxes

__all__ = [
    "CERT_ATTRIBUTE",
    "DirectoryConfig",
    "HttpCertificateDirectory",
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

    def search(
        self, attribute: str, value: str, attributes: Iterable[str], *, size_limit: int = 10
    ) -> list[dict[str, list[bytes]]]:
        """The requested attributes of every entry with ``attribute=value`` under the base.

        Attribute names come back lower-cased without options (``usercertificate``).
        ``size_limit``: at most this many entries (0: the server's own limit).
        """
        self.connect()
        wanted = list(attributes)
        mid = self._request(lambda i: encode_search(
            i, self.config.search_base, attribute, value, wanted, size_limit=size_limit))
        entries: list[dict[str, list[bytes]]] = []
        try:
            while True:
                msg = self._recv()
                if msg.message_id != mid:
                    continue
                if msg.op == _APP_SEARCH_ENTRY:
                    entry: dict[str, list[bytes]] = {}
                    for name, values in msg.attributes.items():
                        entry.setdefault(name.lower().split(";")[0], []).extend(values)
                    entries.append(entry)
                elif msg.op == _APP_SEARCH_DONE:
                    self._check(msg, "search")
                    return entries
                # references and intermediate responses: nothing to follow here
        except OSError as exc:
            self.close()
            raise SafeMailError(f"{self._where()}: {exc}", "try again") from exc

    def search_certificates(self, mailbox: str) -> list[bytes]:
        """The DER values of ``userCertificate;binary`` of every entry with ``mail=mailbox``."""
        found: list[bytes] = []
        for entry in self.search("mail", mailbox, [CERT_ATTRIBUTE]):
            found.extend(entry.get("usercertificate", []))
        return found

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


# --- the CA's distribution point (HTTP) -----------------------------------------------------

_MAX_HTTP_BODY = 1024 * 1024  # a certificate or a CRL of a few hundred entries: a few KB
HTTP_SCHEMES = ("http", "https")


class HttpCertificateDirectory:
    """Recipient certificates from the CA's distribution point (``<uri>/certs/<mailbox>.pem``).

    Implements :class:`safemail.participant.message.CertificateDirectory`. The distribution
    host and the way to it are not trusted: integrity comes from the SafeMail CA's signatures.
    A certificate is returned only if ``issuer`` signed it, it names the mailbox, it is within
    its validity and its serial is not on the CRL the distribution point publishes (the CRL
    signed by ``issuer`` and not expired). The CRL is fetched once per instance (one send).
    """

    def __init__(
        self,
        uri: str,
        issuer: x509.Certificate,
        *,
        timeout: float = 30.0,
        cafile: Path | None = None,
        now: datetime.datetime | None = None,
    ) -> None:
        parts = urlsplit(uri)
        if parts.scheme not in HTTP_SCHEMES or not parts.hostname:
            raise SafeMailError(
                f"{uri!r} is not an http:// or https:// URI",
                "give the CA distribution point as http://HOST/",
            )
        self.uri = uri.rstrip("/")
        self.issuer = issuer
        self.timeout = timeout
        self._now = now
        self._crl: x509.CertificateRevocationList | None = None
        handlers: list[urllib.request.BaseHandler] = [
            # Direct connections only: the distribution point is inside SafeNet, and an
            # inherited proxy setting would send the lookups somewhere else.
            urllib.request.ProxyHandler({}),
        ]
        if parts.scheme == "https":
            try:
                ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
            except (OSError, ssl.SSLError) as exc:
                raise SafeMailError(f"cannot load CA file {cafile}: {exc}",
                                    "give the server's TLS CA as PEM with --cafile") from exc
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        self._opener = urllib.request.build_opener(*handlers)

    def __enter__(self) -> HttpCertificateDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to close (one request per fetch); here for the common interface."""

    def _where(self) -> str:
        return f"the CA distribution point {self.uri}/"

    def _now_utc(self) -> datetime.datetime:
        return self._now or datetime.datetime.now(datetime.UTC)

    def _get(self, path: str) -> bytes | None:
        """The body of ``<uri>/<path>``; None on 404; SafeMailError on anything else."""
        url = f"{self.uri}/{path}"
        try:
            with self._opener.open(url, timeout=self.timeout) as response:
                body = response.read(_MAX_HTTP_BODY + 1)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise SafeMailError(f"{self._where()} answered {exc.code} {exc.reason} for {path}",
                                "try again; if it persists, tell the CA operators") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SafeMailError(f"cannot reach {self._where()}: {reason}",
                                "is the distribution host reachable from this host "
                                "(--directory http://HOST/)?") from exc
        if len(body) > _MAX_HTTP_BODY:
            raise SafeMailError(f"{self._where()} sent an oversized answer for {path}",
                                "is the URI really the CA distribution point?")
        return body

    def _load_crl(self, data: bytes, name: str) -> x509.CertificateRevocationList:
        try:
            if b"-----BEGIN" in data:
                return x509.load_pem_x509_crl(data)
            return x509.load_der_x509_crl(data)
        except ValueError as exc:
            raise SafeMailError(f"{self._where()} sent no readable CRL ({name}): {exc}",
                                "is the URI really the CA distribution point?") from exc

    def revocation_list(self) -> x509.CertificateRevocationList:
        """The CA's current CRL from the distribution point, checked; fetched once."""
        if self._crl is not None:
            return self._crl
        for name in ("crl.der", "crl.pem"):
            data = self._get(name)
            if data is not None:
                break
        else:
            raise SafeMailError(
                f"{self._where()} publishes no CRL (crl.der or crl.pem)",
                "without the CRL a revoked certificate cannot be told apart; tell the CA "
                "operators",
            )
        crl = self._load_crl(data, name)
        ca = self.issuer
        if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            raise SafeMailError(
                f"the CRL from {self._where()} is not signed by the SafeMail CA "
                f"{ca.subject.rfc4514_string()}",
                "check --smime-ca; if it is right, the distribution point serves a false CRL: "
                "tell the CA operators",
            )
        now = self._now_utc()
        if crl.next_update_utc is None or crl.next_update_utc <= now:
            raise SafeMailError(
                f"the CRL from {self._where()} has expired (next update "
                f"{crl.next_update_utc or 'not set'})",
                "revocations since then would be missed; tell the CA operators (the signer "
                "pushes a fresh CRL regularly)",
            )
        self._crl = crl
        return crl

    def _refusal(self, cert: x509.Certificate, mailbox: str) -> str | None:
        """Why ``cert`` may not be used for ``mailbox``, or None if it may."""
        if not _issued_by(cert, self.issuer):
            return "it is not signed by the SafeMail CA (--smime-ca)"
        if mailbox.lower() not in certificate_mailboxes(cert):
            return "it does not name this mailbox"
        now = self._now_utc()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return (f"it is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                    f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")
        if self.revocation_list().get_revoked_certificate_by_serial_number(
                cert.serial_number) is not None:
            return f"it is revoked (serial {cert.serial_number:x} is on the CA's CRL)"
        return None

    def certificates_for(self, mailbox: str) -> list[x509.Certificate]:
        """The published certificate of ``mailbox`` after the checks above.

        Raises SafeMailError if nothing is published for the mailbox, or if what is published
        fails a check (saying which), rather than returning an empty list: the reason matters
        to the sender.
        """
        validate_mailbox(mailbox)  # it becomes part of the URL path
        name = f"certs/{quote(mailbox.lower(), safe='@+')}.pem"
        data = self._get(name)
        if data is None:
            raise SafeMailError(
                f"no certificate published for {mailbox}",
                f"is {mailbox} enrolled with the SafeMail CA? The distribution point "
                f"({self.uri}/certs/) lists every mailbox with a current certificate",
            )
        try:
            found = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise SafeMailError(f"{self._where()} sent no readable certificate for {mailbox}",
                                "is the URI really the CA distribution point?") from exc
        certs, refusals = [], []
        for cert in found:
            reason = self._refusal(cert, mailbox)
            if reason is None:
                certs.append(cert)
            else:
                refusals.append(f"serial {cert.serial_number:x}: {reason}")
        if not certs:
            raise SafeMailError(
                f"the certificate published for {mailbox} is not usable: "
                + "; ".join(refusals),
                "nothing was sent; ask the recipient to renew the certificate, or tell the CA "
                "operators if the distribution point looks tampered with",
            )
        return certs
