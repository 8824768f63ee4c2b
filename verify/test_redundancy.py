"""AV-02: the directory replica (roles/auth with auth_replication; docs/availability.md).

Runs only on a redundant stage (two relays, two directory hosts: `safemail lab up
--redundant`); on any other stage verify/conftest.py deselects these tests and lists them
with the reason (marker ``redundant_stage``).

- A participant entry added on the provider is on the replica within REPLICATION_SECONDS,
  and its removal too (a scratch entry, added and removed as root on the provider).
- The replica is read-only: ca-dist, which may write certificates on the provider (twin:
  the same write there works and then replicates), is refused on the replica.
- The replica requires TLS like the provider (bind without StartTLS refused; with it works).
- With slapd on the provider stopped, every relay still resolves a participant's mailbox
  (Postfix's own ldap table, through the replica), an unknown address still resolves to
  nothing, and the store still authenticates a participant's IMAP password (Dovecot).

- The relays' service address (keepalived): with the active relay's S/MIME gate stopped,
  then keepalived stopped on the next active relay, the address moves within
  FAILOVER_SECONDS each time and mail sent to the service name is accepted and delivered;
  the relay whose gate is down, asked directly, refuses (twin).
"""

from __future__ import annotations

import shlex
import time
import uuid

import pytest
from stagegroups import groups as _groups
from stagegroups import holders as _holders
from stagegroups import host as _host

SERVICE_CA = "/etc/safemail/tls/ca.crt"
# refreshAndPersist pushes a change at once (0.1 s measured on a local pair of slapd 2.5);
# the bound leaves room for an emulated VM under load.
REPLICATION_SECONDS = 15
MAILBOX_TABLE = "ldap:/etc/postfix/ldap-mailboxes.cf"


@pytest.fixture(scope="module")
def stage(request) -> dict:
    groups = _groups(request.config)
    # The wiring's provider is the first auth host (playbooks/group_vars/all.yml); the
    # inventory lists auth1 (hosts.yml) before auth2 (the lab's generated part).
    provider, *replicas = groups["auth"]
    assert replicas, "no directory replica in this inventory"
    hv = _host(request.config, provider).ansible.get_variables()
    base = "dc=" + ",dc=".join(hv["safemail_mail_domain"].split("."))
    return {"provider": provider, "replica": replicas[0], "relays": groups["relay"],
            "store": groups["store"][0], "vars": hv, "base": base,
            "participants": f"ou=participants,{base}", "services": f"ou=services,{base}"}


def _ldap(host, uri: str, tool: str, *args: str, bind: tuple[str, str] | None = None,
          starttls: bool = True, stdin: str | None = None):
    cmd = [tool, "-x", "-H", uri, "-o", "nettimeout=10", *(["-ZZ"] if starttls else [])]
    if bind:
        cmd += ["-D", bind[0], "-w", bind[1]]
    line = (f"LDAPTLS_CACERT={SERVICE_CA} LDAPTLS_REQCERT=demand "
            f"{shlex.join([*cmd, *args])}")
    if stdin is not None:
        line = f"printf '%s' {shlex.quote(stdin)} | {line}"
    return host.run(line)


def _account(stage: dict, name: str) -> tuple[str, str]:
    key = {"relay": "relay", "store": "store", "ca-dist": "cadist"}[name]
    return f"cn={name},{stage['services']}", stage["vars"][f"safemail_ldap_{key}_password"]


def _root_search(host, dn: str, *attrs: str):
    return host.run("ldapsearch -Q -LLL -o ldif-wrap=no -Y EXTERNAL -H ldapi:/// -s base -b %s "
                    + " ".join(["%s"] * len(attrs)), dn, *attrs)


def _wait(check, seconds: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.5)
    return None


