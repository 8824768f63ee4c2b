from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
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
from safemail.ca.errors import CaError, CsrRefused, RegistrationRefused
from safemail.ca.ra import RegistrationAuthority


@pytest.fixture
def trio(tmp_path: Path) -> Trio:
    t = make_trio(tmp_path)
    t.register()
    return t


@pytest.fixture
def ra(trio: Trio) -> RegistrationAuthority:
    return trio.ra


def queue_files(ra: RegistrationAuthority) -> list[Path]:
    return sorted(p for p in (ra.state_dir).rglob("*.json") if p.name != "participants.json")


def refusal(ra: RegistrationAuthority, csr: bytes, number: str = NUMBER, **kw) -> CsrRefused:
    before = queue_files(ra)
    with pytest.raises(CsrRefused) as exc:
        ra.submit(csr, number, actor="alice", **kw)
    assert queue_files(ra) == before, "a refused request must leave no file behind"
    assert not list(ra.state_dir.rglob("*.tmp")), "no temporary file may survive"
    return exc.value


# ----------------------------------------------------------------- register
def test_register_writes_the_participant(ra: RegistrationAuthority) -> None:
    p = ra.participants()[NUMBER]
    assert (p.mailbox, p.specialty, p.practice_name) == (MAILBOX, "GP", "Praxis Mueller")
    ra.register_participant("LAB-0001", "Labor Nord", f"labor.nord@{DOMAIN}", "LAB", actor="a")
    assert set(ra.participants()) == {NUMBER, "LAB-0001"}


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        ((NUMBER, "X", f"other@{DOMAIN}", "GP"), "already-registered", "already registered"),
        (("987654321", "X", "a@gmail.com", "GP"), "mailbox-domain", "not in a SafeMail domain"),
        (("987654321", "X", f"Praxis@{DOMAIN}", "GP"), "bad-mailbox", "not a valid mailbox"),
        (("987654321", "X", f"a/../b@{DOMAIN}", "GP"), "bad-mailbox", "not a valid mailbox"),
        (
            ("987654321", "X", f"x@{DOMAIN}", "DENTIST"),
            "unknown-specialty",
            "specialty group 'DENTIST' is not one of",
        ),
        (("987654321", "X", MAILBOX, "GP"), "mailbox-taken", "already belongs to participant"),
        (("1", "X", f"x@{DOMAIN}", "GP"), "bad-participant-number", "not a valid participant"),
        (("987654321", "", f"x@{DOMAIN}", "GP"), "bad-practice-name", "1 to 64"),
    ],
)
def test_register_refusals(ra: RegistrationAuthority, args, code: str, fragment: str) -> None:
    before = ra.register_path.read_bytes()
    with pytest.raises(RegistrationRefused) as exc:
        ra.register_participant(*args, actor="alice")
    assert exc.value.code == code
    assert fragment in exc.value.message
    assert ra.register_path.read_bytes() == before


def test_bad_specialty_hint_lists_the_groups(ra: RegistrationAuthority) -> None:
    with pytest.raises(RegistrationRefused) as exc:
        ra.register_participant("987654321", "X", f"x@{DOMAIN}", "dentist", actor="a")
    assert exc.value.hint and "GP" in exc.value.hint and "HOSPITAL" in exc.value.hint


def test_import_register_from_yaml(ra: RegistrationAuthority, tmp_path: Path) -> None:
    f = tmp_path / "participants.yml"
    f.write_text(
        f"- {{number: '111222333', practice_name: Klinik Sued, mailbox: klinik@{DOMAIN}, "
        "specialty: HOSPITAL}\n"
        f"- {{number: '{NUMBER}', practice_name: dup, mailbox: x@{DOMAIN}, specialty: GP}}\n"
    )
    assert ra.import_register(f, actor="alice") == 1
    assert ra.participants()["111222333"].specialty == "HOSPITAL"


# ----------------------------------------------------------------- submit: accepted
def test_submit_queues_a_pending_request(ra: RegistrationAuthority) -> None:
    req = ra.submit(make_csr(rsa_key(), san=[MAILBOX]), NUMBER, actor="alice")
    assert req.state == "pending"
    stored = ra.get(req.id)
    assert (stored.participant, stored.mailbox, stored.specialty) == (NUMBER, MAILBOX, "GP")
    assert "PRIVATE" not in stored.csr_pem
    assert [r.id for r in ra.list("pending")] == [req.id]


def test_subject_email_alone_is_accepted(ra: RegistrationAuthority) -> None:
    assert ra.submit(make_csr(rsa_key(), subject_email=MAILBOX), NUMBER, actor="a").id


