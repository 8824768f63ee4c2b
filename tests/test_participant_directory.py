"""The directory client (safemail.participant.directory, python-ldap) against a real slapd.

Each server is Debian's slapd started by the test in a temporary directory (tests/slapdkit.py)
with a TLS certificate the test made: StartTLS and ldaps://, the lab's "nothing without TLS",
participant entries carrying certificates. slapd's statistics log shows which binds arrived,
so "no password before verified TLS" is checked at the server, not assumed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from slapdkit import SUFFIX, Slapd, free_port
from test_participant import RECIPIENT, SENDER, safemail_main, write_pem

from safemail.accounting import cli as accounting_cli
from safemail.accounting.ledger import Participant
from safemail.errors import SafeMailError
from safemail.participant import directory, message
from safemail.smime.classify import classify

BASE = f"ou=participants,{SUFFIX}"
BIND_DN = f"uid=100001,{BASE}"
PASSWORD = "lab-praxis-pw"  # noqa: S105 - test fixture
CROWD = "crowd@safenet.test"  # more entries than the size limit carry this mailbox
CROWD_SIZE = directory.DEFAULT_SIZE_LIMIT + 2
SRC = str(Path(__file__).resolve().parent.parent / "src")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_key, issuer_key, issuer: str, *, cn: str, mailbox: str | None = None,
          ip: str | None = None, ca: bool = False, days: int = 30) -> x509.Certificate:
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
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    def __init__(self) -> None:
        self.ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ca = _cert(self.ca_key, self.ca_key, "Test CA", cn="Test CA", ca=True)
        self.server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        # The directory's certificate names 127.0.0.1 (where the test's slapd listens) only.
        self.server = _cert(self.server_key, self.ca_key, "Test CA", cn="directory",
                            ip="127.0.0.1")
        self.rcpt_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        self.rcpt = _cert(self.rcpt_key, self.ca_key, "Test CA", cn=RECIPIENT, mailbox=RECIPIENT)
        rogue_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rogue = _cert(rogue_key, rogue_key, "Test CA", cn=RECIPIENT, mailbox=RECIPIENT,
                           days=60)  # same names, newer, but not signed by the CA
        other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other = _cert(other_key, self.ca_key, "Test CA", cn=SENDER, mailbox=SENDER)

    def server_pem(self) -> tuple[bytes, bytes]:
        return (self.server.public_bytes(serialization.Encoding.PEM),
                self.server_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()




def _person(number: str, mailbox: str, **attrs) -> tuple[str, dict]:
    return (f"uid={number},{BASE}", {
        "objectClass": ["inetOrgPerson"], "uid": [number], "cn": [mailbox], "sn": [number],
        "mail": [mailbox], **attrs})


def _entries(pki: Pki) -> list[tuple[str, dict]]:
    def der(c: x509.Certificate) -> bytes:
        return c.public_bytes(serialization.Encoding.DER)

    return [
        _person("100001", SENDER, userPassword=[PASSWORD], employeeNumber=["100001"],
                businessCategory=["GP"]),
        # pki.other names another mailbox, pki.rogue is not signed by the CA.
        _person("100002", RECIPIENT, employeeNumber=["100002"], businessCategory=["ENT"],
                **{"userCertificate;binary": [der(pki.other), der(pki.rogue), der(pki.rcpt)]}),
        *(_person(f"2000{i:02d}", CROWD) for i in range(CROWD_SIZE)),
    ]


@pytest.fixture(scope="module")
def server(pki: Pki, tmp_path_factory: pytest.TempPathFactory):
    cert, key = pki.server_pem()
    with Slapd(tmp_path_factory.mktemp("slapd"), _entries(pki), cert_pem=cert,
               key_pem=key) as running:
        yield running


def _config(server: Slapd, tmp: Path, pki: Pki, **kw) -> directory.DirectoryConfig:
    cafile = write_pem(tmp / "service-ca.pem", pki.ca)
    return directory.DirectoryConfig(**{"uri": server.uri, "bind_dn": BIND_DN,
                                        "password": PASSWORD, "cafile": cafile,
                                        "timeout": 10, **kw})


def _new_binds(server: Slapd, before: list[str]) -> list[str]:
    return server.binds()[len(before):]


# --- plain helpers ----------------------------------------------------------------------------


def test_parent_dn() -> None:
    assert directory.parent_dn(BIND_DN) == BASE
    assert directory.parent_dn(r"cn=a\,b,ou=x") == "ou=x"
    with pytest.raises(SafeMailError, match="no parent"):
        directory.parent_dn("dc=example")
    with pytest.raises(SafeMailError, match="not a valid DN"):
        directory.parent_dn("no dn at all")


def test_only_ldap_uris(tmp_path: Path) -> None:
    for uri in ("http://x", "ldap://", "ldap://x/dc=example"):
        with pytest.raises(SafeMailError, match="not an ldap"):
            directory.LdapCertificateDirectory(
                directory.DirectoryConfig(uri, BIND_DN, "p", tmp_path / "ca.pem"))


def test_the_ca_file_is_required(tmp_path: Path) -> None:
    with pytest.raises(SafeMailError, match="no CA file") as err:
        directory.LdapCertificateDirectory(
            directory.DirectoryConfig("ldap://x", BIND_DN, "p", None))  # type: ignore[arg-type]
    assert "--cafile" in (err.value.hint or "")
    with pytest.raises(SafeMailError, match="cannot read CA file"):
        directory.LdapCertificateDirectory(directory.DirectoryConfig(
            "ldap://127.0.0.1:9", BIND_DN, "p", tmp_path / "missing.pem")).connect()


# --- against slapd ----------------------------------------------------------------------------


@pytest.mark.req("MAIL-03")
def test_lookup_returns_the_certificate_naming_the_mailbox(
    server: Slapd, tmp_path: Path, pki: Pki
) -> None:
    before, accepted = server.binds(), server.bound()
    with directory.LdapCertificateDirectory(_config(server, tmp_path, pki)) as d:
        certs = d.certificates_for(RECIPIENT)
        # No entry: the documented result is an empty list (the callers say what is missing).
        assert d.certificates_for("nobody@safenet.test") == []
    # pki.other names another mailbox: dropped; without the CA the rogue one stays.
    assert sorted(c.serial_number for c in certs) == sorted(
        c.serial_number for c in (pki.rogue, pki.rcpt))
    assert [b.split(" BIND ")[1] for b in _new_binds(server, before)] == [
        f'dn="{BIND_DN}" method=128']  # one connection, one bind for both lookups
    assert server.bound()[len(accepted):][0].endswith(" ssf=256")  # under TLS


@pytest.mark.req("MAIL-03")
def test_certificates_not_signed_by_the_smime_ca_are_ignored(
    server: Slapd, tmp_path: Path, pki: Pki
) -> None:
    config = _config(server, tmp_path, pki)
    with directory.LdapCertificateDirectory(config, issuer=pki.ca) as d:
        assert d.certificates_for(RECIPIENT) == [pki.rcpt]
    with directory.LdapCertificateDirectory(config) as d:  # without the CA both come back
        found = d.certificates_for(RECIPIENT)
    assert len(found) == 2
    assert message.resolve_recipients(
        [RECIPIENT], message.FileCertificateDirectory(found)) == [pki.rogue]


def test_ldaps_works_too(server: Slapd, tmp_path: Path, pki: Pki) -> None:
    config = _config(server, tmp_path, pki, uri=server.ldaps_uri)
    with directory.LdapCertificateDirectory(config, issuer=pki.ca) as d:
        assert d.certificates_for(RECIPIENT) == [pki.rcpt]


def test_search_attributes_come_back_lower_cased_without_options(
    server: Slapd, tmp_path: Path, pki: Pki
) -> None:
    with directory.LdapCertificateDirectory(_config(server, tmp_path, pki)) as d:
        got = d.search("mail", RECIPIENT, ["employeeNumber", "businessCategory",
                                           directory.CERT_ATTRIBUTE])
    assert len(got) == 1
    assert got[0]["employeenumber"] == [b"100002"] and got[0]["businesscategory"] == [b"ENT"]
    assert len(got[0]["usercertificate"]) == 3


@pytest.mark.parametrize("value", ["*", "*@safenet.test", "x)(mail=*", "a*b)(x=y@z", "\\2a"])
def test_the_looked_up_value_is_a_value_not_a_filter(
    server: Slapd, tmp_path: Path, pki: Pki, value: str
) -> None:
    with directory.LdapCertificateDirectory(_config(server, tmp_path, pki)) as d:
        assert d.search("mail", value, ["mail"]) == []


def test_the_server_enforces_the_size_limit(server: Slapd, tmp_path: Path, pki: Pki) -> None:
    before = server.search_results()
    with directory.LdapCertificateDirectory(_config(server, tmp_path, pki)) as d:
        with pytest.raises(SafeMailError, match=r"more than 10 entries .*size limit"):
            d.search("mail", CROWD, ["mail"])
    # slapd itself stopped at the limit the client sent: sizeLimitExceeded (4) after 10.
    (result,) = server.search_results()[len(before):]
    assert " err=4 " in result and " nentries=10 " in result, result
    config = _config(server, tmp_path, pki, size_limit=CROWD_SIZE)
    with directory.LdapCertificateDirectory(config) as d:
        assert len(d.search("mail", CROWD, ["mail"])) == CROWD_SIZE


class _IgnoresTheLimit(directory.LdapCertificateDirectory):
    """As a directory that ignores the requested size limit: it is not sent at all."""

    def _server_size_limit(self, limit: int) -> int:
        return 0


def test_the_client_enforces_the_size_limit_if_the_server_does_not(
    server: Slapd, tmp_path: Path, pki: Pki
) -> None:
    with _IgnoresTheLimit(_config(server, tmp_path, pki, size_limit=3)) as d:
        with pytest.raises(SafeMailError, match="more than 3 entries"):
            d.search("mail", CROWD, ["mail"])
    with _IgnoresTheLimit(_config(server, tmp_path, pki, size_limit=CROWD_SIZE)) as d:
        assert len(d.search("mail", CROWD, ["mail"])) == CROWD_SIZE


def test_wrong_password_is_a_clear_error(server: Slapd, tmp_path: Path, pki: Pki) -> None:
    config = _config(server, tmp_path, pki, password="wrong")
    with pytest.raises(SafeMailError, match=r"refused the bind.*result 49") as err:
        directory.LdapCertificateDirectory(config).certificates_for(RECIPIENT)
    assert "uid=NUMBER" in (err.value.hint or "")


def test_wrong_base_is_a_clear_error(server: Slapd, tmp_path: Path, pki: Pki) -> None:
    config = _config(server, tmp_path, pki, base=f"ou=elsewhere,{SUFFIX}")
    with pytest.raises(SafeMailError, match="search base does not exist"):
        directory.LdapCertificateDirectory(config).certificates_for(RECIPIENT)


@pytest.mark.parametrize("scheme", ["ldap", "ldaps"])
def test_an_untrusted_server_gets_no_password(
    server: Slapd, tmp_path: Path, pki: Pki, scheme: str
) -> None:
    uri = server.uri if scheme == "ldap" else server.ldaps_uri
    before = server.binds()
    config = _config(server, tmp_path, pki, uri=uri,
                     cafile=write_pem(tmp_path / "other.pem", pki.rogue))
    with pytest.raises(SafeMailError, match="TLS with the directory .* failed") as err:
        directory.LdapCertificateDirectory(config).connect()
    assert "--cafile" in (err.value.hint or "")
    assert _new_binds(server, before) == []


@pytest.mark.parametrize("scheme", ["ldap", "ldaps"])
def test_a_server_under_another_name_gets_no_password(
    server: Slapd, tmp_path: Path, pki: Pki, scheme: str
) -> None:
    """The same server, reached as localhost: its certificate names only 127.0.0.1."""
    before = server.binds()
    port = server.port if scheme == "ldap" else server.tls_port
    config = _config(server, tmp_path, pki, uri=f"{scheme}://localhost:{port}")
    with pytest.raises(SafeMailError, match="TLS with the directory .* failed"):
        directory.LdapCertificateDirectory(config).connect()
    assert _new_binds(server, before) == []


def test_the_environment_cannot_switch_verification_off(
    server: Slapd, tmp_path: Path, pki: Pki
) -> None:
    """libldap reads ldap.conf, ~/.ldaprc and LDAPTLS_* once per process: a fresh one with an
    operator's "never check" and a certificate directory that holds the right CA still
    refuses a server the configured CA file did not sign."""
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    write_pem(trusted / "ca.pem", pki.ca)
    (tmp_path / "ldaprc").write_text("TLS_REQCERT never\n")
    wrong = write_pem(tmp_path / "other.pem", pki.rogue)
    code = (
        "import sys; from pathlib import Path\n"
        "from safemail.errors import SafeMailError\n"
        "from safemail.participant import directory as d\n"
        f"c = d.DirectoryConfig({server.uri!r}, {BIND_DN!r}, {PASSWORD!r}, Path({str(wrong)!r}),"
        " timeout=10)\n"
        "try:\n    d.LdapCertificateDirectory(c).connect()\n"
        "except SafeMailError as e:\n    print(e); sys.exit(3)\n"
        "print('connected'); sys.exit(0)\n"
    )
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HOME": str(tmp_path),
           "LDAPTLS_REQCERT": "never", "LDAPTLS_CACERTDIR": str(trusted),
           "LDAPTLS_CACERT": str(trusted / "ca.pem")}
    before = server.binds()
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "TLS with the directory" in run.stdout
    assert _new_binds(server, before) == []


def test_a_server_without_tls_gets_no_password(tmp_path: Path, pki: Pki) -> None:
    """A slapd with no certificate: StartTLS is refused, ldaps:// finds no TLS."""
    with Slapd(tmp_path / "plain", _entries(pki)[:1], cert_pem=None, key_pem=None) as plain:
        config = _config(plain, tmp_path, pki)
        with pytest.raises(SafeMailError, match="refused StartTLS"):
            directory.LdapCertificateDirectory(config).connect()
        config = _config(plain, tmp_path, pki, uri=plain.ldaps_uri)
        with pytest.raises(SafeMailError, match="TLS with the directory .* failed"):
            directory.LdapCertificateDirectory(config).connect()
        assert plain.binds() == []


