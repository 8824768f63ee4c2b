"""STORE-01, STORE-02: mailboxes, queue and mail logs only on LUKS; nothing lost when locked.

On the relay (Postfix queue, mail logs) and the store (mailboxes, Dovecot's log), each path
must resolve to a bind mount from an open LUKS2 volume (roles/encrypted_storage). A lab mail
with a unique marker proves where its traces land: found by reading the opened (decrypted)
volume, NOT found by the same read of the raw data disk, nor on the plain root filesystem
(seen through a non-recursive bind of /, which shows what lies under the mounts), nor in the
journal.

STORE-02 locks a volume with the documented command (`safemail-storage lock`), shows that the
services do not start while it is locked and that nothing is written to the plain directory
underneath, sends mail meanwhile (store locked: the relay accepts and queues it; relay
locked: the participant's connection is refused, a temporary failure it retries), unlocks and
counts: the mail is there exactly once. A reboot of each VM must bring the volume back by the
boot unlock path with the services started only after the mounts.

These tests lock volumes and reboot VMs: they take a lock file on the controller so that they
never run at the same time as each other (safemail verify runs pytest-xdist workers).

How each was shown to fail: docs/storage.md, "Fault checks".
"""

from __future__ import annotations

import concurrent.futures
import json
import shlex
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import testinfra
from waits import controller_lock, wait_for

from safemail.smime import samples

DEVICE = "/dev/disk/by-id/virtio-safemail-data"
NAME = "safemail-data"
MAPPER = f"/dev/mapper/{NAME}"
HELPER = "/usr/local/sbin/safemail-storage"
# What must live on the volume, per host group (audit report 2.6;
# docs/architecture.md#hosts-roles-and-the-network).
PATHS = {
    "relay": ["/var/spool/postfix", "/var/log/safemail"],
    "store": ["/var/mail/vmail", "/var/log/safemail"],
}
SERVICES = {"relay": ["postfix@-.service", "dovecot.service"], "store": ["dovecot.service"]}
# Where mail data could land on the plain root filesystem (seen through the root view).
PLAIN_DIRS = ["var", "tmp", "root", "home", "srv", "etc"]
ROOT_VIEW = "/run/safemail-verify-rootview"
LOCK_FILE = "/tmp/safemail-verify-storage.lock"
CAFILE = "/etc/safemail/tls/ca.crt"
SAFEMAIL = "/opt/safemail/venv/bin/safemail"


_current: list[pytest.Item] = []


# The stage fixture sends mail from a lab participant host (verify/profiles.py).
pytestmark = pytest.mark.lab_participants


@pytest.fixture(autouse=True)
def _current_item(request) -> Iterator[None]:
    _current.append(request.node)
    yield
    _current.remove(request.node)


def exclusive():
    """A storage test that locks volumes or reboots VMs: alone among the storage tests, across
    xdist workers (on top of its exclusive per-host stage locks, verify/stagelocks.py)."""
    return controller_lock(LOCK_FILE, True, _current[-1] if _current else None)


def shared():
    """A storage test that only reads: beside the other readers, never during a lock or a
    reboot (each reads through its own root view, `root_view`)."""
    return controller_lock(LOCK_FILE, False, _current[-1] if _current else None)


@pytest.fixture(scope="module")
def stage(request) -> dict:
    inventory = request.config.option.ansible_inventory
    relay = testinfra.get_hosts(["ansible://relay"], ansible_inventory=inventory)[0]
    hv = relay.ansible.get_variables()
    groups = hv["groups"]
    hosts = {g: testinfra.get_host(f"ansible://{groups[g][0]}", ansible_inventory=inventory)
             for g in ("relay", "store")}
    people = [e for e in hv["safemail_participants"] if e.get("lab_host")]
    assert len(people) >= 2, "the lab needs two participants with a lab_host"
    sender = testinfra.get_host(f"ansible://{people[0]['lab_host']}",
                                ansible_inventory=inventory)
    return {
        "hosts": hosts,
        "relay_name": groups["relay"][0],
        "sender": sender,
        "from": people[0]["mailbox"],
        "to": people[1]["mailbox"],
        "password": hv["safemail_participant_passwords"][people[0]["number"]],
        "mailboxes": [e["mailbox"] for e in hv["safemail_participants"]],
    }


