"""Checks on a participant's certificate signing request, shared by RA and signer.

Pure functions: bytes and policy in, a parsed CSR or a :class:`CsrRefused` out. The RA runs
them at intake; the signer runs them again before it signs (it does not trust the front-segment
RA blindly).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from safemail.ca.errors import CsrRefused
from safemail.ca.policy import CaPolicy

_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
MAX_CSR_BYTES = 64 * 1024


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR; refuse private keys and anything that is not a CSR."""
    if len(data) > MAX_CSR_BYTES:
        raise CsrRefused("not-a-csr", f"the file is {len(data)} bytes; a CSR is a few KB at most")
    if b"PRIVATE KEY" in data:
        raise CsrRefused(
            "private-key-submitted",
            "this file contains a PRIVATE KEY, not a certificate request; it was not stored",
            "the private key must never leave the practice: send only the .csr file created "
            "by 'safemail participant keygen', and generate a new key because this one was "
            "exposed",
        )
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise CsrRefused(
            "not-a-csr",
            "the file is not a readable certificate signing request (PEM or DER)",
            "send the .csr file created by 'safemail participant keygen'",
        ) from exc


def csr_emails(csr: x509.CertificateSigningRequest) -> list[str]:
    """All e-mail addresses the CSR names: SAN rfc822Name and subject emailAddress."""
    emails = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return emails
    return emails + list(san.value.get_values_for_type(x509.RFC822Name))


def describe_key(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {_CURVES.get(key.curve.name, key.curve.name)}"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "")


def check_key(key: object, policy: CaPolicy) -> None:
    allowed = ", ".join(
        (
            f"RSA >= {policy.participant_rsa_min_bits} bits"
            if t == "rsa"
            else f"EC {'/'.join(policy.participant_ec_curves)}"
        )
        for t in policy.participant_key_types
    )
    if isinstance(key, rsa.RSAPublicKey) and "rsa" in policy.participant_key_types:
        if key.key_size < policy.participant_rsa_min_bits:
            raise CsrRefused(
                "key-too-small",
                f"the key is RSA {key.key_size} bits; the policy requires at least "
                f"{policy.participant_rsa_min_bits} bits",
                "generate a new key with 'safemail participant keygen' (it uses the policy size)",
            )
        return
    if isinstance(key, ec.EllipticCurvePublicKey) and "ec" in policy.participant_key_types:
        curve = _CURVES.get(key.curve.name)
        if curve not in policy.participant_ec_curves:
            raise CsrRefused(
                "key-type-not-allowed",
                f"the key uses curve {key.curve.name}; the policy allows {allowed}",
            )
        return
    raise CsrRefused(
        "key-type-not-allowed",
        f"the key type {describe_key(key)} is not allowed; the policy allows {allowed}",
        "generate a new key with 'safemail participant keygen'",
    )


def check_csr(csr: x509.CertificateSigningRequest, policy: CaPolicy, mailbox: str) -> None:
    """Refuse a CSR whose signature, key or e-mail address does not fit policy and mailbox."""
    if not csr.is_signature_valid:
        raise CsrRefused(
            "bad-signature",
            "the request's signature does not match its content: it was damaged or altered "
            "after it was created",
            "create the request again and send the file unchanged",
        )
    if csr.signature_hash_algorithm is None or isinstance(
        csr.signature_hash_algorithm, hashes.SHA1 | hashes.MD5
    ):
        raise CsrRefused(
            "weak-signature",
            "the request is signed with a weak or missing hash algorithm; SHA-256 or better "
            "is required",
        )
    check_key(csr.public_key(), policy)
    emails = csr_emails(csr)
    if not emails:
        raise CsrRefused(
            "email-missing",
            f"the request names no e-mail address; it must name the registered mailbox {mailbox}",
            "put the mailbox in the subjectAltName (rfc822Name) of the request",
        )
    wrong = sorted({e for e in emails if e != mailbox})
    if wrong:
        raise CsrRefused(
            "email-mismatch",
            f"the request names {', '.join(wrong)} but the participant's registered mailbox is "
            f"{mailbox}",
            "create the request for exactly the registered mailbox, or correct the register",
        )
    if not policy.mailbox_domain_allowed(mailbox):
        raise CsrRefused(
            "mailbox-domain",
            f"the mailbox {mailbox} is not in a SafeMail domain ({', '.join(policy.mail_domains)})",
        )
