"""MAIL-01 ... MAIL-05: the mail path, proven from a participant's side.

practice1 and practice2 are lab participants with their own keys (enrolled through the CA).
Every SMTP test runs `safemail participant smtp-probe` on practice1 against the relay's
submission port and reads the server's replies; delivery is proven by practice2 fetching the
message over IMAP (through the relay's proxy) and decrypting it with its own key. The sender
fetches the recipient's certificate from the CA's distribution point (ca-dist, HTTP inside
SafeNet) and checks it against the SafeMail CA and its CRL, as `safemail participant send` does
by default; the directory (auth, back segment) is out of a participant's reach (SYS-01).
"""

from __future__ import annotations

import fcntl
import json
import re
import shlex
import time
import uuid

import pytest
import testinfra
from cryptography import x509
from waits import wait_for

from safemail.smime import samples

testinfra_hosts = ["ansible://relay"]
# The fixtures send mail from the lab's participant hosts (verify/profiles.py).
pytestmark = pytest.mark.lab_participants

PDIR = "/var/lib/safemail-participant"
CAFILE = "/etc/safemail/tls/ca.crt"
SAFEMAIL = "/opt/safemail/venv/bin/safemail"


class Participant:
    def __init__(self, host, entry: dict, password: str, relay: str, dist_uri: str) -> None:
        self.host = host
        self.mailbox = entry["mailbox"]
        self.password = password
        self.relay = relay
        # Recipient certificates from the distribution point, trusted through the SafeMail CA
        # the participant host holds (enrolment put it there), not through the transport.
        self.directory = ["--directory", dist_uri, "--smime-ca", f"{PDIR}/ca.pem"]

    def _env(self) -> str:
        return f"SAFEMAIL_PASSWORD={shlex.quote(self.password)}"

    def probe(self, to: list[str], *, message: bytes | None = None, sender: str | None = None,
              starttls: bool = True, auth: bool = True, port: int = 587,
              header_from: str | None = None) -> dict:
        """SMTP transcript of one submission. The message's From header is set to this
        participant's mailbox (the gate binds it to the login), or to `header_from`."""
        args = [SAFEMAIL, "participant", "smtp-probe", "--host", self.relay, "--port",
                str(port), "--cafile", CAFILE, "--from", self.mailbox if sender is None else sender]
        for rcpt in to:
            args += ["--to", rcpt]
        if not starttls:
            args.append("--no-starttls")
        if auth:
            args += ["--user", self.mailbox]
        else:
            args.append("--no-auth")
        cmd = f"{self._env()} {shlex.join(args)}"
        if message is not None:
            message = samples.with_from(message, header_from or self.mailbox)
            path = f"/tmp/probe-{uuid.uuid4().hex}.eml"
            self.host.run(f"cat > {path} <<'EOF_MSG'\n{message.decode('latin-1')}\nEOF_MSG")
            cmd += f" --message {path}; rm -f {path}"
        out = self.host.check_output(cmd)
        return json.loads(out)

    def send(self, to: Participant, subject: str, body: str):
        """`participant send` with its default certificate source: the distribution point."""
        body_file = f"/tmp/body-{uuid.uuid4().hex}"
        self.host.run(f"cat > {body_file} <<'EOF_BODY'\n{body}\nEOF_BODY")
        cmd = (f"{self._env()} {SAFEMAIL} participant send --from {self.mailbox} "
               f"--to {to.mailbox} --subject {shlex.quote(subject)} --body-file {body_file} "
               f"{shlex.join(self.directory)} --host {self.relay} --cafile {CAFILE}")
        res = self.host.run(cmd)
        self.host.run(f"rm -f {body_file}")
        return res

    def lookup(self, mailbox: str, directory: list[str] | None = None):
        args = self.directory if directory is None else directory
        return self.host.run(f"{SAFEMAIL} participant lookup --mailbox {shlex.quote(mailbox)} "
                             f"{shlex.join(args)}")

    def certificate(self) -> str:
        return self.host.check_output(f"cat {PDIR}/cert.pem")

    def fetch_newest(self) -> str:
        return self.host.check_output(
            f"{self._env()} {SAFEMAIL} participant fetch --mailbox {self.mailbox} "
            f"--key {PDIR}/key.pem "
            f"--cert {PDIR}/cert.pem --host {self.relay} --cafile {CAFILE}")

    def fetch_by_subject(self, subject: str) -> str:
        """Decrypt the message whose Subject carries ``subject`` ("" while it has not arrived).

        Not simply the newest: other tests deliver synthetic envelopes (which no key opens) to
        the same mailbox at the same time."""
        listing = self.host.run(
            f"{self._env()} {SAFEMAIL} participant fetch --list --mailbox {self.mailbox} "
            f"--host {self.relay} --cafile {CAFILE}")
        for line in listing.stdout.splitlines():
            uid, _, header = line.partition("\t")
            if subject in header:
                return self.host.check_output(
                    f"{self._env()} {SAFEMAIL} participant fetch --mailbox {self.mailbox} "
                    f"--uid {uid} --key {PDIR}/key.pem --cert {PDIR}/cert.pem "
                    f"--host {self.relay} --cafile {CAFILE}")
        return ""

    def list_subjects(self) -> str:
        return self.host.check_output(
            f"{self._env()} {SAFEMAIL} participant fetch --list --mailbox {self.mailbox} "
            f"--host {self.relay} "
            f"--cafile {CAFILE}")


