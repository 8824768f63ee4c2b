"""Self-signed participant certificates for the tests that build real S/MIME mail."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID


def self_signed(mailbox: str, key, *, san: bool = True, skid: bool = False) -> x509.Certificate:
    """A one-day certificate for `mailbox` over `key` (RSA or EC), signed by itself."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, mailbox)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), critical=False
        )
    if skid:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    return builder.sign(key, hashes.SHA256())