def test_der_csr_is_accepted(ra: RegistrationAuthority) -> None:
    pem = make_csr(rsa_key(), san=[MAILBOX])
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    assert ra.submit(der, NUMBER, actor="alice").mailbox == MAILBOX


# ----------------------------------------------------------------- submit: refused
def test_wrong_email_is_refused(ra: RegistrationAuthority) -> None:
    exc = refusal(ra, make_csr(rsa_key(), san=[f"praxis.meier@{DOMAIN}"]))
    assert exc.code == "email-mismatch"
    assert f"names praxis.meier@{DOMAIN}" in exc.message
    assert f"registered mailbox is {MAILBOX}" in exc.message


def test_second_email_in_subject_is_refused(ra: RegistrationAuthority) -> None:
    exc = refusal(ra, make_csr(rsa_key(), san=[MAILBOX], subject_email=f"x@{DOMAIN}"))
    assert exc.code == "email-mismatch"


def test_email_differing_only_in_case_is_refused(ra: RegistrationAuthority) -> None:
    assert refusal(ra, make_csr(rsa_key(), san=[MAILBOX.upper()])).code == "email-mismatch"


def test_missing_email_is_refused(ra: RegistrationAuthority) -> None:
    exc = refusal(ra, make_csr(rsa_key()))
    assert exc.code == "email-missing"
    assert MAILBOX in exc.message


def test_rsa_1024_is_refused(ra: RegistrationAuthority) -> None:
    exc = refusal(ra, make_csr(rsa_key(1024), san=[MAILBOX]))
    assert exc.code == "key-too-small"
    assert "RSA 1024 bits" in exc.message and "at least 3072" in exc.message


def test_rsa_2048_refused_by_default_policy(ra: RegistrationAuthority) -> None:
    assert refusal(ra, make_csr(rsa_key(2048), san=[MAILBOX])).code == "key-too-small"


def test_ec_key_refused_unless_policy_allows(tmp_path: Path) -> None:
    ra = RegistrationAuthority(tmp_path / "a", policy())
    ra.register_participant(NUMBER, "P", MAILBOX, "GP", actor="a")
    exc = refusal(ra, make_csr(ec_key(), san=[MAILBOX]))
    assert exc.code == "key-type-not-allowed" and "EC P-256" in exc.message
    ra2 = RegistrationAuthority(
        tmp_path / "b", policy(participant_key_types=["rsa", "ec"], participant_ec_curves=["P-384"])
    )
    ra2.register_participant(NUMBER, "P", MAILBOX, "GP", actor="a")
    assert refusal(ra2, make_csr(ec_key("P-256"), san=[MAILBOX])).code == "key-type-not-allowed"
    assert ra2.submit(make_csr(ec_key("P-384"), san=[MAILBOX]), NUMBER, actor="a").id


def test_unknown_participant_is_refused(ra: RegistrationAuthority) -> None:
    exc = refusal(ra, make_csr(rsa_key(), san=[MAILBOX]), number="999999999")
    assert exc.code == "unknown-participant"
    assert "not in the participant register" in exc.message


