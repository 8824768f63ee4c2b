"""The directory (roles/auth): TLS on every LDAP connection, and who may read or write what.

MAIL-05: over plain ldap:// (no StartTLS) a bind or search is refused; with StartTLS and the
service TLS CA the same bind works, and a client that does not trust the service CA refuses
the server.

MAIL-01 (the directory the relay validates recipients against): nobody reads anything
anonymously; the relay's account reads a participant's mailbox; a participant reads other
participants' mailbox, name and certificate but no password hash; the CA distribution account
writes userCertificate;binary but not mail; the relay account cannot write certificates.

The probes run the OpenLDAP command-line tools on the directory host against its own
service address (ldap://auth1 resolves to the back-segment address through /etc/hosts), so
they go through slapd's TCP listener like any remote client; the lab has no firewall yet
that would treat a local client differently. Write probes use a throw-away participant
entry that the test adds and removes as root over ldapi:///, never a real participant.
"""

from __future__ import annotations

import shlex
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

testinfra_hosts = ["ansible://auth"]
# The probes and scratch writes are for the provider (the playbooks' first auth host); on a
# redundant stage the replica's parameters are deselected, and verify/test_redundancy.py
# proves the replica (TLS, read-only, replication).
pytestmark = pytest.mark.first_of_group("auth")

SERVICE_CA = "/etc/safemail/tls/ca.crt"
# Any CA bundle that is not the service CA: the server must not be trusted through it.
FOREIGN_CA = "/etc/ssl/certs/ssl-cert-snakeoil.pem"


@dataclass(frozen=True)
class Directory:
    uri: str
    base: str
    participants: str
    services: str
    vars: dict

    def service(self, name: str) -> tuple[str, str]:
        key = {"relay": "relay", "store": "store", "ca-dist": "cadist"}[name]
        return f"cn={name},{self.services}", self.vars[f"safemail_ldap_{key}_password"]

    def participant(self, index: int) -> tuple[str, str, dict]:
        p = self.vars["safemail_participants"][index]
        number = str(p["number"])
        password = self.vars["safemail_participant_passwords"][number]
        return f"uid={number},{self.participants}", password, p


@pytest.fixture(scope="module")
def directory(host) -> Directory:
    # The provider only: first_of_group deselected the other auth hosts at collection.
    hv = host.ansible.get_variables()
    # The inventory is read untemplated here: derive the base DN from the domain as the
    # role wiring (playbooks/group_vars/all.yml) does.
    base = "dc=" + ",dc=".join(hv["safemail_mail_domain"].split("."))
    uri = hv["safemail_ldap_uri"]
    assert urlsplit(uri).scheme == "ldap", uri
    return Directory(uri=uri, base=base, participants=f"ou=participants,{base}",
                     services=f"ou=services,{base}", vars=hv)


def ldap(host, d: Directory, tool: str, *args: str, bind: tuple[str, str] | None = None,
         starttls: bool = True, ca: str = SERVICE_CA, stdin: str | None = None):
    """Run an OpenLDAP client tool against the directory's network listener."""
    cmd = [tool, "-x", "-H", d.uri, "-o", "nettimeout=10"]
    if starttls:
        cmd.append("-ZZ")  # StartTLS, and fail if it does not succeed
    if bind:
        cmd += ["-D", bind[0], "-w", bind[1]]
    cmd += list(args)
    line = f"LDAPTLS_CACERT={shlex.quote(ca)} LDAPTLS_REQCERT=demand {shlex.join(cmd)}"
    if stdin is not None:
        line = f"printf '%s' {shlex.quote(stdin)} | {line}"
    return host.run(line)


def shown(result, secret: str | None = None) -> str:
    """Evidence text: exit code and output, with a password masked."""
    text = f"rc={result.rc} out={result.stdout.strip()[:300]!r} err={result.stderr.strip()[:200]!r}"
    return text.replace(secret, "***") if secret else text


def dns(result) -> list[str]:
    return [line[4:] for line in result.stdout.splitlines() if line.startswith("dn: ")]


def attr_names(result) -> set[str]:
    return {line.split(":", 1)[0] for line in result.stdout.splitlines()
            if ":" in line and not line.startswith((" ", "#"))}


# -- MAIL-05: TLS or nothing ---------------------------------------------------------------

@pytest.mark.req("MAIL-05")
@pytest.mark.read_only
def test_bind_with_starttls_and_service_ca_works(host, directory, evidence):
    dn, pw = directory.service("relay")
    r = ldap(host, directory, "ldapwhoami", bind=(dn, pw))
    evidence(f"ldapwhoami -ZZ as relay: {shown(r, pw)}")
    assert r.rc == 0, r.stderr
    assert r.stdout.strip().lower() == f"dn:{dn}".lower()