@pytest.mark.parametrize("scheme", ["ldap", "ldaps"])
def test_unreachable_directory_is_a_clear_error(tmp_path: Path, pki: Pki, scheme: str) -> None:
    config = directory.DirectoryConfig(f"{scheme}://127.0.0.1:{free_port()}", BIND_DN,
                                       PASSWORD, write_pem(tmp_path / "ca.pem", pki.ca),
                                       timeout=2)
    with pytest.raises(SafeMailError, match="cannot reach the directory") as err:
        directory.LdapCertificateDirectory(config).connect()
    assert "reachable" in (err.value.hint or "")


def test_accounting_resolves_mailboxes_through_the_directory(
    server: Slapd, tmp_path: Path, pki: Pki
) -> None:
    """safemail-accounting's resolver (the relay) on the same client: mail -> number, group."""
    cafile = write_pem(tmp_path / "ca.pem", pki.ca)
    settings = {"uri": server.uri, "base": BASE, "bind_dn": BIND_DN, "password": PASSWORD,
                "cafile": str(cafile)}
    resolve = accounting_cli.directory_resolver(settings)
    assert resolve([SENDER, RECIPIENT, "nobody@safenet.test"]) == {
        SENDER: Participant("100001", "GP"), RECIPIENT: Participant("100002", "ENT")}
    with pytest.raises(SafeMailError, match="size limit"):
        resolve([CROWD])  # ambiguous beyond the limit: an error, never a guess
    with pytest.raises(SafeMailError, match="TLS with the directory"):
        accounting_cli.directory_resolver(
            {**settings, "cafile": str(write_pem(tmp_path / "o.pem", pki.rogue))})([SENDER])


