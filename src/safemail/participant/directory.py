"""Recipient certificates: from the CA's distribution point (HTTP) or the directory (LDAP).

Two sources behind one interface (:class:`safemail.participant.message.CertificateDirectory`,
used as a context manager):

* :class:`HttpCertificateDirectory` -- the participant default. The CA's distribution host
  (ca_dist, front segment) serves ``ca.pem``, ``crl.der``/``crl.pem`` and
  ``certs/<mailbox>.pem`` over HTTP inside SafeNet (roles/ca_hosts, safemail.ca.dist). The
  transport is not trusted: a certificate is used only if the SafeMail CA (``--smime-ca``)
  signed it, it names the mailbox, it is valid now and its serial is not on the CA's CRL
  (itself checked against the CA and not expired).
* :class:`LdapCertificateDirectory` -- for service-side use (the relay's accounting, service
  hosts). The distribution host also publishes each participant's certificate into the
  directory (``userCertificate;binary`` of ``uid=<number>,ou=participants,<base>``); this
  client binds and searches there. The directory sits on the back segment, which SafeNet
  cannot reach (SYS-01), so participants do not use it.

The LDAP side is a thin adapter over python-ldap (OpenLDAP's libldap; Debian's python3-ldap on
the hosts, the same release on the controller: docs/directory.md). TLS is mandatory (StartTLS
on ``ldap://``, or ``ldaps://``), the server is verified against the CA file the caller gives
(required; nothing turns verification off, and no ldap.conf, ldaprc or LDAPTLS_* setting of
the environment widens it), and the bind password never travels before TLS is up. A search
asks the server for at most ``size_limit`` entries and the client stops reading past that.
"""

from __future__ import annotations

import datetime
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import ldap
import ldap.dn
import ldap.filter
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from safemail.errors import SafeMailError
from safemail.participant.keys import validate_mailbox
from safemail.participant.message import certificate_mailboxes

__all__ = [
    "CERT_ATTRIBUTE",
    "DEFAULT_SIZE_LIMIT",
    "DirectoryConfig",
    "HttpCertificateDirectory",
    "LdapCertificateDirectory",
    "parent_dn",
]

CERT_ATTRIBUTE = "userCertificate;binary"
# One mailbox is one participant entry; a handful of matches is already wrong. The server is
# asked for no more, and the client reads no more (a directory that ignores the limit cannot
# make this process hold an unbounded answer).
DEFAULT_SIZE_LIMIT = 10

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


def parent_dn(dn: str) -> str:
    """The DN one level up (``uid=1,ou=participants,dc=x`` -> ``ou=participants,dc=x``)."""
    try:
        rdns = ldap.dn.str2dn(dn)
    except ldap.DECODING_ERROR:
        raise SafeMailError(f"{dn!r} is not a valid DN",
                            "check --directory-bind-dn / --directory-base") from None
    if len(rdns) < 2:
        raise SafeMailError(f"{dn!r} has no parent entry", "give --directory-base explicitly")
    return ldap.dn.dn2str(rdns[1:])


# --- the network edge ---------------------------------------------------------------------


@dataclass(frozen=True)
class DirectoryConfig:
    """Where the directory is, how the client verifies it and how it binds.

    ``cafile`` is required: the directory's TLS certificate is verified against it, always.
    """

    uri: str
    bind_dn: str
    password: str
    cafile: Path
    base: str | None = None  # default: the bind DN's parent (ou=participants,...)
    # AV-02: read-only replicas, tried in order when ``uri`` cannot be reached (connection
    # refused, no route, no answer). Not on a TLS or bind failure: that is a fault to fix,
    # not an outage to ride out.
    replica_uris: tuple[str, ...] = ()
    timeout: float = 30.0
    size_limit: int = DEFAULT_SIZE_LIMIT

    @property
    def search_base(self) -> str:
        return self.base or parent_dn(self.bind_dn)


class _Unreachable(Exception):
    """One URI could not be reached (the next replica may be)."""

    def __init__(self, error: SafeMailError) -> None:
        super().__init__(str(error))
        self.error = error


def _info(exc: ldap.LDAPError) -> tuple[int | None, str, bool]:
    """The result code and the most telling text of a python-ldap error, and whether it
    came from the TCP connection itself (libldap then reports the socket's errno)."""
    detail = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    code = detail.get("result")
    info = str(detail.get("info") or "").strip()
    number = detail.get("errno")
    from_socket = not info or (isinstance(number, int) and info == os.strerror(number))
    return code, info or str(detail.get("desc") or exc), from_socket