@pytest.mark.req("AV-02")
@pytest.mark.redundant_stage
@pytest.mark.stage_hosts("auth")
def test_replica_gets_an_entry_added_on_the_provider_and_refuses_writes(request, stage,
                                                                        evidence):
    provider = _host(request.config, stage["provider"])
    replica = _host(request.config, stage["replica"])
    replica_uri = f"ldap://{stage['replica']}"
    provider_uri = stage["vars"]["safemail_ldap_uri"]
    number = "9" + uuid.uuid4().hex[:8]
    dn = f"uid={number},{stage['participants']}"
    ldif = (f"dn: {dn}\nobjectClass: inetOrgPerson\nuid: {number}\ncn: verify scratch\n"
            f"sn: verify scratch\nmail: scratch-{number}@{stage['vars']['safemail_mail_domain']}\n")
    relay = _account(stage, "relay")

    def on_replica() -> bool:
        r = _ldap(replica, replica_uri, "ldapsearch", "-LLL", "-b", dn, "-s", "base", "mail",
                  bind=relay)
        return r.rc == 0 and f"dn: {dn}" in r.stdout

    added = provider.run(f"printf '%s' {shlex.quote(ldif)} | ldapadd -Q -Y EXTERNAL -H ldapi:///")
    assert added.rc == 0, f"cannot add the scratch entry on the provider: {added.stderr}"
    try:
        took = _wait(on_replica, REPLICATION_SECONDS)
        evidence(f"{dn} added on {stage['provider']}: on {stage['replica']} after "
                 f"{took if took is None else round(took, 1)} s (limit {REPLICATION_SECONDS} s)")
        assert took is not None, f"not replicated within {REPLICATION_SECONDS} s"
        # Read-only: ca-dist may write a certificate on the provider, not on the replica.
        der = provider.run(f"openssl x509 -in {SERVICE_CA} -outform DER | base64 -w0").stdout
        change = (f"dn: {dn}\nchangetype: modify\nreplace: userCertificate;binary\n"
                  f"userCertificate;binary:: {der.strip()}\n")
        cadist = _account(stage, "ca-dist")
        refused = _ldap(replica, replica_uri, "ldapmodify", bind=cadist, stdin=change)
        evidence(f"ca-dist writes a certificate on the replica: rc={refused.rc} "
                 f"{refused.stderr.strip()[:200]!r}")
        assert refused.rc == 53, "the replica accepted (or failed otherwise on) a write"
        done = _ldap(provider, provider_uri, "ldapmodify", bind=cadist, stdin=change)
        assert done.rc == 0, f"twin: ca-dist's write on the provider failed: {done.stderr}"
        took = _wait(lambda: "userCertificate;binary::" in _root_search(
            replica, dn, "userCertificate;binary").stdout, REPLICATION_SECONDS)
        evidence(f"the certificate written on the provider is on the replica after {took} s")
        assert took is not None, "a change on the provider did not reach the replica"
    finally:
        provider.run("ldapdelete -Q -Y EXTERNAL -H ldapi:/// %s", dn)
    gone = _wait(lambda: not on_replica(), REPLICATION_SECONDS)
    evidence(f"deleted on the provider: gone from the replica after {gone} s")
    assert gone is not None, "a deletion on the provider did not reach the replica"


@pytest.mark.req("AV-02")
@pytest.mark.redundant_stage
@pytest.mark.read_only
@pytest.mark.stage_hosts("auth")
def test_replica_requires_tls_like_the_provider(request, stage, evidence):
    replica = _host(request.config, stage["replica"])
    uri = f"ldap://{stage['replica']}"
    relay = _account(stage, "relay")
    plain = _ldap(replica, uri, "ldapwhoami", bind=relay, starttls=False)
    tls = _ldap(replica, uri, "ldapwhoami", bind=relay)
    evidence(f"{uri} without StartTLS: rc={plain.rc}; with StartTLS: rc={tls.rc} "
             f"{tls.stdout.strip()!r}")
    assert plain.rc == 13, "the replica accepted a bind without TLS"
    assert tls.rc == 0 and tls.stdout.strip().lower() == f"dn:{relay[0]}".lower(), tls.stderr


