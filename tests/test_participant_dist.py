"""The participant client's certificate source at the CA's distribution point (MAIL-03, SYS-01).

Participants fetch recipients' certificates over HTTP from ca_dist (front segment), as
safemail.ca.dist publishes them (``ca.pem``, ``crl.der``/``crl.pem``, ``certs/<mailbox>.pem``),
not from the directory on the back segment. A local http.server in a thread serves such a tree;
the client must accept a certificate only when the SafeMail CA signed it, it names the mailbox,
it is valid now and it is not on the (CA-signed, unexpired) CRL.
"""

from __future__ import annotations

import datetime
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from test_participant import RECIPIENT, SENDER, safemail_main, write_pem

from safemail.errors import SafeMailError
from safemail.participant import directory, message
from safemail.smime.classify import classify

NOW = datetime.datetime.now(datetime.UTC)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def _name(cn: str, email: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SafeMail Test"),
             x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attrs)


class Ca:
    def __init__(self, cn: str) -> None:
        self.key = _key()
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, mailbox: str, *, start: datetime.timedelta = datetime.timedelta(days=-1),
              days: int = 30) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
        key = _key()
        cert = (
            x509.CertificateBuilder().subject_name(_name(mailbox, mailbox))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW + start).not_valid_after(NOW + start
                                                           + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return key, cert

    def crl(self, revoked: list[x509.Certificate] = (), *,  # type: ignore[assignment]
            next_update: datetime.timedelta = datetime.timedelta(hours=48),
            ) -> x509.CertificateRevocationList:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(NOW - datetime.timedelta(hours=1))
                   .next_update(NOW + next_update))
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                .revocation_date(NOW - datetime.timedelta(minutes=30)).build())
        return builder.sign(self.key, hashes.SHA256())


class Pki:
    def __init__(self) -> None:
        self.ca = Ca("SafeMail Test CA")
        self.rogue_ca = Ca("SafeMail Test CA")  # same name, other key
        self.rcpt_key, self.rcpt = self.ca.issue(RECIPIENT)
        self.revoked_key, self.revoked = self.ca.issue(RECIPIENT)
        _, self.rogue = self.rogue_ca.issue(RECIPIENT)
        _, self.sender = self.ca.issue(SENDER)
        _, self.expired = self.ca.issue(RECIPIENT, start=datetime.timedelta(days=-40), days=30)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