# --- CLI: the directory is the default source -----------------------------------------------


def _cli_directory_args(server: Slapd, tmp: Path, pki: Pki) -> list[str]:
    return ["--directory", server.uri, "--directory-bind-dn", BIND_DN,
            "--cafile", str(write_pem(tmp / "service-ca.pem", pki.ca)),
            "--smime-ca", str(write_pem(tmp / "smime-ca.pem", pki.ca))]


@pytest.mark.req("MAIL-03")
def test_cli_send_fetches_the_recipient_certificate_from_the_directory(
    server: Slapd, tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    server: Slapd, tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAFEMAIL_PASSWORD", PASSWORD)
    (tmp_path / "b.txt").write_text("x")
    ghost = "ghost@safenet.test"  # no entry in the directory
    rc = safemail_main(["participant", "send", "--from", SENDER, "--to", ghost,
                        "--subject", "x", "--body-file", str(tmp_path / "b.txt"),
                        "--build-only", *_cli_directory_args(server, tmp_path, pki)])
    assert rc == 1
    assert f"no certificate for recipient {ghost}" in capsys.readouterr().err


def test_cli_lookup_prints_pem(
    server: Slapd, tmp_path: Path, pki: Pki, capsysbinary: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAFEMAIL_PASSWORD", PASSWORD)
    rc = safemail_main(["participant", "lookup", "--mailbox", RECIPIENT,
                        *_cli_directory_args(server, tmp_path, pki)])
    assert rc == 0  # --smime-ca: only the CA-signed one of the three
    assert x509.load_pem_x509_certificate(capsysbinary.readouterr().out) == pki.rcpt



def test_cli_ldap_directory_without_cafile_is_a_usage_error(
    server: Slapd, tmp_path: Path, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAFEMAIL_PASSWORD", PASSWORD)
    rc = safemail_main(["participant", "lookup", "--mailbox", RECIPIENT, "--directory",
                        server.uri, "--directory-bind-dn", BIND_DN])
    assert rc == 2
    assert "an LDAP directory needs --cafile" in capsys.readouterr().err


def test_certificate_expiry_report_reads_every_participant(
    server: Slapd, tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safemail-cert-expiry (the relay, CA-04) lists every entry under the base through the
    same client, bounded by its own size limit."""
    from safemail.ops import certexpiry

    config = {"ldap_uri": server.uri, "base_dn": BASE, "bind_dn": BIND_DN,
              "bind_password": PASSWORD, "cafile": str(write_pem(tmp_path / "ca.pem", pki.ca))}
    found = certexpiry.read_directory(config)
    assert len(found) == 2 + CROWD_SIZE
    certs = dict(found)
    assert len(certs[RECIPIENT]) == 3 and certs[SENDER] == []
    monkeypatch.setattr(certexpiry, "SIZE_LIMIT", 1 + CROWD_SIZE)  # one entry too few
    with pytest.raises(SafeMailError, match=f"more than {1 + CROWD_SIZE} entries"):
        certexpiry.read_directory(config)


# --- AV-02: read-only replicas ---------------------------------------------------------------


def test_a_replica_answers_when_the_provider_is_down(
    server: Slapd, tmp_path: Path, pki: Pki
) -> None:
    """The provider's port has no listener: the client binds to the replica instead (the
    module's slapd plays the replica), and the lookup works as usual."""
    down = f"ldap://127.0.0.1:{free_port()}"
    before = server.binds()
    config = _config(server, tmp_path, pki, uri=down, replica_uris=(server.uri,))
    assert directory.LdapCertificateDirectory(config).certificates_for(RECIPIENT)
    assert len(_new_binds(server, before)) == 1


def test_the_provider_is_used_while_it_answers(server: Slapd, tmp_path: Path, pki: Pki) -> None:
    """Provider up: the replica is never contacted. The replica here is a socket that
    listens and never answers: a client that tried it first (or at all) leaves a connection
    in its queue (it would then time out and still reach the provider, so the lookup alone
    could not tell)."""
    import socket

    with socket.socket() as replica:
        replica.bind(("127.0.0.1", 0))
        replica.listen(4)
        replica.setblocking(False)
        config = _config(server, tmp_path, pki, timeout=2,
                         replica_uris=(f"ldap://127.0.0.1:{replica.getsockname()[1]}",))
        assert directory.LdapCertificateDirectory(config).certificates_for(RECIPIENT)
        with pytest.raises(BlockingIOError):
            replica.accept()


def test_a_tls_failure_does_not_fall_over_to_a_replica(
    server: Slapd, tmp_path: Path, pki: Pki
) -> None:
    """A provider that fails verification is a fault to fix: the client stops there instead
    of quietly binding elsewhere (and sends the replica no password either)."""
    before = server.binds()
    config = _config(server, tmp_path, pki, uri=f"ldap://localhost:{server.port}",
                     replica_uris=(server.uri,))
    with pytest.raises(SafeMailError, match="TLS with the directory ldap://localhost"):
        directory.LdapCertificateDirectory(config).connect()
    assert _new_binds(server, before) == []


def test_no_directory_reachable_names_every_uri(tmp_path: Path, pki: Pki) -> None:
    first, second = (f"ldap://127.0.0.1:{free_port()}" for _ in range(2))
    config = directory.DirectoryConfig(first, BIND_DN, PASSWORD,
                                       write_pem(tmp_path / "ca.pem", pki.ca), timeout=2,
                                       replica_uris=(second,))
    with pytest.raises(SafeMailError, match="neither the provider nor a replica") as err:
        directory.LdapCertificateDirectory(config).connect()
    assert first in str(err.value) and second in str(err.value)


def test_a_replica_uri_must_be_an_ldap_uri(tmp_path: Path, pki: Pki) -> None:
    for bad in ("http://auth2", "ldap://auth2 ldap://auth3", "ldap://"):
        with pytest.raises(SafeMailError, match="is not an ldap"):
            directory.LdapCertificateDirectory(directory.DirectoryConfig(
                "ldap://auth1", BIND_DN, PASSWORD, tmp_path / "ca.pem", replica_uris=(bad,)))


def test_accounting_reads_the_replicas_from_its_settings(
    server: Slapd, tmp_path: Path, pki: Pki
) -> None:
    cafile = write_pem(tmp_path / "ca.pem", pki.ca)
    settings = {"uri": f"ldap://127.0.0.1:{free_port()}", "base": BASE, "bind_dn": BIND_DN,
                "password": PASSWORD, "cafile": str(cafile), "replica_uris": [server.uri]}
    assert accounting_cli.directory_resolver(settings)([SENDER]) == {
        SENDER: Participant("100001", "GP")}
    with pytest.raises(SafeMailError, match="replica_uris must be a list"):
        accounting_cli.directory_resolver({**settings, "replica_uris": "ldap://auth2"})
