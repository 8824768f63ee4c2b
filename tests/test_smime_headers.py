"""The gate's header policy: From bound to the login, allowed headers, identifiers anywhere."""

from __future__ import annotations

import types

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from safemail.smime import headers, milter, samples
from safemail.smime.classify import compile_subject_patterns
from safemail.smime.headers import (
    DEFAULT_ALLOWED_HEADERS,
    check_from,
    find_identifier,
    normalise_allowed,
    plan_removals,
)
from safemail.smime.milter import Action, GateConfig, MessageGate

ALLOWED = normalise_allowed(DEFAULT_ALLOWED_HEADERS)
PATTERNS = compile_subject_patterns()
LOGIN = "praxis1@safenet.test"  # the From of samples.mime_message


def _split(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """(name, value) of each header line (the samples fold none) and the body."""
    head, body = raw.split(b"\r\n\r\n", 1)
    fields = [line.split(":", 1) for line in head.decode().split("\r\n")]
    return [(name, value.lstrip()) for name, value in fields], body


_BY_LOGIN = object()  # gate_decide's default origin: submission with a login, local without


def gate_decide(raw: bytes, login: str | None = LOGIN, origin: object = _BY_LOGIN,
                **config: object) -> milter.Decision:
    """The gate's decision for ``raw`` as Postfix would hand it over."""
    gate = MessageGate(GateConfig(**config))  # type: ignore[arg-type]
    gate.set_login(login)
    if origin is _BY_LOGIN:
        origin = milter.ORIGIN_SUBMISSION if login else milter.ORIGIN_LOCAL
    gate.set_origin(origin)  # type: ignore[arg-type]
    fields, body = _split(raw)
    for name, value in fields:
        gate.add_header(name, value)
    gate.end_of_headers()
    gate.add_body(body)
    return gate.decide()


def envelope(**kw: object) -> bytes:
    return samples.smime_message(samples.enveloped_der(), **kw)  # type: ignore[arg-type]


# --- From = login -----------------------------------------------------------------------------


@pytest.mark.req("MAIL-03")
def test_from_equal_to_the_login_passes_ignoring_case() -> None:
    assert check_from([("From", "Praxis Eins <PRAXIS1@safenet.test>")], LOGIN).ok


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ([("From", "praxis2@safenet.test")], "is not your mailbox"),
        ([("From", "praxis1@safenet.test, praxis2@safenet.test")], "exactly one address"),
        ([("From", "praxis1@safenet.test"), ("From", "praxis2@safenet.test")], "2 From"),
        ([], "0 From"),
        ([("From", "praxis1@safenet.test"), ("Sender", "praxis2@safenet.test")], "Sender"),
        ([("From", "praxis1@safenet.test"), ("Reply-To", "praxis2@safenet.test")], "Reply-To"),
        ([("From", "praxis1@safenet.test"),
          ("Reply-To", "praxis1@safenet.test, praxis2@safenet.test")], "exactly one address"),
        # An encoded word cannot hide another address.
        ([("From", "=?utf-8?q?x?= <praxis2@safenet.test>")], "is not your mailbox"),
        # Encoded words that decode to quotes or parentheses stay inside the display name:
        # the address a mail client shows is praxis2's (review walk-arounds).
        ([("From", "=?utf-8?q?Praxis_Zwei_=22?= <praxis2@safenet.test> "
                   "=?utf-8?q?=22_=3Cpraxis1=40safenet=2Etest=3E?=")], "From"),
        ([("From", "=?utf-8?q?praxis1=40safenet=2Etest_=28?= Praxis Zwei "
                   "<praxis2@safenet.test> =?utf-8?q?=29?=")], "From"),
        # A display name that shows another address.
        ([("From", '"praxis2@safenet.test" <praxis1@safenet.test>')], "display name"),
    ],
)
def test_from_that_is_not_the_login_is_refused(fields, words) -> None:
    result = check_from(fields, LOGIN)
    assert not result.ok and words in result.detail


@pytest.mark.req("MAIL-03")
def test_reply_to_the_own_mailbox_passes() -> None:
    assert check_from([("From", "praxis1@safenet.test"),
                       ("Reply-To", "Praxis Eins <praxis1@safenet.test>")], LOGIN).ok


@pytest.mark.req("MAIL-03")
def test_without_a_login_there_is_nothing_to_compare() -> None:
    assert check_from([("From", "anyone@safenet.test")], None).ok