def probe_send(stage: dict, subject: str) -> dict:
    """Send an S/MIME-shaped sample with `subject` from the first participant; the transcript."""
    msg = samples.with_from(samples.smime_message(samples.enveloped_der(), subject=subject),
                            stage["from"])
    host = stage["sender"]
    path = f"/tmp/store-probe-{uuid.uuid4().hex}.eml"
    host.run(f"cat > {path} <<'EOF_MSG'\n{msg.decode('latin-1')}\nEOF_MSG")
    args = [SAFEMAIL, "participant", "smtp-probe", "--host", stage["relay_name"], "--port",
            "587", "--cafile", CAFILE, "--from", stage["from"], "--to", stage["to"],
            "--user", stage["from"], "--message", path]
    out = host.check_output(f"SAFEMAIL_PASSWORD={shlex.quote(stage['password'])} "
                            f"{shlex.join(args)}; rm -f {path}")
    return json.loads(out)


def data_reply(transcript: dict) -> tuple[int, str]:
    for s in transcript["steps"]:
        if s["step"].startswith("data"):
            return s["code"], s["text"]
    return 0, transcript.get("error") or f"no data step: {transcript['steps']}"


def mailbox_count(store, marker: str) -> int:
    # Message files only (Dovecot's index cache keeps the Subject header too).
    out = store.run(f"grep -rlF {shlex.quote(marker)} /var/mail/vmail "
                    "| grep -cE '/Maildir/(new|cur)/'")
    return int(out.stdout.strip() or 0)


@contextmanager
def root_view(host) -> Iterator[str]:
    """A non-recursive bind of / : the plain root filesystem without anything mounted on it.
    One per use (readers run side by side); under /run, which no check of the plain root
    filesystem reads (PLAIN_DIRS)."""
    view = f"{ROOT_VIEW}-{uuid.uuid4().hex[:12]}"
    host.check_output(f"mkdir -p {view} && mount --bind / {view}")
    try:
        yield view
    finally:
        host.run(f"umount {view} && rmdir {view}")


def plain_hits(host, needle: str) -> list[str]:
    """Files on the plain root filesystem (under the mounts too) and journal lines with needle."""
    with root_view(host) as view:
        dirs = " ".join(f"{view}/{d}" for d in PLAIN_DIRS)
        files = host.run(f"grep -rlaF --exclude-dir=journal {shlex.quote(needle)} {dirs}")
    journal = host.run(f"journalctl -q --no-pager -o cat | grep -cF {shlex.quote(needle)}")
    hits = files.stdout.split()
    if int(journal.stdout.strip() or 0):
        hits.append(f"journal ({journal.stdout.strip()} lines)")
    return hits


# Counts needle in a raw device in 16 MiB chunks (grep would buffer the whole newline-free
# ciphertext as one line and run out of memory on a 1.5 GB VM).
COUNT_PY = (
    "import sys\n"
    "needle = sys.argv[2].encode(); tail = b''; n = 0\n"
    "with open(sys.argv[1], 'rb', buffering=0) as fh:\n"
    "    while chunk := fh.read(16 << 20):\n"
    "        buf = tail + chunk; n += buf.count(needle); tail = buf[-(len(needle) - 1):]\n"
    "print(n)\n"
)


def device_count(host, device: str, needle: str) -> int:
    """How often needle occurs on `device` read raw: after a sync and after dropping the
    device's buffer cache, so the read sees what is on the disk now, not blocks cached by an
    earlier read (the 512 MiB lab disk fits in the VM's memory)."""
    out = host.run(f"sync && blockdev --flushbufs {device} && "
                   f"python3 -c {shlex.quote(COUNT_PY)} {device} {shlex.quote(needle)}")
    assert out.rc == 0, out.stderr
    return int(out.stdout.strip() or 0)


