from __future__ import annotations

import base64
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from test_ca_support import MAILBOX, NUMBER, Trio, make_trio, policy, rsa_key

from safemail.ca.dist import (
    LdapCertUpdate,
    current_certificate,
    escape_dn_value,
    ldap_certificate_removal,
    ldap_certificate_update,
    participant_dn,
)
from safemail.ca.errors import CaError


@pytest.fixture
def trio(tmp_path: Path) -> Trio:
    t = make_trio(tmp_path)
    t.register()
    return t


def test_publish_tree(trio: Trio) -> None:
    serial = trio.enrol()
    report = trio.publish()
    pub = trio.dist.published
    assert (pub / "ca.pem").read_bytes() == trio.signer.cert_path.read_bytes()
    assert (pub / "crl.pem").read_bytes() == trio.signer.crl_pem_path.read_bytes()
    assert (pub / "crl.der").read_bytes() == trio.signer.crl_der_path.read_bytes()
    cert = x509.load_pem_x509_certificate((pub / "certs" / f"{MAILBOX}.pem").read_bytes())
    assert f"{cert.serial_number:032x}" == serial
    assert report.published == {MAILBOX: serial}
    [upd] = report.ldap
    assert upd.dn == f"uid={NUMBER},ou=participants,dc=safemail"
    assert upd.values == (trio.signer.certificate(serial).public_bytes(Encoding.DER),)
    assert current_certificate(pub, MAILBOX) == cert


def test_revoked_certificate_is_withdrawn(trio: Trio) -> None:
    serial = trio.enrol()
    trio.publish()
    trio.signer.revoke(int(serial, 16), "affiliation-changed", actor="carol")
    report = trio.publish()
    assert report.withdrawn == [MAILBOX]
    assert not (trio.dist.published / "certs" / f"{MAILBOX}.pem").exists()
    assert [u.op for u in report.ldap] == ["delete"]
    assert current_certificate(trio.dist.published, MAILBOX) is None


def test_renewal_publishes_the_new_certificate(trio: Trio) -> None:
    trio.enrol()
    trio.publish()
    new = trio.enrol(key=rsa_key(3072, 1), renewal=True, confirm_with=rsa_key())
    assert trio.publish().published == {MAILBOX: new}


def test_ldap_update_and_ldif() -> None:
    der = b"\x30\x82" + b"x" * 100
    upd = ldap_certificate_removal("uid=1,dc=x")
    assert upd.modlist() == {"userCertificate;binary": [("MODIFY_DELETE", [])]}
    assert upd.to_ldif() == (
        "dn: uid=1,dc=x\nchangetype: modify\ndelete: userCertificate;binary\n-\n"
    )
    rep = LdapCertUpdate("uid=1,dc=x", "replace", (der,))
    assert rep.modlist() == {"userCertificate;binary": [("MODIFY_REPLACE", [der])]}
    ldif = rep.to_ldif().splitlines()
    assert ldif[:3] == ["dn: uid=1,dc=x", "changetype: modify", "replace: userCertificate;binary"]
    assert all(len(line) <= 76 for line in ldif)
    joined = "".join(line[1:] if line.startswith(" ") else line for line in ldif[3:-1])
    assert base64.b64decode(joined.split(":: ")[1]) == der


def test_ldap_certificate_update_carries_der(trio: Trio) -> None:
    cert = trio.signer.certificate(trio.enrol())
    upd = ldap_certificate_update(cert, "uid=1,dc=x")
    assert upd.values == (cert.public_bytes(Encoding.DER),)
    assert upd.attribute == "userCertificate;binary" and upd.op == "replace"


def test_dn_values_are_escaped() -> None:
    assert escape_dn_value("a,b+c=d") == "a\\,b\\+c\\=d"
    assert escape_dn_value(" #x ") == "\\ #x\\ "
    assert participant_dn("mail={mailbox},dc=x", participant="1", mailbox="a@b") == "mail=a@b,dc=x"
    with pytest.raises(CaError, match="names neither"):
        participant_dn("dc=x", participant="1", mailbox="a@b")


def test_certificate_not_signed_by_the_ca_is_refused(trio: Trio, tmp_path: Path) -> None:
    trio.enrol()
    trio.signer.generate_crl(actor="c")
    t2 = make_trio(tmp_path / "other")
    t2.register()
    serial = t2.enrol()
    shutil.copy(t2.signer.issued_dir / f"{serial}.pem", trio.signer.issued_dir / "zz.pem")
    with pytest.raises(CaError, match="not a certificate signed by the CA"):
        trio.dist.publish(trio.root / "signer", actor="dave")
    assert not (trio.dist.published / "certs").exists()


def test_crl_not_signed_by_the_ca_is_refused(trio: Trio, tmp_path: Path) -> None:
    trio.signer.generate_crl(actor="c")
    other = make_trio(tmp_path / "other")
    other.signer.generate_crl(actor="c")
    shutil.copy(other.signer.crl_pem_path, trio.signer.crl_pem_path)
    with pytest.raises(CaError, match="not signed by the CA"):
        trio.dist.publish(trio.root / "signer", actor="dave")


def test_stale_crl_is_refused(trio: Trio) -> None:
    trio.signer.generate_crl(actor="c")
    later = datetime.now(UTC) + timedelta(hours=policy().crl_validity_hours + 1)
    with pytest.raises(CaError, match="out of date"):
        trio.dist.publish(trio.root / "signer", actor="dave", now=later)


def test_crl_rollback_is_refused(trio: Trio, tmp_path: Path) -> None:
    trio.signer.generate_crl(actor="c")
    old = tmp_path / "old-crl.pem"
    shutil.copy(trio.signer.crl_pem_path, old)
    trio.publish()  # CRL number 2
    shutil.copy(old, trio.signer.crl_pem_path)
    with pytest.raises(CaError, match="refusing to roll revocations back"):
        trio.dist.publish(trio.root / "signer", actor="dave")


def test_ca_is_pinned(trio: Trio, tmp_path: Path) -> None:
    trio.publish()
    other = make_trio(tmp_path / "other")
    other.signer.generate_crl(actor="c")
    with pytest.raises(CaError, match="differs from the published one"):
        trio.dist.publish(other.root / "signer", actor="dave")
    trio.dist.publish(other.root / "signer", actor="dave", accept_new_ca=True)


def test_missing_push_is_explained(trio: Trio, tmp_path: Path) -> None:
    with pytest.raises(CaError, match="ca.pem is missing"):
        trio.dist.publish(tmp_path / "empty", actor="dave")
    with pytest.raises(CaError, match="crl.pem is missing"):
        trio.dist.publish(trio.root / "signer", actor="dave")


def test_expired_certificate_is_not_published(trio: Trio) -> None:
    trio.enrol()
    trio.signer.generate_crl(actor="c")
    later = datetime.now(UTC) + timedelta(days=policy().ee_validity_days + 1)
    # a CRL that is still fresh at that time
    trio.signer.generate_crl(actor="c", now=later - timedelta(hours=1))
    report = trio.dist.publish(trio.root / "signer", actor="dave", now=later)
    assert report.published == {}
