"""The lab participant client: keygen, message building, decryption, CLI (CA-02, MAIL-03)."""

from __future__ import annotations

import datetime
import email
import email.policy
import io
import os
import socket
import stat
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from safemail.errors import SafeMailError
from safemail.participant import cli as participant_cli
from safemail.participant import keys, message, transport
from safemail.smime.classify import classify

SENDER = "praxis1@safenet.test"
RECIPIENT = "praxis2@safenet.test"


def safemail_main(argv: list[str]) -> int:
    """Run ``safemail participant ...`` as safemail.cli.main does, with only this area loaded
    (other areas are developed in parallel and must not break these tests)."""
    import argparse

    parser = argparse.ArgumentParser(prog="safemail")
    sub = parser.add_subparsers(dest="command")
    sub.required = True
    participant_cli.register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SafeMailError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code


def make_cert(
    mailbox: str,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    *,
    days: int = 1,
    start: datetime.datetime | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, mailbox)])
    start = start or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), critical=False)
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def pair() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return key, make_cert(RECIPIENT, key)


@pytest.fixture(scope="module")
def sender_pair() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return key, make_cert(SENDER, key)


def write_pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


# --- keygen -------------------------------------------------------------------------------


@pytest.mark.req("CA-02")
def test_keygen_writes_0600_key_and_prints_only_the_csr(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    key_path = tmp_path / "praxis1.key"
    old = os.umask(0)  # even a permissive umask must not widen the key's mode
    try:
        rc = safemail_main(["participant", "keygen", "--mailbox", SENDER, "--key", str(key_path)])
    finally:
        os.umask(old)
    assert rc == 0
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert out.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    assert "PRIVATE KEY" not in out
    csr = x509.load_pem_x509_csr(out.encode())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == [SENDER]
    assert csr.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)[0].value == SENDER
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == SENDER
    key = keys.load_private_key(key_path)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    assert csr.public_key() == key.public_key()


@pytest.mark.req("CA-02")
def test_keygen_ec_with_csr_file_and_passphrase(tmp_path: Path) -> None:
    (tmp_path / "pass").write_text("geheim\n")
    rc = safemail_main(
        [
            "participant", "keygen", "--mailbox", SENDER, "--key", str(tmp_path / "k.pem"),
            "--csr", str(tmp_path / "r.csr"), "--type", "ec", "--curve", "secp384r1",
            "--name", "Praxis Eins", "--passphrase-file", str(tmp_path / "pass"),
        ]
    )  # fmt: skip
    assert rc == 0
    csr = x509.load_pem_x509_csr((tmp_path / "r.csr").read_bytes())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Praxis Eins"
    with pytest.raises(SafeMailError, match="encrypted"):
        keys.load_private_key(tmp_path / "k.pem")
    key = keys.load_private_key(tmp_path / "k.pem", b"geheim")
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"


@pytest.mark.req("CA-02")
def test_keygen_never_overwrites_a_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key_path = tmp_path / "k.pem"
    key_path.write_text("old key")
    rc = safemail_main(["participant", "keygen", "--mailbox", SENDER, "--key", str(key_path)])
    assert rc == 1
    assert key_path.read_text() == "old key"
    err = capsys.readouterr().err
    assert "not overwriting" in err and "hint:" in err


@pytest.mark.parametrize("mailbox", ["no-at-sign", "a@b@c", "a..b@safenet.test", "x y@z.test"])
def test_keygen_refuses_bad_mailbox(mailbox: str) -> None:
    with pytest.raises(SafeMailError, match="plain mailbox"):
        keys.build_csr(keys.generate_key("ec"), mailbox)


def test_short_rsa_key_refused() -> None:
    with pytest.raises(SafeMailError, match="too short"):
        keys.generate_key("rsa", rsa_bits=2048)


# --- building and decrypting ----------------------------------------------------------------


