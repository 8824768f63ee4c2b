"""The SMTP probe records every reply and stops at the first refusal (fake server on loopback)."""

from __future__ import annotations

import json
import socket
import socketserver
import threading

import pytest

from safemail.participant import probe


class _Handler(socketserver.StreamRequestHandler):
    refuse_rcpt = "nobody@"

    def _send(self, line: str) -> None:
        self.wfile.write((line + "\r\n").encode())

    def handle(self) -> None:
        self._send("220 fake ESMTP")
        while line := self.rfile.readline().decode().strip():
            cmd = line.upper()
            if cmd.startswith("EHLO"):
                self._send("250-fake\r\n250 SIZE 1000")
            elif cmd.startswith("MAIL"):
                self._send("250 2.1.0 Ok")
            elif cmd.startswith("RCPT"):
                if self.refuse_rcpt in line:
                    self._send("550 5.1.1 User unknown")
                else:
                    self._send("250 2.1.5 Ok")
            elif cmd == "DATA":
                self._send("354 go")
                while self.rfile.readline().strip() != b".":
                    pass
                self._send("550 5.7.1 523 Encryption Needed: plaintext")
            elif cmd == "QUIT":
                self._send("221 bye")
                return
            else:
                self._send("502 no")


@pytest.fixture()
def server():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _run(port, **kw):
    base = dict(cafile=None, starttls=False, user=None, password=None,
                sender="a@safemail.example", message=None, timeout=5)
    base.update(kw)
    return probe.run_probe("127.0.0.1", port, **base)


def test_records_each_reply_and_the_refusal(server):
    t = _run(server, recipients=["b@safemail.example", "nobody@safemail.example"],
             message=b"Subject: x\r\n\r\nhello\r\n")
    steps = [(s.step.split()[0], s.code) for s in t.steps]
    assert steps == [("ehlo", 250), ("mail", 250), ("rcpt", 250), ("rcpt", 550), ("data", 550)]
    assert "Encryption Needed" in t.steps[-1].text
    assert json.loads(t.to_json())["steps"][3]["code"] == 550


def test_no_data_when_every_recipient_is_refused(server):
    t = _run(server, recipients=["nobody@safemail.example"], message=b"x\r\n")
    assert [s.step.split()[0] for s in t.steps] == ["ehlo", "mail", "rcpt"]


def test_unreachable_server_is_an_error_not_an_exception():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t = _run(port, recipients=["b@safemail.example"])
    assert t.steps == [] and t.error.startswith("connect:")


def test_starttls_refused_by_a_server_without_it_stops_there(server):
    t = _run(server, recipients=["b@safemail.example"], starttls=True)
    assert t.steps[0].step == "ehlo"
    assert t.error or (t.steps[-1].step == "starttls" and t.steps[-1].code >= 500)
