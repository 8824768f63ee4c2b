"""Shared helpers for the CA tests (keys, CSRs, a ready-made RA/signer/dist trio).

Keys are cached per process: RSA generation dominates the run time otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from safemail.ca import keychange
from safemail.ca.dist import Distribution
from safemail.ca.journal import Journal
from safemail.ca.policy import CaPolicy
from safemail.ca.ra import RegistrationAuthority
from safemail.ca.signer import Signer

DOMAIN = "safemail.example"
MAILBOX = f"praxis.mueller@{DOMAIN}"
NUMBER = "123456789"


def policy_dict(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "ca_subject": {"C": "DE", "O": "SafeMail Test Association", "CN": "SafeMail Test CA"},
        "mail_domains": [DOMAIN],
        "crl_distribution_point": "http://ca-dist.safemail.example/crl.der",
        # EC keeps the tests fast; one test covers the RSA 4096 CA.
        "ca_key_type": "ec-p384",
    }
    data.update(overrides)
    return data


def policy(**overrides: Any) -> CaPolicy:
    return CaPolicy.from_dict(policy_dict(**overrides))


@functools.cache
def rsa_key(bits: int = 3072, n: int = 0) -> rsa.RSAPrivateKey:
    del n  # distinct cache entries for distinct keys of the same size
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def ec_key(curve: str = "P-256") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1() if curve == "P-256" else ec.SECP384R1())


def make_csr(
    key: Any,
    *,
    san: list[str] | None = None,
    subject_email: str | None = None,
    cn: str = "Praxis Mueller",
    hash_alg: hashes.HashAlgorithm | None = None,
) -> bytes:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if subject_email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, subject_email))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(e) for e in san]), critical=False
        )
    csr = builder.sign(key, hash_alg or hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass
class Trio:
    """The three CA hosts, each with its own state directory, plus the exchange steps."""

    root: Path
    ra: RegistrationAuthority
    signer: Signer
    dist: Distribution

    def register(self, number: str = NUMBER, mailbox: str = MAILBOX, specialty: str = "GP"):
        return self.ra.register_participant(
            number, "Praxis Mueller", mailbox, specialty, actor="alice"
        )

    def enrol(
        self,
        number: str = NUMBER,
        mailbox: str = MAILBOX,
        key: Any = None,
        renewal: bool = False,
        confirm_with: Any = None,
    ) -> str:
        """submit -> approve -> issue; return the serial. ``confirm_with``: the current key,
        which confirms a key change (safemail.ca.keychange)."""
        csr = make_csr(key or rsa_key(), san=[mailbox])
        key_change = None
        if confirm_with is not None:
            der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
            key_change = keychange.make(confirm_with, number, mailbox, der)
        req = self.ra.submit(csr, number, actor="alice", renewal=renewal, key_change=key_change)
        self.ra.approve(req.id, operator="bob")
        [out] = [
            o
            for o in self.signer.issue_from_outbox(self.outbox, actor="carol")
            if o.request_id == req.id
        ]
        assert out.serial is not None, out
        return out.serial

    @property
    def outbox(self) -> Path:
        return self.root / "ra" / "outbox" / "approved"

    def publish(self) -> Any:
        """CRL on the signer, push (the signer dir is the source), publish, sync to the RA."""
        self.signer.generate_crl(actor="carol")
        return self.dist.publish(
            self.root / "signer",
            actor="dave",
            dn_template="uid={participant},ou=participants,dc=safemail",
        )


def make_trio(tmp_path: Path, pol: CaPolicy | None = None) -> Trio:
    pol = pol or policy()
    dist = Distribution(
        tmp_path / "dist", journal=Journal(tmp_path / "dist" / "journal.jsonl", host="ca-dist")
    )
    ra = RegistrationAuthority(
        tmp_path / "ra",
        pol,
        journal=Journal(tmp_path / "ra" / "journal.jsonl", host="ca-ra"),
        # In production the RA gets a read-only copy of the published tree; here it reads it.
        published_dir=dist.published,
    )
    signer = Signer(
        tmp_path / "signer",
        pol,
        journal=Journal(tmp_path / "signer" / "journal.jsonl", host="ca-signer"),
    )
    signer.init(actor="carol")
    return Trio(tmp_path, ra, signer, dist)
