"""The signer's own register of mailbox owners (issue 18): what a compromised RA cannot do.

The RA is in the front segment. Everything it hands the signer is an approved request JSON in
its outbox, so these tests play the compromised RA by writing such files directly (as root on
the RA could), then run the signer's real ``issue`` and see what it refuses and why.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_ca_support import DOMAIN, MAILBOX, NUMBER, Trio, make_csr, make_trio, policy_dict, rsa_key

from safemail.ca import journal, keychange
from safemail.ca.errors import CaError
from safemail.cli import main

VICTIM_KEY = 0
ATTACKER_KEY = 7
OTHER_NUMBER = "987654321"


@pytest.fixture
def trio(tmp_path: Path) -> Trio:
    t = make_trio(tmp_path)
    t.register()
    return t


def forged(
    trio: Trio,
    rid: str,
    *,
    number: str = NUMBER,
    mailbox: str = MAILBOX,
    key: Any = None,
    renewal: bool = False,
    key_change: str | None = None,
) -> dict[str, Any]:
    """An 'approved' request as a compromised RA writes it into its outbox."""
    csr = make_csr(key or rsa_key(3072, ATTACKER_KEY), san=[mailbox])
    req = {
        "id": rid,
        "state": "approved",
        "participant": number,
        "practice_name": "Praxis Mueller",
        "mailbox": mailbox,
        "specialty": "GP",
        "renewal": renewal,
        "csr_pem": csr.decode(),
        "csr_sha256": "0" * 64,
        "submitted_at": "2026-12-06T00:00:00Z",
        "submitted_by": "mallory",
        "operator": "mallory",
        "decided_at": "2026-12-06T00:00:00Z",
        "key_change": key_change,
    }
    trio.outbox.mkdir(parents=True, exist_ok=True)
    (trio.outbox / f"{rid}.json").write_text(json.dumps(req))
    return req


def issue(trio: Trio, rid: str) -> Any:
    outcomes = trio.signer.issue_from_outbox(trio.outbox, actor="c")
    [out] = [o for o in outcomes if o.request_id == rid]
    return out


def last_refusal(trio: Trio) -> dict[str, Any]:
    lines = trio.signer.journal.path.read_text().splitlines()
    return [json.loads(x) for x in lines if json.loads(x)["action"] == "issue-refused"][-1]


def published_key(trio: Trio) -> str:
    pem = (trio.dist.published / "certs" / f"{MAILBOX}.pem").read_bytes()
    return keychange.spki_sha256(x509.load_pem_x509_certificate(pem).public_key())


def victim_spki() -> str:
    return keychange.spki_sha256(rsa_key(3072, VICTIM_KEY).public_key())


# ----------------------------------------------------------------- the issue's reproduction
def test_second_participant_number_for_an_owned_mailbox_is_refused(trio: Trio) -> None:
    victim = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    trio.publish()
    forged(trio, "a" * 16, number=OTHER_NUMBER)
    out = issue(trio, "a" * 16)
    assert out.refused == "mailbox-owned" and out.serial is None
    assert NUMBER in out.reason
    entry = last_refusal(trio)
    assert entry["detail"] == "mailbox-owned" and entry["request"] == "a" * 16
    index = trio.signer.index()
    assert list(index["certs"]) == [victim]
    assert trio.publish().published == {MAILBOX: victim}
    assert published_key(trio) == victim_spki()


def test_renewal_with_an_attackers_csr_does_not_supersede_the_victim(trio: Trio) -> None:
    victim = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    trio.publish()
    forged(trio, "b" * 16, renewal=True)
    out = issue(trio, "b" * 16)
    assert out.refused == "key-change-unconfirmed"
    assert last_refusal(trio)["detail"] == "key-change-unconfirmed"
    assert trio.signer.index()["certs"][victim]["status"] == "valid"
    assert trio.publish().published == {MAILBOX: victim}
    assert published_key(trio) == victim_spki()


def test_an_attackers_renewal_is_refused_for_the_key_whatever_its_name(trio: Trio) -> None:
    """verify/test_ca.py's lab case forges the name too ("Mallory"): the key decides first."""
    trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    req = forged(trio, "b1" * 8, renewal=True)
    req["practice_name"] = "Mallory"
    (trio.outbox / ("b1" * 8 + ".json")).write_text(json.dumps(req))
    assert issue(trio, "b1" * 8).refused == "key-change-unconfirmed"