@pytest.mark.req("MAIL-03")
def test_gate_refuses_another_practices_from_with_550_and_code() -> None:
    decision = gate_decide(envelope(), login="praxis2@safenet.test")
    assert decision.action is Action.REJECT and decision.code == "from_not_login"
    assert decision.reply is not None and decision.reply[:2] == ("550", "5.7.1")
    assert decision.reply[2].endswith("[from_not_login]")


@pytest.mark.req("MAIL-03")
def test_encryption_is_judged_before_the_from() -> None:
    plain = samples.mime_message(b"Befund\r\n", content_type="text/plain")
    assert gate_decide(plain, login="praxis2@safenet.test").code == "plaintext"


# --- allowed headers --------------------------------------------------------------------------


@pytest.mark.req("MAIL-04")
def test_headers_outside_the_list_are_removed_with_per_name_indexes() -> None:
    # Postfix never shows the milter its own Received header: every one seen is the client's.
    fields = [
        ("Received", "from a client that claims to be an MTA"),
        ("Received", "from another"),
        ("From", LOGIN),
        ("X-Note", "one"),
        ("x-note", "two"),
        ("Subject", "Befund"),
    ]
    assert plan_removals(fields, ALLOWED) == [
        ("Received", 1), ("Received", 2), ("X-Note", 1), ("x-note", 2)
    ]


@pytest.mark.req("MAIL-04")
def test_the_gate_asks_the_mta_to_delete_unknown_headers() -> None:
    raw = envelope(extra_headers=[("X-Private-Note", "Rueckruf morgen"), ("X-Mailer", "T")])
    decision = gate_decide(raw)
    assert decision.action is Action.ACCEPT
    assert decision.remove_headers == (("X-Private-Note", 1),)


@pytest.mark.req("MAIL-04")
def test_required_headers_cannot_be_dropped_from_the_list() -> None:
    assert {"from", "content-type", "message-id"} <= normalise_allowed(["Subject"])
    with pytest.raises(ValueError, match="not a header field name"):
        normalise_allowed(["X-Bad Name"])


# --- identifiers in any header ----------------------------------------------------------------


@pytest.mark.req("MAIL-04")
@pytest.mark.parametrize(
    ("name", "value", "where"),
    [
        ("Thread-Topic", "Befund A123456789", "value"),
        ("To", '"Patient: Erika Muster" <labor@safenet.test>', "value"),
        # Only the decoded parameter shows the identifier (RFC 2231 continuations, %-escapes).
        ("Content-Type", 'application/pkcs7-mime; name*0="Muster geb. 01.02."; name*1="1960"',
         "parameter name"),
        ("Content-Disposition", "attachment; filename*=utf-8''A%3123456789.p7m",
         "parameter filename"),
        ("Subject", "=?utf-8?q?Befund_A123456789?=", "value"),
    ],
)
def test_identifiers_are_found_in_every_kept_header_and_parameter(name, value, where) -> None:
    hit = find_identifier([(name, value)], ALLOWED, PATTERNS)
    assert hit is not None and hit.header == name and hit.where == where


@pytest.mark.req("MAIL-04")
def test_deleted_headers_are_not_examined_and_kept_ones_are_examined_whole() -> None:
    deleted = [("Received", "from Erika geb. 01.02.1960 A123456789"), ("X-Note", "A123456789")]
    assert find_identifier(deleted, ALLOWED, PATTERNS) is None  # deleted, never delivered
    # Date is kept, so examined: a comment can carry text.
    date = [("Date", "Tue, 4 Mar 2025 10:00:00 +0100 (Muster geb. 01.02.1960)")]
    assert find_identifier(date, ALLOWED, PATTERNS).header == "Date"
    assert find_identifier([("Date", "Tue, 4 Mar 2025 10:00:00 +0100")], ALLOWED, PATTERNS) is None
    # Past the 4096 characters the Subject check of classify looks at.
    long_subject = [("Subject", "Re: " * 1100 + "Befund A123456789")]
    assert find_identifier(long_subject, ALLOWED, PATTERNS).pattern == "kvnr"


@pytest.mark.req("MAIL-04")
def test_gate_refuses_an_identifier_outside_the_subject() -> None:
    raw = envelope(extra_headers=[("Thread-Topic", "Patient: Erika Muster")])
    decision = gate_decide(raw, subject_policy="refuse")
    assert decision.action is Action.REJECT and decision.code == "subject_patient_data"
    assert "Thread-Topic" in decision.reply[2]


