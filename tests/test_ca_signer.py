from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_ca_support import (
    DOMAIN,
    MAILBOX,
    NUMBER,
    Trio,
    ec_key,
    make_csr,
    make_trio,
    policy,
    rsa_key,
)

from safemail.ca import journal
from safemail.ca.errors import CaError
from safemail.ca.signer import Signer, parse_serial


@pytest.fixture
def trio(tmp_path: Path) -> Trio:
    t = make_trio(tmp_path)
    t.register()
    return t


def ca_cert(signer: Signer) -> x509.Certificate:
    return x509.load_pem_x509_certificate(signer.cert_path.read_bytes())


# ----------------------------------------------------------------- CA
def test_ca_key_is_private_and_profile_is_a_root(trio: Trio) -> None:
    s = trio.signer
    assert stat.S_IMODE(s.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(s.key_path.parent.stat().st_mode) == 0o700
    ca = ca_cert(s)
    assert ca.subject == ca.issuer == policy().ca_name()
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature and not ku.value.content_commitment
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"
    ca.verify_directly_issued_by(ca)
    days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    assert days == policy().ca_validity_days


def test_init_is_idempotent(trio: Trio) -> None:
    key_before = trio.signer.key_path.read_bytes()
    cert_before = trio.signer.cert_path.read_bytes()
    cert, created = trio.signer.init(actor="carol")
    assert not created
    assert trio.signer.key_path.read_bytes() == key_before
    assert trio.signer.cert_path.read_bytes() == cert_before
    assert cert == ca_cert(trio.signer)


def test_init_refuses_a_policy_naming_another_ca(trio: Trio) -> None:
    other = Signer(trio.signer.state_dir, policy(ca_subject={"CN": "Other CA"}))
    with pytest.raises(CaError, match="but the policy names"):
        other.init(actor="carol")


def test_half_present_ca_is_not_regenerated(trio: Trio) -> None:
    trio.signer.cert_path.unlink()
    with pytest.raises(CaError, match="missing"):
        trio.signer.init(actor="carol")
    assert trio.signer.key_path.exists()


def test_world_readable_key_is_refused(trio: Trio) -> None:
    os.chmod(trio.signer.key_path, 0o644)
    with pytest.raises(CaError, match="readable by others"):
        trio.signer.load_ca()


def test_rsa_4096_ca(tmp_path: Path) -> None:
    s = Signer(tmp_path, policy(ca_key_type="rsa-4096"))
    cert, created = s.init(actor="carol")
    assert created
    assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 4096
    assert cert.signature_hash_algorithm.name == "sha256"


# ----------------------------------------------------------------- issuance
def test_issued_certificate_profile(trio: Trio) -> None:
    serial = trio.enrol()
    cert = trio.signer.certificate(serial)
    ca = ca_cert(trio.signer)
    cert.verify_directly_issued_by(ca)
    assert cert.issuer == ca.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Praxis Mueller"
    assert f"{cert.serial_number:032x}" == serial
    assert 64 < cert.serial_number.bit_length() <= 128
    assert cert.public_key() == rsa_key().public_key()
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert days == policy().ee_validity_days
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.content_commitment  # no nonRepudiation: no qualified signatures
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert not ku.value.data_encipherment and not ku.value.key_agreement
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == [MAILBOX]
    assert len(list(san)) == 1
    cdp = ext.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for n in cdp[0].full_name] == [policy().crl_distribution_point]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert (trio.signer.issued_dir / f"{serial}.pem").exists()
    entry = trio.signer.index()["certs"][serial]
    assert (entry["participant"], entry["mailbox"], entry["status"]) == (NUMBER, MAILBOX, "valid")


def test_ec_participant_gets_key_agreement(tmp_path: Path) -> None:
    t = make_trio(tmp_path, policy(participant_key_types=["rsa", "ec"]))
    t.register()
    cert = t.signer.certificate(t.enrol(key=ec_key()))
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_agreement and ku.digital_signature and not ku.key_encipherment
    assert not ku.content_commitment


def test_issue_is_idempotent(trio: Trio) -> None:
    serial = trio.enrol()
    pem = (trio.signer.issued_dir / f"{serial}.pem").read_bytes()
    (trio.signer.issued_dir / f"{serial}.pem").unlink()  # lost file is re-created from index
    again = trio.signer.issue_from_outbox(trio.outbox, actor="carol")
    assert [(o.serial, o.new) for o in again] == [(serial, False)]
    assert (trio.signer.issued_dir / f"{serial}.pem").read_bytes() == pem
    assert len(trio.signer.index()["certs"]) == 1


def test_unapproved_request_is_not_issued(trio: Trio) -> None:
    req = trio.ra.submit(make_csr(rsa_key(), san=[MAILBOX]), NUMBER, actor="a")
    out = trio.signer.issue(trio.ra.get(req.id).to_dict(), actor="carol")
    assert out.refused == "not-approved" and out.serial is None
    assert trio.signer.index()["certs"] == {}


