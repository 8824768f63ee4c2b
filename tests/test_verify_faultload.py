"""verify/faultload.py: the pure parts of the AV-02 fault test (no lab).

The time bound, the plaintext needles, the Message-ID accounting (lost, duplicate, elsewhere,
not S/MIME, unknown), the timing statistics and the store-side Maildir listing, which runs as
a stand-alone script with the system's python3 as it does on the store.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "verify"))

import faultload as fl  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


# ------------------------------------------------------------------ time bound


def test_deadline_counts_down_and_names_the_phase():
    clock = FakeClock()
    d = fl.Deadline(60, clock)
    clock.now += 59
    assert not d.expired() and d.remaining() == pytest.approx(1)
    d.check("sending")  # not yet
    clock.now += 1
    assert d.expired() and d.remaining() == 0
    with pytest.raises(fl.TimeLimitReached, match="60 s reached during the relay power-off"):
        d.check("the relay power-off")


@pytest.mark.parametrize("bad", [0, -1, float("nan")])
def test_deadline_refuses_a_limit_that_is_not_positive(bad):
    with pytest.raises(ValueError, match="positive"):
        fl.Deadline(bad)


def test_wait_for_returns_the_time_taken_or_none_or_stops_at_the_limit():
    clock = FakeClock()
    d = fl.Deadline(100, clock)
    calls = iter([False, False, True])
    assert d.wait_for(lambda: next(calls), 30, "x", 2, clock.sleep) == pytest.approx(4)
    clock.now = 1000.0
    d = fl.Deadline(100, clock)
    assert d.wait_for(lambda: False, 10, "x", 2, clock.sleep) is None
    assert clock.now - 1000 == pytest.approx(10)
    with pytest.raises(fl.TimeLimitReached, match="the wait for delivery"):
        d.wait_for(lambda: False, 500, "the wait for delivery", 5, clock.sleep)
    assert clock.now - 1000 == pytest.approx(100)  # stopped at the limit, not after 500 s


# ------------------------------------------------------------------ plaintext


MARKER = "FAULTBODY-0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc", "Lastprobe 17.\r\n"])
def test_needles_find_the_marker_in_base64_at_every_alignment(prefix):
    body = (prefix + MARKER + "\r\nmore text\r\n").encode()
    encoded = base64.encodebytes(body).decode()  # 76-column lines, as MIME writes them
    flat = encoded.replace("\n", "")
    needles = fl.marker_needles(MARKER)
    assert fl.needle_hits(flat, needles), (prefix, flat)
    assert fl.needle_hits(prefix + MARKER, needles) == [MARKER]


def test_needles_find_nothing_in_other_text_and_refuse_short_markers():
    needles = fl.marker_needles(MARKER)
    other = base64.b64encode(b"FAULTBODY-ffffffffffffffffffffffffffffffffffffffffffff").decode()
    assert fl.needle_hits(other + "FAULTBODY-", needles) == []
    with pytest.raises(ValueError, match="too short"):
        fl.marker_needles("short")


# ------------------------------------------------------------------ accounting


def mail(mid, rcpt="p2@x.test", *outcomes, start=100.0):
    attempts = tuple(fl.Attempt(start + i, start + i + 0.5, o) for i, o in enumerate(outcomes))
    return fl.SentMail(mid, "p1@x.test", rcpt, attempts or (fl.Attempt(start, start + .5,
                                                                      "250 2.0.0 Ok"),))


def copy(mid, box="p2@x.test", saved=110.0, ctype="application/pkcs7-mime"):
    return fl.StoredCopy(mid, box, saved, ctype, f"/m/{mid}")


def test_every_mail_once_is_ok_with_its_delays():
    sent = [mail("<a>"), mail("<b>", "p2@x.test", "451 4.7.1 try later", "250 ok")]
    result = fl.account(sent, [copy("<a>", saved=103.0), copy("<b>", saved=111.5)])
    assert result.ok and result.problems() == []
    assert result.delivered_once == 2 and result.accepted == 2
    assert result.delays == pytest.approx([3.0, 11.5])
    assert result.delays_after_250 == pytest.approx([2.5, 10.0])  # <b> accepted at 101.5


def test_a_lost_mail_is_found_and_says_whether_it_was_accepted():
    sent = [mail("<a>"), mail("<b>"), mail("<c>", "p2@x.test", "550 5.1.1 unknown")]
    result = fl.account(sent, [copy("<a>")])
    assert not result.ok
    assert result.lost == ["<b>", "<c>"] and result.lost_after_250 == ["<b>"]
    assert result.refused == {"<c>": "550 5.1.1 unknown"}
    assert "2 lost" in result.problems()[0]


def test_a_duplicate_is_found_and_one_after_an_unanswered_dot_is_named():
    sent = [mail("<a>"), mail("<b>", "p2@x.test", "unconfirmed: after the final dot: timed out",
                             "250 ok")]
    result = fl.account(sent, [copy("<a>"), copy("<a>"), copy("<b>"), copy("<b>")])
    assert not result.ok
    assert result.duplicates == {"<a>": 2, "<b>": 2}
    assert result.duplicates_after_unconfirmed == ["<b>"]
    assert "1 after an attempt whose reply never came" in result.problems()[0]


def test_a_copy_in_another_mailbox_unknown_ids_and_plaintext_copies_fail():
    sent = [mail("<a>"), mail("<b>")]
    stored = [copy("<a>"), copy("<a>", box="p1@x.test"), copy("<b>", ctype="text/plain"),
              copy("<forged>")]
    result = fl.account(sent, stored)
    assert result.misdelivered == {"<a>": ["p1@x.test"]}
    assert result.unknown == ["<forged>"]
    assert len(result.not_smime) == 1 and "text/plain" in result.not_smime[0]
    assert not result.ok and len(result.problems()) == 3


def test_nothing_sent_is_not_ok():
    assert not fl.account([], []).ok
    assert fl.account([], []).problems() == ["no mail was sent"]


def test_mailbox_of_the_store_layout_and_dovecot_file_times():
    root = "/var/mail/vmail"
    assert fl.mailbox_of(f"{root}/safemail.test/p2/Maildir/new/1.M2P3.store1", root) == \
        "p2@safemail.test"
    assert fl.mailbox_of(f"{root}/safemail.test/p2/Maildir/.Trash/cur/1.M2P3:2,S", root) == \
        "p2@safemail.test"
    with pytest.raises(ValueError):
        fl.mailbox_of(f"{root}/safemail.test/p2/Maildir/dovecot.index.cache", root)
    assert fl.saved_time("1765051200.M123456P789.store1,S=3431,W=3500", 5.0) == \
        pytest.approx(1765051200.123456)
    assert fl.saved_time("odd-name", 5.0) == 5.0


def test_clock_shift_moves_host_times_to_the_controller():
    m = fl.shift_mail([mail("<a>")], 2.0)[0]
    assert m.first_try == pytest.approx(98.0)
    c = fl.shift([copy("<a>", saved=110.0)], -1.0)[0]
    assert c.saved == pytest.approx(111.0)


# ------------------------------------------------------------------ statistics


def test_delay_stats_median_p95_max():
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unordered
    assert fl.delay_stats(values) == {"count": 100, "median": 50.5, "p95": 95.0, "max": 100.0}
    assert fl.delay_stats([3.0]) == {"count": 1, "median": 3.0, "p95": 3.0, "max": 3.0}
    assert fl.delay_stats([1.0, 2.0, 9.0]) == {"count": 3, "median": 2.0, "p95": 9.0,
                                               "max": 9.0}
    assert fl.delay_stats([])["median"] is None
    with pytest.raises(ValueError):
        fl.percentile([1.0], 0)


def test_acceptance_gap_is_the_longest_time_without_a_250_in_the_window():
    assert fl.acceptance_gap([1, 2, 3, 10, 11], 0, 12) == 7
    assert fl.acceptance_gap([], 5, 65) == 60  # nothing accepted in the window at all
    assert fl.acceptance_gap([1, 100], 10, 20) == 10
    assert fl.acceptance_gap([5, 8], 0, 10) == 5  # from the start of the fault to the first 250
    assert fl.acceptance_gap([2, 3], 0, 10) == 7  # from the last 250 to the end


def test_pacing_makes_what_is_due_and_never_more_than_the_limit():
    assert fl.due(0.0, 2.0, 0, 100) == 1
    assert fl.due(10.0, 2.0, 1, 100) == 20
    assert fl.due(10.0, 2.0, 21, 100) == 0
    assert fl.due(1000.0, 2.0, 90, 100) == 10


# ------------------------------------------------------------------ on the store


def test_maildir_listing_runs_stand_alone_and_finds_only_the_runs_mail(tmp_path):
    root = tmp_path / "vmail"
    files = {
        "safemail.test/p2/Maildir/new/1765051200.M1P1.store1": ("<fault-r1-p1-00000@s>",
                                                                "application/pkcs7-mime"),
        "safemail.test/p2/Maildir/cur/1765051201.M5P1.store1:2,S": ("<fault-r1-p1-00001@s>",
                                                                    "text/plain"),
        "safemail.test/p1/Maildir/new/1765051202.M1P1.store1": ("<other@s>",
                                                                "application/pkcs7-mime"),
    }
    for rel, (mid, ctype) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"Message-ID: {mid}\r\nContent-Type: {ctype}\r\n\r\nbody\r\n".encode())
    (root / "safemail.test/p2/Maildir/dovecot.index.log").write_bytes(b"<fault-r1-p1-00000@s>")
    out = subprocess.run(["python3", "-I", str(REPO / "verify/faultload.py"), "maildir",
                          str(root), "fault-r1"], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    copies = fl.parse_maildir_lines(out, str(root))
    assert sorted((c.message_id, c.mailbox, c.content_type) for c in copies) == [
        ("<fault-r1-p1-00000@s>", "p2@safemail.test", "application/pkcs7-mime"),
        ("<fault-r1-p1-00001@s>", "p2@safemail.test", "text/plain")]
    assert {round(c.saved, 6) for c in copies} == {1765051200.000001, 1765051201.000005}


def test_the_sender_file_parses_into_attempts():
    doc = {"sender": "p1@s", "recipient": "p2@s", "messages": [
        {"mid": "<a>", "attempts": [[1.0, 2.0, "failed: session: refused"], [5.0, 6.0, "250 ok"]]}]}
    (m,) = fl.parse_sender_file(doc)
    assert m.first_try == 1.0 and m.accepted_at == 6.0 and m.recipient == "p2@s"
    assert json.dumps(doc)  # what the sender writes is plain JSON


def test_the_script_says_how_to_use_it():
    proc = subprocess.run(["python3", str(REPO / "verify/faultload.py")], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2 and "usage: faultload.py send" in proc.stderr


# ------------------------------------------------------------------ the sender, local server


class _Server:
    """A small SMTP submission server (STARTTLS, AUTH PLAIN) on localhost that answers each
    message's final dot from a script: "ok" (250), "tempfail" (451) or "drop" (the message is
    kept, the connection closed without a reply, as when a relay loses power after its queue
    file is written)."""

    def __init__(self, tmp_path: Path, script: list[str]) -> None:
        import datetime
        import socket
        import ssl
        import threading

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(now - datetime.timedelta(minutes=1))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                .sign(key, hashes.SHA256()))
        self.cafile = tmp_path / "server.pem"
        self.cafile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        keyfile = tmp_path / "server.key"
        keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(self.cafile, keyfile)
        self.script = list(script)
        self.stored: list[bytes] = []
        self.sessions = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.sessions += 1
            try:
                self._session(conn)
            except OSError:
                pass
            finally:
                conn.close()

    def _session(self, conn) -> None:
        f = conn.makefile("rwb")

        def say(line: str) -> None:
            f.write(line.encode() + b"\r\n")
            f.flush()

        say("220 localhost ESMTP")
        while line := f.readline():
            cmd = line.strip().upper()
            if cmd.startswith(b"EHLO"):
                say("250-localhost\r\n250-STARTTLS\r\n250 AUTH PLAIN")
            elif cmd == b"STARTTLS":
                say("220 go ahead")
                conn = self.context.wrap_socket(conn, server_side=True)
                f = conn.makefile("rwb")
            elif cmd.startswith(b"AUTH PLAIN"):
                say("235 ok")
            elif cmd.startswith((b"MAIL", b"RCPT", b"RSET")):
                say("250 ok")
            elif cmd == b"DATA":
                say("354 go on")
                data = b""
                while (chunk := f.readline()) != b".\r\n":
                    data += chunk
                what = self.script.pop(0) if self.script else "ok"
                if what == "tempfail":
                    say("451 4.3.0 try again later")
                    continue
                self.stored.append(data)
                if what == "drop":
                    conn.close()
                    return
                say("250 2.0.0 Ok: queued")
            elif cmd == b"QUIT":
                say("221 bye")
                return
            else:
                say("502 no")


def test_the_sender_batches_retries_and_its_resend_shows_as_a_duplicate(tmp_path):
    """The real sender (build and encrypt with safemail.participant.message, one session per
    batch) against the local server: the 2nd mail is refused with 451 once, the 4th is kept by
    the server but its reply never comes. Both are resent; the accounting finds the 4th
    twice, named as resent after an unanswered dot, and everything else exactly once."""
    from certs import self_signed
    from cryptography.hazmat.primitives.asymmetric import rsa

    from safemail.participant import message

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = self_signed("p2@safemail.test", key)
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "rcpt.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "stop").write_text("")
    server = _Server(tmp_path, ["ok", "tempfail", "ok", "drop"])
    cfg = {"sender": "p1@safemail.test", "recipient": "p2@safemail.test",
           "cert": str(tmp_path / "rcpt.pem"), "host": "localhost", "port": server.port,
           "cafile": str(server.cafile), "tag": "fault-t1", "marker": MARKER,
           "domain": "safemail.test", "quota": 6, "max": 6, "rate": 1000.0,
           "batch_seconds": 0.05, "retry_seconds": 0.05, "batch_max": 50, "seconds": 60,
           "stop_file": str(tmp_path / "stop"), "timeout": 5}
    doc = fl.send(cfg, "secret")
    assert doc["status"] == "done" and len(doc["messages"]) == 6
    sent = fl.parse_sender_file(doc)
    outcomes = [[a.outcome.split(":")[0].split()[0] for a in m.attempts] for m in sent]
    assert outcomes[1] == ["451", "250"], outcomes
    assert outcomes[3][0] == "unconfirmed" and outcomes[3][-1] == "250", outcomes
    assert server.sessions < 6 + 2  # batched: fewer sessions than attempts
    stored = []
    for raw in server.stored:
        raw = raw.replace(b"\n..", b"\n.")
        mid = next(line.split(b":", 1)[1].strip().decode() for line in raw.splitlines()
                   if line.lower().startswith(b"message-id:"))
        assert MARKER.encode() not in raw  # encrypted on the way
        assert MARKER.encode() in message.decrypt_message(raw, cert, key)
        stored.append(fl.StoredCopy(mid, "p2@safemail.test", 0.0, "application/pkcs7-mime"))
    result = fl.account(sent, stored)
    assert result.lost == [] and result.delivered_once == 5
    assert list(result.duplicates) == [sent[3].message_id]
    assert result.duplicates_after_unconfirmed == [sent[3].message_id]


# ------------------------------------------------------------------ the plaintext scan, locally


def test_the_plaintext_scan_finds_clear_and_base64_copies_and_proves_it_can_see(tmp_path,
                                                                                monkeypatch):
    """verify/test_faults.py's scan with local hosts and temporary directories: a relay with
    the marker base64-encoded in a queue file and one in clear in a log is reported, a clean
    store is not, both canaries are found; a host whose scan cannot see its canary (here: the
    canary written outside the scanned directories) is reported blind."""
    import warnings

    import testinfra

    with warnings.catch_warnings():  # verify/'s markers are registered by verify/conftest.py
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        import test_faults as tf

    relay_dir, store_dir, canaries, needles_dir = (tmp_path / n for n in
                                                   ("relay", "store", "canary", "needles"))
    for d in (relay_dir, store_dir, canaries, needles_dir):
        d.mkdir()
    monkeypatch.setattr(tf, "SCAN", {"relay": [str(relay_dir), str(canaries)],
                                     "store": [str(store_dir), str(canaries)]})
    monkeypatch.setattr(tf, "CANARY_DIR", str(canaries))
    monkeypatch.setattr(tf, "NEEDLES_DIR", str(needles_dir))
    (relay_dir / "df").mkdir()
    (relay_dir / "df/4F2A1").write_bytes(base64.encodebytes(b"Text: " + MARKER.encode()))
    (relay_dir / "mail.log").write_text(f"something {MARKER} here\n")
    (store_dir / "1.M1P1.store1").write_text("Content-Type: application/pkcs7-mime\n\nMIIB\n")
    local = testinfra.get_host("local://")
    hosts = {"relay1": ("relay", local), "store1": ("store", local)}
    needles = fl.marker_needles(MARKER)
    hits, blind = tf._plaintext_scan(hosts, needles, MARKER)
    assert blind == []
    assert sorted(hits) == ["relay1"]
    assert sorted(Path(p).name for p in hits["relay1"]) == ["4F2A1", "mail.log"]
    assert list(needles_dir.iterdir()) == [] and list(canaries.iterdir()) == []  # cleaned up
    monkeypatch.setattr(tf, "CANARY_DIR", str(tmp_path))  # not scanned
    hits, blind = tf._plaintext_scan(hosts, needles, MARKER)
    assert blind == ["relay1", "store1"]


def test_the_sender_script_stops_on_sigterm_and_still_writes_its_record(tmp_path):
    """What the test's finally does to a sender that is still running: `kill PID`. The script
    (run as on the participant host) ends and writes what it sent, status "stopped"."""
    import os
    import signal
    import time

    from certs import self_signed
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rcpt.pem").write_bytes(
        self_signed("p2@safemail.test", key).public_bytes(serialization.Encoding.PEM))
    server = _Server(tmp_path, [])
    cfg = {"sender": "p1@safemail.test", "recipient": "p2@safemail.test",
           "cert": str(tmp_path / "rcpt.pem"), "host": "localhost", "port": server.port,
           "cafile": str(server.cafile), "tag": "fault-t2", "marker": MARKER,
           "domain": "safemail.test", "quota": 10000, "max": 10000, "rate": 20.0,
           "batch_seconds": 0.2, "batch_max": 50, "seconds": 120,
           "stop_file": str(tmp_path / "stop"), "out": str(tmp_path / "result.json")}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "SAFEMAIL_PASSWORD": "secret", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, str(REPO / "verify/faultload.py"), "send",
                             str(tmp_path / "config.json")], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while len(server.stored) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    doc = json.loads((tmp_path / "result.json").read_text())
    assert doc["status"] == "stopped"
    accepted = [m for m in doc["messages"] if m["attempts"] and
                m["attempts"][-1][2].startswith("250")]
    assert len(accepted) >= 3 and len(doc["messages"]) < 10000


def test_queued_since_counts_only_the_runs_queue_entries():
    lines = "\n".join(json.dumps({"queue_name": q, "arrival_time": t, "queue_id": i})
                      for q, t, i in (("deferred", 1000, "A"), ("active", 2000, "B"),
                                      ("deferred", 2500, "C")))
    assert fl.queued_since(lines + "\n", 2000) == 2
    assert fl.queued_since(lines, 3000) == 0
    assert fl.queued_since("", 0) == 0