@pytest.mark.req("MAIL-05")
@pytest.mark.read_only
def test_bind_without_tls_is_refused(host, directory, evidence):
    dn, pw = directory.service("relay")
    r = ldap(host, directory, "ldapwhoami", bind=(dn, pw), starttls=False)
    evidence(f"ldapwhoami without StartTLS as relay: {shown(r, pw)}")
    assert r.rc == 13, "a clear-text bind was not refused with confidentialityRequired (13)"
    assert "Confidentiality required" in r.stderr


@pytest.mark.req("MAIL-05")
@pytest.mark.read_only
def test_search_without_tls_is_refused(host, directory, evidence):
    r = ldap(host, directory, "ldapsearch", "-LLL", "-b", directory.base, "(objectClass=*)",
             starttls=False)
    evidence(f"anonymous ldapsearch without StartTLS: {shown(r)}")
    assert r.rc == 13
    assert "Confidentiality required" in r.stderr


@pytest.mark.req("MAIL-05")
@pytest.mark.read_only
def test_server_not_trusted_without_the_service_ca(host, directory, evidence):
    dn, pw = directory.service("relay")
    r = ldap(host, directory, "ldapwhoami", bind=(dn, pw), ca=FOREIGN_CA)
    evidence(f"ldapwhoami -ZZ trusting only {FOREIGN_CA}: {shown(r, pw)}")
    assert r.rc != 0
    assert "ldap_start_tls" in r.stderr, "failed, but not at the TLS handshake"
    assert "dn:" not in r.stdout


# -- MAIL-01: the directory's access control -----------------------------------------------

@pytest.mark.req("MAIL-01")
@pytest.mark.read_only
def test_anonymous_search_returns_nothing(host, directory, evidence):
    r = ldap(host, directory, "ldapsearch", "-LLL", "-b", directory.base, "(objectClass=*)")
    evidence(f"anonymous ldapsearch -ZZ of {directory.base}: {shown(r)}")
    # Either no such object (the base is not disclosed) or an empty result: no entry at all.
    assert r.rc in (0, 32), r.stderr
    assert dns(r) == []


@pytest.mark.req("MAIL-01")
@pytest.mark.parametrize("service", ["relay", "store", "ca-dist"])
@pytest.mark.read_only
def test_service_finds_a_participant_by_mailbox(host, directory, service, evidence):
    dn, pw = directory.service(service)
    _, _, p = directory.participant(0)
    r = ldap(host, directory, "ldapsearch", "-LLL", "-b", directory.participants,
             f"(mail={p['mailbox']})", "mail", "uid", bind=(dn, pw))
    evidence(f"{service} searches (mail={p['mailbox']}): {shown(r, pw)}")
    assert r.rc == 0, r.stderr
    assert dns(r) == [f"uid={p['number']},{directory.participants}"]
    assert f"mail: {p['mailbox']}" in r.stdout
    assert f"uid: {p['number']}" in r.stdout


@pytest.mark.req("MAIL-01")
@pytest.mark.read_only
def test_relay_reads_the_participant_data_it_needs(host, directory, evidence):
    dn, pw = directory.service("relay")
    p_dn, _, p = directory.participant(0)
    r = ldap(host, directory, "ldapsearch", "-LLL", "-b", p_dn, "-s", "base", "(objectClass=*)",
             "*", bind=(dn, pw))
    names = attr_names(r)
    evidence(f"relay asks {p_dn} for all attributes -> {sorted(names)}")
    assert r.rc == 0, r.stderr
    assert {"mail", "uid", "cn", "o", "employeeNumber", "businessCategory"} <= names
    assert "userPassword" not in names


@pytest.mark.req("MAIL-01")
@pytest.mark.read_only
def test_participant_reads_others_address_and_name(host, directory, evidence):
    me, pw, _ = directory.participant(0)
    other_dn, _, other = directory.participant(1)
    r = ldap(host, directory, "ldapsearch", "-LLL", "-b", other_dn, "-s", "base",
             "(objectClass=*)", "mail", "cn", bind=(me, pw))
    evidence(f"participant {me} reads {other_dn} mail,cn: {shown(r, pw)}")
    assert r.rc == 0, r.stderr
    assert f"mail: {other['mailbox']}" in r.stdout


@pytest.mark.req("MAIL-01")
@pytest.mark.read_only
def test_participant_cannot_read_others_password_or_data(host, directory, evidence):
    me, pw, _ = directory.participant(0)
    other_dn, _, _ = directory.participant(1)
    r = ldap(host, directory, "ldapsearch", "-LLL", "-b", other_dn, "-s", "base",
             "(objectClass=*)", "*", bind=(me, pw))
    names = attr_names(r)
    evidence(f"participant {me} asks {other_dn} for all attributes -> {sorted(names)}")
    assert r.rc == 0, r.stderr
    assert "userPassword" not in names
    # Only what the recipient lookup needs.
    assert names <= {"dn", "objectClass", "mail", "cn", "userCertificate;binary"}, names


