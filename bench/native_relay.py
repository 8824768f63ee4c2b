"""A relay that is not emulated, for bench_smime_gate.py --native only.

The lab's relay is a QEMU VM under software emulation (TCG), so its figures mix the gate's cost
with the emulator's. This boots a throwaway systemd-nspawn machine from the lab image's relay
layer (Postfix and python3-milter preinstalled, the same packages as relay1) on the host's own
CPU, with a private network (loopback only: nothing it does can leave the machine), installs the
safemail wheel of this checkout and the lab's wheelhouse into /opt/safemail/venv as the
safemail_runtime role does, configures Postfix with the relay's gate settings (the milter,
``milter_default_action = tempfail``, the macros, ``mime_header_checks``) but without LUKS,
LDAP or TLS, and runs the S/MIME gate as a systemd unit under its own account, as the
mailrelay role does. bench_smime_gate.py then adds the same three listeners and runs the same
sender inside it. Everything lives under one work directory and is removed at the end.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = Path(os.environ.get("SAFEMAIL_IMAGE_DIR", "/var/cache/safemail/images"))
WORK_ROOT = Path(os.environ.get("SAFEMAIL_LAB_DIR", "/var/lib/safemail-lab")) / "bench-native"
MACHINE = "smbench-relay"
MESSAGE_SIZE_LIMIT = 52428800  # roles/mailrelay/defaults: mailrelay_message_size_limit

MAIN_CF = f"""\
# bench_smime_gate.py --native: the relay's gate settings, loopback only
compatibility_level = 3.6
myhostname = bench-relay.invalid
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
message_size_limit = {MESSAGE_SIZE_LIMIT}
smtpd_milters = unix:/run/safemail-gate/milter.sock
non_smtpd_milters = $smtpd_milters
milter_default_action = tempfail
milter_protocol = 6
milter_mail_macros = i {{auth_authen}} {{daemon_name}}
mime_header_checks = regexp:/etc/postfix/mime_header_checks
"""

GATE_UNIT = f"""\
[Unit]
Description=SafeMail S/MIME gate (bench, native)
[Service]
User=safemail-gate
Group=safemail-gate
UMask=0117
ExecStart=/opt/safemail/venv/bin/python -m safemail.smime.milter \\
  --socket unix:/run/safemail-gate/milter.sock --subject-policy flag \\
  --max-size {MESSAGE_SIZE_LIMIT} --max-in-flight 16