def _tamper(pem: bytes, old: bytes, new: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    i = der.find(old)
    assert i >= 0
    der[i : i + len(old)] = new
    return bytes(der)


def test_csr_with_altered_content_is_refused(ra: RegistrationAuthority) -> None:
    csr = _tamper(make_csr(rsa_key(), san=[MAILBOX]), b"Praxis Mueller", b"Praxis Meier12")
    exc = refusal(ra, csr)
    assert exc.code == "bad-signature"
    assert "damaged or altered" in exc.message


def test_csr_with_altered_signature_is_refused(ra: RegistrationAuthority) -> None:
    der = bytearray(
        x509.load_pem_x509_csr(make_csr(rsa_key(), san=[MAILBOX])).public_bytes(
            serialization.Encoding.DER
        )
    )
    der[-1] ^= 0x01
    assert refusal(ra, bytes(der)).code == "bad-signature"


def test_private_key_is_refused_and_not_stored(ra: RegistrationAuthority) -> None:
    key_pem = rsa_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    exc = refusal(ra, key_pem)
    assert exc.code == "private-key-submitted"
    assert exc.hint and "never leave the practice" in exc.hint
    text = b"".join(p.read_bytes() for p in ra.state_dir.rglob("*") if p.is_file())
    assert b"PRIVATE KEY" not in text
    assert key_pem.splitlines()[1] not in text


def test_garbage_is_refused(ra: RegistrationAuthority) -> None:
    assert refusal(ra, b"hello").code == "not-a-csr"
    assert refusal(ra, b"-----BEGIN CERTIFICATE REQUEST-----\nxx\n").code == "not-a-csr"


def test_second_pending_request_is_refused(ra: RegistrationAuthority) -> None:
    first = ra.submit(make_csr(rsa_key(), san=[MAILBOX]), NUMBER, actor="alice")
    exc = refusal(ra, make_csr(rsa_key(3072, 1), san=[MAILBOX]))
    assert exc.code == "request-pending" and first.id in exc.message


def test_participant_with_valid_cert_is_refused_unless_renewal(trio: Trio) -> None:
    serial = trio.enrol()
    trio.publish()
    exc = refusal(trio.ra, make_csr(rsa_key(3072, 1), san=[MAILBOX]))
    assert exc.code == "already-certified"
    assert serial in exc.message and "--renewal" in (exc.hint or "")
    assert trio.ra.submit(
        make_csr(rsa_key(3072, 1), san=[MAILBOX]), NUMBER, actor="alice", renewal=True
    ).renewal
    # once revoked and published, a new (non-renewal) request is accepted again
    other = trio.ra.list("pending")[0]
    trio.ra.reject(other.id, reason="test", operator="bob")
    trio.signer.revoke(int(serial, 16), "key-compromise", actor="carol")
    trio.publish()
    assert trio.ra.submit(make_csr(rsa_key(3072, 2), san=[MAILBOX]), NUMBER, actor="alice").id


def test_refusals_are_journaled_without_the_csr(ra: RegistrationAuthority) -> None:
    csr = make_csr(rsa_key(1024), san=[MAILBOX])
    refusal(ra, csr)
    entries = ra.journal.path.read_text().splitlines()
    assert '"action":"submit-refused"' in entries[-1]
    assert '"detail":"key-too-small"' in entries[-1]
    assert "CERTIFICATE" not in ra.journal.path.read_text()
    assert journal.verify(ra.journal.path).ok


def test_failed_journal_write_leaves_no_request(ra: RegistrationAuthority, monkeypatch) -> None:
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ra.journal, "record", boom)
    with pytest.raises(OSError):
        ra.submit(make_csr(rsa_key(), san=[MAILBOX]), NUMBER, actor="alice")
    assert queue_files(ra) == []


# ----------------------------------------------------------------- approve / reject
def test_approve_moves_request_to_outbox(ra: RegistrationAuthority) -> None:
    req = ra.submit(make_csr(rsa_key(), san=[MAILBOX]), NUMBER, actor="alice")
    done = ra.approve(req.id, operator="bob")
    assert (done.state, done.operator) == ("approved", "bob")
    assert (ra.state_dir / "outbox" / "approved" / f"{req.id}.json").exists()
    assert not (ra.state_dir / "queue" / "pending" / f"{req.id}.json").exists()
    assert [r.state for r in ra.list()] == ["approved"]
    with pytest.raises(CaError, match="already approved"):
        ra.reject(req.id, reason="late", operator="bob")


def test_reject_records_reason_and_operator(ra: RegistrationAuthority) -> None:
    req = ra.submit(make_csr(rsa_key(), san=[MAILBOX]), NUMBER, actor="alice")
    with pytest.raises(CaError, match="reason"):
        ra.reject(req.id, reason="  ", operator="bob")
    done = ra.reject(req.id, reason="identity not confirmed by phone", operator="bob")
    assert ra.get(req.id).reason == "identity not confirmed by phone"
    assert done.operator == "bob" and ra.list("rejected")[0].id == req.id
    assert not list((ra.state_dir / "outbox" / "approved").glob("*.json"))


def test_bad_request_id_and_operator(ra: RegistrationAuthority) -> None:
    with pytest.raises(CaError, match="not a request id"):
        ra.approve("../../etc/passwd", operator="bob")
    with pytest.raises(CaError, match="no request"):
        ra.approve("0123456789abcdef", operator="bob")
    with pytest.raises(CaError, match="operator name"):
        ra.approve("0123456789abcdef", operator="")


def test_approve_rechecks_the_register(ra: RegistrationAuthority) -> None:
    req = ra.submit(make_csr(rsa_key(), san=[MAILBOX]), NUMBER, actor="alice")
    ra.register_participant(NUMBER, "Praxis Mueller", f"neu@{DOMAIN}", "GP", actor="a", update=True)
    with pytest.raises(CsrRefused) as exc:
        ra.approve(req.id, operator="bob")
    assert exc.value.code == "register-changed"
    assert ra.get(req.id).state == "pending"