def _reply(transcript: dict, step_prefix: str) -> tuple[int, str]:
    for s in transcript["steps"]:
        if s["step"].startswith(step_prefix):
            return s["code"], s["text"]
    return 0, f"no {step_prefix} step: {transcript}"


def _first_refusal(transcript: dict) -> tuple[str, int, str]:
    """The first step the server did not accept (a gate that is down refuses early)."""
    for s in transcript["steps"]:
        if s["code"] >= 400:
            return s["step"], s["code"], s["text"]
    return "", 0, f"nothing refused: {transcript}"


# Stopping the gate (test_gate_down_...) must not overlap another worker's SMTP test: those
# would see the 4xx meant for it. Every test here holds a shared lock on the controller; the
# gate-down test takes it exclusively.
_GATE_LOCK = "/tmp/safemail-verify-mail-gate.lock"


@pytest.fixture(autouse=True)
def _gate_lock():
    with open(_GATE_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield handle
        fcntl.flock(handle, fcntl.LOCK_UN)


def _gate_answers(lab) -> bool:
    msg = samples.accepted_samples()[0].message
    return _reply(lab["p1"].probe([lab["p2"].mailbox], message=msg), "data")[0] == 250


@pytest.fixture(scope="module")
def lab(request, host):
    inventory = request.config.option.ansible_inventory
    hv = host.ansible.get_variables()
    relay = host.backend.host
    # The distribution point at ca-dist's SafeNet-facing service address (where
    # ca_hosts_dist_http_address binds it in the test inventory).
    dist = testinfra.get_host(f"ansible://{hv['groups']['ca_dist'][0]}",
                              ansible_inventory=inventory)
    dist_uri = f"http://{dist.ansible.get_variables()['safemail_address']}/"
    people = []
    for entry in hv["safemail_participants"]:
        if entry.get("lab_host"):
            h = testinfra.get_host(f"ansible://{entry['lab_host']}",
                                   ansible_inventory=inventory)
            people.append(Participant(h, entry, hv["safemail_participant_passwords"][
                entry["number"]], relay, dist_uri))
    assert len(people) >= 2, "the lab needs two participants with a lab_host"
    store = testinfra.get_host(f"ansible://{hv['groups']['store'][0]}",
                               ansible_inventory=inventory)
    return {"p1": people[0], "p2": people[1], "relay": host, "domain": hv["safemail_mail_domain"],
            "dist_uri": dist_uri, "store": store,
            # The role's default unless the inventory moves it (roles/mailrelay/defaults).
            "mail_log": hv.get("mailrelay_log_path", "/var/log/safemail/mail.log")}


@pytest.mark.req("MAIL-01")
def test_known_mailbox_is_accepted_at_rcpt(lab, evidence):
    t = lab["p1"].probe([lab["p2"].mailbox])
    code, text = _reply(t, "rcpt")
    evidence(f"RCPT {lab['p2'].mailbox}: {code} {text}")
    assert code == 250


@pytest.mark.req("MAIL-01")
def test_unknown_mailbox_is_refused_at_rcpt(lab, evidence):
    t = lab["p1"].probe([f"nobody-{uuid.uuid4().hex[:8]}@{lab['domain']}"])
    code, text = _reply(t, "rcpt")
    evidence(f"RCPT unknown mailbox: {code} {text}")
    assert code == 550


@pytest.mark.req("MAIL-02")
@pytest.mark.parametrize("outside", ["someone@example.org", "postmaster@[203.0.113.10]"])
def test_outside_recipient_is_refused_even_when_authenticated(lab, evidence, outside):
    t = lab["p1"].probe([outside])
    code, text = _reply(t, "rcpt")
    evidence(f"RCPT {outside}: {code} {text}")
    assert 500 <= code < 600


@pytest.mark.req("MAIL-02")
def test_unauthenticated_client_cannot_send_at_all(lab, evidence):
    t = lab["p1"].probe([lab["p2"].mailbox], auth=False)
    code, text = _reply(t, "rcpt")
    if code == 0:
        code, text = _reply(t, "mail")
    evidence(f"unauthenticated: {code} {text}")
    assert 500 <= code < 600


@pytest.mark.req("MAIL-02")
def test_relay_has_no_way_out(lab, evidence):
    relay = lab["relay"]
    conf = relay.check_output("postconf -h default_transport relay_transport relayhost "
                              "virtual_transport")
    master = relay.check_output("postconf -M")
    services = {line.split()[0] for line in master.splitlines() if line.strip()}
    evidence(f"transports: {conf.split()}; master services: {sorted(services)}")
    assert "smtp" not in services and "relay" not in services
    lines = conf.splitlines()
    assert lines[0].startswith("error:") and lines[1].startswith("error:")
    assert lines[2] == ""
    assert lines[3].startswith("lmtp:inet:")
    # Nothing in the queue is headed anywhere else.
    queue = relay.check_output("postqueue -j || true")
    for line in filter(None, queue.splitlines()):
        for rcpt in json.loads(line).get("recipients", []):
            assert rcpt["address"].endswith("@" + lab["domain"]), rcpt


@pytest.mark.req("MAIL-03")
def test_encrypted_mail_is_delivered_and_decrypts_to_the_sent_bytes(lab, evidence):
    marker = f"Befund {uuid.uuid4().hex}"
    body = f"{marker}\nDiese Zeilen sind nur verschluesselt unterwegs."
    subject = f"Befund folgt {uuid.uuid4().hex[:8]}"
    res = lab["p1"].send(lab["p2"], subject, body)
    evidence(f"send: rc={res.rc} {res.stderr.strip()[-200:]}")
    assert res.rc == 0, res.stderr
    plain = wait_for(lambda: lab["p2"].fetch_by_subject(subject), 90)
    evidence(f"practice2 decrypted: {plain.strip()[:120]!r}")
    # The client wraps the text in a MIME entity with CRLF line ends; compare the text.
    assert body.replace("\n", "\r\n") in plain


@pytest.mark.req("MAIL-03")
def test_sender_gets_the_recipients_certificate_from_the_distribution_point(lab, evidence):
    """What `send` encrypts to is the certificate practice2 holds the key for (CA-published)."""
    res = lab["p1"].lookup(lab["p2"].mailbox)
    evidence(f"lookup {lab['p2'].mailbox} at {lab['dist_uri']}: rc={res.rc} "
             f"{res.stderr.strip()[-200:]}")
    assert res.rc == 0, res.stderr
    published = x509.load_pem_x509_certificate(res.stdout.encode())
    own = x509.load_pem_x509_certificate(lab["p2"].certificate().encode())
    evidence(f"published serial {published.serial_number:x}, practice2 serial "
             f"{own.serial_number:x}")
    assert published == own


@pytest.mark.req("MAIL-03")
def test_distribution_point_lookup_needs_the_smime_ca(lab, evidence):
    """Without the CA to check against, the client refuses to use what HTTP delivered."""
    res = lab["p1"].lookup(lab["p2"].mailbox, ["--directory", lab["dist_uri"]])
    evidence(f"lookup without --smime-ca: rc={res.rc} {res.stderr.strip()[-200:]}")
    assert res.rc == 2 and "needs --smime-ca" in res.stderr


@pytest.mark.req("MAIL-03")
def test_unenrolled_mailbox_has_no_published_certificate(lab, evidence):
    mailbox = f"nobody-{uuid.uuid4().hex[:8]}@{lab['domain']}"
    res = lab["p1"].lookup(mailbox)
    evidence(f"lookup {mailbox}: rc={res.rc} {res.stderr.strip()[-200:]}")
    assert res.rc == 1 and f"no certificate published for {mailbox}" in res.stderr


@pytest.mark.req("MAIL-03")
def test_plaintext_twin_is_refused_with_5_7_1(lab, evidence):
    msg = samples.mime_message(b"Befund: alles gut.\r\n", content_type="text/plain")
    t = lab["p1"].probe([lab["p2"].mailbox], message=msg)
    code, text = _reply(t, "data")
    evidence(f"plaintext DATA: {code} {text}")
    assert code == 550 and "5.7.1" in text


def _gate_samples() -> list[samples.Sample]:
    """Every structural refusal, and for the cryptographic policy one sample per refusal code
    plus the ciphers the audit's "Stand der Technik" rules out by name (the unit tests send
    every policy sample through the classifier; over SMTP one per code proves the relay runs
    the policy)."""
    policy = samples.policy_refused_samples()
    names = {s.name for s in policy}
    structural = [s for s in samples.refused_samples() if s.name not in names]
    chosen, codes = [], set()
    for s in policy:
        if s.code not in codes or s.name in ("rc2_40", "des_ede3_cbc"):
            chosen.append(s)
            codes.add(s.code)
    return structural + chosen


# What the relay answers where the message the gate sees is not the sample itself: the probe
# gives every message the participant's From (the empty message is no longer empty), and
# Postfix ends the header section at a line that is no header (the rest is body, so there is
# no Content-Type).
_AT_THE_RELAY = {"empty_message": "plaintext", "broken_header_line": "plaintext"}
# Postfix's first layer (mime_header_checks) refuses these content types before the gate.
_FIRST_LAYER = "[mime_header_checks]"


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("sample", _gate_samples(), ids=lambda s: s.name)
def test_gate_refuses(lab, evidence, sample):
    t = lab["p1"].probe([lab["p2"].mailbox], message=sample.message)
    code, text = _reply(t, "data")
    evidence(f"{sample.name}: {code} {text}")
    assert code == 550, t
    # Refused for this sample's reason, not for another one: the reply names it.
    expected = f"[{_AT_THE_RELAY.get(sample.name, sample.code)}]"
    assert "5.7.1" in text and (expected in text or _FIRST_LAYER in text), text


def _encoded_word(text: str) -> str:
    """RFC 2047 Q-encoding of `text` (every byte escaped), as a mail client could send it."""
    return "=?utf-8?q?" + "".join(f"={b:02X}" for b in text.encode()) + "?="


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("form", ["plain", "hidden_by_encoded_words"])
def test_from_of_another_practice_is_refused(lab, evidence, form):
    """Logged in as practice1, the header From shows practice2's mailbox: refused, although
    the envelope sender is practice1's own (reject_sender_login_mismatch passes it). The
    second form wraps practice2's address in encoded words that decode to a quote and to
    practice1's address, which a parser that decodes first would take for the login."""
    own, other = lab["p1"].mailbox, lab["p2"].mailbox
    opening = _encoded_word('Praxis Zwei "')
    closing = _encoded_word('" <' + own + '>')
    header_from = other if form == "plain" else f"{opening} <{other}> {closing}"
    msg = samples.accepted_samples()[0].message
    t = lab["p1"].probe([other], message=msg, header_from=header_from)
    code, text = _reply(t, "data")
    evidence(f"From {header_from!r} sent by {own}: {code} {text}")
    assert code == 550 and "[from_not_login]" in text, t


@pytest.mark.req("MAIL-03")
def test_null_sender_is_refused_on_submission(lab, evidence):
    """Logged in as practice1, MAIL FROM:<>: refused. reject_sender_login_mismatch does not look
    at the null sender, which would carry mail that names no mailbox (uncounted by the
    accounting, outside the store's duplicate key)."""
    msg = samples.smime_message(samples.enveloped_der(), subject=f"Null {uuid.uuid4().hex[:8]}")
    t = lab["p1"].probe([lab["p2"].mailbox], message=msg, sender="")
    code, text = _reply(t, "mail")
    if code == 250:
        code, text = _reply(t, "rcpt")
    evidence(f"MAIL FROM:<> logged in as {lab['p1'].mailbox}: {code} {text}")
    assert 500 <= code < 600, t


@pytest.mark.req("MAIL-03")
def test_reply_to_another_practice_is_refused(lab, evidence):
    """From is practice1's own, but Reply-To names practice2: the answer, with the patient's
    case in it, would go to another practice. Refused like a foreign From."""
    own, other = lab["p1"].mailbox, lab["p2"].mailbox
    msg = samples.smime_message(samples.enveloped_der(), extra_headers=[("Reply-To", other)])
    t = lab["p1"].probe([other], message=msg, header_from=own)
    code, text = _reply(t, "data")
    evidence(f"From {own}, Reply-To {other}, sent by {own}: {code} {text}")
    assert code == 550 and "[from_not_login]" in text and "Reply-To" in text, t


_CONNECT = r"""
import json, socket, sys
out = {}
for port in (25, 465, 587):
    try:
        socket.create_connection((sys.argv[1], port), 5).close(); out[port] = "open"
    except socket.timeout:
        out[port] = "filtered"
    except OSError as exc:
        out[port] = type(exc).__name__
print(json.dumps(out))
"""


@pytest.mark.req("MAIL-03")
def test_service_hosts_cannot_put_mail_into_the_relay(lab, evidence):
    """The ways into the relay's queue are submission (participants, with a login, through the
    gate), local sendmail on the relay (next test) and Postfix's own notices (docs/mail.md).
    A service host has none: Postfix listens for SMTP on submission only, and the store (the
    service host closest to the relay) cannot reach an SMTP port of the relay at all."""
    relay, store = lab["relay"], lab["store"]
    inet = sorted(line.split()[0] for line in relay.check_output("postconf -M").splitlines()
                  if line.split()[1:2] == ["inet"])
    address = relay.ansible.get_variables()["safemail_address"]
    reached = json.loads(store.check_output(f"python3 -c {shlex.quote(_CONNECT)} {address}"))
    evidence(f"relay's Postfix inet services: {inet}; from the store to {address}: {reached}")
    assert inet == ["submission"], inet
    assert "open" not in reached.values(), reached


@pytest.mark.req("MAIL-03")
def test_local_sendmail_on_the_relay_passes_the_gate(lab, evidence):
    """Mail put in on the relay itself (sendmail, pickup, cleanup) meets the same gate: a
    plaintext message with a participant as envelope sender is discarded (the gate logs its
    verdict), and no bounce carries the text into that participant's mailbox, as a Postfix
    bounce of a rejected message would, without passing the gate."""
    relay, store = lab["relay"], lab["store"]
    marker = f"local-{uuid.uuid4().hex}"
    msg = (f"From: {lab['p1'].mailbox}\nTo: {lab['p2'].mailbox}\nSubject: {marker}\n"
           f"Message-ID: <{marker}@relay.test>\n\nBefund im Klartext {marker}.\n")
    relay.check_output(f"printf %s {shlex.quote(msg)} | sendmail -f {lab['p1'].mailbox} -- "
                       f"{shlex.quote(lab['p2'].mailbox)}")
    log = lab["mail_log"]

    def queue_id() -> str:
        return relay.run(f"grep -F {shlex.quote(marker)} {log} | grep -o ']: [0-9A-F]*:' "
                         "| head -n1 | tr -d ' ]:'").stdout.strip()

    def fate(qid: str) -> str:
        return relay.run(f"grep -F '{qid}: milter-' {log}").stdout.strip()

    qid = wait_for(queue_id, 60, 2)
    line = wait_for(lambda: fate(qid), 60, 2) if qid else ""
    verdict = relay.run(f"journalctl -u safemail-smime-gate -o cat --no-pager "
                        f"| grep -F 'queue_id={qid} '").stdout.strip() if qid else ""
    time.sleep(5)  # a bounce, if one were made, is queued within a second of the refusal
    bounced = relay.run(f"grep -cF '{qid}: sender non-delivery' {log}").stdout.strip()
    stored = store.run(f"grep -rlF {shlex.quote(marker)} /var/mail/vmail").stdout.split()
    evidence(f"local sendmail of a plaintext message: {line or 'nothing logged'}; gate: "
             f"{verdict or 'no verdict'}; bounces: {bounced}; copies on the store: {stored}")
    assert qid and "milter-discard" in line
    assert "origin=safemail-local verdict=plaintext action=discard" in verdict
    assert bounced == "0" and stored == []


@pytest.mark.req("MAIL-04")
@pytest.mark.parametrize("header", [
    ("Thread-Topic", "Befund A123456789"),
    ("Cc", '"Patient: Erika Muster" <{p2}>'),
    ("Content-Disposition", "attachment; filename*0=\"Muster geb. 01.02.\"; filename*1=\"1960\""),
], ids=lambda h: h[0])
def test_patient_identifier_in_another_header_is_refused(lab, evidence, header):
    name, value = header
    value = value.format(p2=lab["p2"].mailbox)
    msg = samples.smime_message(samples.enveloped_der(), extra_headers=[(name, value)])
    t = lab["p1"].probe([lab["p2"].mailbox], message=msg)
    code, text = _reply(t, "data")
    evidence(f"{name}: {value!r}: {code} {text}")
    assert code == 550 and "[subject_patient_data]" in text and name in text, t


@pytest.mark.req("MAIL-04")
def test_headers_outside_the_allowed_list_never_reach_the_store(lab, evidence):
    """A header no mail client needs (here X-Private-Note, and a Received header the client
    made up: Postfix never shows the gate its own) is deleted by the gate: the message is
    delivered, neither header is in the stored copy. Postfix's own Received (it quotes the
    client's HELO) is dropped by header_checks: only the store's LMTP one is left."""
    subject = f"Befund {uuid.uuid4().hex[:12]}"
    note = f"note-{uuid.uuid4().hex}"
    msg = samples.smime_message(samples.enveloped_der(), subject=subject,
                                extra_headers=[("X-Private-Note", note), ("X-Mailer", "probe"),
                                               ("Received", f"from {note} by client")])
    t = lab["p1"].probe([lab["p2"].mailbox], message=msg)
    code, text = _reply(t, "data")
    store = lab["store"]

    def stored() -> list[str]:
        return store.run(f"grep -rlF {shlex.quote(subject)} /var/mail/vmail "
                         "| grep -E '/Maildir/(new|cur)/'").stdout.split()

    files = wait_for(stored, 90, 2)
    content = store.check_output(f"cat {shlex.quote(files[0])}") if files else ""
    head = content.split("\n\n", 1)[0]
    received = [block for block in re.split(r"\n(?=\S)", head) if block.startswith("Received:")]
    # The store's own LMTP Received stays; none from the relay's Postfix (it quotes the
    # client's HELO, free text nobody examines).
    from_relay = [r for r in received if "(Postfix)" in r or "ESMTP" in r]
    evidence(f"DATA {code} {text}; stored copies: {len(files)}; X-Private-Note or client "
             f"Received in it: "
             f"{note in content}; X-Mailer kept: {'X-Mailer: probe' in content}; Received "
             f"headers: {received}")
    assert code == 250 and len(files) == 1
    assert note not in content and "X-Mailer: probe" in content
    assert received and from_relay == [], f"the relay's own Received reached the store: {head}"


@pytest.mark.req("MAIL-03")
def test_synthetic_envelope_passes_the_gate(lab, evidence):
    """The positive twin of the refusals, with the same probe: a well-formed envelope."""
    t = lab["p1"].probe([lab["p2"].mailbox], message=samples.accepted_samples()[0].message)
    code, text = _reply(t, "data")
    evidence(f"enveloped DATA: {code} {text}")
    assert code == 250


@pytest.mark.req("MAIL-03")
@pytest.mark.disruptive
@pytest.mark.stage_hosts("relay", also=("participants",))
def test_gate_down_means_tempfail_never_acceptance(lab, evidence, _gate_lock):
    fcntl.flock(_gate_lock, fcntl.LOCK_UN)
    fcntl.flock(_gate_lock, fcntl.LOCK_EX)  # wait until no other mail test runs
    relay = lab["relay"]
    msg = samples.accepted_samples()[0].message
    relay.check_output("systemctl stop safemail-smime-gate")
    try:
        t = lab["p1"].probe([lab["p2"].mailbox], message=msg)
    finally:
        relay.check_output("systemctl start safemail-smime-gate")
    step, code, text = _first_refusal(t)
    evidence(f"gate stopped: {step}: {code} {text}")
    assert 400 <= code < 500, t
    assert _reply(t, "data")[0] != 250
    # Back up: the same message is accepted again (the gate needs some seconds to start).
    assert wait_for(lambda: _gate_answers(lab), 180)


@pytest.mark.req("MAIL-04")
@pytest.mark.parametrize("subject", ["Befund A123456789", "Patient: Erika Muster",
                                     "Labor geb. 01.02.1960"])
def test_subject_with_patient_identifier_is_refused(lab, evidence, subject):
    msg = samples.smime_message(samples.enveloped_der(), subject=subject)
    t = lab["p1"].probe([lab["p2"].mailbox], message=msg)
    code, text = _reply(t, "data")
    evidence(f"subject {subject!r}: {code} {text}")
    assert code == 550 and "5.7.1" in text and "[subject_patient_data]" in text


@pytest.mark.req("MAIL-04")
def test_neutral_subject_is_accepted(lab, evidence):
    msg = samples.smime_message(samples.enveloped_der(), subject="Befund folgt")
    t = lab["p1"].probe([lab["p2"].mailbox], message=msg)
    code, text = _reply(t, "data")
    evidence(f"neutral subject: {code} {text}")
    assert code == 250


@pytest.mark.req("MAIL-05")
def test_submission_without_tls_is_refused(lab, evidence):
    t = lab["p1"].probe([lab["p2"].mailbox], starttls=False)
    code, text = _reply(t, "auth")
    evidence(f"AUTH without STARTTLS: {code} {text}")
    assert code >= 500
    t = lab["p1"].probe([lab["p2"].mailbox], starttls=False, auth=False)
    code, text = _reply(t, "mail")
    evidence(f"MAIL without STARTTLS: {code} {text}")
    assert 500 <= code < 600


@pytest.mark.req("MAIL-05")
def test_imap_only_over_tls(lab, evidence):
    p1 = lab["p1"]
    code = ("import socket,ssl,sys\n"
            f"h='{p1.relay}'\n"
            "try:\n socket.create_connection((h,143),timeout=30); print('plain-open')\n"
            "except OSError as e: print('plain-refused', e.errno)\n"
            f"c=ssl.create_default_context(cafile='{CAFILE}')\n"
            "s=c.wrap_socket(socket.create_connection((h,993),timeout=30),server_hostname=h)\n"
            "print('tls', s.version(), s.recv(64).decode().strip())\n")
    out = p1.host.check_output(f"python3 - <<'EOF'\n{code}EOF")
    evidence(out.replace("\n", " | "))
    assert "plain-refused" in out
    assert "tls TLSv1." in out and "* OK" in out


@pytest.mark.req("MAIL-05")
def test_relay_to_store_deliveries_are_verified_tls(lab, evidence):
    relay = lab["relay"]
    hv = relay.ansible.get_variables()
    log = hv.get("mailrelay_log_path", "/var/log/safemail/mail.log")
    out = relay.check_output(f"grep -E 'TLS connection established to' {log} | tail -n 3")
    evidence(out)
    assert "Verified TLS connection established to" in out
    assert "Untrusted" not in out.splitlines()[-1]


@pytest.mark.req("MAIL-05")
def test_imap_proxy_verifies_the_store_certificate(lab, evidence):
    """The relay's IMAP proxy starts TLS to the store AND verifies it (no any-cert), with the
    service TLS CA in ssl_ca (Dovecot 2.3's login proxy ignores ssl_client_ca_*). The store's
    certificate verifies for its name against that CA; the fetch tests above prove sessions
    pass through the verifying proxy."""
    relay = lab["relay"]
    attrs = relay.check_output("grep -h '^pass_attrs' /etc/dovecot/dovecot-ldap.conf.ext")
    ca_line = relay.check_output("doveconf -h ssl_ca")
    store = attrs.split("=host=", 1)[1].split(",", 1)[0].strip() if "=host=" in attrs else ""
    probe = relay.run(
        f"echo | openssl s_client -starttls imap -connect {store}:143 -CAfile {CAFILE} "
        f"-verify_return_error -verify_hostname {store} -brief 2>&1")
    evidence(f"{attrs.strip()} | ssl_ca {ca_line.strip()} | store TLS: "
             f"{[x for x in probe.stdout.splitlines() if 'Verif' in x or 'Peer cert' in x]}")
    assert "starttls=yes" in attrs and "any-cert" not in attrs
    assert ca_line.strip() == f"<{CAFILE}"
    assert probe.rc == 0 and "Verification: OK" in probe.stdout