CPUAccounting=yes
"""


def _mime_header_checks() -> str:
    text = (REPO / "roles/mailrelay/templates/etc/postfix/mime_header_checks.j2").read_text()
    return "\n".join(line for line in text.splitlines() if "{{" not in line) + "\n"


def _relay_layer() -> tuple[Path, Path]:
    """(relay VM layer upper dir, base rootfs) of the newest complete image with Postfix and
    pymilter in the layer."""
    layers = sorted(
        (p for p in IMAGES.glob("vm-*") if (p / "complete").exists()
         and (p / "upper/usr/sbin/postfix").exists()
         and any((p / "upper/usr/lib/python3/dist-packages").glob("Milter*"))),
        key=lambda p: (p / "complete").stat().st_mtime)
    bases = sorted((p for p in IMAGES.glob("base-*") if (p / "rootfs").is_dir()),
                   key=lambda p: p.stat().st_mtime)
    if not layers or not bases:
        raise SystemExit(f"no relay image layer in {IMAGES}: run `safemail lab up` once first")
    return layers[-1] / "upper", bases[-1] / "rootfs"


def _wheelhouse() -> Path:
    houses = sorted((p / "wheels" for p in IMAGES.glob("wheels-*")
                     if any((p / "wheels").glob("*.whl"))), key=lambda p: p.stat().st_mtime)
    if not houses:
        raise SystemExit(f"no wheelhouse in {IMAGES}: run `safemail lab up` once first")
    return houses[-1]


class NativeRelay:
    """Start with :meth:`start`, run commands with :meth:`run`, always :meth:`stop`."""

    def __init__(self) -> None:
        self.work = WORK_ROOT
        self.root = self.work / "root"
        self.pid: int | None = None
        self.leader: int | None = None

    def start(self) -> None:
        self.stop()  # an earlier run that could not clean up
        upper, base = _relay_layer()
        wheels = _wheelhouse()
        dist = self.work / "dist"
        for d in ("upper", "work", "root", "dist"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
             "--wheel-dir", str(dist), str(REPO)],
            check=True, env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})
        subprocess.run(
            ["mount", "-t", "overlay", "smbench-overlay", "-o",
             f"lowerdir={upper}:{base},upperdir={self.work / 'upper'},"
             f"workdir={self.work / 'work'}", str(self.root)], check=True)
        console = (self.work / "console.log").open("ab")
        proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "--boot", "--register=no", "--keep-unit",
             f"--machine={MACHINE}", "--hostname=bench-relay", "--private-network",
             f"--bind-ro={wheels}:/srv/wheels", f"--bind-ro={dist}:/srv/dist",
             "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=passive"],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.pid = proc.pid
        (self.work / "nspawn.pid").write_text(str(proc.pid))
        deadline = time.monotonic() + 60
        while self.leader is None and time.monotonic() < deadline:
            self.leader = _container_init(proc.pid)
            if self.leader is None:
                time.sleep(0.5)
        if self.leader is None:
            raise SystemExit(f"the native relay did not start: see {self.work / 'console.log'}")
        (self.work / "init.pid").write_text(str(self.leader))
        self.run("for i in $(seq 60); do systemctl is-system-running --wait >/dev/null 2>&1 "
                 "&& exit 0; s=$(systemctl is-system-running); [ \"$s\" = degraded ] && exit 0; "
                 "sleep 1; done; exit 1", timeout=120)
        self._configure()

    def _configure(self) -> None:
        self.run(
            "set -e; python3 -m venv --system-site-packages /opt/safemail/venv; "
            "/opt/safemail/venv/bin/pip install --quiet --disable-pip-version-check --no-index "
            "--find-links /srv/wheels /srv/dist/safemail-*.whl; "
            "id safemail-gate >/dev/null 2>&1 || useradd --system --no-create-home "
            "--home-dir /nonexistent --shell /usr/sbin/nologin --user-group safemail-gate",
            timeout=300)
        files = {"/etc/postfix/main.cf": MAIN_CF,
                 "/etc/postfix/mime_header_checks": _mime_header_checks(),
                 "/etc/systemd/system/safemail-smime-gate.service": GATE_UNIT}
        for path, text in files.items():
            self.run(f"cat > {shlex.quote(path)}", stdin=text.encode())
        # The socket directory as the mailrelay role's tmpfiles.d line makes it: the gate's
        # account, group postfix, setgid (the socket inherits group postfix).
        self.run("set -e; install -d -m 2750 -o safemail-gate -g postfix /run/safemail-gate; "
                 "systemctl daemon-reload; systemctl start safemail-smime-gate; "
                 "for i in $(seq 60); do test -S /run/safemail-gate/milter.sock && break; "
                 "sleep 0.5; done; test -S /run/safemail-gate/milter.sock; "
                 "systemctl restart postfix@-.service; postfix check", timeout=120)

    def run(self, command: str, stdin: bytes | None = None, timeout: float = 3600,
            progress: bool = False) -> str:
        """Run `command` with /bin/sh inside the machine (all its namespaces); stdout. With
        `progress` its stderr goes to ours as it comes."""
        assert self.leader is not None
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--",
             "/bin/sh", "-c", command],
            input=stdin, stdout=subprocess.PIPE,
            stderr=None if progress else subprocess.PIPE, timeout=timeout, check=False)
        if proc.returncode != 0:
            said = (proc.stdout + (proc.stderr or b"")).decode(errors="replace")
            raise SystemExit(f"in the native relay: {command[:80]}... failed "
                             f"({proc.returncode}): {said[-1500:]}")
        return proc.stdout.decode()

    def stop(self) -> None:
        """Power the machine off (kill it after 30 s), unmount, remove the work directory.

        The machine's init is killed as well if it outlives systemd-nspawn: once seen, an
        init left behind (nspawn killed before it) kept the machine running, with a syslog
        daemon spinning on a whole core, for an hour after its work directory was gone."""
        pidfile, initfile = self.work / "nspawn.pid", self.work / "init.pid"
        pid = self.pid or (int(pidfile.read_text()) if pidfile.exists() else None)
        init = self.leader or (int(initfile.read_text()) if initfile.exists() else None)
        if init is None and pid is not None and _is_our_nspawn(pid):
            init = _container_init(pid)  # started, but stopped before start() found it
        if pid is not None and _is_our_nspawn(pid):
            os.kill(pid, signal.SIGTERM)  # nspawn asks the machine's init to power off
            deadline = time.monotonic() + 30
            while _is_our_nspawn(pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            if _is_our_nspawn(pid):
                os.kill(pid, signal.SIGKILL)
                time.sleep(1)
        if init is not None and _is_our_init(init):
            os.kill(init, signal.SIGKILL)  # PID 1 of its namespace: everything in it ends
            deadline = time.monotonic() + 10
            while _is_our_init(init) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _is_our_init(init):
                raise SystemExit(f"the native relay's init (PID {init}) does not end; kill it by "
                             f"its PID, then remove {self.work}")
        if self.root.is_mount():
            subprocess.run(["umount", str(self.root)], check=False)
        if self.work.exists() and not self.root.is_mount():
            shutil.rmtree(self.work)
        self.pid = self.leader = None


def _container_init(nspawn_pid: int) -> int | None:
    """The machine's init: the descendant of systemd-nspawn that is PID 1 in its own PID
    namespace (NSpid ends in 1), running systemd."""
    todo, seen = [nspawn_pid], set()
    while todo:
        pid = todo.pop()
        seen.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        nspid = next((line.split()[1:] for line in status.splitlines()
                      if line.startswith("NSpid:")), [])
        if pid != nspawn_pid and len(nspid) > 1 and nspid[-1] == "1" \
                and Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
            return pid
        todo += [int(c) for c in children if int(c) not in seen]
    return None


def _is_our_init(pid: int) -> bool:
    """PID is alive, PID 1 of its own namespace, and its root is this machine's overlay."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        mounts = Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return False
    nspid = next((line.split()[1:] for line in status.splitlines()
                  if line.startswith("NSpid:")), [])
    return len(nspid) > 1 and nspid[-1] == "1" and "smbench-overlay" in mounts.split("\n", 1)[0]


def _is_our_nspawn(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"systemd-nspawn") and \
        f"--machine={MACHINE}".encode() in cmdline


if __name__ == "__main__":  # a smoke run: start, show Postfix and the gate, stop
    relay = NativeRelay()
    try:
        relay.start()
        print(relay.run("systemctl is-active postfix@-.service safemail-smime-gate.service; "
                        "postconf -n | head -5"))
    finally:
        relay.stop()