@pytest.mark.req("AV-02")
@pytest.mark.redundant_stage
@pytest.mark.disruptive
@pytest.mark.stage_hosts("auth", "relay", "store")
def test_relays_and_store_use_the_replica_while_the_provider_is_stopped(request, stage,
                                                                        evidence):
    provider = _host(request.config, stage["provider"])
    relays = {name: _host(request.config, name) for name in stage["relays"]}
    store = _host(request.config, stage["store"])
    person = stage["vars"]["safemail_participants"][0]
    mailbox, number = person["mailbox"], str(person["number"])
    password = stage["vars"]["safemail_participant_passwords"][number]
    unknown = f"nobody-{uuid.uuid4().hex[:8]}@{stage['vars']['safemail_mail_domain']}"

    def lookups(when: str) -> None:
        for name, relay in relays.items():
            found = relay.run("postmap -q %s %s", mailbox, MAILBOX_TABLE)
            none = relay.run("postmap -q %s %s", unknown, MAILBOX_TABLE)
            evidence(f"{when}, {name}: postmap -q {mailbox} -> rc={found.rc} "
                     f"{found.stdout.strip()!r}; unknown -> rc={none.rc}")
            assert found.rc == 0 and found.stdout.strip() == mailbox, found.stderr
            assert none.rc == 1 and not none.stdout.strip(), none.stderr
        auth = store.run("doveadm auth test %s %s", mailbox, password)
        evidence(f"{when}, {stage['store']}: doveadm auth test -> rc={auth.rc} "
                 f"{auth.stdout.strip()[:120]!r}")
        assert auth.rc == 0 and "auth succeeded" in auth.stdout, auth.stdout + auth.stderr

    lookups("provider up")  # the twin: the same lookups with both directories up
    stopped = provider.run("systemctl stop slapd")
    assert stopped.rc == 0, stopped.stderr
    try:
        down = _ldap(provider, stage["vars"]["safemail_ldap_uri"], "ldapwhoami",
                     bind=_account(stage, "relay"))
        evidence(f"provider stopped: ldapwhoami against it rc={down.rc}")
        assert down.rc != 0, "slapd on the provider still answers"
        lookups("provider stopped")
    finally:
        provider.run("systemctl start slapd")
    up = _wait(lambda: _ldap(provider, stage["vars"]["safemail_ldap_uri"], "ldapwhoami",
                             bind=_account(stage, "relay")).rc == 0, 30)
    assert up is not None, "slapd on the provider did not come back"


# -- the relays' service address (roles/relay_vrrp, keepalived) --------------------------------

PDIR = "/var/lib/safemail-participant"
SAFEMAIL = "/opt/safemail/venv/bin/safemail"
FAILOVER_SECONDS = 30  # measured locally: 5 s after a failed check, 1 s after a stop
CHECK = "/usr/local/sbin/safemail-relay-vrrp-check"  # roles/relay_vrrp's health check


def _participant(request, stage: dict, index: int):
    entry = stage["vars"]["safemail_participants"][index]
    password = stage["vars"]["safemail_participant_passwords"][str(entry["number"])]
    return _host(request.config, entry["lab_host"]), entry["mailbox"], password


def _send(sender, to: str, host: str, subject: str, body: str, dist_uri: str):
    h, mailbox, password = sender
    path = f"/tmp/body-{uuid.uuid4().hex}"
    h.run(f"cat > {path} <<'EOF_BODY'\n{body}\nEOF_BODY")
    res = h.run(f"SAFEMAIL_PASSWORD={shlex.quote(password)} {SAFEMAIL} participant send "
                f"--from {mailbox} --to {to} --subject {shlex.quote(subject)} --body-file {path} "
                f"--directory {dist_uri} --smime-ca {PDIR}/ca.pem --host {host} "
                f"--cafile {SERVICE_CA}")
    h.run(f"rm -f {path}")
    return res


def _fetch(recipient, host: str, subject: str) -> str:
    h, mailbox, password = recipient
    env = f"SAFEMAIL_PASSWORD={shlex.quote(password)}"
    listing = h.run(f"{env} {SAFEMAIL} participant fetch --list --mailbox {mailbox} "
                    f"--host {host} --cafile {SERVICE_CA}")
    for line in listing.stdout.splitlines():
        uid, _, header = line.partition("\t")
        if subject in header:
            return h.run(f"{env} {SAFEMAIL} participant fetch --mailbox {mailbox} --uid {uid} "
                         f"--key {PDIR}/key.pem --cert {PDIR}/cert.pem --host {host} "
                         f"--cafile {SERVICE_CA}").stdout
    return ""


