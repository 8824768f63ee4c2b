"""`lab up`'s wait for SSH: a QEMU VM whose kernel hangs at boot is reset once, no more.

Seen once on this machine (store1, a loaded host): the guest's systemd and modprobe stuck in
an audit netlink loop, the console full of "soft lockup" and RCU stall reports, no SSH after
300 s, and `lab up` failed. The wait now resets such a VM through its QMP socket and waits
again. The QMP server below speaks the protocol QEMU speaks on `-qmp unix:` (greeting,
capabilities, command), and one test asks a real, machine-less QEMU; the clock is a fake so
the test does not wait minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from safemail.errors import SafeMailError
from safemail.lab import machines, stage
from safemail.lab.config import LabPaths

HUNG = ("[   36.716142] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [modprobe:177]\n"
        "[   36.009489] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n")
BOOTING = "[   15.371150] systemd[1]: Finished kmod-static-nodes.service\n"


def test_console_hang_reads_the_markers_from_the_offset_on(tmp_path):
    log = tmp_path / "console.log"
    log.write_text(BOOTING)
    assert not machines.console_hang(log)
    log.write_text(BOOTING + HUNG)
    assert machines.console_hang(log)
    assert not machines.console_hang(log, offset=log.stat().st_size)
    assert not machines.console_hang(tmp_path / "missing.log")


class FakeQmp:
    """A unix-socket server that answers like QEMU's QMP and records what it was asked."""

    def __init__(self, path: Path, error_on: str | None = None) -> None:
        self.asked: list[str] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.error_on = error_on
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn, conn.makefile("rwb") as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                command = json.loads(line)["execute"]
                self.asked.append(command)
                if command == self.error_on:
                    f.write(b'{"error": {"class": "GenericError", "desc": "no"}}\n')
                else:
                    # an event in between, as QEMU sends on a reset
                    f.write(b'{"event": "RESET", "data": {}}\n{"return": {}}\n')
                f.flush()

    def close(self) -> None:
        self.server.close()


def test_qmp_negotiates_then_runs_the_command(tmp_path):
    server = FakeQmp(tmp_path / "qmp.sock")
    try:
        assert machines.qmp(tmp_path / "qmp.sock", "system_reset") == {"return": {}}
        server.thread.join(5)
        assert server.asked == ["qmp_capabilities", "system_reset"]
    finally:
        server.close()


def test_qmp_errors_are_safemail_errors(tmp_path):
    server = FakeQmp(tmp_path / "qmp.sock", error_on="system_reset")
    try:
        with pytest.raises(SafeMailError, match="GenericError"):
            machines.qmp(tmp_path / "qmp.sock", "system_reset")
    finally:
        server.close()
    with pytest.raises(SafeMailError, match="failed"):
        machines.qmp(tmp_path / "nobody.sock", "system_reset")


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                    reason="qemu-system-x86_64 not installed (make setup installs it)")
def test_qmp_against_a_real_qemu(tmp_path):
    """The same calls against QEMU itself (a machine-less QEMU: no guest, starts at once)."""
    sock, pidfile = tmp_path / "qmp.sock", tmp_path / "qemu.pid"
    subprocess.run(["qemu-system-x86_64", "-M", "none", "-display", "none", "-nodefaults",
                    "-qmp", f"unix:{sock},server=on,wait=off", "-daemonize",
                    "-pidfile", str(pidfile)], check=True, timeout=30)
    pid = int(pidfile.read_text())
    try:
        assert machines.qmp(sock, "query-status")["return"]["running"] is True
        assert machines.qmp(sock, "system_reset") == {"return": {}}
        with pytest.raises(SafeMailError, match="CommandNotFound"):
            machines.qmp(sock, "no_such_command")
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _host(name: str, address: str, hypervisor: str):
    return SimpleNamespace(name=name, mgmt=SimpleNamespace(address=address),
                           spec=SimpleNamespace(hypervisor=hypervisor))


@pytest.fixture
def lab(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(stage.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(stage.time, "sleep", clock.sleep)
    monkeypatch.setattr(stage.runner, "info", lambda msg: None)
    st = stage.Stage(LabPaths(state=tmp_path / "lab", images=tmp_path / "images"), tmp_path)
    for name in ("relay1", "store1"):
        (st.paths.machines / name).mkdir(parents=True)
        (st.paths.machines / name / "console.log").write_text(BOOTING)
    resets: list[str] = []
    monkeypatch.setattr(stage.machines, "qmp",
                        lambda sock, cmd: resets.append((sock.parent.name, cmd)) or {})
    plan = SimpleNamespace(hosts=[_host("relay1", "198.18.0.7", "qemu"),
                                  _host("store1", "198.18.0.8", "qemu"),
                                  _host("auth1", "198.18.0.2", "nspawn")])
    return SimpleNamespace(stage=st, clock=clock, resets=resets, plan=plan)


def test_a_hung_vm_is_reset_once_and_its_wait_starts_again(lab, monkeypatch):
    (lab.stage.paths.machines / "store1" / "console.log").write_text(BOOTING + HUNG)
    reset_at: list[float] = []

    def answers(address: str) -> bool:
        if address != "198.18.0.8":
            return True
        if lab.resets and not reset_at:
            reset_at.append(lab.clock.now)
        # store1 answers 250 s after its reset: past the first 300 s, inside the second
        return bool(reset_at) and lab.clock.now - reset_at[0] > 250

    monkeypatch.setattr(lab.stage, "answers", answers)
    lab.stage._wait(lab.plan)
    assert lab.resets == [("store1", "system_reset")]
    assert lab.clock.now - 1000.0 > stage.SSH_WAIT_SECONDS


def test_a_slow_vm_without_a_hang_is_not_reset_and_fails_after_the_wait(lab, monkeypatch):
    monkeypatch.setattr(lab.stage, "answers", lambda address: address != "198.18.0.8")
    with pytest.raises(SafeMailError, match=r"no SSH answer after 300 s from: store1$"):
        lab.stage._wait(lab.plan)
    assert lab.resets == []


def test_a_vm_that_hangs_again_is_not_reset_twice(lab, monkeypatch):
    (lab.stage.paths.machines / "store1" / "console.log").write_text(BOOTING + HUNG)
    monkeypatch.setattr(lab.stage, "answers", lambda address: address != "198.18.0.8")
    with pytest.raises(SafeMailError, match=r"reset once after a hung boot: store1"):
        lab.stage._wait(lab.plan)
    assert lab.resets == [("store1", "system_reset")]