def storage_hosts() -> list[str]:
    return list(PATHS)


# --- STORE-01 ----------------------------------------------------------------------------------


@pytest.mark.req("STORE-01")
@pytest.mark.parametrize("group", storage_hosts())
def test_volume_is_an_open_luks2_volume_on_the_data_disk(stage, evidence, group):
    host = stage["hosts"][group]
    with shared():
        status = host.run(f"cryptsetup status {NAME}")
        disk = host.check_output(f"readlink -f {DEVICE}")
        luks = host.run(f"cryptsetup luksDump {DEVICE}")
    evidence(f"{group}: cryptsetup status: {' '.join(status.stdout.split())[:300]}")
    assert status.rc == 0, status.stderr
    assert "type:    LUKS2" in status.stdout
    assert f"device:  {disk}" in status.stdout
    assert "Version:       \t2" in luks.stdout or "Version:" in luks.stdout


@pytest.mark.req("STORE-01")
@pytest.mark.parametrize("group,path",
                         [(g, p) for g, paths in PATHS.items() for p in paths])
def test_mail_path_resolves_to_the_dm_crypt_volume(stage, evidence, group, path):
    host = stage["hosts"][group]
    with shared():
        source = host.check_output(f"findmnt -n -o SOURCE -T {path}")
        chain = host.check_output(f"lsblk -n -s -o NAME,TYPE {MAPPER} || true")
        with root_view(host) as view:
            below = host.run(f"ls -A {view}{path}")
    evidence(f"{group} {path}: mounted from {source}; {MAPPER}: {' '.join(chain.split())}; "
             f"plain directory underneath: {below.stdout.split() or 'empty'}")
    assert source.startswith(f"{MAPPER}["), f"{path} is on {source}, not on {MAPPER}"
    assert "crypt" in chain.split()
    assert below.rc == 0 and below.stdout.strip() == "", (
        f"plain directory under {path} holds {below.stdout.split()}")


@pytest.mark.req("STORE-01")
def test_mail_traces_only_on_the_encrypted_volume(stage, evidence):
    relay, store = stage["hosts"]["relay"], stage["hosts"]["store"]
    marker = f"STORE01-{uuid.uuid4().hex}"
    with shared():
        t = probe_send(stage, f"Befund {marker}")
        code, text = data_reply(t)
        evidence(f"DATA: {code} {text}")
        assert code == 250, t
        queue_id = text.rsplit(" ", 1)[-1]
        delivered = wait_for(lambda: mailbox_count(store, marker), 120)
        logged = wait_for(lambda: relay.run(
            f"grep -cF {queue_id} /var/log/safemail/mail.log").stdout.strip() not in ("", "0"), 60)
        # The marker (subject) in the store's mailbox, the queue id in the relay's mail log:
        # found by reading the opened volume, not by the same read of the raw disk.
        # Four whole-device reads on two VMs: at the same time, not one after the other.
        reads = {
            "store decrypted volume": (store, MAPPER, marker),
            "store raw disk": (store, DEVICE, marker),
            "relay decrypted volume": (relay, MAPPER, queue_id),
            "relay raw disk": (relay, DEVICE, queue_id),
        }
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(reads)) as pool:
            counts = {k: pool.submit(device_count, *args) for k, args in reads.items()}
            found = {"store mailbox files": delivered,
                     **{k: f.result() for k, f in counts.items()}}
        # The queue id alone names nobody: the S/MIME gate logs it with its verdict code to
        # the journal by design. What names sender, recipient or subject must not be there.
        plain = {"store": plain_hits(store, marker), "relay (subject)": plain_hits(relay, marker),
                 "relay (sender)": plain_hits(relay, stage["from"])}
    evidence(f"marker {marker}, relay queue id {queue_id}, in mail.log: {bool(logged)}; "
             f"blocks/files found: {found}; on the plain root fs or journal: {plain}")
    assert found["store mailbox files"] == 1
    assert logged
    assert found["store decrypted volume"] > 0 and found["relay decrypted volume"] > 0
    assert found["store raw disk"] == 0 and found["relay raw disk"] == 0
    assert plain == {"store": [], "relay (subject)": [], "relay (sender)": []}


