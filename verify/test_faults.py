"""AV-02 (and AV-01's "nothing lost"): at least 1,000 S/MIME mails under faults, one at a time.

Opt-in, like the restore test of test_availability.py: the test exists only when
``SAFEMAIL_FAULTS=1`` is set, so a default run neither runs nor skips it (a skipped test would
make AV-02 "untested" in the report; AV-02's other tests in test_redundancy.py prove it on a
default run of the redundant stage)::

    SAFEMAIL_FAULTS=1 safemail verify --stage test --requirements AV-02

It needs the redundant stage (`safemail lab up --redundant`: marker ``redundant_stage``).

What it does, with the hosts of the redundant lab:

1. practice1 -> practice2 and practice2 -> practice1 send through the relays' service name
   (``safemail_relay_service``), each at least half of SAFEMAIL_FAULTS_MAILS (default 1000)
   real S/MIME mails (encrypted on the participant host with the recipient's certificate from
   the distribution point, as ``safemail participant send``), paced over the run, one SMTP
   session per batch; what is not accepted is tried again (verify/faultload.py).
2. Meanwhile, one at a time, each followed by a settle time:
   - the store's volume is locked (``safemail-storage lock``) for LOCK_SECONDS, then unlocked;
   - the relay holding the service address is powered off: QMP ``stop`` on its QEMU VM (the
     vCPUs halt at once: no shutdown, no more packets, as when the power goes), kept off
     OFF_SECONDS, then powered on: QMP ``system_reset`` + ``cont`` (a cold boot: what was in
     the guest's memory and not on its disk is gone, its encrypted volume must come back by
     the boot unlock path, its queue from the disk). ``stop``/``cont`` alone would be a freeze
     (memory, page cache, TCP state kept; the guest clock behind): not a power loss.
     ``system_powerdown``/``quit`` end the QEMU process, and the lab has no per-host start
     (``start_qemu`` re-creates the root disk from the image), so a real process end could not
     be undone;
   - slapd on the directory provider is stopped for DIRECTORY_SECONDS, then started;
   - the S/MIME gate on the relay then holding the address is restarted.
3. Then every mail must be in its recipient's mailbox exactly once (Message-IDs of the
   message files in the store's Maildirs), none lost, none elsewhere, every stored copy S/MIME
   enveloped, and the body marker (in clear or base64) nowhere on the relays or the store
   (queue, mailboxes, logs, journal; a canary file with the marker proves each scan can find
   it). Failover time (power-off to the address on the other relay), each fault's longest
   time without an accepted mail and the delivery delay (first attempt -> in the mailbox;
   median, p95, max) go to the evidence and to ``faults-av02.json`` beside the JUnit XML (the
   run's report directory under ``safemail verify``).

Bounded: SAFEMAIL_FAULTS_MINUTES (default 20) for the whole run; past it the senders stop,
the faults are undone and the test fails naming the phase. Every fault is undone in a
``finally`` (relay powered on, slapd started, volume unlocked, gate started).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import socket
import time
import uuid
from pathlib import Path

import pytest
from faultload import (
    Deadline,
    TimeLimitReached,
    acceptance_gap,
    account,
    delay_stats,
    marker_needles,
    parse_maildir_lines,
    parse_sender_file,
    queued_since,
    shift,
    shift_mail,
)
from stagegroups import groups as _groups
from stagegroups import holders as _holders
from stagegroups import host as _host

from safemail.lab.machines import qmp as _qmp

FAULTS_ENV = "SAFEMAIL_FAULTS"
MAILS = int(os.environ.get("SAFEMAIL_FAULTS_MAILS", "1000"))
MINUTES = float(os.environ.get("SAFEMAIL_FAULTS_MINUTES", "20"))
LOCK_SECONDS = 60
OFF_SECONDS = 60
DIRECTORY_SECONDS = 60
SETTLE_SECONDS = 20
FAILOVER_SECONDS = 30
BOOT_SECONDS = 300  # TCG VM: SSH after 24-32 s, then the boot unlock and the services
PLANNED_SECONDS = 420  # the sum of the faults and settle times above, roughly: the pace
PDIR = "/var/lib/safemail-participant"
CAFILE = "/etc/safemail/tls/ca.crt"
SAFEMAIL = "/opt/safemail/venv/bin/safemail"
VENV_PYTHON = "/opt/safemail/venv/bin/python"
STORAGE = "/usr/local/sbin/safemail-storage"
CHECK = "/usr/local/sbin/safemail-relay-vrrp-check"
GATE = "safemail-smime-gate.service"
MAIL_ROOT = "/var/mail/vmail"
WORK = "/tmp/safemail-faults"
# Where mail or its traces live on each kind of host (roles/mailrelay, roles/mailstore); the
# scan's canary goes to CANARY_DIR (scanned), its pattern file to NEEDLES_DIR (not scanned).
CANARY_DIR = "/var/tmp"
NEEDLES_DIR = "/run"
SCAN = {"relay": ["/var/spool/postfix", "/var/log", "/var/lib/postfix", "/tmp", "/var/tmp"],
        "store": [MAIL_ROOT, "/var/log", "/tmp", "/var/tmp"]}




def _qmp_socket(host: str) -> Path:
    from safemail.lab.config import LabPaths

    return LabPaths.default().machines / host / "qmp.sock"


def _put(host, path: str, data: bytes, mode: str = "0600") -> None:
    b64 = base64.b64encode(data).decode()
    host.run_test(f"echo {b64} | base64 -d > {path} && chmod {mode} {path}")


def _clock_offset(host) -> float:
    """host clock - controller clock (seconds), from one `date` round trip."""
    before = time.time()
    remote = float(host.check_output("date +%s.%N"))
    after = time.time()
    return remote - (before + after) / 2


class Faults:
    """What the test broke, so that the finally undoes exactly that."""

    def __init__(self) -> None:
        self.frozen: str | None = None
        self.slapd_stopped = False
        self.store_locked = False
        self.gate_stopped: str | None = None
        self.windows: list[dict] = []


@pytest.mark.req("AV-02")
@pytest.mark.redundant_stage
@pytest.mark.lab_participants
@pytest.mark.disruptive
@pytest.mark.stage_hosts("relay", "auth", "store", also=("participants", "ca_dist"))
def _faulted_test(request, evidence):
    config = request.config
    deadline = Deadline(MINUTES * 60)

    def phase(name: str) -> None:
        # Where the run's time goes (a run that hit its limit says in which step).
        evidence(f"phase: {name} at {deadline.elapsed():.0f} s")

    groups = _groups(config)
    relays = {n: _host(config, n) for n in groups["relay"]}
    provider = _host(config, groups["auth"][0])  # the wiring's provider: the first auth host
    store_name = groups["store"][0]
    store = _host(config, store_name)
    hv = store.ansible.get_variables()
    service = hv["safemail_relay_service"]
    people = [e for e in hv["safemail_participants"] if e.get("lab_host")][:2]
    assert len(people) == 2, "the lab needs two participants with a lab_host"
    dist_host = _host(config, groups["ca_dist"][0])
    dist = f"http://{dist_host.ansible.get_variables()['safemail_address']}/"
    for name in relays:
        sock = _qmp_socket(name)
        assert sock.is_socket(), (f"{name} has no QMP socket at {sock}: the power-off fault "
                                  "needs the relays as QEMU VMs of `safemail lab up --redundant`")
        assert relays[name].run(CHECK).rc == 0, f"{name} is not healthy before the faults"
    assert len(_holders(relays, service["address"])) == 1, "no single holder of the address"
    phase("hosts checked")

    # Each relay's clock at the start: queue entries from then on are the run's (postqueue -j).
    relay_start = {n: float(h.check_output("date +%s")) - 1 for n, h in relays.items()}
    run = uuid.uuid4().hex[:10]
    tag, marker = f"fault-{run}", f"FAULTBODY-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"
    needles = marker_needles(marker)
    quota = -(-MAILS // 2)
    senders: list[dict] = []
    faults = Faults()
    late = ""
    try:
        for me, other in ((people[0], people[1]), (people[1], people[0])):
            cfg = {"sender": me["mailbox"], "recipient": other["mailbox"],
                   "host": service["name"], "port": 587, "cafile": CAFILE, "tag": tag,
                   "marker": marker, "domain": hv["safemail_mail_domain"], "quota": quota,
                   "max": 2 * quota, "rate": quota / PLANNED_SECONDS, "batch_seconds": 5,
                   "batch_max": 50, "seconds": deadline.remaining() - 60}
            password = hv["safemail_participant_passwords"][str(me["number"])]
            senders.append(_start_sender(_host(config, me["lab_host"]), me["lab_host"], cfg,
                                         password, dist))
        phase("senders started")
        deadline.check("the first minute of sending")
        time.sleep(SETTLE_SECONDS)
        _run_faults(relays, provider, store, service, faults, deadline, evidence)
        phase("faults done")
        for s in senders:
            s["host"].run(f"touch {WORK}/stop")
        for s in senders:
            done = deadline.wait_for(lambda s=s: s["host"].run(f"test -e {WORK}/result.json")
                                     .rc == 0, deadline.remaining(), "the end of sending", 5)
            assert done is not None, f"the sender on {s['name']} did not finish"
        phase("sending ended")
        sent = []
        for s in senders:
            doc = json.loads(s["host"].check_output(f"cat {WORK}/result.json"))
            evidence(f"sender {s['name']}: {doc['status']}, {len(doc['messages'])} mails; "
                     f"last log lines {doc['log'][-3:]}")
            assert doc["status"] == "done", f"sender on {s['name']} ended with {doc['status']}"
            sent += shift_mail(parse_sender_file(doc), s["offset"])
        _put(store, f"{WORK}-faultload.py",
             Path(__file__).with_name("faultload.py").read_bytes())
        store_offset = _clock_offset(store)

        def listing():
            out = store.check_output(f"python3 {WORK}-faultload.py maildir {MAIL_ROOT} {tag}")
            return shift(parse_maildir_lines(out, MAIL_ROOT), store_offset)

        def all_in() -> bool:
            got = {c.message_id for c in listing()}
            queued = sum(queued_since(r.run("postqueue -j").stdout, relay_start[n])
                         for n, r in relays.items())
            return got >= {m.message_id for m in sent} and queued == 0

        try:
            waited = deadline.wait_for(all_in, deadline.remaining(), "the wait for delivery",
                                       10)
        except TimeLimitReached as exc:
            waited, late = None, str(exc)  # count what arrived: the lost mails are the news
        phase("delivery waited for")
        result = account(sent, listing())
        scanned = {**{n: ("relay", h) for n, h in relays.items()}, store_name: ("store", store)}
        hits, canaries = _plaintext_scan(scanned, needles, marker)
    finally:
        for s in senders:
            s["host"].run(f"kill {s['pid']} 2>/dev/null; touch {WORK}/stop")
        _undo(relays, provider, store, faults, evidence)
        store.run(f"rm -f {WORK}-faultload.py")
    delays, after_250 = delay_stats(result.delays), delay_stats(result.delays_after_250)
    figures = {
        "run": tag, "mails_sent": result.sent, "accepted": result.accepted,
        "delivered_once": result.delivered_once, "lost": len(result.lost),
        "lost_after_250": len(result.lost_after_250), "duplicates": len(result.duplicates),
        "misdelivered": len(result.misdelivered), "not_smime": len(result.not_smime),
        "plaintext_hits": hits, "delay_first_try_to_mailbox_s": delays,
        "delay_250_to_mailbox_s": after_250, "faults": faults.windows,
        "minutes": round(deadline.elapsed() / 60, 1), "limit_minutes": MINUTES,
        "delivery_wait_s": None if waited is None else round(waited, 1),
        "clock_offsets_s": {**{s["name"]: round(s["offset"], 3) for s in senders},
                            store_name: round(store_offset, 3)},
    }
    figures["failover_s"] = [w["failover_s"] for w in faults.windows if "failover_s" in w]
    accepted = sorted(t for m in sent if (t := m.accepted_at) is not None)
    for w in faults.windows:
        w["longest_without_acceptance_s"] = round(
            acceptance_gap(accepted, w["start"], w["end"] + SETTLE_SECONDS), 1)
        w["mails_tried_during"] = sum(
            1 for m in sent if any(w["start"] <= a.start <= w["end"] for a in m.attempts))
        # The check below counts the settle time too: a gate restart may take only seconds.
        w["mails_tried_during_or_settle"] = sum(
            1 for m in sent
            if any(w["start"] <= a.start <= w["end"] + SETTLE_SECONDS for a in m.attempts))
    evidence("fault run: " + json.dumps(figures))
    xml = getattr(config.option, "xmlpath", None)
    if xml:
        path = Path(xml).resolve().parent / "faults-av02.json"
        path.write_text(json.dumps(figures, indent=2) + "\n")
        evidence(f"figures written to {path}")
    assert canaries == [], f"the plaintext scan could not find its canary on {canaries}"
    assert hits == {}, f"the body marker is in clear or base64 on {hits}"
    assert result.sent >= MAILS, f"only {result.sent} mails sent (wanted {MAILS})"
    assert all(w["mails_tried_during_or_settle"] for w in faults.windows), (
        f"no mail was tried during a fault: {faults.windows}")
    assert result.ok, "; ".join(result.problems())
    assert not late, late


def _start_sender(h, name: str, cfg: dict, password: str, dist: str) -> dict:
    """Fetch the recipient's certificate on the participant host (distribution point, checked
    against the SafeMail CA), put faultload.py and its configuration there and start it in
    the background; its pid and the host's clock offset."""
    cert = h.run(f"{SAFEMAIL} participant lookup --mailbox {cfg['recipient']} "
                 f"--directory {dist} --smime-ca {PDIR}/ca.pem")
    assert cert.rc == 0, f"lookup of {cfg['recipient']} on {name}: {cert.stderr}"
    h.run_test(f"rm -rf {WORK} && mkdir -m 0700 {WORK}")
    _put(h, f"{WORK}/faultload.py", Path(__file__).with_name("faultload.py").read_bytes())
    _put(h, f"{WORK}/rcpt.pem", cert.stdout.encode())
    cfg = {**cfg, "cert": f"{WORK}/rcpt.pem", "stop_file": f"{WORK}/stop",
           "out": f"{WORK}/result.json"}
    _put(h, f"{WORK}/config.json", json.dumps(cfg).encode())
    # Only the sender goes to the background, with every stream redirected: with the `&`
    # after the whole `cd && ...` list, a subshell holding the SSH session's output waited for
    # the sender, so this call returned only when the sender ended (the first run of the
    # test spent its whole time limit here, before the first fault).
    pid = h.check_output(
        f"cd {WORK} && {{ SAFEMAIL_PASSWORD={shlex.quote(password)} setsid nohup {VENV_PYTHON} "
        f"{WORK}/faultload.py send {WORK}/config.json > {WORK}/sender.log 2>&1 < /dev/null "
        "& echo $!; }")
    return {"host": h, "name": name, "pid": pid.strip(), "offset": _clock_offset(h)}


