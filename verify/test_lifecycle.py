"""Participants from enrolment to departure, and how long traffic data stays (issue 18).

CA-04    revocation and a missing certificate stop mail: after `playbooks/ca-revoke.yml` ends,
         RCPT to the participant is refused over SMTP (a real dialogue from practice1 through
         the relay); the expiry report lists every participant with its certificate's end.
MAIL-01  offboarding: after `playbooks/participant-remove.yml` the participant cannot log in
         (IMAP and SMTP AUTH), RCPT is refused, its certificate is on the published CRL, the
         removal report names what went; check mode changes nothing; an unknown number is
         refused.
MAIL-04  every enrolled participant's notice exists (controller evidence and the participant's
         copy) and carries the warning that subjects are not encrypted.
STORE-03 retention: the deployed logrotate settings match the configured days; the deployed
         rotation, run on a copy whose files were moved past the limit, deletes them and keeps
         younger ones; the distribution point logs no request; the deployed mailbox purge
         deletes a removed mailbox once its period is over (a copy moved forward in time).

The revocation and removal tests use throw-away participants that they register at the RA,
enter into the directory and enrol themselves (key on practice1, in a temporary directory),
so practice1 and practice2 keep theirs. Every positive check has its negative twin: RCPT is
accepted before and refused after, login works before and fails after.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import shlex
import subprocess
import time
import uuid
from functools import cache

import enrolment
import pytest
import testinfra
from cryptography import x509
from waits import wait_for

from safemail import ansible
from safemail.project import project_root

# Sends mail and runs playbooks from the lab's participant hosts (verify/profiles.py).
pytestmark = pytest.mark.lab_participants

CA = enrolment.CA
SAFEMAIL = enrolment.SAFEMAIL
PDIR = "/var/lib/safemail-participant"
CAFILE = "/etc/safemail/tls/ca.crt"
NOTICE_WARNING = ("DER BETREFF WIRD NICHT VERSCHLUESSELT", "KEINE PATIENTENDATEN",
                  "THE SUBJECT IS NOT ENCRYPTED")


# ------------------------------------------------------------------ plumbing
def _inventory(config) -> str:
    return config.getoption("ansible_inventory") or "inventories/test"


@cache
def _host(inventory: str, name: str):
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory)


@cache
def _vars(inventory: str) -> dict:
    return testinfra.get_hosts(["ansible://relay"], ansible_inventory=inventory)[0] \
        .ansible.get_variables()


def _groups(config, name: str) -> list[str]:
    try:
        return sorted(_vars(_inventory(config))["groups"].get(name, []))
    except Exception:  # noqa: BLE001 - collection must not die on an unreachable lab
        return [f"<{name}: inventory unreadable>"]


def pytest_generate_tests(metafunc):
    if "mail_host" in metafunc.fixturenames:
        metafunc.parametrize("mail_host", _groups(metafunc.config, "relay")
                             + _groups(metafunc.config, "store"))
    if "participant_host" in metafunc.fixturenames:
        metafunc.parametrize("participant_host", _groups(metafunc.config, "participants"))


class Lab:
    def __init__(self, inventory: str) -> None:
        self.inventory = inventory
        self.vars = _vars(inventory)

    def __call__(self, name: str):
        return _host(self.inventory, name)

    def first(self, group: str):
        return self(self.vars["groups"][group][0])

    @property
    def domain(self) -> str:
        return self.vars["safemail_mail_domain"]

    def lab_participants(self) -> list[dict]:
        return [p for p in self.vars["safemail_participants"] if p.get("lab_host")]

    def dist_url(self, path: str) -> str:
        dist = self.first("ca_dist").ansible.get_variables()["safemail_address"]
        return f"http://{dist}/{path}"

    def playbook(self, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
        cmd = [ansible.command("ansible-playbook"), "-i", self.inventory, *args]
        return subprocess.run(cmd, cwd=project_root(), capture_output=True, text=True,
                              timeout=timeout, check=False)


@pytest.fixture(scope="module")
def lab(request) -> Lab:
    return Lab(_inventory(request.config))


def _sender(lab: Lab) -> tuple:
    """(host, mailbox, password) of the first lab participant: the one that sends."""
    p = lab.lab_participants()[0]
    return (lab(p["lab_host"]), p["mailbox"],
            lab.vars["safemail_participant_passwords"][str(p["number"])])


# The relay the participants submit to (set once per module by the `_relay` fixture).
_relay_name: dict[str, str] = {}


def _probe(host, user: str, password: str, rcpts: list[str]) -> dict:
    """An SMTP dialogue (EHLO, STARTTLS, AUTH as `user`, MAIL, RCPT) from a participant host
    through the relay's submission port."""
    args = [SAFEMAIL, "participant", "smtp-probe", "--host", _relay_name["relay"], "--port",
            "587", "--cafile", CAFILE, "--from", user, "--user", user]
    for r in rcpts:
        args += ["--to", r]
    out = host.run(f"SAFEMAIL_PASSWORD={shlex.quote(password)} {shlex.join(args)}")
    assert out.rc == 0, out.stderr
    return json.loads(out.stdout)


