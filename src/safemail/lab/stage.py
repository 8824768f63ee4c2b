"""`lab up`, `lab down`, `lab status`, `lab replace`: the local test stage as a whole.

Layout (all names carry the lab prefix, all state lives under LabPaths.state):

- namespace ``smlab-net`` holds one bridge per segment (br-mgmt, br-safenet, ...);
- namespace ``smlab-router`` routes between the routed segments and to ``internet``;
- namespaces ``smlab-mirror`` (apt mirror + NTP, on core) and ``smlab-internet`` (the sink);
- one namespace per nspawn machine (``smlab-<host>``) with ``mgmt0`` and ``eth0``;
- QEMU VMs use tap devices in ``smlab-net``;
- the machine's own namespace gets one veth (``smlab-ctl``, 198.18.0.1 on mgmt) and
  ``unreachable`` routes for every lab range.

The state file lists what was created, so `down` removes exactly that (and, after a crash,
the remains it can recognise by prefix and state path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from safemail.errors import SafeMailError
from safemail.lab import image as image_mod
from safemail.lab import machines, mirror, runner
from safemail.lab.config import DEBIAN_MIRROR, PREFIX, LabPaths
from safemail.lab.plan import (
    CONTROLLER_MGMT,
    LAB_RANGES,
    ROUTED_SEGMENTS,
    SEGMENTS,
    HostPlan,
    LabPlan,
    generated_inventory,
    hosts_from_inventory,
    make_plan,
    redundant_hosts,
    route_conflicts,
)
from safemail.project import Project

NET_NS = f"{PREFIX}-net"
ROUTER_NS = f"{PREFIX}-router"
MIRROR_NS = f"{PREFIX}-mirror"
INTERNET_NS = f"{PREFIX}-internet"
CONTROLLER_LINK = f"{PREFIX}-ctl"
GENERATED_INVENTORY = "zz_lab_generated.yml"
SSH_WAIT_SECONDS = 300
# A VM that has not answered after this long and whose console shows a hung kernel is reset.
VM_HANG_GRACE_SECONDS = 60
NETNS_DIR = Path("/run/netns")
NSPAWN_PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")


def vm_hosts(plan: LabPlan) -> dict[str, tuple[str, ...]]:
    """VM host -> its inventory groups (the image builder gives each VM its roles' packages)."""
    return {h.name: h.spec.groups for h in plan.hosts if h.spec.hypervisor == "qemu"}


@dataclass
class Stage:
    paths: LabPaths
    project: Path

    @property
    def inventory_dir(self) -> Path:
        return Project(self.project).inventory("test")

    # -- reading ---------------------------------------------------------------------------
    def plan(self, all_vms: bool = False, redundant: bool | None = None) -> LabPlan:
        """The lab's plan; ``redundant`` None: as the running lab was started (AV-02:
        `lab up --redundant` adds relay2 and auth2, which shifts addresses)."""
        hosts_file = self.inventory_dir / "hosts.yml"
        try:
            inventory = yaml.safe_load(hosts_file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SafeMailError(f"cannot read the test inventory {hosts_file}: {exc}") from exc
        if redundant is None:
            state = self.load_state()
            redundant = bool(state and state.get("redundant"))
        specs = hosts_from_inventory(inventory, all_vms=all_vms)
        return make_plan(redundant_hosts(specs) if redundant else specs)

    def load_state(self) -> dict | None:
        try:
            return json.loads(self.paths.state_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise SafeMailError(f"lab state file {self.paths.state_file} is unreadable: {exc}",
                                hint="run `safemail lab down` to clean up") from exc

    def save_state(self, state: dict) -> None:
        self.paths.state.mkdir(parents=True, exist_ok=True)
        tmp = self.paths.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.paths.state_file)

    # -- checks ----------------------------------------------------------------------------
    def ssh_cmd(self, address: str, *command: str, interactive: bool = False) -> list[str]:
        mode = ["-t"] if interactive else ["-o", "BatchMode=yes"]
        return ["ssh", *mode, "-i", str(self.paths.key_file),
                "-o", f"UserKnownHostsFile={self.paths.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
                "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=15",
                "-o", "ServerAliveCountMax=4", f"root@{address}", *command]

    def answers(self, address: str) -> bool:
        try:
            proc = subprocess.run(self.ssh_cmd(address, "true"), capture_output=True,
                                  timeout=20, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def processes_alive(self, state: dict) -> dict[str, bool]:
        return {name: machines.process_alive(p["pid"], p["marker"])
                for name, p in state.get("processes", {}).items()}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One lab command at a time: a second `up` or `down` meanwhile is refused."""
        self.paths.state.mkdir(parents=True, exist_ok=True)
        with (self.paths.state / "lock").open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise SafeMailError(f"another lab command is running ({holder})",
                                    hint="wait for it to finish") from exc
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            yield

    # -- up --------------------------------------------------------------------------------
    def up(self, all_vms: bool = False, redundant: bool = False) -> int:
        runner.require_root()
        with self.locked():
            return self._up(all_vms, redundant)

    def _up(self, all_vms: bool, redundant: bool = False) -> int:
        runner.require_tools("ip", "systemd-nspawn", "qemu-system-x86_64", "mkfs.ext4",
                             "ssh", "ssh-keygen", "apt-ftparchive", "debootstrap")
        state = self.load_state()
        if state is not None:
            alive = self.processes_alive(state)
            if state.get("complete") and all(alive.values()) and \
                    state.get("all_vms", False) == all_vms and \
                    state.get("redundant", False) == redundant:
                # This checkout may not have the generated inventory yet (the lab was
                # started from another one): write it, nothing else.
                self._write_inventory(self.plan(all_vms=all_vms, redundant=redundant))
                runner.info("lab is already up (nothing to do); `safemail lab status` shows it")
                return 0
            runner.info("lab: found remains of an earlier lab; cleaning them first")
            self._down()
        plan = self.plan(all_vms=all_vms, redundant=redundant)
        self._preflight()
        started = time.monotonic()
        runner.info(f"lab: {len(plan.hosts)} hosts "
                    f"({sum(h.spec.hypervisor == 'qemu' for h in plan.hosts)} QEMU VMs)")
        runner.info("[1/5] image")
        img = image_mod.build(self.paths, self.project, vm_hosts(plan))
        state = {"complete": False, "all_vms": all_vms, "redundant": redundant,
                 "namespaces": [], "processes": {},
                 "root_links": [], "root_routes": [], "image": [p.name for p in img.parts()]}
        self.save_state(state)
        try:
            runner.info("[2/5] mirror")
            self.publish_mirror(img)
            runner.info("[3/5] network")
            self._network(plan, state)
            runner.info("[4/5] machines")
            self._keys()
            self._machines(plan, img, state)
            runner.info("[5/5] waiting for SSH on every host")
            self._wait(plan)
            self._write_inventory(plan)
        except BaseException:
            runner.info("lab up failed; `safemail lab down` removes what was created "
                        f"(logs in {self.paths.logs})")
            raise
        state["complete"] = True
        self.save_state(state)
        runner.info(f"lab is up in {time.monotonic() - started:.0f} s; inventory: "
                    f"{self.inventory_dir / GENERATED_INVENTORY}")
        return 0

    def _preflight(self) -> None:
        """Refuse to install routes that would cut the machine off from what it uses."""
        used: dict[str, str] = {}
        for name in (urllib.parse.urlparse(DEBIAN_MIRROR).hostname or "", "pypi.org"):
            try:
                for info in socket.getaddrinfo(name, 80, socket.AF_INET):
                    used[name] = str(info[4][0])
            except OSError:
                continue
        for line in Path("/etc/resolv.conf").read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                used[f"nameserver {parts[1]}"] = parts[1]
        conflicts = route_conflicts(used)
        if conflicts:
            raise SafeMailError("the lab's unreachable routes would cut this machine off: "
                                + "; ".join(conflicts),
                                hint="change the lab ranges in src/safemail/lab/plan.py")

    def publish_mirror(self, img: image_mod.Image) -> None:
        count = mirror.publish(self.paths.mirror, img.debs())
        wheels = mirror.publish_wheels(self.paths.mirror,
                                       sorted((img.wheels / "wheels").glob("*.whl")))
        runner.info(f"  mirror: {len(img.debs())} packages ({count} new) in "
                    f"{mirror.repo_dir(self.paths.mirror)}, {wheels} wheels")

    def _ns(self, state: dict, name: str) -> None:
        runner.run(["ip", "netns", "add", name])
        state["namespaces"].append(name)
        self.save_state(state)
        runner.run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _veth_into(self, ns: str, bridge: str, outer: str, inner: str, cidr: str,
                   gateway: str | None, mac: str | None = None) -> None:
        """A veth from bridge `bridge` (in the net namespace) into namespace `ns`."""
        runner.run(["ip", "-n", NET_NS, "link", "add", outer, "type", "veth", "peer", "name",
                    f"{outer}x"])
        runner.run(["ip", "-n", NET_NS, "link", "set", f"{outer}x", "netns", ns])
        runner.run(["ip", "-n", ns, "link", "set", f"{outer}x", "name", inner])
        if mac:
            runner.run(["ip", "-n", ns, "link", "set", inner, "address", mac])
        runner.run(["ip", "-n", ns, "addr", "add", cidr, "dev", inner])
        runner.run(["ip", "-n", ns, "link", "set", inner, "up"])
        runner.run(["ip", "-n", NET_NS, "link", "set", outer, "master", bridge, "up"])
        if gateway:
            runner.run(["ip", "-n", ns, "route", "add", "default", "via", gateway])

    def _spawn_service(self, state: dict, name: str, ns: str, args: list[str]) -> None:
        log = (self.paths.logs / f"{name}.log").open("ab")
        marker = f"safemail.lab.services {args[0]}"
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m",
                                 "safemail.lab.services", *args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        state["processes"][name] = {"pid": proc.pid, "marker": marker}
        self.save_state(state)

    def _network(self, plan: LabPlan, state: dict) -> None:
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        # Unreachable routes first: from now on a lab address that is not up fails here.
        for net in LAB_RANGES:
            runner.run(["ip", "route", "replace", "unreachable", str(net)])
            state["root_routes"].append(str(net))
        self._ns(state, NET_NS)
        for seg in SEGMENTS:
            runner.run(["ip", "-n", NET_NS, "link", "add", f"br-{seg}", "type", "bridge"])
            runner.run(["ip", "-n", NET_NS, "link", "set", f"br-{seg}", "up"])
        # The controller's one way in: a veth on mgmt.
        runner.run(["ip", "link", "add", CONTROLLER_LINK, "type", "veth", "peer", "name",
                    "ctl", "netns", NET_NS])
        state["root_links"].append(CONTROLLER_LINK)
        self.save_state(state)
        mgmt_prefix = SEGMENTS["mgmt"].prefixlen
        runner.run(["ip", "addr", "add", f"{CONTROLLER_MGMT}/{mgmt_prefix}", "dev",
                    CONTROLLER_LINK])
        runner.run(["ip", "link", "set", CONTROLLER_LINK, "up"])
        runner.run(["ip", "-n", NET_NS, "link", "set", "ctl", "master", "br-mgmt", "up"])
        # Router between the routed segments.
        self._ns(state, ROUTER_NS)
        runner.run(["ip", "netns", "exec", ROUTER_NS, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for seg in ROUTED_SEGMENTS:
            cidr = f"{plan.router_address(seg)}/{SEGMENTS[seg].prefixlen}"
            self._veth_into(ROUTER_NS, f"br-{seg}", f"rt-{seg[:8]}", seg, cidr, None)
        # Mirror (apt + NTP) on core; internet sink on the internet segment.
        self._ns(state, MIRROR_NS)
        self._veth_into(MIRROR_NS, "br-core", "mirror", "eth0",
                        f"{plan.mirror}/{SEGMENTS['core'].prefixlen}",
                        str(plan.router_address("core")))
        self._spawn_service(state, "mirror", MIRROR_NS,
                            ["mirror", "--root", str(self.paths.mirror), "--bind",
                             str(plan.mirror)])
        self._ns(state, INTERNET_NS)
        self._veth_into(INTERNET_NS, "br-internet", "internet", "eth0",
                        f"{plan.internet_sink}/{SEGMENTS['internet'].prefixlen}",
                        str(plan.router_address("internet")))
        self._spawn_service(state, "internet-sink", INTERNET_NS,
                            ["sink", "--bind", str(plan.internet_sink), "--log",
                             str(self.paths.logs / "internet-sink.jsonl")])

    def _keys(self) -> None:
        self.paths.ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.paths.key_file.exists():
            runner.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "safemail-lab",
                        "-f", str(self.paths.key_file)])
        self.paths.known_hosts.write_text("")

    def _machines(self, plan: LabPlan, img: image_mod.Image, state: dict) -> None:
        public_key = self.paths.key_file.with_suffix(".pub").read_text()
        known = [self._machine(host, index, img, state, public_key, links=True)
                 for index, host in enumerate(plan.hosts)]
        self.paths.known_hosts.write_text("\n".join(known) + "\n")

    def _machine(self, host: HostPlan, index: int, img: image_mod.Image, state: dict,
                 public_key: str, links: bool) -> str:
        """Create one machine from the golden image and start it; its known_hosts line.

        `index` is the host's place in the whole plan (it names its veths and taps). With
        `links` the machine's links are made first (nspawn: its namespace and veths; QEMU: its
        tap devices); without, those of `lab up` are used again (`lab replace`)."""
        mdir = self.paths.machines / host.name
        machines.remove_machine_dir(mdir)
        upper = mdir / "upper"
        host_key = machines.write_host_files(host, upper, public_key)
        if host.spec.hypervisor == "qemu":
            machines.write_vm_network(host, upper)
            machines.write_vm_boot_settings(upper)
            if links:
                tap_m, tap_d = machines.tap_names(index)
                for tap, seg in ((tap_m, "mgmt"), (tap_d, host.data.segment)):
                    runner.run(["ip", "-n", NET_NS, "tuntap", "add", "dev", tap, "mode", "tap"])
                    runner.run(["ip", "-n", NET_NS, "link", "set", tap, "master", f"br-{seg}",
                                "up"])
            runner.info(f"  {host.name}: QEMU VM (disk image, then boot)")
            pid = machines.start_qemu(host, img, mdir, index, NET_NS)
        else:
            if links:
                ns = machines.netns(host.name)
                self._ns(state, ns)
                self._veth_into(ns, "br-mgmt", f"h{index:02d}m", "mgmt0", host.mgmt.cidr, None,
                                host.mgmt.mac)
                self._veth_into(ns, f"br-{host.data.segment}", f"h{index:02d}d", "eth0",
                                host.data.cidr, str(host.gateway), host.data.mac)
            runner.info(f"  {host.name}: nspawn machine")
            pid = machines.start_nspawn(host, img, mdir)
        state["processes"][host.name] = {"pid": pid, "marker": str(mdir)}
        self.save_state(state)
        return f"{host.mgmt.address},{host.name} {host_key}"

    def _wait(self, plan: LabPlan) -> None:
        pending = {h.name: str(h.mgmt.address) for h in plan.hosts}
        vms = {h.name for h in plan.hosts if h.spec.hypervisor == "qemu"}
        start = time.monotonic()
        # A VM whose kernel hangs at boot is reset once (machines.KERNEL_HANG_MARKERS); its
        # wait starts again then.
        since = dict.fromkeys(pending, start)
        reset: set[str] = set()
        last_report = 0.0
        while pending:
            for name, addr in list(pending.items()):
                if self.answers(addr):
                    del pending[name]
                    runner.info(f"  {name} answers ({time.monotonic() - start:.0f} s)")
            now = time.monotonic()
            elapsed = now - start
            if not pending:
                break
            for name in sorted((set(pending) & vms) - reset):
                if now - since[name] >= VM_HANG_GRACE_SECONDS and self._reset_if_hung(name):
                    reset.add(name)
                    since[name] = time.monotonic()
            late = [n for n in pending if time.monotonic() - since[n] > SSH_WAIT_SECONDS]
            if late:
                logs = ", ".join(str(self._console(n)) for n in late)
                was_reset = [n for n in late if n in reset]
                raise SafeMailError(
                    f"no SSH answer after {SSH_WAIT_SECONDS} s from: {', '.join(late)}"
                    + (f" (reset once after a hung boot: {', '.join(was_reset)})"
                       if was_reset else ""),
                    hint=f"look at the console logs: {logs}")
            if elapsed - last_report >= 15:
                runner.info(f"  waiting for {', '.join(sorted(pending))} ({elapsed:.0f} s)")
                last_report = elapsed
            time.sleep(2)

    def _console(self, name: str) -> Path:
        return self.paths.machines / name / "console.log"

    def _reset_if_hung(self, name: str) -> bool:
        """Reset a VM whose console shows a hung kernel; True if it was reset."""
        if not machines.console_hang(self._console(name)):
            return False
        runner.info(f"  {name}: the guest kernel hung at boot ({self._console(name)} shows "
                    "a soft lockup or RCU stall); resetting the VM once")
        machines.qmp(self.paths.machines / name / "qmp.sock", "system_reset")
        return True

    def _write_inventory(self, plan: LabPlan) -> None:
        data = generated_inventory(plan, str(self.paths.key_file), str(self.paths.known_hosts),
                                   self.paths.key_file.with_suffix(".pub").read_text().strip())
        text = ("# Written by `safemail lab up`; removed by `safemail lab down`. Do not edit.\n"
                + yaml.safe_dump(data, sort_keys=True))
        (self.inventory_dir / GENERATED_INVENTORY).write_text(text)

    # -- replace ---------------------------------------------------------------------------
    def replace(self, names: list[str]) -> int:
        """A brand-new machine in place of each named host (AV-01's restore from nothing)."""
        runner.require_root()
        with self.locked():
            return self._replace(names)

    def _replace(self, names: list[str]) -> int:
        """As an operator deploys a new VM from the template: the host's process stopped, its
        machine directory (overlay, VM disks: the data disk too, so its LUKS volume is gone)
        removed, a new machine made from the running lab's golden image with the same name,
        addresses and MACs and a new SSH host key, started on the links `lab up` made, and
        waited for like `lab up` waits."""
        state = self.load_state()
        if state is None:
            raise SafeMailError("the lab is not up", hint="start it with `safemail lab up`")
        if not state.get("complete"):
            raise SafeMailError("the lab is not complete (`lab up` did not finish)",
                                hint="run `safemail lab down`, then `safemail lab up`")
        plan = self.plan(all_vms=bool(state.get("all_vms")))
        index = {h.name: i for i, h in enumerate(plan.hosts)}
        wanted = list(dict.fromkeys(names))
        unknown = [n for n in wanted if n not in index]
        if not wanted or unknown:
            raise SafeMailError(
                f"no lab host named {', '.join(map(repr, unknown))}" if unknown
                else "name the host(s) to replace",
                hint=f"lab hosts: {', '.join(index)}")
        hosts = [plan.hosts[index[n]] for n in wanted]
        img = self._running_image(plan, state)
        self._check_links(hosts, index)
        runner.require_tools("ip", "ssh", "ssh-keygen",
                             *(("qemu-system-x86_64", "mkfs.ext4")
                               if any(h.spec.hypervisor == "qemu" for h in hosts)
                               else ("systemd-nspawn",)))
        started = time.monotonic()
        public_key = self.paths.key_file.with_suffix(".pub").read_text()
        for host in hosts:
            runner.info(f"lab: replacing {host.name} ({host.spec.hypervisor}) with a new machine")
            proc = state.get("processes", {}).get(host.name)
            if proc and machines.process_alive(proc["pid"], proc["marker"]):
                runner.info(f"  stopping {host.name} (pid {proc['pid']})")
                machines.stop_process(proc["pid"], proc["marker"])
            if host.spec.hypervisor != "qemu":
                shutil.rmtree(NSPAWN_PROPAGATE_DIR / machines.netns(host.name),
                              ignore_errors=True)
            line = self._machine(host, index[host.name], img, state, public_key, links=False)
            self._known_host(host, line)
            runner.info(f"  {host.name}: new SSH host key {line.split(' ', 1)[1]}")
        runner.info(f"lab: waiting for SSH on {', '.join(wanted)}")
        try:
            self._wait(dataclasses.replace(plan, hosts=tuple(hosts)))
        except BaseException:
            runner.info("lab replace: the new machine did not answer; `safemail lab replace "
                        f"{' '.join(wanted)}` again, or `safemail lab down` (logs in "
                        f"{self.paths.machines}/<host>/console.log)")
            raise
        runner.info(f"lab: replaced {', '.join(wanted)} in {time.monotonic() - started:.0f} s; "
                    "nothing on them is converged: run playbooks/restore.yml "
                    "(docs/availability.md)")
        return 0

    def _running_image(self, plan: LabPlan, state: dict) -> image_mod.Image:
        """The golden image the running lab was started from (never a rebuild: a replaced
        machine must come from the same template as its neighbours)."""
        img = image_mod.image_for(self.paths, self.project, vm_hosts(plan))
        if sorted(p.name for p in img.parts()) != sorted(state.get("image", [])) \
                or not image_mod.is_built(img):
            raise SafeMailError(
                "this checkout's golden image is not the one the running lab was started from "
                "(the roles' packages or the VM hosts changed since `lab up`)",
                hint="replace from the checkout that started the lab, or `safemail lab down` "
                     "and `safemail lab up`")
        return img

    def _check_links(self, hosts: list[HostPlan], index: dict[str, int]) -> None:
        """The links `lab up` made for these hosts are still there (they are reused)."""
        for host in hosts:
            if host.spec.hypervisor == "qemu":
                for tap in machines.tap_names(index[host.name]):
                    if runner.run(["ip", "-n", NET_NS, "link", "show", tap],
                                  check=False).returncode != 0:
                        raise SafeMailError(f"{host.name}: its tap device {tap} is missing in "
                                            f"{NET_NS}", hint="restart the lab (`lab down`, "
                                                              "`lab up`)")
            elif not (NETNS_DIR / machines.netns(host.name)).exists():
                raise SafeMailError(f"{host.name}: its network namespace "
                                    f"{machines.netns(host.name)} is missing",
                                    hint="restart the lab (`lab down`, `lab up`)")

    def _known_host(self, host: HostPlan, line: str) -> None:
        """Put `line` in place of the host's line in the lab's known_hosts; others stay."""
        try:
            old = self.paths.known_hosts.read_text().splitlines()
        except FileNotFoundError:
            old = []
        names = {host.name, str(host.mgmt.address)}
        lines: list[str] = []
        for entry in old:
            if not entry.strip():
                continue
            if names & set(entry.split(" ", 1)[0].split(",")):
                if line not in lines:
                    lines.append(line)  # in the old line's place; a second old line goes
            else:
                lines.append(entry)
        if line not in lines:
            lines.append(line)
        self.paths.known_hosts.write_text("\n".join(lines) + "\n")

    # -- down ------------------------------------------------------------------------------
    def down(self) -> int:
        runner.require_root()
        with self.locked():
            return self._down()

    def _down(self) -> int:
        state = self.load_state() or {}
        removed = 0
        for name, proc in state.get("processes", {}).items():
            if machines.process_alive(proc["pid"], proc["marker"]):
                runner.info(f"  stopping {name} (pid {proc['pid']})")
                machines.stop_process(proc["pid"], proc["marker"])
                removed += 1
        # Crash remains: processes whose command line names the lab's state directory.
        for pid, _ in self._stray_processes():
            machines.stop_process(pid, str(self.paths.state))
            removed += 1
        for mount in self._lab_mounts():
            runner.run(["umount", "-l", mount], check=False)
            removed += 1
        namespaces = set(state.get("namespaces", [])) | self._lab_namespaces()
        for ns in sorted(namespaces):
            runner.run(["ip", "netns", "del", ns], check=False)
            shutil.rmtree(NSPAWN_PROPAGATE_DIR / ns, ignore_errors=True)
            removed += 1
        links = set(state.get("root_links", [])) | {CONTROLLER_LINK}
        for link in links:
            if Path(f"/sys/class/net/{link}").exists():
                runner.run(["ip", "link", "del", link], check=False)
                removed += 1
        routes = set(state.get("root_routes", [])) | {str(n) for n in LAB_RANGES}
        for net in routes:
            proc = runner.run(["ip", "route", "del", "unreachable", net], check=False)
            removed += proc.returncode == 0
        if self.paths.machines.exists():
            shutil.rmtree(self.paths.machines)
        self.paths.state_file.unlink(missing_ok=True)
        (self.inventory_dir / GENERATED_INVENTORY).unlink(missing_ok=True)
        runner.info("lab is down" + (f" ({removed} items removed)" if removed else
                                     " (nothing was running)"))
        return 0

    def _stray_processes(self) -> list[tuple[int, str]]:
        marker = str(self.paths.state)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmd and ("systemd-nspawn" in cmd or "qemu-system" in cmd
                                  or "safemail.lab.services" in cmd):
                found.append((int(entry.name), cmd))
        return found

    def _lab_mounts(self) -> list[str]:
        prefix = str(self.paths.state) + "/"
        mounts = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1].replace("\\040", " ")
            if target.startswith(prefix):
                mounts.append(target)
        return sorted(mounts, key=len, reverse=True)

    def _lab_namespaces(self) -> set[str]:
        try:
            return {n for n in os.listdir("/run/netns") if n.startswith(f"{PREFIX}-")}
        except FileNotFoundError:
            return set()

    # -- status ----------------------------------------------------------------------------
    def status(self) -> list[dict]:
        state = self.load_state()
        plan = self.plan(all_vms=bool(state and state.get("all_vms")))
        alive = self.processes_alive(state) if state else {}
        rows = []
        for h in plan.hosts:
            running = alive.get(h.name, False)
            rows.append({
                "host": h.name, "hypervisor": h.spec.hypervisor,
                "groups": ",".join(g for g in h.spec.groups if g != "service"),
                "mgmt": str(h.mgmt.address), "address": f"{h.data.address} ({h.data.segment})",
                "running": running,
                "answers": running and self.answers(str(h.mgmt.address)),
            })
        for name, addr in (("mirror", plan.mirror), ("internet-sink", plan.internet_sink)):
            running = alive.get(name, False)
            # Not reachable from the controller by design (only mgmt is): running is all.
            rows.append({"host": name, "hypervisor": "namespace", "groups": "lab",
                         "mgmt": "-", "address": str(addr), "running": running,
                         "answers": running})
        return rows