@pytest.mark.req("STORE-01")
@pytest.mark.parametrize("group", storage_hosts())
def test_no_mail_log_lines_on_the_plain_disk(stage, evidence, group):
    """No participant's address in /var/log of the root disk or in the journal."""
    host = stage["hosts"][group]
    with shared():
        on_volume = {m: host.run(f"grep -rlF {shlex.quote(m)} /var/log/safemail").stdout.split()
                     for m in stage["mailboxes"]}
        with root_view(host) as view:
            plain = {m: host.run(f"grep -rlaF --exclude-dir=journal {shlex.quote(m)} "
                                 f"{view}/var/log").stdout.split() for m in stage["mailboxes"]}
        journal = {m: host.run(f"journalctl -q --no-pager -o cat | grep -cF {shlex.quote(m)}")
                   .stdout.strip() for m in stage["mailboxes"]}
    evidence(f"{group}: mailbox addresses in the volume's logs: {on_volume}; "
             f"in the plain /var/log: {plain}; journal lines: {journal}")
    assert any(on_volume.values()), "no mail log on the volume names a participant (no traffic?)"
    assert not any(plain.values()) and set(journal.values()) <= {"0", ""}


# --- STORE-02 ----------------------------------------------------------------------------------


def _lock(host) -> str:
    return host.check_output(f"{HELPER} lock")


def _unlock(host) -> None:
    # Fails the test (naming the helper's error) when the volume and services do not come back.
    host.check_output(f"{HELPER} unlock")


# The relay's timed job on the volume (encrypted_storage_lock_stops in playbooks/group_vars/
# relay.yml): the mail counting, every 5 minutes.
TIMED_JOB = "safemail-accounting-collect"
_FAST_TIMER = f"/run/systemd/system/{TIMED_JOB}.timer.d/verify-fast.conf"


def _fast_timer(host, on: bool) -> None:
    """Fire the timed job every 2 s (runtime drop-in) or back to its schedule. Under this
    pressure a `lock` that does not hold the timer lost the race within a few tries: a job
    started between its stop and the unmount made the unmount fail ("target is busy") or
    failed itself ("not mounted"), and stopping a running job killed it (Result=signal)."""
    if on:
        host.check_output(
            f"mkdir -p {shlex.quote(_FAST_TIMER.rsplit('/', 1)[0])} && printf "
            f"'[Timer]\\nOnCalendar=\\nOnCalendar=*:*:0/2\\nAccuracySec=1s\\n' > {_FAST_TIMER}"
            f" && systemctl daemon-reload && systemctl restart {TIMED_JOB}.timer")
    else:
        host.run(f"rm -f {_FAST_TIMER} && systemctl daemon-reload && "
                 f"systemctl restart {TIMED_JOB}.timer")


def _start_refused(host, unit: str) -> tuple[bool, str]:
    """Try to start `unit` with the volume locked: it must not become active. The start job
    (and the mount jobs it pulled in) stay queued, as after an operator's `systemctl start`
    on a locked host: `safemail-storage unlock` must cancel them and start the services
    itself, in order (otherwise the queued start races the helper's mounts).

    Proof from systemd's own job queue rather than from a long timeout: the start is queued
    without blocking, and on three looks two seconds apart the unit is not (being) started
    and its job is `waiting` (for the mount jobs ahead of it), never `running`. A start that
    no longer waits for the volume shows a `running` job or an activating unit at once."""
    host.run(f"systemctl start --no-block {unit}")
    looks = []
    for _ in range(3):
        time.sleep(2)
        state = host.run(f"systemctl is-active {unit}").stdout.strip()
        jobs = _job_table(host)
        looks.append((state, jobs.get(unit)))
    queued = sorted(jobs)
    refused = all(state in ("inactive", "failed") and job in (None, ("start", "waiting"))
                  for state, job in looks)
    return refused, (f"systemctl start --no-block {unit}; (state, job) on three looks: "
                     f"{looks}; queued jobs left for unlock: {queued}")


