"""Build and open S/MIME enveloped mail: pure functions, no network.

:func:`build_message` encrypts a MIME entity for one or more recipient certificates with
cryptography's ``PKCS7EnvelopeBuilder`` (AES-256-CBC content encryption, RSA key transport)
and returns a complete RFC 5322 message with CRLF line endings, ready for SMTP.
:func:`decrypt_message` reverses it with the participant's own key and certificate and returns
exactly the entity bytes that were encrypted.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.header
import email.parser
import email.policy
import email.utils
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7

from safemail.errors import SafeMailError
from safemail.participant.keys import PrivateKey, validate_mailbox

__all__ = [
    "Attachment",
    "CertificateDirectory",
    "FileCertificateDirectory",
    "build_inner_entity",
    "build_message",
    "certificate_mailboxes",
    "check_recipient_certificate",
    "decrypt_message",
    "encrypt_entity",
    "envelope_der",
    "load_certificate",
    "resolve_recipients",
    "to_crlf",
]

_SMIME_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime")


@dataclass(frozen=True)
class Attachment:
    """A file to send inside the encrypted entity."""

    filename: str
    data: bytes
    content_type: str = "application/octet-stream"


def load_certificate(path: Path) -> x509.Certificate:
    """Load one X.509 certificate (PEM or DER) or raise SafeMailError saying which file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SafeMailError(
            f"cannot read certificate {path}: {exc.strerror}", "check the path"
        ) from exc
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise SafeMailError(
            f"{path} is not an X.509 certificate: {exc}",
            "give the recipient's certificate as PEM or DER",
        ) from exc


def certificate_mailboxes(cert: x509.Certificate) -> set[str]:
    """Mailboxes a certificate names: rfc822Name SANs and the subject emailAddress, lower-cased."""
    boxes: set[str] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        boxes.update(v.lower() for v in san.get_values_for_type(x509.RFC822Name))
    except x509.ExtensionNotFound:
        pass
    for attr in cert.subject.get_attributes_for_oid(x509.oid.NameOID.EMAIL_ADDRESS):
        boxes.add(str(attr.value).lower())
    return boxes


def check_recipient_certificate(
    cert: x509.Certificate, now: datetime.datetime | None = None
) -> None:
    """Raise SafeMailError unless ``cert`` can receive encrypted mail now (RSA key, in validity)."""
    now = now or datetime.datetime.now(datetime.UTC)
    who = ", ".join(sorted(certificate_mailboxes(cert))) or cert.subject.rfc4514_string()
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        raise SafeMailError(
            f"the certificate for {who} does not hold an RSA key",
            "S/MIME encryption here needs RSA recipient certificates; ask the recipient to "
            "enrol an RSA key (keygen --type rsa)",
        )
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SafeMailError(
            f"the certificate for {who} is not valid now (valid "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})",
            "fetch the recipient's current certificate",
        )


class CertificateDirectory(Protocol):
    """Where recipient certificates come from (the CA distribution point, LDAP, or files)."""

    def certificates_for(self, mailbox: str) -> list[x509.Certificate]:
        """All usable certificates for ``mailbox`` (may be empty)."""
        ...


class FileCertificateDirectory:
    """Certificates given as files, indexed by the mailboxes they name."""

    def __init__(self, certificates: Iterable[x509.Certificate]) -> None:
        self._by_mailbox: dict[str, list[x509.Certificate]] = {}
        for cert in certificates:
            for box in certificate_mailboxes(cert):
                self._by_mailbox.setdefault(box, []).append(cert)

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> FileCertificateDirectory:
        return cls(load_certificate(p) for p in paths)

    def certificates_for(self, mailbox: str) -> list[x509.Certificate]:
        return list(self._by_mailbox.get(mailbox.lower(), []))


def resolve_recipients(
    recipients: Sequence[str], directory: CertificateDirectory
) -> list[x509.Certificate]:
    """One certificate per recipient mailbox; raise SafeMailError naming any that has none."""
    certs: list[x509.Certificate] = []
    for mailbox in recipients:
        found = directory.certificates_for(mailbox)
        if not found:
            raise SafeMailError(
                f"no certificate for recipient {mailbox}",
                "is the recipient enrolled and its certificate published by the CA? "
                "(a --recipient-cert FILE must name this mailbox in its SAN)",
            )
        # A certificate valid now, the newest of them: a renewed certificate replaces the old
        # one. If none is valid, the newest, which check_recipient_certificate then refuses.
        now = datetime.datetime.now(datetime.UTC)
        valid = [c for c in found if c.not_valid_before_utc <= now <= c.not_valid_after_utc]
        certs.append(max(valid or found, key=lambda c: c.not_valid_after_utc))
    return certs