class DistPoint:
    """A published tree as safemail.ca.dist renders it, served by http.server on 127.0.0.1."""

    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url = root, url
        (root / "certs").mkdir()

    def publish_ca(self, ca: Ca) -> None:
        write_pem(self.root / "ca.pem", ca.cert)

    def publish_crl(self, crl: x509.CertificateRevocationList, *, der: bool = True,
                    pem: bool = True) -> None:
        if der:
            (self.root / "crl.der").write_bytes(crl.public_bytes(serialization.Encoding.DER))
        if pem:
            (self.root / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    def publish_cert(self, mailbox: str, cert: x509.Certificate) -> None:
        write_pem(self.root / "certs" / f"{mailbox}.pem", cert)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


@pytest.fixture
def dist(tmp_path: Path, pki: Pki) -> Iterator[DistPoint]:
    root = tmp_path / "published"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    point = DistPoint(root, f"http://127.0.0.1:{server.server_address[1]}/")
    point.publish_ca(pki.ca)
    point.publish_crl(pki.ca.crl([pki.revoked]))
    try:
        yield point
    finally:
        server.shutdown()
        server.server_close()


def _lookup(dist: DistPoint, pki: Pki, mailbox: str = RECIPIENT,
            ca: x509.Certificate | None = None) -> list[x509.Certificate]:
    with directory.HttpCertificateDirectory(dist.url, ca or pki.ca.cert, timeout=5) as d:
        return d.certificates_for(mailbox)


# --- the checks ----------------------------------------------------------------------------


@pytest.mark.req("MAIL-03")
def test_valid_published_certificate_is_accepted(dist: DistPoint, pki: Pki) -> None:
    dist.publish_cert(RECIPIENT, pki.rcpt)
    assert _lookup(dist, pki) == [pki.rcpt]
    assert message.resolve_recipients([RECIPIENT], directory.HttpCertificateDirectory(
        dist.url, pki.ca.cert, timeout=5)) == [pki.rcpt]


@pytest.mark.req("MAIL-03")
def test_revoked_certificate_is_refused(dist: DistPoint, pki: Pki) -> None:
    dist.publish_cert(RECIPIENT, pki.revoked)
    with pytest.raises(SafeMailError, match=r"not usable: .*revoked") as err:
        _lookup(dist, pki)
    assert f"{pki.revoked.serial_number:x}" in str(err.value)


@pytest.mark.req("MAIL-03")
def test_revocation_is_read_from_crl_pem_when_no_der_is_published(
    dist: DistPoint, pki: Pki
) -> None:
    (dist.root / "crl.der").unlink()
    dist.publish_cert(RECIPIENT, pki.revoked)
    with pytest.raises(SafeMailError, match="revoked"):
        _lookup(dist, pki)


@pytest.mark.req("MAIL-03")
def test_certificate_of_another_ca_is_refused(dist: DistPoint, pki: Pki) -> None:
    dist.publish_cert(RECIPIENT, pki.rogue)  # same issuer name, other key
    with pytest.raises(SafeMailError, match="not signed by the SafeMail CA"):
        _lookup(dist, pki)


@pytest.mark.req("MAIL-03")
def test_certificate_naming_another_mailbox_is_refused(dist: DistPoint, pki: Pki) -> None:
    dist.publish_cert(RECIPIENT, pki.sender)
    with pytest.raises(SafeMailError, match="does not name this mailbox"):
        _lookup(dist, pki)


@pytest.mark.req("MAIL-03")
def test_expired_certificate_is_refused(dist: DistPoint, pki: Pki) -> None:
    dist.publish_cert(RECIPIENT, pki.expired)
    with pytest.raises(SafeMailError, match="not valid now"):
        _lookup(dist, pki)


@pytest.mark.req("MAIL-03")
def test_unpublished_mailbox_is_a_clear_message(dist: DistPoint, pki: Pki) -> None:
    with pytest.raises(SafeMailError, match=f"no certificate published for {RECIPIENT}") as err:
        _lookup(dist, pki)
    assert "enrolled" in (err.value.hint or "")


@pytest.mark.req("MAIL-03")
def test_crl_not_signed_by_the_ca_is_refused(dist: DistPoint, pki: Pki) -> None:
    dist.publish_crl(pki.rogue_ca.crl())  # a CRL without the revocation, from another key
    dist.publish_cert(RECIPIENT, pki.revoked)
    with pytest.raises(SafeMailError, match="CRL .* is not signed by the SafeMail CA"):
        _lookup(dist, pki)


@pytest.mark.req("MAIL-03")
def test_expired_crl_is_refused(dist: DistPoint, pki: Pki) -> None:
    dist.publish_crl(pki.ca.crl(next_update=datetime.timedelta(minutes=-5)))
    dist.publish_cert(RECIPIENT, pki.rcpt)
    with pytest.raises(SafeMailError, match="CRL .* has expired"):
        _lookup(dist, pki)


@pytest.mark.req("MAIL-03")
def test_missing_crl_is_refused(dist: DistPoint, pki: Pki) -> None:
    (dist.root / "crl.der").unlink()
    (dist.root / "crl.pem").unlink()
    dist.publish_cert(RECIPIENT, pki.rcpt)
    with pytest.raises(SafeMailError, match="publishes no CRL"):
        _lookup(dist, pki)


def test_unreachable_distribution_point_is_a_clear_error(pki: Pki) -> None:
    with pytest.raises(SafeMailError, match="cannot reach the CA distribution point"):
        directory.HttpCertificateDirectory("http://127.0.0.1:9/", pki.ca.cert,
                                           timeout=2).certificates_for(RECIPIENT)


def test_only_http_uris(pki: Pki) -> None:
    with pytest.raises(SafeMailError, match="not an http"):
        directory.HttpCertificateDirectory("ldap://auth1", pki.ca.cert)


def test_mailbox_must_be_plain(dist: DistPoint, pki: Pki) -> None:
    with pytest.raises(SafeMailError, match="not a plain mailbox"):
        _lookup(dist, pki, mailbox="../ca.pem")


# --- CLI ---------------------------------------------------------------------------------


def _cli_send(dist: DistPoint, tmp_path: Path, body: str, *extra: str) -> int:
    """`safemail participant send --build-only` from SENDER to RECIPIENT through `dist`."""
    (tmp_path / "body.txt").write_text(body)
    return safemail_main(["participant", "send", "--from", SENDER, "--to", RECIPIENT,
                          "--subject", "Befund", "--body-file", str(tmp_path / "body.txt"),
                          "--build-only", "--directory", dist.url, *extra])


@pytest.mark.req("MAIL-03")
def test_cli_send_encrypts_to_the_published_certificate_without_a_password(
    dist: DistPoint, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SAFEMAIL_PASSWORD", raising=False)
    monkeypatch.delenv("SAFEMAIL_DIRECTORY_BIND_DN", raising=False)
    dist.publish_cert(RECIPIENT, pki.rcpt)
    out = tmp_path / "msg.eml"
    rc = _cli_send(dist, tmp_path, "Befund von der Verteilstelle.\n", "--out", str(out),
                   "--smime-ca", str(write_pem(tmp_path / "ca.pem", pki.ca.cert)),
                   "--timeout", "5")
    assert rc == 0
    raw = out.read_bytes()
    assert classify(raw).accepted
    assert b"Befund von der Verteilstelle." in message.decrypt_message(raw, pki.rcpt,
                                                                       pki.rcpt_key)


@pytest.mark.req("MAIL-03")
def test_cli_send_refuses_a_revoked_recipient(
    dist: DistPoint, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    dist.publish_cert(RECIPIENT, pki.revoked)
    out = tmp_path / "msg.eml"
    rc = _cli_send(dist, tmp_path, "x", "--out", str(out),
                   "--smime-ca", str(write_pem(tmp_path / "ca.pem", pki.ca.cert)))
    assert rc == 1
    assert "revoked" in capsys.readouterr().err
    assert not out.exists()


def test_cli_http_directory_without_smime_ca_is_a_usage_error(
    dist: DistPoint, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = _cli_send(dist, tmp_path, "x")
    assert rc == 2
    err = capsys.readouterr().err
    assert "needs --smime-ca" in err and "CA signed them" in err
    rc = safemail_main(["participant", "lookup", "--mailbox", RECIPIENT,
                        "--directory", dist.url])
    assert rc == 2


def test_cli_unknown_directory_scheme_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = safemail_main(["participant", "lookup", "--mailbox", RECIPIENT,
                        "--directory", "ftp://ca-dist/"])
    assert rc == 2
    assert "unknown kind of directory" in capsys.readouterr().err


@pytest.mark.req("MAIL-03")
def test_cli_lookup_prints_the_published_pem(
    dist: DistPoint, pki: Pki, tmp_path: Path, capsysbinary: pytest.CaptureFixture
) -> None:
    dist.publish_cert(RECIPIENT, pki.rcpt)
    rc = safemail_main(["participant", "lookup", "--mailbox", RECIPIENT, "--directory", dist.url,
                        "--smime-ca", str(write_pem(tmp_path / "ca.pem", pki.ca.cert))])
    assert rc == 0
    assert x509.load_pem_x509_certificate(capsysbinary.readouterr().out) == pki.rcpt


def test_cli_lookup_of_an_unpublished_mailbox(
    dist: DistPoint, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = safemail_main(["participant", "lookup", "--mailbox", RECIPIENT, "--directory", dist.url,
                        "--smime-ca", str(write_pem(tmp_path / "ca.pem", pki.ca.cert))])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"no certificate published for {RECIPIENT}" in err and "hint:" in err