def _reply(transcript: dict, prefix: str) -> tuple[int, str]:
    for s in transcript["steps"]:
        if s["step"].startswith(prefix):
            return s["code"], s["text"]
    return 0, f"no {prefix} step: {transcript}"


def _rcpt(lab: Lab, mailbox: str) -> tuple[int, str]:
    host, user, password = _sender(lab)
    return _reply(_probe(host, user, password, [mailbox]), "rcpt")


_put = enrolment.put


def _suffix(lab: Lab) -> str:
    out = lab.first("auth").check_output(
        "ldapsearch -Q -LLL -Y EXTERNAL -H ldapi:/// -s base -b '' namingContexts")
    [suffix] = [line.split(": ", 1)[1] for line in out.splitlines()
                if line.startswith("namingContexts: ")]
    return suffix


def _directory_has_cert(lab: Lab, dn: str) -> bool | None:
    """True/False: the entry carries a certificate or not; None: no such entry."""
    out = lab.first("auth").run(f"ldapsearch -Q -LLL -o ldif-wrap=no -Y EXTERNAL -H ldapi:/// "
                                f"-s base -b {shlex.quote(dn)} 'userCertificate;binary'")
    if out.rc == 32:
        return None
    assert out.rc == 0, out.stderr
    return "userCertificate;binary:: " in out.stdout


class Throwaway:
    """A participant of this test only: registered at the RA, in the directory (with a
    password), key and CSR in a temporary directory on practice1, enrolled via RA -> signer
    -> distribution. ``cleanup`` removes the directory entry and the traces on the hosts."""

    def __init__(self, lab: Lab, tag: str) -> None:
        self.lab = lab
        stamp = f"{int(time.time() * 1000) % 10**11:011d}{random.randint(10, 99)}"
        self.number = f"9{stamp}"  # digits only, as participant numbers are
        self.mailbox = f"verify-{tag}-{stamp}@{lab.domain}"
        self.password = f"verify-{uuid.uuid4().hex[:16]}"
        self.dn = f"uid={self.number},ou=participants,{_suffix(lab)}"
        self.host = lab(lab.lab_participants()[0]["lab_host"])
        self.dir = f"/tmp/verify-life-{self.number}"

    def enrol(self) -> None:
        lab, auth, ra = self.lab, self.lab.first("auth"), self.lab.first("ca_ra")
        ra.run_expect([0], f"{CA} register {self.number} --name 'Verify lifecycle' "
                           f"--mailbox {self.mailbox} --specialty OTHER --operator verify")
        entry = (f"dn: {self.dn}\nobjectClass: inetOrgPerson\nuid: {self.number}\n"
                 f"cn: Verify lifecycle\nsn: Verify lifecycle\nmail: {self.mailbox}\n"
                 f"employeeNumber: {self.number}\nbusinessCategory: OTHER\n")
        auth.run_expect([0], f"printf {shlex.quote(entry)} | ldapadd -Q -Y EXTERNAL -H ldapi:///")
        auth.run_expect([0], f"ldappasswd -Q -Y EXTERNAL -H ldapi:/// "
                             f"-s {shlex.quote(self.password)} {shlex.quote(self.dn)}")
        enrolment.enrol(self.host, ra, lab.first("ca_signer"), self.number, self.mailbox,
                        self.dir)
        assert wait_for(lambda: _directory_has_cert(lab, self.dn), 90), (
            f"{self.dn}: distribution never put the certificate into the directory")

    def serial(self) -> int:
        out = self.host.run(f"python3 -c {shlex.quote(_GET)} "
                            f"{shlex.quote(self.lab.dist_url(f'certs/{self.mailbox}.pem'))} "
                            f"{self.dir}/cert.pem")
        assert out.rc == 0, out.stderr
        return x509.load_pem_x509_certificate(
            self.host.file(f"{self.dir}/cert.pem").content).serial_number

    def login_imap(self):
        return self.host.run(
            f"SAFEMAIL_PASSWORD={shlex.quote(self.password)} {SAFEMAIL} participant fetch "
            f"--list --mailbox {self.mailbox} --host {_relay_name['relay']} --cafile {CAFILE}")

    def login_smtp(self) -> tuple[int, str]:
        t = _probe(self.host, self.mailbox, self.password, [self.mailbox])
        return _reply(t, "auth")

    def cleanup(self) -> None:
        self.lab.first("auth").run(
            f"ldapdelete -Q -Y EXTERNAL -H ldapi:/// {shlex.quote(self.dn)}")
        self.host.run(f"rm -rf {self.dir}")