def _job_table(host) -> dict[str, tuple[str, str]]:
    """{unit: (job type, job state)} of systemd's job queue."""
    out = host.run("systemctl list-jobs --no-legend --plain").stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            table[parts[1]] = (parts[2], parts[3])
    return table


def _queue_state(relay, queue_id: str) -> str | None:
    """The Postfix queue (active, deferred, ...) holding `queue_id` on the relay, or None."""
    for line in relay.run("postqueue -j").stdout.splitlines():
        entry = json.loads(line)
        if entry.get("queue_id") == queue_id:
            return entry.get("queue_name")
    return None


def _jobs_left(host, units: list[str]) -> list[str]:
    """Jobs still queued for `units` (after unlock there must be none)."""
    out = host.run("systemctl list-jobs --no-legend --plain").stdout
    return [line for line in out.splitlines() if any(u in line for u in units)]


def _plain_listing(host, paths: list[str]) -> dict[str, list[str]]:
    return {p: host.run(f"ls -A {p}").stdout.split() for p in paths}


@pytest.mark.req("STORE-02")
@pytest.mark.disruptive
@pytest.mark.stage_hosts("relay", "store", also=("participants",))
def test_store_locked_mail_waits_on_the_relay_and_arrives_once(stage, evidence):
    relay, store = stage["hosts"]["relay"], stage["hosts"]["store"]
    marker = f"STORE02S-{uuid.uuid4().hex}"
    with exclusive():
        try:
            _lock(store)
            closed = store.run(f"test -e {MAPPER}").rc != 0
            refused, how = _start_refused(store, "dovecot.service")
            t = probe_send(stage, f"Befund {marker}")
            code, text = data_reply(t)
            queue_id = text.rsplit(" ", 1)[-1]
            # The relay tried to deliver, failed and keeps the mail: deferred, not bounced.
            queued = wait_for(lambda: _queue_state(relay, queue_id) == "deferred", 90, 3)
            plain = _plain_listing(store, PATHS["store"])
        finally:
            _unlock(store)
        jobs = _jobs_left(store, SERVICES["store"])
        dovecot = store.run("systemctl is-active dovecot.service").stdout.strip()
        relay.run("postqueue -f")
        count = wait_for(lambda: mailbox_count(store, marker), 180)
        # Once the relay's queue no longer holds it, no second copy can follow: count then.
        left = wait_for(lambda: _queue_state(relay, queue_id) is None, 60, 2)
        final = mailbox_count(store, marker)
    evidence(f"store locked (volume closed: {closed}); {how}; relay DATA {code} {text}; "
             f"deferred in the relay queue: {queued}; plain dirs while locked: {plain}; "
             f"after unlock: dovecot {dovecot}, jobs left {jobs}, {final} copy in the "
             f"mailbox, gone from the relay queue: {left}")
    assert closed and refused
    assert jobs == [] and dovecot == "active"
    assert code == 250 and queued
    assert all(not v for v in plain.values())
    assert count == 1 and final == 1 and left