@pytest.mark.req("MAIL-04")
def test_mime_parameters_are_rfc2231_decoded() -> None:
    params = headers.mime_parameters("attachment; filename*=utf-8''Befund%20A.p7m")
    assert params == [("filename", "Befund A.p7m")]


# --- messages in flight -----------------------------------------------------------------------


class _FakeMilter:
    CONTINUE, REJECT, TEMPFAIL, DISCARD = "continue", "reject", "tempfail", "discard"

    class Base:
        def __init__(self) -> None:
            self.replies: list[tuple[str, ...]] = []
            self.changed: list[tuple[str, int, object]] = []

        def getsymval(self, name: str) -> str | None:
            return {"{auth_authen}": LOGIN, "i": "Q1",
                    "{daemon_name}": milter.ORIGIN_SUBMISSION}.get(name)

        def setreply(self, *reply: str) -> None:
            self.replies.append(reply)

        def chgheader(self, name: str, index: int, value: object) -> None:
            self.changed.append((name, index, value))

        def addheader(self, name: str, value: str) -> None:
            pass


def _connection(config: GateConfig):
    cls = milter._milter_class(types.SimpleNamespace(**vars(_FakeMilter)), config)
    conn = cls.__new__(cls)
    _FakeMilter.Base.__init__(conn)
    cls.__init__(conn)
    return conn


@pytest.mark.req("MAIL-03")
def test_more_messages_than_slots_get_a_temporary_failure_at_data() -> None:
    config = GateConfig(max_in_flight=2)
    cls = milter._milter_class(types.SimpleNamespace(**vars(_FakeMilter)), config)
    conns = []
    for _ in range(4):
        conn = cls.__new__(cls)
        _FakeMilter.Base.__init__(conn)
        cls.__init__(conn)
        conns.append(conn)
    # MAIL FROM alone takes no slot: a client without a login never gets past RCPT to DATA,
    # so it cannot fill the slots by opening sessions.
    assert all(c.envfrom("<x>") == "continue" for c in conns)
    assert conns[0].data() == "continue"
    assert conns[0].header("Subject", "a") == "continue"  # one slot per message
    assert conns[1].data() == "continue"
    assert conns[2].data() == "tempfail"
    assert conns[2].replies[-1][:2] == ("451", "4.3.2")
    assert conns[3].eom() == "tempfail"  # no DATA callback: the slot is taken at the end
    conns[0].abort()  # a slot comes back when a message ends, however it ends
    assert conns[2].envfrom("<c>") == "continue"
    assert conns[2].data() == "continue"
    conns[1].close()
    conns[2].eom()
    assert conns[0].envfrom("<a>") == "continue"
    assert conns[0].data() == "continue"


@pytest.mark.req("MAIL-04")
def test_glue_deletes_headers_highest_index_first() -> None:
    conn = _connection(GateConfig())
    conn.envfrom("<a>")
    raw = envelope(extra_headers=[("X-A", "1"), ("X-A", "2"), ("X-B", "3")])
    fields, body = _split(raw)
    for name, value in fields:
        conn.header(name, value)
    conn.eoh()
    conn.body(body)
    assert conn.eom() == "continue"
    assert conn.changed == [("X-A", 2, None), ("X-A", 1, None), ("X-B", 1, None)]


@pytest.mark.req("MAIL-03")
def test_refused_local_mail_is_discarded_not_bounced() -> None:
    """Local submission on the relay (origin safemail-local): a refusal would become a bounce
    that carries the plaintext to the envelope sender without passing the gate; it is
    discarded."""
    plain = samples.mime_message(b"Befund im Klartext\r\n", content_type="text/plain")
    decision = gate_decide(plain, login=None)
    assert decision.action is Action.DISCARD and decision.code == "plaintext"
    assert decision.reply is None
    assert gate_decide(plain).action is Action.REJECT  # submission: 550 to the client
    assert gate_decide(envelope(), login=None).action is Action.ACCEPT


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("origin", [None, "", "relay1.safenet.test", "submission"])
def test_mail_of_unknown_origin_is_deferred_never_discarded(origin: str | None) -> None:
    """Postfix names the origin positively ({daemon_name}); without it (a changed
    milter_macro_daemon_name or macro list) mail is deferred, loudly, whatever it is."""
    plain = samples.mime_message(b"Befund im Klartext\r\n", content_type="text/plain")
    for raw, login in ((plain, None), (plain, LOGIN), (envelope(), LOGIN)):
        decision = gate_decide(raw, login=login, origin=origin)
        assert decision.action is Action.TEMPFAIL and decision.code == "unknown_origin"
        assert decision.reply is not None and decision.reply[0] == "451"
        assert decision.reply[2].endswith("[unknown_origin]")