_GET = ("import sys, urllib.request; "
        "open(sys.argv[2], 'wb').write(urllib.request.urlopen(sys.argv[1], timeout=20).read())")


@pytest.fixture(scope="module", autouse=True)
def _relay(lab):
    _relay_name["relay"] = lab.vars["groups"]["relay"][0]


# ------------------------------------------------------------------ CA-04: mail stops
@pytest.mark.req("CA-04")
def test_mailbox_without_certificate_is_refused_at_rcpt(lab, evidence):
    """A directory entry without a certificate gets no mail; an enrolled one does."""
    t = Throwaway(lab, "nocert")
    enrolled = lab.lab_participants()[1]["mailbox"]
    auth = lab.first("auth")
    entry = (f"dn: {t.dn}\nobjectClass: inetOrgPerson\nuid: {t.number}\ncn: Verify nocert\n"
             f"sn: Verify nocert\nmail: {t.mailbox}\n")
    auth.run_expect([0], f"printf {shlex.quote(entry)} | ldapadd -Q -Y EXTERNAL -H ldapi:///")
    try:
        refused = _rcpt(lab, t.mailbox)
        accepted = _rcpt(lab, enrolled)
    finally:
        t.cleanup()
    evidence(f"RCPT {t.mailbox} (entry, no certificate): {refused}; "
             f"RCPT {enrolled} (enrolled): {accepted}")
    assert accepted[0] == 250
    assert refused[0] == 550


@pytest.mark.req("CA-04")
def test_rcpt_refused_when_ca_revoke_playbook_ends(lab, evidence):
    """Enrol a throw-away participant: RCPT accepted. Run playbooks/ca-revoke.yml: the moment
    it returns, RCPT to that participant is refused (no waiting here: the playbook itself
    waits until the directory dropped the certificate)."""
    t = Throwaway(lab, "revoke")
    try:
        t.enrol()
        before = _rcpt(lab, t.mailbox)
        run = lab.playbook("playbooks/ca-revoke.yml", "-e", f"ca_revoke_mailbox={t.mailbox}",
                           "-e", "ca_revoke_reason=key-compromise",
                           "-e", "ca_revoke_operator=verify")
        after = _rcpt(lab, t.mailbox)
    finally:
        t.cleanup()
    evidence(f"{t.mailbox}: RCPT before revocation {before}; ca-revoke.yml rc={run.returncode}; "
             f"RCPT right after {after}")
    assert before[0] == 250, before
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
    assert after[0] == 550, after


