"""Distribution: publish the CA certificate, the CRL and participant certificates.

Runs on the distribution host (front segment). The signer pushes its public output (``ca.pem``,
``crl.pem``, ``issued/*.pem``, ``index.json``) into an incoming directory; :func:`publish`
checks every signature against the CA and renders the published tree::

    published/ca.pem                 the CA certificate (pinned on first publish)
    published/crl.pem, crl.der       the current CRL (must be signed by the CA and fresh)
    published/certs/<mailbox>.pem    the current valid certificate of each mailbox

Decisions rest on signed data only: a certificate counts as revoked because the signed CRL
lists it, not because an (unsigned) index says so. LDAP publishing is prepared as pure data
(:class:`LdapCertUpdate`); the ca_hosts role applies it to the directory with ldapmodify on the
distribution host (safemail-ca-ldap units).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from safemail.ca import _fs
from safemail.ca.errors import CaError
from safemail.ca.journal import Journal

CERT_ATTRIBUTE = "userCertificate;binary"
_MAILBOX_FILE_RE = re.compile(r"^[a-z0-9][a-z0-9._+-]*@[a-z0-9.-]+$")


# ---------------------------------------------------------------- reading a published tree
def _load_crl(path: Path, ca: x509.Certificate) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError as exc:
        raise CaError(f"{path} is not a readable CRL") from exc
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise CaError(
            f"the CRL {path} is not signed by the CA {ca.subject.rfc4514_string()}",
            "do not publish it; generate a new CRL on the signer and push again",
        )
    return crl


def current_certificate(
    published_dir: Path, mailbox: str, now: datetime | None = None
) -> x509.Certificate | None:
    """The mailbox's published certificate if it is unexpired and not on the CRL, else None.

    Used by the RA (with a read-only copy of the published tree) to see whether a participant
    already holds a valid certificate. A tree that does not exist yet holds no certificates.
    """
    now = now or datetime.now(UTC)
    path = published_dir / "certs" / f"{mailbox}.pem"
    if not _MAILBOX_FILE_RE.match(mailbox) or not path.exists():
        return None
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    if cert.not_valid_after_utc <= now:
        return None
    ca_path, crl_path = published_dir / "ca.pem", published_dir / "crl.pem"
    if ca_path.exists() and crl_path.exists():
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
        crl = _load_crl(crl_path, ca)
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            return None
    return cert


def mailbox_of(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise CaError(f"certificate {cert.serial_number:032x} names no mailbox") from exc
    names = san.get_values_for_type(x509.RFC822Name)
    if len(names) != 1 or not _MAILBOX_FILE_RE.match(names[0]):
        raise CaError(f"certificate {cert.serial_number:032x} does not name exactly one mailbox")
    return names[0]


# ---------------------------------------------------------------- LDAP (pure data)
def escape_dn_value(value: str) -> str:
    """Escape an attribute value for a DN (RFC 4514 section 2.4)."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch in " #" and i == 0) or (ch == " " and i == len(value) - 1):
            out.append("\\" + ch)
        elif ord(ch) < 32:
            out.append(f"\\{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def participant_dn(template: str, *, participant: str, mailbox: str) -> str:
    """Render a DN template such as ``uid={participant},ou=participants,dc=example``."""
    if "{participant}" not in template and "{mailbox}" not in template:
        raise CaError(
            f"LDAP DN template {template!r} names neither {{participant}} nor {{mailbox}}"
        )
    return template.format(
        participant=escape_dn_value(participant), mailbox=escape_dn_value(mailbox)
    )


@dataclass(frozen=True)
class LdapCertUpdate:
    """One change to a participant's directory entry: set or remove its certificate."""

    dn: str
    op: str  # "replace" (set the certificate) or "delete" (remove it)
    values: tuple[bytes, ...] = ()
    attribute: str = CERT_ATTRIBUTE

    def modlist(self) -> dict[str, list[tuple[str, list[bytes]]]]:
        """The change in ldap3's ``Connection.modify(dn, changes)`` form."""
        kind = "MODIFY_REPLACE" if self.op == "replace" else "MODIFY_DELETE"
        return {self.attribute: [(kind, list(self.values))]}

    def to_ldif(self) -> str:
        lines = [f"dn: {self.dn}", "changetype: modify", f"{self.op}: {self.attribute}"]
        for value in self.values:
            lines.extend(_fold(f"{self.attribute}:: {base64.b64encode(value).decode()}"))
        lines.append("-")
        return "\n".join(lines) + "\n"


def _fold(line: str, width: int = 76) -> list[str]:
    out = [line[:width]]
    out.extend(" " + line[i : i + width - 1] for i in range(width, len(line), width - 1))
    return out


def ldap_certificate_update(cert: x509.Certificate, dn: str) -> LdapCertUpdate:
    """Publish ``cert`` (DER) as the entry's ``userCertificate;binary``."""
    return LdapCertUpdate(dn, "replace", (cert.public_bytes(serialization.Encoding.DER),))


def ldap_certificate_removal(dn: str) -> LdapCertUpdate:
    """Remove every certificate from the entry (the participant holds no valid one)."""
    return LdapCertUpdate(dn, "delete")


# ---------------------------------------------------------------- publishing
@dataclass
class PublishReport:
    crl_number: int
    published: dict[str, str] = field(default_factory=dict)  # mailbox -> serial
    withdrawn: list[str] = field(default_factory=list)
    ldap: list[LdapCertUpdate] = field(default_factory=list)


class Distribution:
    """The distribution host's operations on its state directory."""

    def __init__(self, state_dir: Path, *, journal: Journal | None = None) -> None:
        self.state_dir = state_dir
        self.published = state_dir / "published"
        self.journal = journal or Journal(state_dir / "journal.jsonl")
        self._lock = state_dir / "dist.lock"

    def publish(
        self,
        source: Path,
        *,
        actor: str,
        dn_template: str | None = None,
        accept_new_ca: bool = False,
        now: datetime | None = None,
    ) -> PublishReport:
        """Check the signer's output in ``source`` and render the published tree from it."""
        now = now or datetime.now(UTC)
        with _fs.locked(self._lock):
            ca = self._checked_ca(source, accept_new_ca)
            crl = self._checked_crl(source, ca, now)
            current = self._current_certs(source, ca, crl, now)
            participants = self._participants(source)
            report = PublishReport(crl_number=_crl_number(crl))
            certs_dir = self.published / "certs"
            certs_dir.mkdir(parents=True, exist_ok=True)
            _fs.atomic_write_bytes(
                self.published / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)
            )
            _fs.atomic_write_bytes(
                self.published / "crl.der", crl.public_bytes(serialization.Encoding.DER)
            )
            _fs.atomic_write_bytes(
                self.published / "crl.pem", crl.public_bytes(serialization.Encoding.PEM)
            )
            for mailbox, cert in sorted(current.items()):
                pem = cert.public_bytes(serialization.Encoding.PEM)
                path = certs_dir / f"{mailbox}.pem"
                if not path.exists() or path.read_bytes() != pem:
                    _fs.atomic_write_bytes(path, pem)
                report.published[mailbox] = f"{cert.serial_number:032x}"
                number = participants.get(f"{cert.serial_number:032x}")
                if dn_template and number:
                    dn = participant_dn(dn_template, participant=number, mailbox=mailbox)
                    report.ldap.append(ldap_certificate_update(cert, dn))
            for path in sorted(certs_dir.glob("*.pem")):
                mailbox = path.name.removesuffix(".pem")
                if mailbox not in current:
                    path.unlink()
                    report.withdrawn.append(mailbox)
                    number = _number_for_mailbox(source, mailbox)
                    if dn_template and number:
                        dn = participant_dn(dn_template, participant=number, mailbox=mailbox)
                        report.ldap.append(ldap_certificate_removal(dn))
            self.journal.record(
                "publish",
                actor,
                serial=str(report.crl_number),
                detail=f"{len(report.published)} published, {len(report.withdrawn)} withdrawn"
                + (f": {', '.join(report.withdrawn)}" if report.withdrawn else ""),
            )
            return report

    def _checked_ca(self, source: Path, accept_new_ca: bool) -> x509.Certificate:
        try:
            ca = x509.load_pem_x509_certificate((source / "ca.pem").read_bytes())
        except FileNotFoundError as exc:
            raise CaError(
                f"{source}/ca.pem is missing", "push the signer's output before publishing"
            ) from exc
        try:
            ca.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CaError(f"{source}/ca.pem is not a valid self-signed CA certificate") from exc
        pinned = self.published / "ca.pem"
        if pinned.exists() and not accept_new_ca:
            old = x509.load_pem_x509_certificate(pinned.read_bytes())
            if old != ca:
                raise CaError(
                    "the pushed CA certificate differs from the published one",
                    "if this is a planned CA rollover, publish with --accept-new-ca; "
                    "otherwise stop and investigate the signer",
                )
        return ca

    def _checked_crl(
        self, source: Path, ca: x509.Certificate, now: datetime
    ) -> x509.CertificateRevocationList:
        path = source / "crl.pem"
        if not path.exists():
            raise CaError(f"{path} is missing", "run 'safemail ca crl' on the signer and push")
        crl = _load_crl(path, ca)
        if crl.next_update_utc is None or crl.next_update_utc <= now:
            raise CaError(
                "the pushed CRL is out of date (nextUpdate has passed)",
                "generate a fresh CRL on the signer ('safemail ca crl') and push again",
            )
        published = self.published / "crl.pem"
        if published.exists():
            old = x509.load_pem_x509_crl(published.read_bytes())
            if _crl_number(crl) < _crl_number(old):
                raise CaError(
                    f"the pushed CRL number {_crl_number(crl)} is older than the published "
                    f"{_crl_number(old)}; refusing to roll revocations back"
                )
        return crl

    def _current_certs(
        self,
        source: Path,
        ca: x509.Certificate,
        crl: x509.CertificateRevocationList,
        now: datetime,
    ) -> dict[str, x509.Certificate]:
        """For each mailbox, its newest certificate that is CA-signed, unexpired, unrevoked."""
        current: dict[str, x509.Certificate] = {}
        for path in sorted((source / "issued").glob("*.pem")):
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise CaError(
                    f"{path} is not a certificate signed by the CA; nothing was published",
                    "check the signer's issued/ directory and push again",
                ) from exc
            if cert.not_valid_after_utc <= now or cert.not_valid_before_utc > now:
                continue
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                continue
            mailbox = mailbox_of(cert)
            old = current.get(mailbox)
            if old is None or cert.not_valid_before_utc > old.not_valid_before_utc:
                current[mailbox] = cert
        return current

    @staticmethod
    def _participants(source: Path) -> dict[str, str]:
        """serial -> participant number, from the signer's index (used for LDAP DNs only)."""
        path = source / "index.json"
        if not path.exists():
            return {}
        try:
            certs: dict[str, Any] = _fs.read_json(path)["certs"]
        except (ValueError, KeyError) as exc:
            raise CaError(f"{path} is damaged") from exc
        return {s: str(e["participant"]) for s, e in certs.items()}


def _number_for_mailbox(source: Path, mailbox: str) -> str | None:
    path = source / "index.json"
    if not path.exists():
        return None
    for entry in _fs.read_json(path)["certs"].values():
        if entry["mailbox"] == mailbox:
            return str(entry["participant"])
    return None


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0