def test_confirmation_signed_by_the_attacker_is_refused(trio: Trio) -> None:
    trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    csr = make_csr(rsa_key(3072, ATTACKER_KEY), san=[MAILBOX])
    der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    # the attacker's own key "confirms" the attacker's CSR
    own = keychange.make(rsa_key(3072, ATTACKER_KEY), NUMBER, MAILBOX, der)
    forged(trio, "c" * 16, renewal=True, key_change=own)
    out = issue(trio, "c" * 16)
    assert out.refused == "key-change-confirmation-invalid"
    assert "not signed by the registered key" in out.reason


def test_a_real_confirmation_cannot_be_replayed_for_another_csr(trio: Trio) -> None:
    trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    # the participant once confirmed a CSR of its own new key ...
    own_csr = make_csr(rsa_key(3072, 1), san=[MAILBOX])
    der = x509.load_pem_x509_csr(own_csr).public_bytes(serialization.Encoding.DER)
    real = keychange.make(rsa_key(3072, VICTIM_KEY), NUMBER, MAILBOX, der)
    # ... the RA attaches it to the attacker's CSR
    forged(trio, "d" * 16, renewal=True, key_change=real)
    assert issue(trio, "d" * 16).refused == "key-change-confirmation-invalid"
    # and to the same CSR for another participant number / mailbox: bound to both
    forged(trio, "e" * 16, number=OTHER_NUMBER, key=rsa_key(3072, 1), key_change=real)
    assert issue(trio, "e" * 16).refused == "mailbox-owned"


def test_confirmed_key_change_is_issued_and_supersedes(trio: Trio) -> None:
    old = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    new = trio.enrol(key=rsa_key(3072, 1), renewal=True, confirm_with=rsa_key(3072, VICTIM_KEY))
    index = trio.signer.index()
    assert index["certs"][old]["reason"] == "superseded"
    owner = index["register"][MAILBOX]
    assert owner["serial"] == new and owner["participant"] == NUMBER
    assert owner["key_sha256"] == keychange.spki_sha256(rsa_key(3072, 1).public_key())
    # the OLD key can no longer confirm anything: the register moved on
    with pytest.raises(AssertionError):
        trio.enrol(key=rsa_key(3072, 2), renewal=True, confirm_with=rsa_key(3072, VICTIM_KEY))


def test_renewal_with_the_same_key_needs_no_confirmation(trio: Trio) -> None:
    old = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    not_after = datetime.fromisoformat(trio.signer.index()["certs"][old]["not_after"])
    forged(trio, "0" * 16, key=rsa_key(3072, VICTIM_KEY), renewal=True)
    outs = trio.signer.issue_from_outbox(trio.outbox, actor="c", now=not_after - timedelta(1))
    [out] = [o for o in outs if o.request_id == "0" * 16]
    assert trio.signer.index()["certs"][old]["reason"] == "superseded"
    assert out.serial is not None and out.serial != old


def test_new_request_after_revocation_with_a_new_key_is_refused(trio: Trio) -> None:
    serial = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    trio.signer.revoke(int(serial, 16), "affiliation-changed", actor="carol")
    forged(trio, "f" * 16)  # not a renewal: the participant holds no valid certificate
    assert issue(trio, "f" * 16).refused == "mailbox-revoked"


