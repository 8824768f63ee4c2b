"""The participant client's directory lookup (MAIL-03): LDAP codec and a fake StartTLS server.

The fake server speaks just enough LDAPv3 to exercise the client: StartTLS, simple bind, a
one-level equality search answering ``userCertificate;binary``. It records whether a bind ever
arrived before TLS (it must not).
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from test_participant import RECIPIENT, SENDER, safemail_main, write_pem

from safemail.errors import SafeMailError
from safemail.participant import directory, message
from safemail.participant.directory import _Reader, _tlv
from safemail.smime.classify import classify

BASE = "ou=participants,dc=safemail,dc=example"
BIND_DN = f"uid=100001,{BASE}"
PASSWORD = "lab-praxis-pw"  # noqa: S105 - test fixture


# --- codec ------------------------------------------------------------------------------------


def test_encodings_match_rfc_4511_bytes() -> None:
    assert directory.encode_unbind(3) == bytes.fromhex("300502010342" "00")
    oid = b"1.3.6.1.4.1.1466.20037"
    assert directory.encode_starttls(1) == (
        bytes.fromhex("301d020101" "7718" "8016") + oid
    )
    assert directory.encode_bind(1, "cn=a", "b") == bytes.fromhex(
        "3011020101" "600c" "020103" "0404") + b"cn=a" + bytes.fromhex("8001") + b"b"


def test_search_request_carries_the_filter_value_raw() -> None:
    raw = directory.encode_search(7, BASE, "mail", "a*b)(x=y@z", ["userCertificate;binary"])
    outer = _Reader(_Reader(raw).expect(0x30))
    assert outer.expect(0x02) == b"\x07"
    body = _Reader(outer.expect(0x63))
    assert body.expect(0x04) == BASE.encode()
    assert body.expect(0x0A) == b"\x01"  # one level
    for tag in (0x0A, 0x02, 0x02, 0x01):
        body.expect(tag)
    ava = _Reader(body.expect(0xA3))
    assert ava.expect(0x04) == b"mail"
    assert ava.expect(0x04) == b"a*b)(x=y@z"  # no filter-string injection possible
    assert _Reader(body.expect(0x30)).expect(0x04) == b"userCertificate;binary"


def test_long_lengths_round_trip() -> None:
    value = b"x" * 70000
    entry = _entry(5, "uid=1," + BASE, {"userCertificate;binary": [value, b"y"]})
    msg = directory.decode_message(entry)
    assert msg.message_id == 5 and msg.dn == "uid=1," + BASE
    assert msg.attributes["userCertificate;binary"] == [value, b"y"]


@pytest.mark.parametrize("data", [b"", b"\x30", b"\x30\x05\x02\x01", b"\x30\x84\xff\xff\xff\xff",
                                  b"\x1f\x00", b"\x30\x03\x04\x01x"])
def test_malformed_messages_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        directory.decode_message(data)


def test_parent_dn() -> None:
    assert directory.parent_dn(BIND_DN) == BASE
    assert directory.parent_dn(r"cn=a\,b,ou=x") == "ou=x"
    with pytest.raises(SafeMailError, match="no parent"):
        directory.parent_dn("dc=example")


def test_only_ldap_uris() -> None:
    with pytest.raises(SafeMailError, match="not an ldap"):
        directory.LdapCertificateDirectory(directory.DirectoryConfig("http://x", BIND_DN, "p"))


# --- a fake directory -------------------------------------------------------------------------


def _int(n: int) -> bytes:
    return _tlv(0x02, bytes([n]))


def _result(message_id: int, op: int, code: int, text: str = "") -> bytes:
    body = _tlv(0x0A, bytes([code])) + _tlv(0x04, b"") + _tlv(0x04, text.encode())
    return _tlv(0x30, _int(message_id) + _tlv(op, body))


def _entry(message_id: int, dn: str, attrs: dict[str, list[bytes]]) -> bytes:
    items = b"".join(
        _tlv(0x30, _tlv(0x04, name.encode()) + _tlv(0x31, b"".join(_tlv(0x04, v) for v in vals)))
        for name, vals in attrs.items()
    )
    return _tlv(0x30, _int(message_id) + _tlv(0x64, _tlv(0x04, dn.encode()) + _tlv(0x30, items)))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_key, issuer_key, issuer: str, *, cn: str, mailbox: str | None = None,
          dns: str | None = None, ca: bool = False, days: int = 30) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(issuer))
        .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if mailbox:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), critical=False)
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    def __init__(self) -> None:
        self.ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ca = _cert(self.ca_key, self.ca_key, "Test CA", cn="Test CA", ca=True)
        self.server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.server = _cert(self.server_key, self.ca_key, "Test CA", cn="localhost",
                            dns="localhost")
        self.rcpt_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        self.rcpt = _cert(self.rcpt_key, self.ca_key, "Test CA", cn=RECIPIENT, mailbox=RECIPIENT)
        rogue_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rogue = _cert(rogue_key, rogue_key, "Test CA", cn=RECIPIENT, mailbox=RECIPIENT,
                           days=60)  # same names, newer, but not signed by the CA
        other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = _cert(other_key, self.ca_key, "Test CA", cn=SENDER, mailbox=SENDER)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


class FakeDirectory:
    """One-connection-at-a-time LDAP server on 127.0.0.1 (runs until the test ends)."""

    def __init__(self, pki: Pki, tmp: Path, entries: dict[str, list[x509.Certificate]],
                 *, starttls: bool = True) -> None:
        self.entries, self.starttls = entries, starttls
        self.bind_before_tls = False
        self.searches: list[tuple[str, str]] = []
        (tmp / "srv.pem").write_bytes(
            pki.server.public_bytes(serialization.Encoding.PEM)
            + pki.server_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(tmp / "srv.pem")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _read(conn) -> bytes | None:
        head = conn.recv(2)
        if len(head) < 2:
            return None
        extra = b""
        if head[1] & 0x80:
            extra = conn.recv(head[1] & 0x7F)
        length = int.from_bytes(extra, "big") if extra else head[1]
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                return None
            body += chunk
        return head + extra + body

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                self._session(conn)
            except (OSError, ValueError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def _session(self, conn) -> None:
        tls, bound = False, False
        while (data := self._read(conn)) is not None:
            outer = _Reader(_Reader(data).expect(0x30))
            mid = int.from_bytes(outer.expect(0x02), "big")
            op, value = outer.read()
            if op == 0x77:  # extended: StartTLS
                if not self.starttls:
                    conn.sendall(_result(mid, 0x78, 2, "unsupported extended operation"))
                    continue
                conn.sendall(_result(mid, 0x78, 0))
                conn = self.ctx.wrap_socket(conn, server_side=True)
                tls = True
            elif op == 0x60:  # bind
                self.bind_before_tls |= not tls
                body = _Reader(value)
                body.expect(0x02)
                dn, pw = body.expect(0x04).decode(), body.expect(0x80).decode()
                bound = tls and dn == BIND_DN and pw == PASSWORD
                conn.sendall(_result(mid, 0x61, 0 if bound else (13 if not tls else 49)))
            elif op == 0x63:  # search
                body = _Reader(value)
                base = body.expect(0x04).decode()
                for tag in (0x0A, 0x0A, 0x02, 0x02, 0x01):
                    body.expect(tag)
                ava = _Reader(body.expect(0xA3))
                ava.expect(0x04)
                mailbox = ava.expect(0x04).decode()
                self.searches.append((base, mailbox))
                if not bound:
                    conn.sendall(_result(mid, 0x65, 50))
                    continue
                if base != BASE:
                    conn.sendall(_result(mid, 0x65, 32))
                    continue
                certs = self.entries.get(mailbox)
                if certs is not None:
                    ders = [c.public_bytes(serialization.Encoding.DER) for c in certs]
                    conn.sendall(_entry(mid, f"uid=x,{BASE}", {"userCertificate;binary": ders}))
                conn.sendall(_result(mid, 0x65, 0))
            elif op == 0x42:  # unbind
                return


def _config(server: FakeDirectory, tmp: Path, pki: Pki, **kw) -> directory.DirectoryConfig:
    cafile = write_pem(tmp / "service-ca.pem", pki.ca)
    return directory.DirectoryConfig(**{"uri": f"ldap://localhost:{server.port}",
                                        "bind_dn": BIND_DN, "password": PASSWORD,
                                        "cafile": cafile, "timeout": 10, **kw})


@pytest.mark.req("MAIL-03")
def test_lookup_returns_the_certificate_naming_the_mailbox(tmp_path: Path, pki: Pki) -> None:
    server = FakeDirectory(pki, tmp_path, {RECIPIENT: [pki.other, pki.rcpt]})
    with directory.LdapCertificateDirectory(_config(server, tmp_path, pki)) as d:
        certs = d.certificates_for(RECIPIENT)
        assert d.certificates_for("nobody@safemail.example") == []
    assert certs == [pki.rcpt]  # pki.other names another mailbox: dropped
    assert server.searches == [(BASE, RECIPIENT), (BASE, "nobody@safemail.example")]
    assert not server.bind_before_tls


@pytest.mark.req("MAIL-03")
def test_certificates_not_signed_by_the_smime_ca_are_ignored(tmp_path: Path, pki: Pki) -> None:
    server = FakeDirectory(pki, tmp_path, {RECIPIENT: [pki.rogue, pki.rcpt]})
    config = _config(server, tmp_path, pki)
    with directory.LdapCertificateDirectory(config, issuer=pki.ca) as d:
        assert d.certificates_for(RECIPIENT) == [pki.rcpt]
    with directory.LdapCertificateDirectory(config) as d:  # without the CA both come back
        found = d.certificates_for(RECIPIENT)
    assert len(found) == 2
    assert message.resolve_recipients([RECIPIENT], directory_of(found)) == [pki.rogue]


def directory_of(certs: list[x509.Certificate]) -> message.FileCertificateDirectory:
    return message.FileCertificateDirectory(certs)


def test_wrong_password_is_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    server = FakeDirectory(pki, tmp_path, {})
    config = _config(server, tmp_path, pki, password="wrong")
    with pytest.raises(SafeMailError, match=r"refused the bind.*result 49") as err:
        directory.LdapCertificateDirectory(config).certificates_for(RECIPIENT)
    assert "uid=NUMBER" in (err.value.hint or "")


def test_wrong_base_is_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    server = FakeDirectory(pki, tmp_path, {})
    config = _config(server, tmp_path, pki, base="ou=elsewhere,dc=example")
    with pytest.raises(SafeMailError, match="search base does not exist"):
        directory.LdapCertificateDirectory(config).certificates_for(RECIPIENT)


def test_a_server_without_starttls_gets_no_password(tmp_path: Path, pki: Pki) -> None:
    server = FakeDirectory(pki, tmp_path, {}, starttls=False)
    with pytest.raises(SafeMailError, match="StartTLS failed"):
        directory.LdapCertificateDirectory(_config(server, tmp_path, pki)).connect()
    assert not server.bind_before_tls


def test_an_untrusted_server_gets_no_password(tmp_path: Path, pki: Pki) -> None:
    server = FakeDirectory(pki, tmp_path, {})
    other_ca = write_pem(tmp_path / "other.pem", pki.rogue)
    config = _config(server, tmp_path, pki)
    config = directory.DirectoryConfig(**{**config.__dict__, "cafile": other_ca})
    with pytest.raises(SafeMailError, match="TLS with the directory"):
        directory.LdapCertificateDirectory(config).connect()
    assert not server.bind_before_tls


def test_unreachable_directory_is_a_clear_error(tmp_path: Path, pki: Pki) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    config = directory.DirectoryConfig(f"ldap://127.0.0.1:{port}", BIND_DN, PASSWORD, timeout=2)
    with pytest.raises(SafeMailError, match="cannot reach the directory"):
        directory.LdapCertificateDirectory(config).connect()


# --- CLI: the directory is the default source -----------------------------------------------


def _cli_directory_args(server: FakeDirectory, tmp: Path, pki: Pki) -> list[str]:
    return ["--directory", f"ldap://localhost:{server.port}", "--directory-bind-dn", BIND_DN,
            "--cafile", str(write_pem(tmp / "service-ca.pem", pki.ca)),
            "--smime-ca", str(write_pem(tmp / "smime-ca.pem", pki.ca))]


@pytest.mark.req("MAIL-03")
def test_cli_send_fetches_the_recipient_certificate_from_the_directory(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeDirectory(pki, tmp_path, {RECIPIENT: [pki.rogue, pki.rcpt]})
    monkeypatch.setenv("SAFEMAIL_PASSWORD", PASSWORD)
    (tmp_path / "body.txt").write_text("Befund aus dem Verzeichnis.\n")
    out = tmp_path / "msg.eml"
    rc = safemail_main(["participant", "send", "--from", SENDER, "--to", RECIPIENT,
                        "--subject", "Befund", "--body-file", str(tmp_path / "body.txt"),
                        "--build-only", "--out", str(out),
                        *_cli_directory_args(server, tmp_path, pki)])
    assert rc == 0
    raw = out.read_bytes()
    assert classify(raw).accepted
    plain = message.decrypt_message(raw, pki.rcpt, pki.rcpt_key)
    assert b"Befund aus dem Verzeichnis." in plain
    assert server.searches == [(BASE, RECIPIENT)]


def test_cli_send_without_directory_or_file_says_what_to_give(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SAFEMAIL_DIRECTORY", raising=False)
    monkeypatch.delenv("SAFEMAIL_DIRECTORY_BIND_DN", raising=False)
    (tmp_path / "b.txt").write_text("x")
    rc = safemail_main(["participant", "send", "--from", SENDER, "--to", RECIPIENT,
                        "--subject", "x", "--body-file", str(tmp_path / "b.txt"),
                        "--build-only"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no directory to fetch recipient certificates from" in err
    assert "--directory http://CA-DIST/" in err


def test_cli_send_unknown_recipient_in_the_directory(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeDirectory(pki, tmp_path, {})
    monkeypatch.setenv("SAFEMAIL_PASSWORD", PASSWORD)
    (tmp_path / "b.txt").write_text("x")
    rc = safemail_main(["participant", "send", "--from", SENDER, "--to", RECIPIENT,
                        "--subject", "x", "--body-file", str(tmp_path / "b.txt"),
                        "--build-only", *_cli_directory_args(server, tmp_path, pki)])
    assert rc == 1
    assert f"no certificate for recipient {RECIPIENT}" in capsys.readouterr().err


def test_cli_lookup_prints_pem(
    tmp_path: Path, pki: Pki, capsysbinary: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = FakeDirectory(pki, tmp_path, {RECIPIENT: [pki.rcpt]})
    monkeypatch.setenv("SAFEMAIL_PASSWORD", PASSWORD)
    rc = safemail_main(["participant", "lookup", "--mailbox", RECIPIENT,
                        *_cli_directory_args(server, tmp_path, pki)])
    assert rc == 0
    assert x509.load_pem_x509_certificate(capsysbinary.readouterr().out) == pki.rcpt