@pytest.mark.req("MAIL-03")
def test_built_message_is_smime_with_headers_and_crlf(
    pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    key, cert = pair
    entity = message.build_inner_entity("Guten Tag,\nder Befund ist unauffällig.\n")
    raw = message.build_message(
        entity, [cert], sender=SENDER, recipients=[RECIPIENT], subject="Rückfrage Befund"
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["From"] == SENDER and parsed["To"] == RECIPIENT
    assert str(parsed["Subject"]) == "Rückfrage Befund"
    assert raw.isascii()
    assert parsed["Message-ID"].endswith("@safenet.test>")
    assert parsed["Date"] is not None
    assert parsed.get_content_type() == "application/pkcs7-mime"
    assert parsed["Content-Transfer-Encoding"] == "base64"
    assert classify(raw).accepted
    assert message.decrypt_message(raw, cert, key) == entity


@pytest.mark.req("MAIL-03")
def test_several_recipients_each_decrypt(
    pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
    sender_pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    entity = message.build_inner_entity("an beide")
    raw = message.build_message(
        entity,
        [pair[1], sender_pair[1]],
        sender=SENDER,
        recipients=[RECIPIENT, SENDER],
        subject="x",
    )
    assert classify(raw).reason == "S/MIME enveloped message for 2 recipient(s)"
    for key, cert in (pair, sender_pair):
        assert message.decrypt_message(raw, cert, key) == entity


def test_attachments_travel_inside_the_encryption(
    pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    key, cert = pair
    data = bytes(range(256)) * 10
    entity = message.build_inner_entity(
        "siehe Anhang", [message.Attachment("befund.pdf", data, "application/pdf")]
    )
    raw = message.build_message(entity, [cert], sender=SENDER, recipients=[RECIPIENT], subject="x")
    assert b"befund.pdf" not in raw
    inner = email.message_from_bytes(message.decrypt_message(raw, cert, key))
    parts = [p for p in inner.walk() if p.get_filename() == "befund.pdf"]
    assert parts and parts[0].get_payload(decode=True) == data


def test_wrong_key_gives_a_clear_error(
    pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
    sender_pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    raw = message.build_message(
        b"x\r\n", [pair[1]], sender=SENDER, recipients=[RECIPIENT], subject="x"
    )
    with pytest.raises(SafeMailError, match="cannot decrypt"):
        message.decrypt_message(raw, sender_pair[1], sender_pair[0])


def test_decrypting_plaintext_is_refused(pair: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    with pytest.raises(SafeMailError, match="not S/MIME encrypted"):
        message.decrypt_message(b"Subject: x\r\n\r\nhello\r\n", pair[1], pair[0])


def test_header_injection_refused(pair: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    with pytest.raises(SafeMailError, match="line break"):
        message.build_message(
            b"x", [pair[1]], sender=SENDER, recipients=[RECIPIENT], subject="a\r\nBcc: x@y.test"
        )


def test_recipient_lookup_by_san(
    pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
    sender_pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    directory = message.FileCertificateDirectory([pair[1], sender_pair[1]])
    assert message.resolve_recipients(["PRAXIS2@safenet.test"], directory) == [pair[1]]
    with pytest.raises(SafeMailError, match="no certificate for recipient other@safenet.test"):
        message.resolve_recipients(["other@safenet.test"], directory)


def test_expired_and_non_rsa_certificates_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    old = make_cert(RECIPIENT, key, start=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    with pytest.raises(SafeMailError, match="not valid now"):
        message.check_recipient_certificate(old)
    ec_cert = make_cert(RECIPIENT, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(SafeMailError, match="RSA"):
        message.check_recipient_certificate(ec_cert)


# --- CLI: send --build-only and fetch --input ------------------------------------------------


@pytest.mark.req("MAIL-03")
def test_cli_send_build_only_then_fetch_input(
    tmp_path: Path,
    pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
    capsys: pytest.CaptureFixture,
) -> None:
    key, cert = pair
    cert_path = write_pem(tmp_path / "praxis2.pem", cert)
    key_path = tmp_path / "praxis2.key"
    keys.write_private_key(key_path, key)
    (tmp_path / "body.txt").write_text("Befund anbei.\n", encoding="utf-8")
    out = tmp_path / "msg.eml"
    rc = safemail_main(
        [
            "participant", "send", "--from", SENDER, "--to", RECIPIENT, "--subject", "Befund",
            "--body-file", str(tmp_path / "body.txt"), "--recipient-cert", str(cert_path),
            "--build-only", "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    raw = out.read_bytes()
    assert classify(raw).accepted
    plain = tmp_path / "plain.txt"
    rc = safemail_main(
        [
            "participant", "fetch", "--input", str(out), "--key", str(key_path),
            "--cert", str(cert_path), "--out", str(plain),
        ]
    )  # fmt: skip
    assert rc == 0
    assert stat.S_IMODE(plain.stat().st_mode) == 0o600
    inner = email.message_from_bytes(plain.read_bytes(), policy=email.policy.default)
    assert inner.get_content().replace("\r\n", "\n") == "Befund anbei.\n"


def test_cli_send_build_only_to_stdout_reads_stdin(
    tmp_path: Path,
    pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
    capsysbinary: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert_path = write_pem(tmp_path / "c.pem", pair[1])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Text von stdin\n")))
    rc = safemail_main(
        [
            "participant", "send", "--from", SENDER, "--to", RECIPIENT, "--subject",
            "Patient: Muster", "--recipient-cert", str(cert_path), "--build-only",
        ]
    )  # fmt: skip
    assert rc == 0
    captured = capsysbinary.readouterr()
    assert classify(captured.out).accepted
    assert b"patient data" in captured.err  # the unencrypted-subject warning


def test_cli_send_without_matching_certificate_fails_clearly(
    tmp_path: Path,
    sender_pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
    capsys: pytest.CaptureFixture,
) -> None:
    cert_path = write_pem(tmp_path / "c.pem", sender_pair[1])  # names praxis1, not praxis2
    rc = safemail_main(
        [
            "participant", "send", "--from", SENDER, "--to", RECIPIENT, "--subject", "x",
            "--recipient-cert", str(cert_path), "--build-only",
        ]
    )  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert f"error: no certificate for recipient {RECIPIENT}" in err
    assert "hint: is the recipient enrolled" in err


def test_cli_send_needs_host_and_password(
    tmp_path: Path,
    pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert_path = write_pem(tmp_path / "c.pem", pair[1])
    (tmp_path / "b.txt").write_text("x")
    base = [
        "participant", "send", "--from", SENDER, "--to", RECIPIENT, "--subject", "x",
        "--recipient-cert", str(cert_path), "--body-file", str(tmp_path / "b.txt"),
    ]  # fmt: skip
    assert safemail_main(base) == 2
    assert "--host is required" in capsys.readouterr().err
    monkeypatch.delenv(transport.DEFAULT_PASSWORD_ENV, raising=False)
    assert safemail_main([*base, "--host", "127.0.0.1", "--port", "9"]) == 1
    assert "no password given" in capsys.readouterr().err


def test_password_from_file_or_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret\nignored\n")
    assert transport.read_password(tmp_path / "pw") == "s3cret"
    monkeypatch.setenv("MY_PW", "from-env")
    assert transport.read_password(None, "MY_PW") == "from-env"
    with pytest.raises(SafeMailError, match="empty"):
        (tmp_path / "empty").write_text("")
        transport.read_password(tmp_path / "empty")


def test_smtp_connection_refused_is_a_clear_error(
    tmp_path: Path,
    pair: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    """Nothing listens on 127.0.0.1 port 9 (discard) here: the error says so, no traceback."""
    account = transport.Account("127.0.0.1", 9, SENDER, "pw", timeout=2)
    with pytest.raises(SafeMailError, match="SMTP with 127.0.0.1:9 failed"):
        transport.submit(account, SENDER, [RECIPIENT], b"x")


def test_participant_help_lists_actions(capsys: pytest.CaptureFixture) -> None:
    """Through the real top-level CLI, which loads this area with importlib."""
    from safemail.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["participant", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "keygen" in out and "send" in out and "fetch" in out


def _fake_smtp_without_starttls() -> tuple[int, threading.Thread]:
    """A one-connection SMTP server on 127.0.0.1 that offers no STARTTLS."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(10)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            conn.settimeout(10)
            reader = conn.makefile("rb")
            conn.sendall(b"220 fake ESMTP\r\n")
            for line in reader:
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-fake\r\n250 SIZE 1000000\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"502 no\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


def test_submit_refuses_a_server_without_starttls() -> None:
    """Never send mail (or the password) over a connection that cannot be encrypted."""
    port, thread = _fake_smtp_without_starttls()
    account = transport.Account("127.0.0.1", port, SENDER, "pw", timeout=5)
    with pytest.raises(SafeMailError, match="does not offer STARTTLS; not sending"):
        transport.submit(account, SENDER, [RECIPIENT], b"x")
    thread.join(5)


class FakeImap:
    """Answers like an IMAP server through imaplib's return values."""

    def __init__(self, messages: dict[str, bytes]) -> None:
        self.messages = messages
        self.readonly: bool | None = None
        self.logged_out = False

    def select(self, folder: str, readonly: bool = False) -> tuple[str, list[bytes]]:
        self.readonly = readonly
        return "OK", [str(len(self.messages)).encode()]

    def uid(self, command: str, *args: str) -> tuple[str, list]:
        if command == "SEARCH":
            return "OK", [" ".join(self.messages).encode()]
        if args[0] == "1:*":
            items: list = []
            for i, (u, m) in enumerate(self.messages.items(), 1):
                head = f"{i} (RFC822.SIZE {len(m)} UID {u} BODY[...] {{12}}".encode()
                items += [(head, b"Subject: x\r\n"), b")"]
            return "OK", items
        body = self.messages.get(args[0])
        return "OK", [(f"1 (UID {args[0]} BODY[] {{3}}".encode(), body), b")"] if body else [None]

    def logout(self) -> None:
        self.logged_out = True


def test_imap_list_and_fetch_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeImap({"3": b"first", "7": b"newest"})
    monkeypatch.setattr(transport, "_imap", lambda account: fake)
    account = transport.Account("127.0.0.1", 993, RECIPIENT, "pw")
    entries = transport.list_messages(account)
    assert [(e.uid, e.size) for e in entries] == [("3", 5), ("7", 6)]
    assert transport.fetch_message(account, None) == b"newest"
    assert transport.fetch_message(account, "3") == b"first"
    assert fake.readonly is True and fake.logged_out
    with pytest.raises(SafeMailError, match="no message with UID 9"):
        transport.fetch_message(account, "9")
    with pytest.raises(SafeMailError, match="not a message UID"):
        transport.fetch_message(account, "1:*")
