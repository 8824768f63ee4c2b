"""The S/MIME gate milter: per-message decisions and the pymilter glue (MAIL-03, MAIL-04).

pymilter is not installed in the development venv, so the glue is driven through a stand-in
``Milter`` module that records what the milter asks of the MTA.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import pytest

from safemail.smime import milter, samples
from safemail.smime.classify import compile_subject_patterns
from safemail.smime.milter import (
    SUBJECT_WARNING_HEADER,
    Action,
    GateConfig,
    MessageGate,
    load_subject_patterns,
)

ENCRYPTED = samples.smime_message(samples.enveloped_der())
PLAIN = samples.mime_message(b"Hallo,\r\nanbei der Befund.\r\n", content_type="text/plain")


def split_headers(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """Headers (continuations joined, as the MTA passes them) and body of a raw message."""
    head, body = raw.split(b"\r\n\r\n", 1)
    fields: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "surrogateescape").split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + "\n" + line)
            continue
        name, value = line.split(":", 1)
        fields.append((name, value.lstrip(" ")))
    return fields, body


def feed(gate: MessageGate, raw: bytes, chunk: int = 65536) -> None:
    """Feed a raw message the way Postfix does: header by header, then body chunks."""
    fields, body = split_headers(raw)
    for name, value in fields:
        gate.add_header(name, value)
    gate.end_of_headers()
    for start in range(0, len(body), chunk):
        gate.add_body(body[start : start + chunk])


def submission_gate(config: GateConfig) -> MessageGate:
    """A gate for a participant's message on the submission service."""
    gate = MessageGate(config)
    gate.set_login("praxis1@safenet.test")
    gate.set_origin(milter.ORIGIN_SUBMISSION)
    return gate


def decide(raw: bytes, **config: object) -> milter.Decision:
    gate = MessageGate(GateConfig(**config))  # type: ignore[arg-type]
    gate.set_login("praxis1@safenet.test")  # submission: the samples' From is the login
    gate.set_origin(milter.ORIGIN_SUBMISSION)
    feed(gate, raw)
    return gate.decide()


@pytest.mark.req("MAIL-03")
def test_encrypted_mail_is_accepted() -> None:
    decision = decide(ENCRYPTED)
    assert (decision.action, decision.code, decision.reply) == (Action.ACCEPT, "accepted", None)


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize(
    "sample",
    [s for s in samples.refused_samples() if s.message],
    ids=[s.name for s in samples.refused_samples() if s.message],
)
def test_refused_mail_gets_550_with_reason(sample: samples.Sample) -> None:
    if sample.code == "malformed_headers":
        pytest.skip("an MTA passes no header section that is not one")
    decision = decide(sample.message)
    assert decision.action is Action.REJECT
    assert decision.code == sample.code
    assert decision.reply is not None
    rcode, xcode, text = decision.reply
    assert (rcode, xcode) == ("550", "5.7.1")
    assert text.startswith("523 Encryption Needed: message is not S/MIME encrypted (")


@pytest.mark.req("MAIL-03")
def test_small_chunks_give_the_same_answer() -> None:
    gate = submission_gate(GateConfig())
    feed(gate, ENCRYPTED, chunk=7)
    assert gate.decide().action is Action.ACCEPT


@pytest.mark.req("MAIL-03")
def test_oversized_mail_is_rejected_without_buffering_it_all() -> None:
    gate = submission_gate(GateConfig(max_size=2000))
    big = samples.smime_message(samples.enveloped_der(content_size=8000))
    feed(gate, big, chunk=500)
    decision = gate.decide()
    assert (decision.action, decision.code) == (Action.REJECT, "too_large")


@pytest.mark.req("MAIL-03")
def test_gate_holds_no_copy_of_the_body() -> None:
    """The body streams through the classifier: the gate keeps the headers, not the body."""
    import tracemalloc

    big = samples.smime_message(samples.enveloped_der(content_size=4_000_000))
    gate = submission_gate(GateConfig())
    fields, body = split_headers(big)
    tracemalloc.start()
    try:
        for name, value in fields:
            gate.add_header(name, value)
        gate.end_of_headers()
        for start in range(0, len(body), 65536):
            gate.add_body(body[start : start + 65536])
        decision = gate.decide()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decision.action is Action.ACCEPT
    assert peak < 1 << 20, f"peak {peak} bytes for a {len(big)} byte message"