def test_new_request_after_expiry_with_a_new_key_is_refused(trio: Trio) -> None:
    trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    later = datetime.now(UTC) + timedelta(days=trio.signer.policy.ee_validity_days + 1)
    forged(trio, "f" * 16)
    out = trio.signer.issue_from_outbox(trio.outbox, actor="c", now=later)
    assert [o.refused for o in out if o.request_id == "f" * 16] == ["key-change-unconfirmed"]


def test_participant_cannot_take_a_second_mailbox(trio: Trio) -> None:
    trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    other = f"zweite.praxis@{DOMAIN}"
    forged(trio, "9" * 16, mailbox=other, renewal=True)
    out = issue(trio, "9" * 16)
    assert out.refused == "participant-has-mailbox" and MAILBOX in out.reason


# ----------------------------------------------------------------- lost key: out-of-band path
def test_lost_key_revoke_release_then_fresh_enrolment(trio: Trio) -> None:
    old = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    with pytest.raises(CaError, match="still has valid certificate"):
        trio.signer.release(MAILBOX, reason="key lost", actor="carol", expect_key=spki(3))
    trio.signer.revoke(int(old, 16), "key-compromise", actor="carol")
    owner = trio.signer.release(
        MAILBOX, reason="key lost, ticket 42", actor="carol", expect_key=spki(3)
    )
    assert owner["status"] == "released" and owner["released_for"] == NUMBER
    entry = json.loads(trio.signer.journal.path.read_text().splitlines()[-1])
    assert (entry["action"], entry["mailbox"], entry["detail"]) == (
        "release",
        MAILBOX,
        f"key lost, ticket 42 (key {spki(3)}, name 'Praxis Mueller')",
    )
    # a second number still cannot take the released mailbox
    forged(trio, "1" * 16, number=OTHER_NUMBER, key=rsa_key(3072, 3))
    assert issue(trio, "1" * 16).refused == "mailbox-released-for-other"
    new = trio.enrol(key=rsa_key(3072, 3))
    owner = trio.signer.index()["register"][MAILBOX]
    assert owner["status"] == "active" and owner["serial"] == new
    with pytest.raises(CaError, match="no registered owner"):
        trio.signer.release(f"nobody@{DOMAIN}", reason="x", actor="carol", expect_key=spki(3))


def test_release_for_another_participant_number(trio: Trio) -> None:
    old = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    trio.signer.revoke(int(old, 16), "cessation-of-operation", actor="carol")
    trio.signer.release(
        MAILBOX,
        reason="practice handed over",
        actor="carol",
        participant=OTHER_NUMBER,
        expect_key=spki(4),
    )
    forged(trio, "2" * 16, number=OTHER_NUMBER, key=rsa_key(3072, 4))
    assert issue(trio, "2" * 16).serial is not None
    assert trio.signer.index()["register"][MAILBOX]["participant"] == OTHER_NUMBER


def test_register_is_seeded_from_an_index_without_one(trio: Trio) -> None:
    serial = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    index = json.loads(trio.signer.index_path.read_text())
    del index["register"]
    trio.signer.index_path.write_text(json.dumps(index))
    forged(trio, "3" * 16, number=OTHER_NUMBER)
    assert issue(trio, "3" * 16).refused == "mailbox-owned"
    assert trio.signer.index()["register"][MAILBOX]["serial"] == serial