def to_crlf(data: bytes) -> bytes:
    """Normalise every line ending (LF or CRLF) to CRLF, as SMTP requires."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def build_inner_entity(text: str, attachments: Sequence[Attachment] = ()) -> bytes:
    """The MIME entity that gets encrypted: the text, plus attachments if any, CRLF endings."""
    entity = EmailMessage(policy=email.policy.SMTP)
    entity.set_content(text, subtype="plain", charset="utf-8")
    for item in attachments:
        maintype, _, subtype = item.content_type.partition("/")
        entity.add_attachment(
            item.data,
            maintype=maintype or "application",
            subtype=subtype or "octet-stream",
            filename=item.filename,
        )
    del entity["MIME-Version"]
    return to_crlf(entity.as_bytes())


def encrypt_entity(entity: bytes, certificates: Sequence[x509.Certificate]) -> bytes:
    """Encrypt ``entity`` for the certificates; return cryptography's S/MIME output (LF endings).

    The Binary option keeps the entity's bytes exactly (it is already canonical CRLF), so the
    recipient decrypts exactly what was sent.
    """
    if not certificates:
        raise SafeMailError("no recipient certificates", "give at least one --recipient-cert")
    builder = pkcs7.PKCS7EnvelopeBuilder().set_data(entity)
    for cert in certificates:
        builder = builder.add_recipient(cert)
    builder = builder.set_content_encryption_algorithm(pkcs7.algorithms.AES256)
    return builder.encrypt(serialization.Encoding.SMIME, [pkcs7.PKCS7Options.Binary])


def _header_value(name: str, value: str) -> str:
    if "\r" in value or "\n" in value:
        raise SafeMailError(f"the {name} contains a line break", "give it on one line")
    if value.isascii():
        return value
    return email.header.Header(value, "utf-8", header_name=name).encode()


def build_message(
    entity: bytes,
    certificates: Sequence[x509.Certificate],
    *,
    sender: str,
    recipients: Sequence[str],
    subject: str,
    date: datetime.datetime | None = None,
    message_id: str | None = None,
) -> bytes:
    """A complete S/MIME enveloped RFC 5322 message (CRLF endings) for SMTP submission."""
    validate_mailbox(sender)
    if not recipients:
        raise SafeMailError("no recipients", "give at least one --to address")
    for mailbox in recipients:
        validate_mailbox(mailbox)
    smime = encrypt_entity(entity, certificates)
    domain = sender.rsplit("@", 1)[1]
    headers = [
        ("From", sender),
        ("To", ", ".join(recipients)),
        ("Subject", _header_value("Subject", subject)),
        ("Date", email.utils.format_datetime(date or datetime.datetime.now(datetime.UTC))),
        ("Message-ID", message_id or email.utils.make_msgid(domain=domain)),
    ]
    head = "".join(f"{name}: {value}\n" for name, value in headers).encode("ascii")
    # cryptography's S/MIME output begins with MIME-Version, Content-Type and
    # Content-Transfer-Encoding headers and uses bare LF line endings.
    return to_crlf(head + smime)


def envelope_der(raw: bytes) -> bytes:
    """The CMS DER inside a received S/MIME message; raise SafeMailError if it is none."""
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    ctype = headers.get_content_type()
    if ctype not in _SMIME_TYPES:
        raise SafeMailError(
            f"the message is not S/MIME encrypted (Content-Type {ctype})",
            "only application/pkcs7-mime messages can be decrypted",
        )
    match = re.search(rb"\r?\n\r?\n", raw)
    body = raw[match.end() :] if match else b""
    cte = str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte == "binary":
        return body
    try:
        return base64.b64decode(body.translate(None, b" \t\r\n"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SafeMailError(
            "the S/MIME body is not valid base64", "the message is damaged"
        ) from exc


def decrypt_message(raw: bytes, certificate: x509.Certificate, key: PrivateKey) -> bytes:
    """Decrypt a received S/MIME enveloped message; return the inner entity exactly."""
    der = envelope_der(raw)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SafeMailError(
            "only RSA keys can decrypt S/MIME mail here", "use the RSA key you enrolled"
        )
    try:
        return pkcs7.pkcs7_decrypt_der(der, certificate, key, [])
    except ValueError as exc:
        raise SafeMailError(
            f"cannot decrypt the message: {exc}",
            "check that --key and --cert are the recipient's own pair and that the message "
            "was encrypted for that certificate",
        ) from exc