@pytest.mark.req("AV-02")
@pytest.mark.redundant_stage
@pytest.mark.lab_participants
@pytest.mark.disruptive
@pytest.mark.stage_hosts("relay", also=("participants", "store", "ca_dist"))
def test_the_service_address_moves_and_mail_is_still_accepted(request, stage, evidence):
    """The active relay's S/MIME gate stops (health check) and then keepalived on the next
    active relay stops: each time the service address moves within FAILOVER_SECONDS and a
    participant's mail sent to the service name is accepted and delivered. Twin: the relay
    whose gate is down, asked directly, does not accept the mail."""
    service = stage["vars"]["safemail_relay_service"]
    name, address = service["name"], service["address"]
    relays = {n: _host(request.config, n) for n in stage["relays"]}
    p1, p2 = _participant(request, stage, 0), _participant(request, stage, 1)
    dist_host = _host(request.config, _groups(request.config)["ca_dist"][0])
    dist = f"http://{dist_host.ansible.get_variables()['safemail_address']}/"  # as test_mail
    holders = _holders(relays, address)
    evidence(f"{address} ({name}) held by {holders}")
    assert len(holders) == 1, f"the service address is held by {holders}, not one relay"
    first = holders[0]

    def moved_from(old: str) -> tuple[str, float]:
        start = time.monotonic()
        while time.monotonic() - start < FAILOVER_SECONDS:
            now = _holders(relays, address)
            if len(now) == 1 and now[0] != old:
                return now[0], time.monotonic() - start
            time.sleep(0.5)
        raise AssertionError(f"{address} did not leave {old} within {FAILOVER_SECONDS} s "
                             f"(holders: {_holders(relays, address)})")

    def delivered(label: str) -> None:
        subject, body = f"AV-02 {label} {uuid.uuid4().hex[:8]}", f"Befund {uuid.uuid4().hex}"
        sent = _send(p1, p2[1], name, subject, body, dist)
        evidence(f"{label}: send to {name} rc={sent.rc} {sent.stderr.strip()[-200:]!r}")
        assert sent.rc == 0, f"mail to the service name refused ({label}): {sent.stderr}"
        got = ""
        deadline = time.monotonic() + 120
        while not got and time.monotonic() < deadline:
            got = _fetch(p2, name, subject)
            time.sleep(2)
        assert body in got, f"mail sent {label} not delivered and decrypted within 120 s"

    delivered("before any fault")
    gate = relays[first].run("systemctl stop safemail-smime-gate.service")
    assert gate.rc == 0, gate.stderr
    try:
        second, took = moved_from(first)
        evidence(f"S/MIME gate stopped on {first}: {address} on {second} after {took:.1f} s")
        direct = _send(p1, p2[1], first, "AV-02 direct", "x", dist)
        evidence(f"twin: send directly to {first} (gate down) rc={direct.rc}")
        assert direct.rc != 0, f"{first} accepted mail with its gate down"
        delivered(f"gate down on {first}")
    finally:
        relays[first].run("systemctl start safemail-smime-gate.service")
    # The address stays on `second` (equal priorities); `first` must be healthy again before
    # `second` is taken away, or the next mail would meet a relay whose gate is still starting.
    healthy = _wait(lambda: relays[first].run(CHECK).rc == 0, FAILOVER_SECONDS)
    evidence(f"{first} healthy again after {healthy} s; {address} stays on "
             f"{_holders(relays, address)}")
    assert healthy is not None, f"{first}'s health check still fails after the gate restart"
    assert _holders(relays, address) == [second], "the recovered relay took the address back"
    stop = relays[second].run("systemctl stop keepalived")
    assert stop.rc == 0, stop.stderr
    try:
        third, took = moved_from(second)
        evidence(f"keepalived stopped on {second}: {address} on {third} after {took:.1f} s")
        delivered(f"keepalived stopped on {second}")
    finally:
        relays[second].run("systemctl start keepalived")
