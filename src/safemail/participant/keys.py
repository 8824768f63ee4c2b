"""Participant keys and certificate requests (CA-02: the key never leaves the participant).

Pure functions build keys and CSRs; :func:`write_private_key` is the one place that writes a
key, always with mode 0600 and never over an existing file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from safemail.errors import SafeMailError

__all__ = [
    "EC_CURVES",
    "PrivateKey",
    "build_csr",
    "generate_key",
    "load_private_key",
    "validate_mailbox",
    "write_private_key",
]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
    "secp521r1": ec.SECP521R1,
}
RSA_MIN_BITS = 3072

# A deliberately plain mailbox form: local@domain, ASCII, no quoting or comments.
_MAILBOX = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def validate_mailbox(mailbox: str) -> str:
    """Return the mailbox if it is a plain ``local@domain`` address; raise SafeMailError if not."""
    if not _MAILBOX.fullmatch(mailbox) or ".." in mailbox:
        raise SafeMailError(
            f"{mailbox!r} is not a plain mailbox address",
            "give the participant's address as local@domain, e.g. praxis1@safenet.test",
        )
    return mailbox


def generate_key(kind: str = "rsa", *, rsa_bits: int = RSA_MIN_BITS, curve: str = "secp256r1"):
    """Generate a private key: RSA (default 3072 bits) or EC on a named curve."""
    if kind == "rsa":
        if rsa_bits < RSA_MIN_BITS:
            raise SafeMailError(
                f"RSA keys of {rsa_bits} bits are too short",
                f"use --rsa-bits {RSA_MIN_BITS} or more",
            )
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    if kind == "ec":
        if curve not in EC_CURVES:
            raise SafeMailError(
                f"unknown curve {curve!r}", f"choose one of: {', '.join(sorted(EC_CURVES))}"
            )
        return ec.generate_private_key(EC_CURVES[curve]())
    raise SafeMailError(f"unknown key type {kind!r}", "choose rsa or ec")


def build_csr(
    key: PrivateKey, mailbox: str, common_name: str | None = None
) -> x509.CertificateSigningRequest:
    """A CSR for ``mailbox``: subject CN and emailAddress, rfc822Name SAN, S/MIME usage."""
    validate_mailbox(mailbox)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name or mailbox),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, mailbox),
        ]
    )
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def write_private_key(path: Path, key: PrivateKey, passphrase: bytes | None = None) -> None:
    """Write ``key`` as PKCS#8 PEM to a new file created with mode 0600.

    Refuses to overwrite: a participant's existing key may be the only way to read old mail.
    """
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SafeMailError(
            f"{path} already exists; not overwriting a private key",
            "choose another --key path, or move the old key away if you really mean to replace it",
        ) from exc
    except OSError as exc:
        raise SafeMailError(f"cannot create {path}: {exc.strerror}", "check the directory") from exc
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # whatever the umask
        handle.write(pem)


def load_private_key(path: Path, passphrase: bytes | None = None) -> PrivateKey:
    """Load a PEM private key; raise SafeMailError with a next step if that fails."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SafeMailError(f"cannot read key {path}: {exc.strerror}", "check --key") from exc
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        raise SafeMailError(
            f"key {path} is encrypted and no passphrase was given (or one was given for a "
            "plain key)",
            "pass --passphrase-file, or set SAFEMAIL_KEY_PASSPHRASE",
        ) from exc
    except ValueError as exc:
        raise SafeMailError(f"cannot load key {path}: {exc}", "is it a PEM private key?") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise SafeMailError(f"key {path} is neither RSA nor EC", "generate one with keygen")
    return key