def _run_faults(relays, provider, store, service, faults: Faults, deadline: Deadline,
                evidence) -> None:
    address = service["address"]

    def window(name: str, start: float, **extra) -> None:
        faults.windows.append({"fault": name, "start": start, "end": time.time(),
                               "ended_at_run_s": round(deadline.elapsed(), 1), **extra})
        evidence(f"fault {name}: {json.dumps(faults.windows[-1])}")
        time.sleep(SETTLE_SECONDS)

    # 1. The store's volume locked for a minute: the relay defers, delivers after the unlock.
    start = time.time()
    store.check_output(f"{STORAGE} lock")
    faults.store_locked = True
    closed = store.run("test -e /dev/mapper/safemail-data").rc != 0
    assert closed, "the store's volume is still open after `safemail-storage lock`"
    time.sleep(min(LOCK_SECONDS, deadline.remaining()))
    store.check_output(f"{STORAGE} unlock")
    faults.store_locked = False
    window("store volume locked", start, seconds=LOCK_SECONDS)
    deadline.check("the store lock")

    # 2. The relay holding the address loses power (QMP stop), comes back with a cold boot.
    holders = _holders(relays, address)
    assert len(holders) == 1, f"{address} is held by {holders} before the power-off"
    active = holders[0]
    survivors = {n: h for n, h in relays.items() if n != active}
    boot_before = _boot_id(relays[active])
    start = time.time()
    _qmp(_qmp_socket(active), "stop")
    faults.frozen = active
    took = deadline.wait_for(lambda: _holders(survivors, address), FAILOVER_SECONDS,
                             "the relay power-off", 0.5)
    assert took is not None, f"{address} did not leave the powered-off {active} in " \
                             f"{FAILOVER_SECONDS} s"
    time.sleep(max(0.0, min(OFF_SECONDS - (time.time() - start), deadline.remaining())))
    off_for = time.time() - start
    _power_on(active, relays[active], deadline, "the relay power-on", boot_before)
    faults.frozen = None
    back = time.time() - start
    window("active relay powered off", start, relay=active, failover_s=round(took, 1),
           off_s=round(off_for, 1), healthy_again_after_s=round(back, 1),
           boot_ids=[boot_before, _boot_id(relays[active])],
           holder_after=_holders(relays, address))
    deadline.check("the relay power-off")

    # 3. The directory provider stopped: relays and store read the replica.
    start = time.time()
    provider.check_output("systemctl stop slapd")
    faults.slapd_stopped = True
    time.sleep(min(DIRECTORY_SECONDS, deadline.remaining()))
    provider.check_output("systemctl start slapd")
    faults.slapd_stopped = False
    window("directory provider stopped", start, seconds=DIRECTORY_SECONDS)
    deadline.check("the directory stop")

    # 4. The S/MIME gate restarted on the relay now holding the address.
    holders = _holders(relays, address)
    assert len(holders) == 1, f"{address} is held by {holders} before the gate restart"
    active = holders[0]
    start = time.time()
    faults.gate_stopped = active
    relays[active].check_output(f"systemctl restart {GATE}")
    healthy = deadline.wait_for(lambda: relays[active].run(CHECK).rc == 0, 120,
                                "the gate restart", 1)
    faults.gate_stopped = None
    assert healthy is not None, f"{active}'s health check fails 120 s after the gate restart"
    window("S/MIME gate restarted", start, relay=active, healthy_after_s=round(healthy, 1),
           holder_after=_holders(relays, address))