def test_signer_rechecks_the_csr(trio: Trio) -> None:
    req = trio.ra.submit(make_csr(rsa_key(), san=[MAILBOX]), NUMBER, actor="a")
    approved = trio.ra.approve(req.id, operator="bob").to_dict()
    approved["mailbox"] = f"intruder@{DOMAIN}"  # altered on the way from the RA
    out = trio.signer.issue(approved, actor="carol")
    assert out.refused == "email-mismatch"
    # the refusal is remembered: the same request id is never issued later
    assert trio.signer.issue(approved, actor="carol").refused == "email-mismatch"


def test_signer_refuses_second_cert_unless_renewal(trio: Trio) -> None:
    first = trio.enrol()
    # the RA missed it (published tree not yet synced): the signer still refuses
    req = trio.ra.submit(make_csr(rsa_key(3072, 1), san=[MAILBOX]), NUMBER, actor="a")
    trio.ra.approve(req.id, operator="bob")
    outs = {o.request_id: o for o in trio.signer.issue_from_outbox(trio.outbox, actor="c")}
    assert outs[req.id].refused == "already-certified"
    renewed = trio.enrol(key=rsa_key(3072, 2), renewal=True, confirm_with=rsa_key())
    index = trio.signer.index()["certs"]
    assert index[first]["status"] == "revoked" and index[first]["reason"] == "superseded"
    assert index[renewed]["status"] == "valid"


def test_certificate_never_outlives_the_ca(tmp_path: Path) -> None:
    t = make_trio(tmp_path, policy(ca_validity_days=365, ee_validity_days=300))
    t.register()
    req = t.ra.submit(make_csr(rsa_key(), san=[MAILBOX]), NUMBER, actor="a")
    t.ra.approve(req.id, operator="bob")
    later = datetime.now(UTC) + timedelta(days=100)
    with pytest.raises(CaError, match="outlive the CA"):
        t.signer.issue_from_outbox(t.outbox, actor="carol", now=later)


# ----------------------------------------------------------------- revocation and CRL
def test_revoke_and_crl(trio: Trio) -> None:
    serial = trio.enrol()
    ca = ca_cert(trio.signer)
    crl1 = trio.signer.generate_crl(actor="carol")
    assert len(crl1) == 0
    trio.signer.revoke(parse_serial(serial), "key-compromise", actor="carol")
    crl2 = trio.signer.generate_crl(actor="carol")
    assert crl2.is_signature_valid(ca.public_key())
    assert crl2.issuer == ca.subject
    revoked = crl2.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert revoked is not None
    reason = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    now = datetime.now(UTC)
    assert crl2.last_update_utc <= now < crl2.next_update_utc
    assert crl2.next_update_utc - crl2.last_update_utc == timedelta(
        hours=policy().crl_validity_hours
    )

    def number(crl: x509.CertificateRevocationList) -> int:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    assert number(crl2) == number(crl1) + 1
    aki = crl2.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert (
        aki.key_identifier
        == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    )
    assert trio.signer.crl_der_path.exists()
    assert x509.load_der_x509_crl(trio.signer.crl_der_path.read_bytes()) == crl2
    assert trio.signer.index()["certs"][serial]["status"] == "revoked"
    with pytest.raises(CaError, match="already revoked"):
        trio.signer.revoke(int(serial, 16), "superseded", actor="carol")


def test_unspecified_reason_has_no_reason_code(trio: Trio) -> None:
    serial = trio.enrol()
    trio.signer.revoke(int(serial, 16), "unspecified", actor="carol")
    rc = trio.signer.generate_crl(actor="c").get_revoked_certificate_by_serial_number(
        int(serial, 16)
    )
    assert rc is not None and len(rc.extensions) == 0


def test_revoke_refuses_unknown_serial_and_reason(trio: Trio) -> None:
    with pytest.raises(CaError, match="was issued by this CA"):
        trio.signer.revoke(12345, "superseded", actor="carol")
    with pytest.raises(CaError, match="unknown revocation reason"):
        trio.signer.revoke(12345, "holiday", actor="carol")
    with pytest.raises(CaError, match="not a certificate serial"):
        parse_serial("xyz")
    assert parse_serial("0x0A:bc") == 0xABC


def test_signer_journal_records_every_operation(trio: Trio) -> None:
    serial = trio.enrol()
    trio.signer.revoke(int(serial, 16), "superseded", actor="carol")
    trio.signer.generate_crl(actor="carol")
    actions = [
        e.split('"action":"')[1].split('"')[0]
        for e in trio.signer.journal.path.read_text().splitlines()
    ]
    assert actions == ["ca-init", "issue", "revoke", "crl"]
    assert journal.verify(trio.signer.journal.path).ok
    assert "PRIVATE" not in trio.signer.journal.path.read_text()