def test_gate_is_reusable_after_reset() -> None:
    gate = submission_gate(GateConfig())
    feed(gate, PLAIN)
    assert gate.decide().action is Action.REJECT
    gate.reset()
    gate.set_login("praxis1@safenet.test")
    gate.set_origin(milter.ORIGIN_SUBMISSION)
    feed(gate, ENCRYPTED)
    assert gate.decide().action is Action.ACCEPT


def test_internal_error_is_tempfail(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(milter.StreamClassifier, "_finish", boom)
    decision = decide(ENCRYPTED)
    assert decision.action is Action.TEMPFAIL
    assert decision.reply is not None and decision.reply[:2] == ("451", "4.3.0")


def test_classifier_internal_error_verdict_is_tempfail(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, piece: bytes) -> None:
        raise ZeroDivisionError

    monkeypatch.setattr(milter.StreamClassifier, "_feed_piece", boom)
    assert decide(ENCRYPTED).action is Action.TEMPFAIL


def test_reply_text_is_safe_for_libmilter() -> None:
    msg = samples.smime_message(samples.enveloped_der(), content_type="text/x-100%")
    decision = decide(msg)
    assert decision.reply is not None
    assert "%%" in decision.reply[2] and "% " not in decision.reply[2].replace("%%", "")


# --- subject policy -----------------------------------------------------------------------

PATIENT_SUBJECT = samples.smime_message(samples.enveloped_der(), subject="Befund A123456789")


@pytest.mark.req("MAIL-04")
def test_subject_policy_refuse() -> None:
    decision = decide(PATIENT_SUBJECT, subject_policy="refuse")
    assert (decision.action, decision.code) == (Action.REJECT, "subject_patient_data")
    assert decision.reply is not None and decision.reply[:2] == ("550", "5.7.1")
    assert "(kvnr)" in decision.reply[2] and "A123456789" not in decision.reply[2]


@pytest.mark.req("MAIL-04")
def test_subject_policy_flag_adds_warning_header() -> None:
    decision = decide(PATIENT_SUBJECT, subject_policy="flag")
    assert decision.action is Action.ACCEPT
    assert decision.add_headers == (
        (
            SUBJECT_WARNING_HEADER,
            "subject may contain patient data (kvnr); headers are not encrypted",
        ),
    )


@pytest.mark.req("MAIL-04")
def test_subject_policy_off() -> None:
    decision = decide(PATIENT_SUBJECT, subject_policy="off")
    assert (decision.action, decision.add_headers) == (Action.ACCEPT, ())


@pytest.mark.req("MAIL-04")
def test_harmless_subject_is_not_flagged() -> None:
    decision = decide(ENCRYPTED, subject_policy="refuse")
    assert (decision.action, decision.add_headers) == (Action.ACCEPT, ())


@pytest.mark.req("MAIL-04")
def test_plaintext_is_refused_for_encryption_before_subject_policy() -> None:
    msg = samples.mime_message(b"x\r\n", content_type="text/plain", subject="Patient: Muster")
    assert decide(msg, subject_policy="refuse").code == "plaintext"


@pytest.mark.req("MAIL-04")
def test_encoded_subject_is_checked() -> None:
    msg = samples.smime_message(
        samples.enveloped_der(), subject="=?utf-8?b?UGF0aWVudDogTcO8bGxlcg==?="
    )
    assert decide(msg, subject_policy="refuse").code == "subject_patient_data"


def test_custom_patterns() -> None:
    patterns = compile_subject_patterns([{"name": "case", "regex": r"Fall-\d+"}])
    msg = samples.smime_message(samples.enveloped_der(), subject="Fall-17")
    assert decide(msg, subject_policy="refuse", subject_patterns=patterns).code == (
        "subject_patient_data"
    )
    assert decide(PATIENT_SUBJECT, subject_policy="refuse", subject_patterns=patterns).code == (
        "accepted"
    )


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="subject policy"):
        GateConfig(subject_policy="maybe")
    with pytest.raises(ValueError, match="max size"):
        GateConfig(max_size=0)


@pytest.mark.parametrize("suffix", [".json", ".yml"])
def test_load_subject_patterns(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"patterns{suffix}"
    items = [{"name": "case", "regex": "Fall-[0-9]+"}]
    if suffix == ".json":
        path.write_text(json.dumps(items))
    else:
        path.write_text("- name: case\n  regex: 'Fall-[0-9]+'\n")
    (pattern,) = load_subject_patterns(path)
    assert pattern.name == "case" and pattern.regex.search("Fall-3")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "non-empty list"),
        ("{not json", "not valid JSON"),
        ('[{"name": "x", "regex": "("}]', "not a valid regex"),
    ],
)
def test_load_subject_patterns_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_subject_patterns(path)