@pytest.mark.req("MAIL-01")
@pytest.mark.parametrize("service", ["relay", "store", "ca-dist"])
@pytest.mark.read_only
def test_services_cannot_read_passwords(host, directory, service, evidence):
    dn, pw = directory.service(service)
    # Its positive twin is test_service_finds_a_participant_by_mailbox: the same account
    # finds entries by mailbox, but neither sees nor filters on a password.
    r = ldap(host, directory, "ldapsearch", "-LLL", "-b", directory.base,
             "(userPassword=*)", "userPassword", bind=(dn, pw))
    evidence(f"{service} searches (userPassword=*): {shown(r, pw)}")
    assert r.rc == 0, r.stderr
    assert "userPassword" not in r.stdout
    assert dns(r) == []


@pytest.mark.req("MAIL-01")
@pytest.mark.read_only
def test_cadist_sees_no_practice_data(host, directory, evidence):
    dn, pw = directory.service("ca-dist")
    p_dn, _, _ = directory.participant(0)
    r = ldap(host, directory, "ldapsearch", "-LLL", "-b", p_dn, "-s", "base", "(objectClass=*)",
             "*", bind=(dn, pw))
    names = attr_names(r)
    evidence(f"ca-dist asks {p_dn} for all attributes -> {sorted(names)}")
    assert r.rc == 0, r.stderr
    assert names <= {"dn", "objectClass", "mail", "uid", "userCertificate;binary"}, names


@pytest.fixture
def scratch_participant(host, directory):
    """A throw-away participant entry, added and removed by root over ldapi:///."""
    number = "9" + uuid.uuid4().hex[:8]
    dn = f"uid={number},{directory.participants}"
    domain = directory.vars["safemail_mail_domain"]
    ldif = (f"dn: {dn}\nobjectClass: inetOrgPerson\nuid: {number}\ncn: verify scratch\n"
            f"sn: verify scratch\nmail: scratch-{number}@{domain}\n")
    added = host.run(f"printf '%s' {shlex.quote(ldif)} | ldapadd -Q -Y EXTERNAL -H ldapi:///")
    assert added.rc == 0, f"cannot add the scratch entry as root: {added.stderr}"
    yield dn
    host.run(f"ldapdelete -Q -Y EXTERNAL -H ldapi:/// {shlex.quote(dn)}")


def _cert_ldif(dn: str, der_b64: str) -> str:
    return (f"dn: {dn}\nchangetype: modify\nreplace: userCertificate;binary\n"
            f"userCertificate;binary:: {der_b64}\n")


def _mail_ldif(dn: str) -> str:
    return f"dn: {dn}\nchangetype: modify\nreplace: mail\nmail: hijacked@example.org\n"


@pytest.fixture(scope="module")
def some_der(host) -> str:
    # Any DER certificate will do as a value: the service CA's own.
    r = host.run(f"openssl x509 -in {SERVICE_CA} -outform DER | base64 -w0")
    assert r.rc == 0 and r.stdout, r.stderr
    return r.stdout.strip()


@pytest.mark.req("MAIL-01")
def test_cadist_writes_a_certificate(host, directory, scratch_participant, some_der, evidence):
    dn, pw = directory.service("ca-dist")
    r = ldap(host, directory, "ldapmodify", bind=(dn, pw),
             stdin=_cert_ldif(scratch_participant, some_der))
    evidence(f"ca-dist replaces userCertificate;binary of {scratch_participant}: {shown(r, pw)}")
    assert r.rc == 0, r.stderr
    check = host.run("ldapsearch -Q -LLL -o ldif-wrap=no -Y EXTERNAL -H ldapi:/// -b %s -s base %s",
                     scratch_participant, "userCertificate;binary")
    assert some_der in check.stdout


@pytest.mark.req("MAIL-01")
def test_cadist_cannot_write_mail(host, directory, scratch_participant, evidence):
    dn, pw = directory.service("ca-dist")
    r = ldap(host, directory, "ldapmodify", bind=(dn, pw), stdin=_mail_ldif(scratch_participant))
    evidence(f"ca-dist replaces mail of {scratch_participant}: {shown(r, pw)}")
    assert r.rc == 50, "ca-dist changed a mailbox address (expected insufficientAccess, 50)"


@pytest.mark.req("MAIL-01")
def test_relay_cannot_write_a_certificate(host, directory, scratch_participant, some_der, evidence):
    dn, pw = directory.service("relay")
    r = ldap(host, directory, "ldapmodify", bind=(dn, pw),
             stdin=_cert_ldif(scratch_participant, some_der))
    evidence(f"relay replaces userCertificate;binary of {scratch_participant}: {shown(r, pw)}")
    assert r.rc == 50, "the relay account wrote a certificate (expected insufficientAccess, 50)"