# ----------------------------------------------------------------- through the command line
def test_cli_refusal_exit_code_release_and_owners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    t = make_trio(tmp_path)
    t.register()
    t.enrol(key=rsa_key(3072, VICTIM_KEY))
    pol = tmp_path / "policy.yml"
    pol.write_text(yaml.safe_dump({"ca_policy": policy_dict()}))
    monkeypatch.setenv("SAFEMAIL_CA_POLICY", str(pol))
    monkeypatch.delenv("SAFEMAIL_CA_JOURNAL_KEY", raising=False)
    monkeypatch.delenv("SAFEMAIL_CA_JOURNAL_SEALER", raising=False)
    sd = ["--state-dir", str(t.signer.state_dir)]
    forged(t, "4" * 16, number=OTHER_NUMBER)
    code = main(["ca", "issue", "--from", str(t.outbox), *sd, "--operator", "cycle"])
    out, _err = capsys.readouterr()
    assert code == 3 and "refused (mailbox-owned)" in out
    assert main(["ca", "list", "--owners", "--json", *sd]) == 0
    [row] = json.loads(capsys.readouterr()[0])
    assert row["mailbox"] == MAILBOX and row["participant"] == NUMBER
    rel = ["ca", "release", "--mailbox", MAILBOX, "--operator", "o", *sd]
    code = main([*rel, "--reason", "x", "--expect-key", spki(3)])
    assert code == 1 and "revoke first" in capsys.readouterr()[1]
    assert main(["ca", "revoke", "--mailbox", MAILBOX, "--reason", "key-compromise", *sd]) == 0
    with pytest.raises(SystemExit):  # --expect-key is required
        main([*rel, "--reason", "lost"])
    capsys.readouterr()
    assert main([*rel, "--reason", "lost", "--expect-key", "SHA256:" + spki(3).upper()]) == 0
    assert f"with key {spki(3)}" in capsys.readouterr()[0]
    key = tmp_path / "k.pem"
    key.write_bytes(
        rsa_key(3072, 3).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    csr = tmp_path / "k.csr"
    csr.write_bytes(make_csr(rsa_key(3072, 3), san=[MAILBOX]))
    for f in (key, csr):
        assert main(["ca", "key-id", str(f)]) == 0
        assert capsys.readouterr()[0].strip() == spki(3)
    result = journal.verify(t.signer.journal.path)
    assert result.ok


def test_cli_confirm_key_change_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(
        rsa_key(3072, VICTIM_KEY).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    csr = tmp_path / "new.csr"
    csr.write_bytes(make_csr(rsa_key(3072, 1), san=[MAILBOX]))
    conf = tmp_path / "confirm.json"
    assert (
        main(
            [
                "ca",
                "confirm-key-change",
                "--key",
                str(key),
                "--csr",
                str(csr),
                "--participant",
                NUMBER,
                "--mailbox",
                MAILBOX,
                "--out",
                str(conf),
            ]
        )
        == 0
    )
    der = x509.load_pem_x509_csr(csr.read_bytes()).public_bytes(serialization.Encoding.DER)
    pub = rsa_key(3072, VICTIM_KEY).public_key()
    assert keychange.check(conf.read_text().strip(), pub, NUMBER, MAILBOX, der) is None
    assert keychange.check(conf.read_text().strip(), pub, OTHER_NUMBER, MAILBOX, der)
    assert (
        main(
            [
                "ca",
                "confirm-key-change",
                "--key",
                str(csr),
                "--csr",
                str(csr),
                "--participant",
                NUMBER,
                "--mailbox",
                MAILBOX,
            ]
        )
        == 1
    )
    assert "not an unencrypted PEM private key" in capsys.readouterr()[1]


# ----------------------------------------------------------------- revocation binds the signer
def spki(n: int) -> str:
    return keychange.spki_sha256(rsa_key(3072, n).public_key())


def test_key_compromise_refuses_a_change_confirmed_with_the_stolen_key(trio: Trio) -> None:
    """The thief holds A; the operator revoked key-compromise and has not released yet."""
    serial = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    trio.signer.revoke(int(serial, 16), "key-compromise", actor="carol")
    csr = make_csr(rsa_key(3072, ATTACKER_KEY), san=[MAILBOX])
    der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    conf = keychange.make(rsa_key(3072, VICTIM_KEY), NUMBER, MAILBOX, der)
    forged(trio, "a" * 16, key=rsa_key(3072, ATTACKER_KEY), key_change=conf)
    out = issue(trio, "a" * 16)
    assert out.serial is None and out.refused == "mailbox-revoked", out
    assert "release" in out.reason
    owner = trio.signer.index()["register"][MAILBOX]
    assert owner["status"] == "revoked" and owner["revoked_reason"] == "key-compromise"


def test_compromised_key_is_never_certified_again(trio: Trio) -> None:
    serial = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    trio.signer.revoke(int(serial, 16), "key-compromise", actor="carol")
    forged(trio, "b" * 16, key=rsa_key(3072, VICTIM_KEY))  # fresh request, the stolen key
    assert issue(trio, "b" * 16).refused == "key-compromised"
    # nor can the operator release the mailbox for that key, by mistake or on a lie
    with pytest.raises(CaError, match="compromised"):
        trio.signer.release(MAILBOX, reason="x", actor="carol", expect_key=victim_spki())
    trio.signer.release(MAILBOX, reason="new key", actor="carol", expect_key=spki(3))
    forged(trio, "c" * 16, key=rsa_key(3072, VICTIM_KEY))
    assert issue(trio, "c" * 16).refused == "key-compromised"


@pytest.mark.parametrize("reason", ["privilege-withdrawn", "affiliation-changed", "unspecified"])
def test_approved_request_waiting_in_the_outbox_does_not_undo_a_revocation(
    trio: Trio, reason: str
) -> None:
    serial = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    forged(trio, "d" * 16, key=rsa_key(3072, VICTIM_KEY))  # approved earlier, same key
    trio.signer.revoke(int(serial, 16), reason, actor="carol")
    out = issue(trio, "d" * 16)  # the next cycle
    assert out.refused == "mailbox-revoked", out
    assert trio.signer.index()["certs"][serial]["status"] == "revoked"


def test_release_issues_only_the_expected_key(trio: Trio) -> None:
    serial = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    trio.signer.revoke(int(serial, 16), "key-compromise", actor="carol")
    owner = trio.signer.release(MAILBOX, reason="key lost", actor="carol", expect_key=spki(3))
    assert owner["expected_key"] == spki(3)
    # the RA saw the release and races the owner with its own key
    forged(trio, "e" * 16, key=rsa_key(3072, ATTACKER_KEY))
    out = issue(trio, "e" * 16)
    assert out.refused == "key-not-expected" and out.serial is None, out
    new = trio.enrol(key=rsa_key(3072, 3))
    owner = trio.signer.index()["register"][MAILBOX]
    assert owner["status"] == "active" and owner["serial"] == new
    assert owner["key_sha256"] == spki(3) and "expected_key" not in owner


@pytest.mark.parametrize("bad", ["", "abc", "z" * 64, "SHA256:" + "0" * 63])
def test_release_needs_a_well_formed_expected_key(trio: Trio, bad: str) -> None:
    serial = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    trio.signer.revoke(int(serial, 16), "cessation-of-operation", actor="carol")
    with pytest.raises(CaError, match="SHA-256"):
        trio.signer.release(MAILBOX, reason="x", actor="carol", expect_key=bad)


# ----------------------------------------------------------------- the RA alone cannot supersede
def test_same_key_renewal_is_refused_until_the_renewal_window(trio: Trio) -> None:
    """The RA replays the victim's own CSR as a 'renewal': nothing new for the participant,
    but it would revoke the current certificate (superseded). Refused until near expiry."""
    victim = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    forged(trio, "d" * 16, key=rsa_key(3072, VICTIM_KEY), renewal=True)
    out = issue(trio, "d" * 16)
    assert out.refused == "renewal-too-early" and out.serial is None, out
    assert trio.signer.index()["certs"][victim]["status"] == "valid"
    # inside the window (policy renewal_window_days before not_after) it is a renewal
    not_after = datetime.fromisoformat(trio.signer.index()["certs"][victim]["not_after"])
    window = timedelta(days=trio.signer.policy.renewal_window_days)
    forged(trio, "5" * 16, key=rsa_key(3072, VICTIM_KEY), renewal=True)
    outs = trio.signer.issue_from_outbox(trio.outbox, actor="c", now=not_after - window * 2)
    [early] = [o for o in outs if o.request_id == "5" * 16]
    assert early.refused == "renewal-too-early"
    forged(trio, "6" * 16, key=rsa_key(3072, VICTIM_KEY), renewal=True)
    outs = trio.signer.issue_from_outbox(trio.outbox, actor="c", now=not_after - window / 2)
    [ok] = [o for o in outs if o.request_id == "6" * 16]
    assert ok.serial is not None and ok.new
    assert trio.signer.index()["certs"][victim]["reason"] == "superseded"


def test_the_ra_cannot_change_the_registered_name(trio: Trio) -> None:
    trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    assert trio.signer.index()["register"][MAILBOX]["name"] == "Praxis Mueller"
    csr = make_csr(rsa_key(3072, 1), san=[MAILBOX])
    der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    conf = keychange.make(rsa_key(3072, VICTIM_KEY), NUMBER, MAILBOX, der)
    req = forged(trio, "7" * 16, key=rsa_key(3072, 1), renewal=True, key_change=conf)
    req["practice_name"] = "Evil Name"
    (trio.outbox / ("7" * 16 + ".json")).write_text(json.dumps(req))
    out = issue(trio, "7" * 16)
    assert out.refused == "name-change-unconfirmed" and "Praxis Mueller" in out.reason


def test_a_name_change_goes_through_the_signer_operator(trio: Trio) -> None:
    old = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    trio.signer.revoke(int(old, 16), "superseded", actor="carol")
    # released for the same key without --name: the registered name still binds
    trio.signer.release(MAILBOX, reason="x", actor="carol", expect_key=victim_spki())
    req = forged(trio, "8" * 16, key=rsa_key(3072, VICTIM_KEY))
    req["practice_name"] = "Praxis Mueller-Schmidt"
    (trio.outbox / ("8" * 16 + ".json")).write_text(json.dumps(req))
    assert issue(trio, "8" * 16).refused == "name-change-unconfirmed"
    trio.signer.release(
        MAILBOX,
        reason="renamed, ticket 7",
        actor="carol",
        expect_key=victim_spki(),
        name="Praxis Mueller-Schmidt",
    )
    req["id"] = "a1" * 8
    (trio.outbox / ("a1" * 8 + ".json")).write_text(json.dumps(req))
    out = issue(trio, "a1" * 8)
    assert out.serial is not None, out
    assert "Mueller-Schmidt" in trio.signer.certificate(out.serial).subject.rfc4514_string()
    assert trio.signer.index()["register"][MAILBOX]["name"] == "Praxis Mueller-Schmidt"


def test_register_without_names_takes_them_from_the_certificates(trio: Trio) -> None:
    trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    index = json.loads(trio.signer.index_path.read_text())
    del index["register"][MAILBOX]["name"]
    trio.signer.index_path.write_text(json.dumps(index))
    assert trio.signer.register()[MAILBOX]["name"] == "Praxis Mueller"


def test_a_revocation_from_before_the_lock_locks_the_mailbox_too(trio: Trio) -> None:
    """An index written before revoke() marked the register: the entry still says active."""
    serial = trio.enrol(key=rsa_key(3072, VICTIM_KEY))
    trio.signer.revoke(int(serial, 16), "privilege-withdrawn", actor="carol")
    index = json.loads(trio.signer.index_path.read_text())
    owner = index["register"][MAILBOX]
    for k in ("revoked_reason", "revoked_serial", "revoked_at"):
        del owner[k]
    owner["status"] = "active"
    trio.signer.index_path.write_text(json.dumps(index))
    forged(trio, "c1" * 8, key=rsa_key(3072, VICTIM_KEY))
    assert issue(trio, "c1" * 8).refused == "mailbox-revoked"