def _boot_id(host) -> str:
    return host.check_output("cat /proc/sys/kernel/random/boot_id").strip()


def _power_on(name: str, host, deadline: Deadline | None, phase: str,
              boot_before: str | None = None) -> None:
    """Cold boot of a VM stopped with QMP `stop`: reset while stopped, then run; wait until it
    answers on a new boot (boot id changed, when known) and its health check passes."""
    sock = _qmp_socket(name)
    _qmp(sock, "system_reset")
    _qmp(sock, "cont")
    status = _qmp(sock, "query-status")["return"]
    assert status.get("running"), f"{name} does not run after system_reset + cont: {status}"
    address = host.ansible.get_variables()["ansible_host"]

    def healthy() -> bool:
        # Port 22 first, 1 s at most (as test_storage's reboot test): an SSH login to a VM
        # that is still booting waits out its connect timeout. The control master of the old
        # boot dies at its first use (the new kernel resets the connection): one ssh error.
        try:
            socket.create_connection((address, 22), timeout=1).close()
            res = host.run(f"cat /proc/sys/kernel/random/boot_id && {CHECK}")
        except (OSError, RuntimeError):
            return False
        return res.rc == 0 and (boot_before is None or res.stdout.split()[:1] != [boot_before])

    # Undoing after the hard limit gets a bound of its own.
    took = (deadline or Deadline(BOOT_SECONDS + 30)).wait_for(healthy, BOOT_SECONDS, phase, 3)
    assert took is not None, f"{name} not back on a new boot and healthy {BOOT_SECONDS} s " \
                             "after power-on"