@pytest.mark.req("CA-04")
def test_expiry_report_lists_every_participant(lab, evidence):
    """The deployed expiry report: each lab participant with its certificate's end; with a
    warning period longer than any certificate, every one is due (exit 3)."""
    relay = lab.first("relay")
    relay.run_test("systemctl start safemail-cert-expiry.service")
    doc = json.loads(relay.check_output("cat /var/log/safemail/cert-expiry.json"))
    by_mailbox = {c["mailbox"]: c for c in doc["certificates"]}
    wide = relay.run("/opt/safemail/venv/bin/python -m safemail.ops.certexpiry --config "
                     "/etc/safemail/cert-expiry.json --status-file /tmp/verify-expiry.json "
                     "--warn-days 100000 --no-syslog")
    wide_doc = json.loads(relay.check_output("cat /tmp/verify-expiry.json"))
    relay.run("rm -f /tmp/verify-expiry.json")
    timer = relay.service("safemail-cert-expiry.timer")
    rows = []
    for p in lab.lab_participants():
        held = x509.load_pem_x509_certificate(lab(p["lab_host"]).file(f"{PDIR}/cert.pem").content)
        row = by_mailbox.get(p["mailbox"], {})
        rows.append((p["mailbox"], row.get("state"), row.get("not_after"),
                     held.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")))
    evidence(f"report (warn {doc['warn_days']} d): {rows}; --warn-days 100000: rc={wide.rc} "
             f"attention={wide_doc['attention']}; timer enabled={timer.is_enabled}")
    assert timer.is_enabled
    for mailbox, state, reported, held_end in rows:
        assert state in ("ok", "expiring"), (mailbox, state)
        assert reported == held_end, mailbox
    assert wide.rc == 3
    assert {c["mailbox"] for c in wide_doc["certificates"] if c["state"] == "expiring"} >= {
        p["mailbox"] for p in lab.lab_participants()}


# ------------------------------------------------------------------ MAIL-01: offboarding
@pytest.mark.req("MAIL-01")
def test_participant_remove_refuses_an_unknown_participant(lab, evidence):
    run = lab.playbook("playbooks/participant-remove.yml", "-e",
                       "participant_remove_number=999999999999", "-e",
                       "participant_remove_operator=verify", timeout=600)
    out = run.stdout + run.stderr
    evidence(f"rc={run.returncode}; {out[out.find('has no directory'):][:200]!r}")
    assert run.returncode != 0
    assert "999999999999 has no directory entry" in out


@pytest.mark.req("MAIL-01")
def test_participant_remove_refuses_a_participant_the_inventory_lists(lab, evidence):
    number = str(lab.lab_participants()[0]["number"])
    run = lab.playbook("playbooks/participant-remove.yml", "-e",
                       f"participant_remove_number={number}", "-e",
                       "participant_remove_operator=verify", "--check", timeout=600)
    out = run.stdout + run.stderr
    found = out.find("still in safemail_participants")
    evidence(f"rc={run.returncode}; {out[max(found - 40, 0):][:200]!r}")
    assert run.returncode != 0
    assert "still in safemail_participants" in out


@pytest.mark.req("MAIL-01", "CA-04", "STORE-03")
def test_participant_remove_end_to_end(lab, evidence):
    """A throw-away participant, enrolled, with a delivered mail. --check changes nothing;
    the real run: login (IMAP, SMTP AUTH) fails, RCPT refused, certificate on the CRL,
    mailbox marked for deletion and deleted by the deployed purge in a copy moved past the
    keeping period, the report names it all."""
    t = Throwaway(lab, "remove")
    store = lab.first("store")
    sender_host, sender, sender_pw = _sender(lab)
    local, _, domain = t.mailbox.partition("@")
    purge_cfg = json.loads(store.check_output("cat /etc/safemail/mailbox-purge.json"))
    home = f"{purge_cfg['mail_root']}/{domain}/{local}"
    marker = f"{purge_cfg['mail_root']}/.safemail-removed/{t.mailbox}.json"
    copy = f"/tmp/verify-purge-{t.number}"
    reports = project_root() / "reports" / "participants" / t.number
    try:
        t.enrol()
        serial = t.serial()
        body = f"/tmp/verify-life-body-{t.number}"
        sender_host.run_test(f"echo 'lifecycle test' > {body}")
        sent = sender_host.run(
            f"SAFEMAIL_PASSWORD={shlex.quote(sender_pw)} {SAFEMAIL} participant send "
            f"--from {sender} --to {t.mailbox} --subject 'verify lifecycle' --body-file {body} "
            f"--directory {lab.dist_url('')} --smime-ca {PDIR}/ca.pem "
            f"--host {_relay_name['relay']} --cafile {CAFILE}")
        sender_host.run(f"rm -f {body}")
        assert sent.rc == 0, sent.stderr
        assert wait_for(lambda: store.run(f"ls {home}/Maildir/new").stdout.strip(), 90), (
            f"nothing delivered to {home}")
        login_before, smtp_before, rcpt_before = t.login_imap(), t.login_smtp(), _rcpt(
            lab, t.mailbox)

        args = ("playbooks/participant-remove.yml", "-e", f"participant_remove_number={t.number}",
                "-e", "participant_remove_operator=verify")
        check = lab.playbook(*args, "--check")
        after_check = (_directory_has_cert(lab, t.dn), _rcpt(lab, t.mailbox),
                       store.file(marker).exists)
        run = lab.playbook(*args)
        login_after, smtp_after, rcpt_after = t.login_imap(), t.login_smtp(), _rcpt(
            lab, t.mailbox)
        entry_after = _directory_has_cert(lab, t.dn)
        crl_get = t.host.run(f"python3 -c {shlex.quote(_GET)} "
                             f"{shlex.quote(lab.dist_url('crl.pem'))} {t.dir}/crl.pem")
        crl = x509.load_pem_x509_crl(t.host.file(f"{t.dir}/crl.pem").content)
        marker_doc = json.loads(store.check_output(f"cat {shlex.quote(marker)}"))
        report = json.loads((reports / "removal.json").read_text())

        # The keeping period, moved forward in a copy: the deployed purge with the deployed
        # settings on a copy of the real marker and mailbox.
        store.run_test(f"rm -rf {copy} && mkdir -p {copy}/{domain} {copy}/.safemail-removed "
                       f"&& cp -a {home} {copy}/{domain}/ && cp -a {shlex.quote(marker)} "
                       f"{copy}/.safemail-removed/")
        removed = dt.datetime.fromisoformat(marker_doc["removed_at"].replace("Z", "+00:00"))
        keep = dt.timedelta(days=purge_cfg["keep_days"])
        purge = ("/usr/bin/python3 /usr/local/sbin/safemail-mailbox-purge --config "
                 f"/etc/safemail/mailbox-purge.json --mail-root {copy} --no-syslog --now ")
        early = store.run(purge + (removed + keep - dt.timedelta(hours=1)).isoformat())
        kept_early = store.file(f"{copy}/{domain}/{local}").exists
        late = store.run(purge + (removed + keep + dt.timedelta(hours=1)).isoformat())
        gone_late = not store.file(f"{copy}/{domain}/{local}").exists
        timer = store.service("safemail-mailbox-purge.timer")
    finally:
        t.cleanup()
        store.run(f"rm -rf {copy} {shlex.quote(home)} {shlex.quote(marker)}")
        subprocess.run(["rm", "-rf", str(reports)], check=False)
    evidence(
        f"{t.mailbox}: before: IMAP rc={login_before.rc}, AUTH {smtp_before}, RCPT {rcpt_before}; "
        f"--check rc={check.returncode}, then cert={after_check[0]} RCPT={after_check[1]} "
        f"marker={after_check[2]}; participant-remove.yml rc={run.returncode}; after: IMAP "
        f"rc={login_after.rc} {login_after.stderr.strip()[-100:]!r}, AUTH {smtp_after}, RCPT "
        f"{rcpt_after}, entry={entry_after}, CRL lists {serial:x}: "
        f"{crl.get_revoked_certificate_by_serial_number(serial) is not None}; purge "
        f"{purge_cfg['keep_days']} d: 1 h early rc={early.rc} kept={kept_early}, 1 h late "
        f"rc={late.rc} gone={gone_late}; report revoked {report.get('certificates_revoked')}")
    assert login_before.rc == 0 and smtp_before[0] == 235 and rcpt_before[0] == 250
    assert check.returncode == 0, check.stdout[-3000:]
    assert after_check[0] is True and after_check[1][0] == 250 and after_check[2] is False
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
    assert login_after.rc != 0
    assert smtp_after[0] == 535
    assert rcpt_after[0] == 550
    assert entry_after is None
    assert crl_get.rc == 0
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert early.rc == 0 and kept_early
    assert late.rc == 0 and gone_late
    assert timer.is_enabled
    assert serial in [int(str(s), 16) for s in report["certificates_revoked"]]
    assert report["mailbox"] == t.mailbox and report["mailbox_deletion"]


# ------------------------------------------------------------------ MAIL-04: the notice
@pytest.mark.req("MAIL-04")
@pytest.mark.read_only
def test_enrolment_notice_exists_with_the_warning(lab, evidence, participant_host):
    [p] = [p for p in lab.lab_participants() if p["lab_host"] == participant_host]
    kept = project_root() / "reports" / "participants" / str(p["number"]) / "enrolment-notice.txt"
    text = kept.read_text(encoding="utf-8") if kept.is_file() else ""
    copy = lab(participant_host).file(f"{PDIR}/enrolment-notice.txt")
    given = copy.content_string if copy.exists else ""
    missing = [w for w in NOTICE_WARNING if w not in text]
    evidence(f"{kept}: {'present' if text else 'MISSING'}, mode "
             f"{oct(kept.stat().st_mode & 0o777) if text else '-'}; warning lines missing: "
             f"{missing}; {participant_host}:{PDIR}/enrolment-notice.txt "
             f"{'identical' if given == text else 'DIFFERENT or missing'}")
    assert text, f"no enrolment notice kept for participant {p['number']}"
    assert not missing
    assert p["mailbox"] in text and str(p["number"]) in text
    assert kept.stat().st_mode & 0o077 == 0
    assert given == text


# ------------------------------------------------------------------ STORE-03: retention
_LOGROTATE = {"relay": ("/etc/logrotate.d/safemail-mail", "mailrelay_log_retention_days"),
              "store": ("/etc/logrotate.d/safemail-mailstore", "mailstore_log_retention_days")}


def _configured_days(host, var: str) -> int:
    """The retention the inventory sets for the host (the role default, 7, otherwise)."""
    return int(host.ansible.get_variables().get(var, 7))


def _kind(lab: Lab, name: str) -> str:
    return "relay" if name in lab.vars["groups"]["relay"] else "store"


def _blocks(text: str) -> dict[str, dict[str, str]]:
    """logrotate stanzas: {log path: {directive: argument}} (comments and scripts skipped)."""
    blocks: dict[str, dict[str, str]] = {}
    current = None
    script = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if script:
            script = line != "endscript"
            continue
        if line.endswith("{"):
            current = blocks.setdefault(line[:-1].strip(), {})
        elif line == "}":
            current = None
        elif current is not None:
            key, _, arg = line.partition(" ")
            script = key in ("prerotate", "postrotate", "firstaction", "lastaction")
            current[key] = arg.strip()
    return blocks


@pytest.mark.req("STORE-03")
@pytest.mark.read_only
def test_deployed_log_retention_matches_the_setting(lab, evidence, mail_host):
    host = lab(mail_host)
    path, var = _LOGROTATE[_kind(lab, mail_host)]
    days = _configured_days(host, var)
    blocks = _blocks(host.file(path).content_string)
    debug = host.run("logrotate --debug /etc/logrotate.conf 2>&1")
    timer = host.service("logrotate.timer")
    found = {p: (b.get("rotate"), b.get("maxage"), "ifempty" in b and "daily" in b)
             for p, b in blocks.items()}
    evidence(f"{path}: {found}; setting {var}={days}; logrotate.timer "
             f"enabled={timer.is_enabled} active={timer.is_running}")
    assert blocks, f"{path} has no log stanza"
    assert 1 <= days <= 31
    for log, (rotate, maxage, every_day) in found.items():
        assert rotate == str(days) and maxage == str(days) and every_day, log
        assert log.startswith("/var/log/safemail/"), log
        assert log in debug.stdout, f"{log} not in logrotate's own run"
    assert timer.is_enabled


@pytest.mark.req("STORE-03")
def test_rotation_deletes_logs_past_retention(lab, evidence, mail_host):
    """The deployed rotation config, pointed at a copy whose rotated files were moved past the
    configured limit (file times set back; nothing waits): old content gone, young kept."""
    host = lab(mail_host)
    path, var = _LOGROTATE[_kind(lab, mail_host)]
    blocks = _blocks(host.file(path).content_string)
    days = _configured_days(host, var)
    tag = uuid.uuid4().hex[:8]
    d = f"/tmp/verify-rotate-{tag}"
    setup = [f"mkdir -m 0700 {d}"]
    for log in blocks:
        name = log.rsplit("/", 1)[1]
        setup += [
            f"echo current-{tag} > {d}/{name}",
            # logrotate deletes a rotated file older than maxage days (to the second): one an
            # hour younger than the limit stays, one an hour older goes. Both hold only when
            # the deployed limit is the configured one (measured with logrotate 3.21).
            f"echo young-{tag} > {d}/{name}.1",
            f"touch -d @$(( $(date +%s) - {days * 86400 - 3600} )) {d}/{name}.1",
            f"echo old-{tag} | gzip > {d}/{name}.2.gz",
            f"touch -d @$(( $(date +%s) - {days * 86400 + 3600} )) {d}/{name}.2.gz",
        ]
    # The deployed file with the log directory replaced by the copy; the prerotate command
    # (the accounting collect) is dropped: it reads the real log, not the copy.
    conf = host.file(path).content_string
    for log in blocks:
        conf = conf.replace(log, f"{d}/{log.rsplit('/', 1)[1]}")
    lines, skip = [], False
    for line in conf.splitlines():
        if line.strip() == "prerotate":
            skip = True
        if not skip:
            lines.append(line)
        if line.strip() == "endscript":
            skip = False
    host.run_test(" && ".join(setup))
    _put(host, f"{d}/logrotate.conf", ("\n".join(lines) + "\n").encode())
    host.run_test(f"chmod 0644 {d}/logrotate.conf")
    run = host.run(f"logrotate -f -s {d}/state {d}/logrotate.conf")
    listing = host.run(f"ls -l --time-style=+%F {d}").stdout
    contents = host.run(f"cd {d} && for f in *; do case $f in *.gz) zcat $f;; state|*.conf) ;; "
                        f"*) cat $f;; esac; done").stdout
    host.run(f"rm -rf {d}")
    evidence(f"{path} on a copy, {var}={days}: rc={run.rc} {run.stderr.strip()[-200:]!r}; "
             f"after: {listing!r}")
    assert run.rc == 0
    assert f"young-{tag}" in contents and f"current-{tag}" in contents
    assert f"old-{tag}" not in contents


@pytest.mark.req("STORE-03")
def test_distribution_point_logs_no_request(lab, evidence):
    """A certificate request to ca-dist (200) leaves no line with its marker in the unit's
    journal: no client address + mailbox on the plain disk."""
    host, _, _ = _sender(lab)
    dist = lab.first("ca_dist")
    mailbox = lab.lab_participants()[1]["mailbox"]
    marker = f"verify-{uuid.uuid4().hex}"
    url = lab.dist_url(f"certs/{mailbox}.pem?{marker}")
    # Only what the unit logged from this request on: an access line an earlier run left in
    # the journal (a mutation's, say) is not this run's.
    since = dist.check_output("date '+%Y-%m-%d %H:%M:%S'")
    got = host.run(f"python3 -c {shlex.quote(_GET)} {shlex.quote(url)} /dev/null")
    time.sleep(2)
    journal = dist.run(f"journalctl -u safemail-ca-http.service --since '{since}' "
                       "--no-pager -o cat")
    setting = dist.run("systemctl show -p StandardError -p StandardOutput "
                       "safemail-ca-http.service").stdout.split()
    evidence(f"GET {url}: rc={got.rc}; journal rc={journal.rc}, lines with the marker: "
             f"{[line for line in journal.stdout.splitlines() if marker in line]}; {setting}")
    assert got.rc == 0, got.stderr
    assert journal.rc == 0
    assert marker not in journal.stdout
    host_addr = host.ansible.get_variables().get("safemail_address", "")
    assert not host_addr or f"{host_addr} - -" not in journal.stdout


@pytest.mark.req("STORE-03")
def test_mailbox_purge_deletes_after_the_keeping_period(lab, evidence):
    """The deployed purge with the deployed settings, on a copy: a removed mailbox (marker
    and Maildir) an hour before its keeping period ends stays, an hour after it is gone, as
    `--now` moves the copy forward. The settings hold the configured period; the timer runs."""
    store = lab.first("store")
    configured = int(store.ansible.get_variables().get("mailstore_removed_retention_days", 90))
    cfg = json.loads(store.check_output("cat /etc/safemail/mailbox-purge.json"))
    tag = uuid.uuid4().hex[:10]
    mailbox = f"verify-purge-{tag}@{lab.domain}"
    root = f"/tmp/verify-purge-{tag}"
    home = f"{root}/{lab.domain}/verify-purge-{tag}"
    removed = dt.datetime.now(dt.UTC).replace(microsecond=0)
    marker = json.dumps({"mailbox": mailbox, "removed_at": removed.strftime("%Y-%m-%dT%H:%M:%SZ")})
    store.run_test(f"mkdir -p -m 0700 {home}/Maildir/new {root}/.safemail-removed && "
                   f"echo x > {home}/Maildir/new/1 && "
                   f"printf %s {shlex.quote(marker)} > {root}/.safemail-removed/{mailbox}.json")
    keep = dt.timedelta(days=cfg["keep_days"])
    purge = ("/usr/bin/python3 /usr/local/sbin/safemail-mailbox-purge --config "
             f"/etc/safemail/mailbox-purge.json --mail-root {root} --no-syslog --now ")
    early = store.run(purge + (removed + keep - dt.timedelta(hours=1)).isoformat())
    kept = store.file(home).exists
    late = store.run(purge + (removed + keep + dt.timedelta(hours=1)).isoformat())
    gone = not store.file(home).exists and not store.file(
        f"{root}/.safemail-removed/{mailbox}.json").exists
    store.run(f"rm -rf {root}")
    timer = store.service("safemail-mailbox-purge.timer")
    evidence(f"keep_days deployed {cfg['keep_days']}, configured {configured}; 1 h early: "
             f"rc={early.rc} {early.stdout.strip()!r} kept={kept}; 1 h late: rc={late.rc} "
             f"{late.stdout.strip()!r} gone={gone}; timer enabled={timer.is_enabled}")
    assert cfg["keep_days"] == configured
    assert early.rc == 0 and kept
    assert late.rc == 0 and gone
    assert timer.is_enabled


@pytest.mark.req("STORE-03")
def test_directory_logs_no_request(lab, evidence):
    """A search by the relay's account (StartTLS, as the relay's lookups) for a marked mailbox
    answers, and leaves no line with the marker in slapd's journal (plain disk)."""
    auth = lab.first("auth")
    marker = f"verify-{uuid.uuid4().hex}"
    bind = f"cn=relay,ou=services,{_suffix(lab)}"
    search = auth.run(
        f"LDAPTLS_CACERT={CAFILE} LDAPTLS_REQCERT=demand ldapsearch -x -ZZ -LLL "
        f"-H {shlex.quote(lab.vars['safemail_ldap_uri'])} "
        f"-D {shlex.quote(bind)} -w {shlex.quote(lab.vars['safemail_ldap_relay_password'])} "
        f"-b {shlex.quote('ou=participants,' + _suffix(lab))} "
        f"'(mail={marker}@{lab.domain})' mail")
    time.sleep(2)
    journal = auth.run("journalctl -u slapd.service --since '10 min ago' --no-pager -o cat")
    evidence(f"search rc={search.rc}; journal rc={journal.rc}, lines with the marker: "
             f"{[line for line in journal.stdout.splitlines() if marker in line]}")
    assert search.rc == 0, search.stderr
    assert journal.rc == 0
    assert marker not in journal.stdout