def test_main_reports_bad_pattern_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "p.json"
    path.write_text("[]")
    assert milter.main(["--socket", "inet:1@127.0.0.1", "--subject-patterns", str(path)]) == 2
    assert "non-empty list" in capsys.readouterr().err


def test_main_without_pymilter_says_what_to_install(capsys: pytest.CaptureFixture) -> None:
    try:
        import Milter  # noqa: F401
    except ImportError:
        assert milter.main(["--socket", "inet:1@127.0.0.1"]) == 1
        assert "python3-milter" in capsys.readouterr().err
    else:
        pytest.skip("pymilter is installed here")


# --- pymilter glue, with a stand-in Milter module -----------------------------------------


class FakeBase:
    def __init__(self) -> None:
        self.replies: list[tuple[str, ...]] = []
        self.added: list[tuple[str, str]] = []
        # A participant's session: submission always has a SASL login (the samples' From).
        self.macros = {"i": "4ABC123", "{auth_authen}": "praxis1@safenet.test",
                       "{daemon_name}": milter.ORIGIN_SUBMISSION}

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setreply(self, rcode: str, xcode: str, msg: str) -> None:
        self.replies.append((rcode, xcode, msg))

    def addheader(self, name: str, value: str, idx: int = -1) -> None:
        self.added.append((name, value))


    def chgheader(self, name: str, idx: int, value: object) -> None:
        pass


FAKE_MILTER = types.SimpleNamespace(
    Base=FakeBase, CONTINUE=0, REJECT=1, TEMPFAIL=2, ACCEPT=3, DISCARD=4
)


def run_glue(raw: bytes, config: GateConfig | None = None) -> tuple[int, FakeBase]:
    cls = milter._milter_class(FAKE_MILTER, config or GateConfig())
    conn = cls()
    FakeBase.__init__(conn)
    assert conn.envfrom("<praxis1@safenet.test>") == FAKE_MILTER.CONTINUE
    fields, body = split_headers(raw)
    for name, value in fields:
        assert conn.header(name, value) == FAKE_MILTER.CONTINUE
    assert conn.eoh() == FAKE_MILTER.CONTINUE
    assert conn.body(body) == FAKE_MILTER.CONTINUE
    return conn.eom(), conn


@pytest.mark.req("MAIL-03")
def test_glue_accepts_encrypted() -> None:
    result, conn = run_glue(ENCRYPTED)
    assert result == FAKE_MILTER.CONTINUE
    assert conn.replies == [] and conn.added == []


@pytest.mark.req("MAIL-03")
def test_glue_rejects_plaintext_with_550(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="safemail.smime.milter"):
        result, conn = run_glue(PLAIN)
    assert result == FAKE_MILTER.REJECT
    assert conn.replies == [
        (
            "550",
            "5.7.1",
            "523 Encryption Needed: message is not S/MIME encrypted (found text/plain) [plaintext]",
        )
    ]
    assert "queue_id=4ABC123 origin=safemail-submission verdict=plaintext action=reject" in (
        caplog.text
    )


@pytest.mark.req("MAIL-04")
def test_glue_flags_subject_and_logs_no_content(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="safemail.smime.milter"):
        result, conn = run_glue(PATIENT_SUBJECT, GateConfig(subject_policy="flag"))
    assert result == FAKE_MILTER.CONTINUE
    assert conn.added and conn.added[0][0] == SUBJECT_WARNING_HEADER
    for secret in ("A123456789", "Befund", "praxis1", "praxis2", "safenet"):
        assert secret not in caplog.text


def test_glue_tempfails_when_the_mta_call_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_addheader(self: FakeBase, name: str, value: str, idx: int = -1) -> None:
        raise RuntimeError("MTA said no")

    monkeypatch.setattr(FakeBase, "addheader", broken_addheader)
    result, conn = run_glue(PATIENT_SUBJECT, GateConfig(subject_policy="flag"))
    assert result == FAKE_MILTER.TEMPFAIL
    assert conn.replies[-1][:2] == ("451", "4.3.0")


def test_glue_handles_a_second_message_on_the_same_connection() -> None:
    cls = milter._milter_class(FAKE_MILTER, GateConfig())
    conn = cls()
    FakeBase.__init__(conn)
    for raw, expected in ((PLAIN, FAKE_MILTER.REJECT), (ENCRYPTED, FAKE_MILTER.CONTINUE)):
        conn.envfrom("<a@safenet.test>")
        fields, body = split_headers(raw)
        for name, value in fields:
            conn.header(name, value)
        conn.eoh()
        conn.body(body)
        assert conn.eom() == expected