@pytest.mark.req("MAIL-03")
def test_submission_without_a_login_is_deferred() -> None:
    """Submission requires SASL before RCPT; a message without a login there means the
    restrictions changed: deferred, not judged against no login and not discarded."""
    plain = samples.mime_message(b"Befund im Klartext\r\n", content_type="text/plain")
    for raw in (plain, envelope()):
        decision = gate_decide(raw, login=None, origin=milter.ORIGIN_SUBMISSION)
        assert decision.action is Action.TEMPFAIL and decision.code == "no_login"


@pytest.mark.req("MAIL-03")
def test_glue_asks_no_reply_for_content_and_no_callbacks_it_does_not_use() -> None:
    """pymilter's decorators are applied where the protocol allows: no answer awaited for
    MAIL FROM, headers, end of headers and body chunks; connect, HELO, RCPT and unknown
    commands not sent.
    DATA and end of message keep their answers (busy, the verdict)."""

    def mark(kind):
        def decorate(func):
            func.marked = kind
            return func
        return decorate

    fake = types.SimpleNamespace(**vars(_FakeMilter), noreply=mark("noreply"),
                                 nocallback=mark("nocallback"))
    cls = milter._milter_class(fake, GateConfig())
    marks = {name: getattr(getattr(cls, name), "marked", None)
             for name in ("connect", "hello", "envrcpt", "unknown", "header", "eoh", "body",
                          "envfrom", "data", "eom")}
    assert marks == {"connect": "nocallback", "hello": "nocallback", "envrcpt": "nocallback",
                     "unknown": "nocallback", "header": "noreply", "eoh": "noreply",
                     "body": "noreply", "envfrom": "noreply", "data": None, "eom": None}


# --- the fast paths read a value as the slow paths do ---------------------------------------

_HEADERISH = st.lists(
    st.sampled_from(list("aZ09 .@<>\"'()=?_+-,;:\\\t\r\n") + ["ä", "\udcff", "=?", "=?utf-8?q?"]),
    max_size=40,
).map("".join)


def _slow_whole_text(value: str) -> str:
    import email.header
    import re

    try:
        text = str(email.header.make_header(email.header.decode_header(value)))
    except Exception:  # noqa: BLE001 - as _whole_text
        text = value
    return re.sub(r"\s+", " ", text)


@settings(max_examples=600, deadline=None)
@given(_HEADERISH)
@example("Befund f\udcffr Patient")  # pymilter's surrogateescape for a raw 8-bit octet
@example("plain\r\n folded")
def test_whole_text_fast_path_equals_the_email_package(value: str) -> None:
    assert headers._whole_text(value) == _slow_whole_text(value)


_ADDRESSISH = st.one_of(
    _HEADERISH,
    st.builds(
        lambda name, local, domain, brackets: (
            f"{name} <{local}@{domain}>" if brackets else f"{name}{local}@{domain}"
        ),
        st.text(alphabet="aZ09 .", max_size=12),
        st.text(alphabet="aZ09._+-", min_size=1, max_size=12),
        st.text(alphabet="aZ09.-", min_size=1, max_size=12),
        st.booleans(),
    ),
)


@settings(max_examples=1500, deadline=None)
@given(_ADDRESSISH)
@example("praxis1@safenet.test")
@example("Praxis Eins <praxis1@safenet.test>")
@example("<praxis1@safenet.test>")
@example("Praxis praxis1@safenet.test")
@example("Praxis  Eins   <praxis1@safenet.test>")
@example("praxis<praxis1@safenet.test>")
@example("a..b@safenet.test")
@example(".a@safenet.test")
def test_simple_address_fast_path_equals_the_rfc5322_parser(value: str) -> None:
    if headers._simple_address(value) is None:
        return  # the fast path does not take it: the parser decides
    assert headers._addresses(value) == headers._parsed_addresses(value)


def test_simple_address_fast_path_is_taken_for_ordinary_from_values() -> None:
    for value in ("praxis1@safenet.test", "Praxis Eins <praxis1@safenet.test>"):
        assert headers._simple_address(value) is not None