class LdapCertificateDirectory:
    """Recipient certificates from the directory; one connection, opened on first use.

    Implements :class:`safemail.participant.message.CertificateDirectory`. Only certificates
    that name the looked-up mailbox are returned; with ``issuer`` set, only those the SafeMail
    CA signed (a directory entry cannot slip in a key of someone else's choosing). A mailbox
    with no entry (or an entry without a usable certificate) gives an empty list.
    """

    def __init__(self, config: DirectoryConfig, issuer: x509.Certificate | None = None) -> None:
        self.config = config
        self.issuer = issuer
        self._conn: ldap.ldapobject.LDAPObject | None = None
        self._uris = (config.uri, *config.replica_uris)
        for uri in self._uris:
            parts = urlsplit(uri)
            if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path not in (
                    "", "/") or any(c.isspace() for c in uri):
                raise SafeMailError(
                    f"{uri!r} is not an ldap:// or ldaps:// URI",
                    "give the directory as ldap://HOST (StartTLS) or ldaps://HOST",
                )
        self._uri = config.uri
        if not config.cafile:
            raise SafeMailError(
                f"no CA file to verify {self._where()}",
                "give the service TLS CA as PEM with --cafile (the directory is always "
                "verified)",
            )
        if not 0 < config.size_limit:
            raise SafeMailError(f"size limit must be at least 1, not {config.size_limit}")
        self._ldaps = urlsplit(self._uri).scheme == "ldaps"

    # context manager: close the connection after the lookups
    def __enter__(self) -> LdapCertificateDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _where(self) -> str:
        return f"the directory {self._uri}"

    def _error(self, exc: ldap.LDAPError, what: str) -> SafeMailError:
        """A SafeMailError for a failed ``what`` (connect, StartTLS, bind, search)."""
        code, text, from_socket = _info(exc)
        # libldap reports a failed handshake or verification as "connect error" after
        # StartTLS, or as "can't contact" on ldaps://, with the TLS layer's text rather than
        # a socket error; it does not say which check failed (GnuTLS: "(unknown error code)").
        tls_failed = (what == "StartTLS" and isinstance(exc, ldap.CONNECT_ERROR)) or (
            what == "connect" and self._ldaps and isinstance(exc, ldap.SERVER_DOWN)
            and not from_socket)
        if tls_failed:
            return SafeMailError(
                f"TLS with {self._where()} failed ({text}): its certificate is not signed by "
                f"the CA in {self.config.cafile}, does not name the host of the URI, or the "
                "handshake failed",
                "check --cafile (the service TLS CA) and that the URI names the host as its "
                "certificate does",
            )
        if isinstance(exc, ldap.SERVER_DOWN):
            if what == "connect":
                return SafeMailError(f"cannot reach {self._where()}: {text}",
                                     "is the directory reachable from this host?")
            return SafeMailError(f"{self._where()} closed the connection during the {what}: "
                                 f"{text}", "try again")
        if isinstance(exc, ldap.TIMEOUT):
            return SafeMailError(f"{self._where()} did not answer the {what} within "
                                 f"{self.config.timeout:g} s", "try again")
        if what == "StartTLS":
            return SafeMailError(f"{self._where()} refused StartTLS (result {code}: {text})",
                                 "the directory must offer StartTLS (or give ldaps://)")
        if code in _RESULT_HINTS:
            msg, hint = _RESULT_HINTS[code]
            return SafeMailError(f"{self._where()}: {msg} (result {code}: {text})", hint)
        return SafeMailError(f"{self._where()}: {what} failed (result {code}: {text})",
                             "try again")

    def _too_many(self, limit: int) -> SafeMailError:
        return SafeMailError(
            f"{self._where()} has more than {limit} entries for one lookup "
            "(size limit)",
            "a mailbox belongs to one participant entry: check the directory's data",
        )

    def _server_size_limit(self, limit: int) -> int:
        """The size limit sent with a search (the client enforces it too)."""
        return limit

    def connect(self) -> None:
        """Connect, start TLS (verified against ``cafile``), bind: to ``uri``, or to the
        first replica that can be reached when it cannot (AV-02)."""
        if self._conn is not None:
            return
        unreachable: list[SafeMailError] = []
        for uri in self._uris:
            self._uri = uri
            self._ldaps = urlsplit(uri).scheme == "ldaps"
            try:
                self._connect_one()
                return
            except _Unreachable as exc:
                unreachable.append(exc.error)
        if len(unreachable) == 1:
            raise unreachable[0]
        raise SafeMailError(
            "no directory could be reached, neither the provider nor a replica: "
            + "; ".join(e.message for e in unreachable),
            "is the directory reachable from this host?")

    def _connect_one(self) -> None:
        cafile = Path(self.config.cafile)
        try:
            cafile.read_bytes()
        except OSError as exc:
            raise SafeMailError(f"cannot read CA file {cafile}: {exc.strerror}",
                                "give the service TLS CA as PEM with --cafile") from exc
        timeout = self.config.timeout
        what = "connect"
        try:
            conn = ldap.initialize(self._uri)
            self._conn = conn
            conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
            conn.set_option(ldap.OPT_REFERRALS, 0)
            conn.set_option(ldap.OPT_NETWORK_TIMEOUT, timeout)
            conn.set_option(ldap.OPT_TIMEOUT, timeout)
            # TLS of this connection only, replacing whatever ldap.conf, ~/.ldaprc or
            # LDAPTLS_* put into libldap's defaults: this CA file and nothing else, the
            # certificate and host name checked, TLS 1.2 or later. (Debian's GnuTLS build
            # ignores a certificate directory anyway; an OpenSSL build would add its CAs.)
            conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
            conn.set_option(ldap.OPT_X_TLS_CACERTFILE, str(cafile))
            conn.set_option(ldap.OPT_X_TLS_CACERTDIR, "")
            conn.set_option(ldap.OPT_X_TLS_PROTOCOL_MIN, ldap.OPT_X_TLS_PROTOCOL_TLS1_2)
            conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
            if not self._ldaps:
                what = "StartTLS"
                conn.start_tls_s()
            what = "bind"
            conn.simple_bind_s(self.config.bind_dn, self.config.password)
        except ldap.LDAPError as exc:
            self.close()
            if what == "bind" and self._ldaps and isinstance(exc, ldap.SERVER_DOWN):
                what = "connect"  # ldaps:// connects (and shakes hands) with the first request
            if what == "StartTLS" and isinstance(exc, ldap.SERVER_DOWN):
                what = "connect"  # the StartTLS request is the first one on the wire
            error = self._error(exc, what)
            if what == "connect" and (isinstance(exc, ldap.TIMEOUT) or (
                    isinstance(exc, ldap.SERVER_DOWN) and str(error).startswith("cannot reach"))):
                raise _Unreachable(error) from exc
            raise error from exc

    def close(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            conn.unbind_s()
        except ldap.LDAPError:
            pass

    def search(
        self, attribute: str, value: str, attributes: Iterable[str], *,
        size_limit: int | None = None,
    ) -> list[dict[str, list[bytes]]]:
        """The requested attributes of every entry with ``attribute=value`` one level under
        the base; an empty list when none matches.

        Attribute names come back lower-cased without options (``usercertificate``).
        ``size_limit`` (default: the config's): at most this many entries; the server is asked
        for no more, and more is a SafeMailError whatever the server does.
        """
        limit = self.config.size_limit if size_limit is None else size_limit
        if limit < 1:
            raise SafeMailError(f"size limit must be at least 1, not {limit}",
                                "every directory lookup is bounded")
        self.connect()
        assert self._conn is not None
        timeout = self.config.timeout
        query = ldap.filter.filter_format(f"({attribute}=%s)", [value])
        entries: list[dict[str, list[bytes]]] = []
        msgid = None
        try:
            msgid = self._conn.search_ext(
                self.config.search_base, ldap.SCOPE_ONELEVEL, query, list(attributes),
                sizelimit=self._server_size_limit(limit), timeout=int(timeout) or 1,
            )
            while True:
                rtype, rdata, _, _ = self._conn.result3(msgid, all=0, timeout=timeout)
                if rtype == ldap.RES_SEARCH_RESULT:
                    return entries
                if rtype != ldap.RES_SEARCH_ENTRY:
                    continue  # references: nothing to follow here
                for _dn, attrs in rdata:
                    entry: dict[str, list[bytes]] = {}
                    for name, values in attrs.items():
                        entry.setdefault(name.lower().split(";")[0], []).extend(values)
                    entries.append(entry)
                if len(entries) > limit:
                    self._conn.abandon(msgid)
                    raise self._too_many(limit)
        except ldap.SIZELIMIT_EXCEEDED as exc:  # the server stopped at the limit
            raise self._too_many(limit) from exc
        except ldap.LDAPError as exc:
            self.close()
            raise self._error(exc, "search") from exc

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