@pytest.mark.req("STORE-02")
@pytest.mark.disruptive
@pytest.mark.stage_hosts("relay", "store", also=("participants",))
def test_relay_locked_send_fails_temporarily_then_succeeds(stage, evidence):
    relay, store = stage["hosts"]["relay"], stage["hosts"]["store"]
    marker = f"STORE02R-{uuid.uuid4().hex}"
    job = f"{TIMED_JOB}.service"
    with exclusive():
        try:
            # Lock while the timed job runs and its timer keeps firing: `lock` must let the
            # running job finish, start no new one and still unmount.
            _fast_timer(relay, True)
            relay.run(f"systemctl reset-failed {job}")
            running = wait_for(lambda: relay.run(f"systemctl is-active {job}").stdout.strip()
                               == "activating", 30, 0.5)
            _lock(relay)
            job_result = relay.run(f"systemctl show -p Result --value {job}").stdout.strip()
            closed = relay.run(f"test -e {MAPPER}").rc != 0
            refused, how = _start_refused(relay, "postfix@-.service")
            postfix_state = relay.run("systemctl is-active postfix@-.service").stdout.strip()
            locked_try = probe_send(stage, f"Befund {marker}")
            plain = _plain_listing(relay, PATHS["relay"])
        finally:
            _fast_timer(relay, False)
            _unlock(relay)
        timer = relay.run(f"systemctl is-active {TIMED_JOB}.timer").stdout.strip()
        jobs = _jobs_left(relay, SERVICES["relay"])
        active = wait_for(lambda: relay.run("systemctl is-active postfix@-.service")
                           .stdout.strip() == "active", 60)
        t = probe_send(stage, f"Befund {marker}")
        code, text = data_reply(t)
        if code != 250:
            # One retry: smtpd is spawned on the first connection after the start.
            time.sleep(15)
            t = probe_send(stage, f"Befund {marker}")
            code, text = data_reply(t)
        count = wait_for(lambda: mailbox_count(store, marker), 120)
    evidence(f"locked while {job} ran: {running}, its result {job_result}, its timer after "
             f"unlock {timer}; "
             f"relay locked (volume closed: {closed}); {how}; postfix@-: {postfix_state}; "
             f"participant while locked: {locked_try.get('error') or locked_try['steps']}; "
             f"plain dirs while locked: {plain}; after unlock postfix active: {active}, "
             f"jobs left {jobs}, DATA {code} {text}, copies delivered: {count}")
    assert closed and refused and postfix_state != "active"
    assert running and job_result == "success" and timer == "active"
    assert jobs == []
    # No SMTP answer at all: the client's send fails temporarily (it retries), nothing stored.
    assert locked_try["error"].startswith("connect:") and not locked_try["steps"]
    assert all(not v for v in plain.values())
    assert code == 250 and count == 1