def _undo(relays, provider, store, faults: Faults, evidence) -> None:
    """Undo whatever is still broken; each step on its own, so one failure does not keep the
    others from running."""
    steps = []
    if faults.frozen:
        steps.append(("power on " + faults.frozen,
                      lambda: _power_on(faults.frozen, relays[faults.frozen], None, "undo")))
    if faults.slapd_stopped:
        steps.append(("start slapd", lambda: provider.check_output("systemctl start slapd")))
    if faults.store_locked:
        steps.append(("unlock the store", lambda: store.check_output(f"{STORAGE} unlock")))
    if faults.gate_stopped:
        steps.append(("start the gate", lambda: relays[faults.gate_stopped].check_output(
            f"systemctl start {GATE}")))
    for what, step in steps:
        try:
            step()
            evidence(f"undone: {what}")
        except Exception as exc:  # noqa: BLE001 - report and go on with the next step
            evidence(f"UNDO FAILED: {what}: {exc}")


# `rev` is in bsdextrautils, not in every image; python3 is.
REV = ("python3 -c 'import sys\nfor line in sys.stdin: print(line.rstrip(chr(10))[::-1])'")


def _plaintext_scan(hosts: dict, needles: list[str], marker: str):
    """{name: (kind, host)} scanned: hosts (with where) on which a needle is found, and hosts
    whose canary was not found (a scan that cannot see proves nothing)."""
    hits: dict[str, list[str]] = {}
    blind: list[str] = []
    for name, (kind, h) in hosts.items():
        # The pattern file outside every scanned directory; it and the canary (in one that is
        # scanned) travel reversed: a command line with the marker would land in the host's
        # audit and admin logs and be found there.
        patterns = f"{NEEDLES_DIR}/safemail-faults-needles-{uuid.uuid4().hex}"
        canary = f"{CANARY_DIR}/safemail-faults-canary-{uuid.uuid4().hex}"
        _put(h, f"{patterns}.rev", "\n".join(n[::-1] for n in needles).encode())
        h.run_test(f"{REV} < {patterns}.rev > {patterns} && rm {patterns}.rev")
        h.run_test(f"echo {shlex.quote(marker[::-1])} | {REV} > {canary}")
        files = h.run(f"grep -rlaF -D skip -f {patterns} {' '.join(SCAN[kind])}")
        journal = h.run(f"journalctl -q --no-pager -o cat | grep -cF -f {patterns}")
        h.run(f"rm -f {canary} {patterns}")
        listed = files.stdout.split()
        found = [f for f in listed if f != canary]
        if canary not in listed:
            blind.append(name)
        if int(journal.stdout.strip() or 0):
            found.append(f"journal ({journal.stdout.strip()} lines)")
        if found:
            hits[name] = found
    return hits, blind


if os.environ.get(FAULTS_ENV) == "1":
    test_a_thousand_mails_under_faults_each_delivered_once = _faulted_test
