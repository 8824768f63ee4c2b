"""A participant's confirmation of a key change, signed with the key it replaces.

The signer binds each mailbox to a participant number and a public key (its register,
:mod:`safemail.ca.signer`). A request that would put a *different* key on that mailbox is
issued only with a confirmation made by the holder of the registered key: a signature with
that (current) private key over::

    safemail-key-change-v1
    <participant number>
    <mailbox>
    <SHA-256 of the new CSR, DER, hex>

The RA never holds a participant's private key (CA-02), so a compromised RA cannot make one;
it can only replay a confirmation for the very CSR the participant confirmed, which carries the
participant's own new key. The confirmation travels as a small JSON document
(``{"version": 1, "csr_sha256": ..., "alg": ..., "signature": <base64>}``) beside the CSR.

Made on the participant's host: ``safemail ca confirm-key-change --key OLD --csr NEW ...``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from safemail.ca.errors import CaError

VERSION = 1
MAX_BYTES = 4096


def message(participant: str, mailbox: str, csr_sha256: str) -> bytes:
    return f"safemail-key-change-v{VERSION}\n{participant}\n{mailbox}\n{csr_sha256}\n".encode()


def csr_digest(csr_der: bytes) -> str:
    return hashlib.sha256(csr_der).hexdigest()


def spki_sha256(public_key: Any) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo: the key's identity in the register."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def make(private_key: Any, participant: str, mailbox: str, csr_der: bytes) -> str:
    """Return the confirmation document (JSON text) signed with ``private_key``."""
    digest = csr_digest(csr_der)
    msg = message(participant, mailbox, digest)
    if isinstance(private_key, rsa.RSAPrivateKey):
        alg = "rsa-pkcs1v15-sha256"
        sig = private_key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        alg = "ecdsa-sha256"
        sig = private_key.sign(msg, ec.ECDSA(hashes.SHA256()))
    else:
        raise CaError("the current key is neither RSA nor EC; it cannot confirm a key change")
    return json.dumps(
        {
            "version": VERSION,
            "csr_sha256": digest,
            "alg": alg,
            "signature": base64.b64encode(sig).decode(),
        },
        sort_keys=True,
    )


def check(
    document: Any, public_key: Any, participant: str, mailbox: str, csr_der: bytes
) -> str | None:
    """Return None if ``document`` confirms this CSR with ``public_key``, else what is wrong."""
    if not isinstance(document, str) or len(document) > MAX_BYTES:
        return "the confirmation is missing or too long"
    try:
        data = json.loads(document)
    except ValueError:
        return "the confirmation is not JSON"
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return "the confirmation has an unknown format"
    digest = csr_digest(csr_der)
    if data.get("csr_sha256") != digest:
        return "the confirmation is for another CSR"
    try:
        sig = base64.b64decode(str(data.get("signature", "")), validate=True)
    except (binascii.Error, ValueError):
        return "the confirmation's signature is not base64"
    msg = message(participant, mailbox, digest)
    try:
        if data.get("alg") == "rsa-pkcs1v15-sha256" and isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
        elif data.get("alg") == "ecdsa-sha256" and isinstance(
            public_key, ec.EllipticCurvePublicKey
        ):
            public_key.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        else:
            return "the confirmation's algorithm does not fit the registered key"
    except InvalidSignature:
        return "the confirmation is not signed by the registered key"
    return None