@pytest.mark.req("STORE-01", "STORE-02")
@pytest.mark.disruptive
@pytest.mark.stage_hosts("relay", "store", also=("participants",))
def test_reboot_reopens_the_volume_before_the_services(stage, evidence):
    """Both VMs reboot at once (the stage recovers once, not once per host); each must bring
    its volume back by the boot unlock path and start its services only after the mounts."""
    groups = storage_hosts()
    hosts = {g: stage["hosts"][g] for g in groups}
    with exclusive():
        boot_before = {g: h.check_output("cat /proc/sys/kernel/random/boot_id")
                       for g, h in hosts.items()}
        addresses = {g: h.ansible.get_variables()["ansible_host"] for g, h in hosts.items()}
        began = time.monotonic()
        for h in hosts.values():
            h.check_output("systemd-run --on-active=2 systemctl reboot")
        time.sleep(15)
        polls: dict[str, list[tuple[float, float, str]]] = {g: [] for g in groups}

        def sshd_answers(group: str) -> bool:
            """Does the VM accept a TCP connection on port 22? One second at most: an SSH
            login to a VM that is down waits out its 10 s connect timeout, so two VMs polled
            one after the other would be seen up to 20 s late."""
            try:
                with socket.create_connection((addresses[group], 22), timeout=1):
                    return True
            except OSError:
                return False

        def back(group: str) -> bool:
            start = time.monotonic()
            if not sshd_answers(group):
                polls[group].append((round(start - began, 1),
                                     round(time.monotonic() - start, 1), "port 22 closed"))
                return False
            try:
                res = hosts[group].run("cat /proc/sys/kernel/random/boot_id; "
                                       "systemctl is-system-running --wait")
            except RuntimeError as exc:  # ssh exit 255: the VM is down while it reboots
                # testinfra raises with the command result: keep ssh's own words (refused,
                # timed out, the control master's error) as evidence of where the wait went.
                result = exc.args[0] if exc.args else None
                said = " ".join(str(getattr(result, "stderr", "") or exc).split())[-100:]
                polls[group].append((round(start - began, 1),
                                     round(time.monotonic() - start, 1), f"ssh failed: {said}"))
                return False
            lines = res.stdout.split()
            new = bool(lines) and lines[0] != boot_before[group]
            polls[group].append((round(start - began, 1), round(time.monotonic() - start, 1),
                                 "new boot" if new else "old boot"))
            return new

        # Each VM polled on its own thread: a VM that answers waits in `is-system-running
        # --wait` until its boot ends, which must not delay noticing the other.
        with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
            waits = {g: pool.submit(wait_for, lambda g=g: back(g), 420, 2) for g in groups}
            up = {g: bool(w.result()) for g, w in waits.items()}
        up_all = all(up.values())
        boots = {g: hosts[g].run("systemd-analyze time | head -n 1").stdout.strip()
                 for g in groups if up[g]}
        assert up_all, f"did not come back from the reboot: {[g for g in groups if not up[g]]}"
        times: dict[str, dict] = {}
        sources: dict[str, dict] = {}
        unmounted: dict[str, str] = {}
        for group, host in hosts.items():
            target = host_mount(host)
            if not target:  # the volume did not come back: say so, with systemd's view of it
                unmounted[group] = host.run(
                    f"systemctl status --no-pager --lines=15 {shlex.quote(crypt_unit_name(host))}"
                ).stdout[-1500:]
                continue
            mount_unit = host.check_output(f"systemd-escape --path --suffix=mount {target}")
            crypt_unit = crypt_unit_name(host)
            times[group] = {}
            for u in [crypt_unit, mount_unit, *SERVICES[group]]:
                out = host.check_output(f"systemctl show -p ActiveState "
                                        f"-p ActiveEnterTimestampMonotonic {shlex.quote(u)}")
                props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
                since = int(props.get("ActiveEnterTimestampMonotonic", 0))
                times[group][u] = (props.get("ActiveState"), since)
            sources[group] = {p: host.check_output(f"findmnt -n -o SOURCE -T {p}")
                              for p in PATHS[group]}
    problems = [f"{group}: the volume is not mounted after the reboot:\n{status}"
                for group, status in unmounted.items()]
    evidence(f"reboot timeline, seconds from the reboot command (poll start, poll took, "
             f"answer): {polls}; boot: {boots}")
    for group in times:
        evidence(f"{group} after reboot: units (state, activated at µs): {times[group]}; "
                 f"mounts: {sources[group]}")
    for group in times:
        crypt, mount, *services = times[group].values()
        if not all(state == "active" for state, _ in times[group].values()):
            problems.append(f"{group}: not every unit is active: {times[group]}")
        if not 0 < crypt[1] <= mount[1]:
            problems.append(f"{group}: the volume was not opened before its mount: {times[group]}")
        if not all(mount[1] < t for _, t in services):
            problems.append(f"{group}: a service started before the volume mount")
        if not all(s.startswith(f"{MAPPER}[") for s in sources[group].values()):
            problems.append(f"{group}: a mail path is not on the volume: {sources[group]}")
    assert problems == [], problems


def crypt_unit_name(host) -> str:
    return host.check_output(f"systemd-escape --template=systemd-cryptsetup@.service {NAME}")


def host_mount(host) -> str:
    return host.check_output(f"findmnt -n -o TARGET --source {MAPPER} | head -n 1")
