"""Booting lab machines: systemd-nspawn containers and QEMU VMs from the golden image."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from safemail.errors import SafeMailError
from safemail.lab import runner
from safemail.lab.config import PREFIX
from safemail.lab.image import Image
from safemail.lab.plan import HostPlan

VM_MEMORY_MB = 1536
VM_ROOT_SIZE = "4G"
# The second virtual disk (like an extra VMDK) for encrypted data. Lab mail needs a few MB;
# STORE-01 reads the whole device (raw and opened) to prove where a marker lands, so its size
# sets that test's time (2 GiB took about 16 s a read under emulation).
VM_DATA_SIZE = "512M"


def netns(host: str) -> str:
    return f"{PREFIX}-{host}"


def write_host_files(host: HostPlan, upper: Path, public_key: str) -> str:
    """Put the host's identity into its overlay layer; return its SSH host public key."""
    etc = upper / "etc"
    (etc / "ssh").mkdir(parents=True, exist_ok=True)
    (etc / "hostname").write_text(f"{host.name}\n")
    (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{host.name}\n")
    ssh_root = upper / "root" / ".ssh"
    ssh_root.mkdir(parents=True, exist_ok=True)
    os.chmod(upper / "root", 0o700)
    os.chmod(ssh_root, 0o700)
    auth = ssh_root / "authorized_keys"
    auth.write_text(public_key.strip() + "\n")
    os.chmod(auth, 0o600)
    key = etc / "ssh" / "ssh_host_ed25519_key"
    if not key.exists():
        runner.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{host.name}",
                    "-f", str(key)])
    return (key.with_suffix(".pub")).read_text().strip()


def write_vm_network(host: HostPlan, upper: Path) -> None:
    """VMs configure their NICs with systemd-networkd, named by MAC like the nspawn hosts."""
    net = upper / "etc" / "systemd" / "network"
    net.mkdir(parents=True, exist_ok=True)
    for iface in (host.mgmt, host.data):
        (net / f"10-{iface.name}.link").write_text(
            f"[Match]\nMACAddress={iface.mac}\n\n[Link]\nName={iface.name}\n")
        route = f"Gateway={host.gateway}\n" if iface is host.data else ""
        (net / f"20-{iface.name}.network").write_text(
            f"[Match]\nMACAddress={iface.mac}\n\n[Network]\nAddress={iface.cidr}\n{route}"
            "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")
    wants = upper / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "systemd-networkd.service"
    if not link.is_symlink():
        link.symlink_to("/lib/systemd/system/systemd-networkd.service")


# Units that only cost boot time in an emulated lab VM: e2scrub_reap removes stale LVM
# snapshots of e2scrub (the lab VMs have no LVM) and took 29 s of a 90 s reboot on relay1
# under TCG, on the path `systemctl is-system-running --wait` waits for. Lab only: a
# production VM with LVM keeps it.
VM_MASKED_UNITS = ("e2scrub_reap.service", "e2scrub_all.timer")


def write_vm_boot_settings(upper: Path) -> None:
    """Mask VM_MASKED_UNITS in the VM's root (a unit linked to /dev/null is masked)."""
    system = upper / "etc" / "systemd" / "system"
    system.mkdir(parents=True, exist_ok=True)
    for unit in VM_MASKED_UNITS:
        link = system / unit
        if not link.is_symlink():
            link.symlink_to("/dev/null")


def mount_overlay(lower: list[Path], upper: Path, work: Path, merged: Path) -> None:
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    lowers = ":".join(str(p) for p in lower)
    runner.run(["mount", "-t", "overlay", f"{PREFIX}-overlay", "-o",
                f"lowerdir={lowers},upperdir={upper},workdir={work}", str(merged)])


def start_nspawn(host: HostPlan, image: Image, mdir: Path) -> int:
    root = mdir / "root"
    mount_overlay([image.rootfs], mdir / "upper", mdir / "work", root)
    console = (mdir / "console.log").open("ab")
    proc = subprocess.Popen(
        ["systemd-nspawn", "-D", str(root), "--boot", "--register=no", "--keep-unit",
         f"--machine={netns(host.name)}", f"--hostname={host.name}",
         "--capability=CAP_NET_ADMIN", f"--network-namespace-path=/run/netns/{netns(host.name)}",
         "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=passive"],
        stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
        start_new_session=True)
    return proc.pid


def tap_names(index: int) -> tuple[str, str]:
    return f"tq{index:02d}m", f"tq{index:02d}d"


def start_qemu(host: HostPlan, image: Image, mdir: Path, index: int, bridge_ns: str) -> int:
    merged = mdir / "stage"
    layer = image.vms[host.name]
    mount_overlay([layer.upper, image.rootfs], mdir / "upper", mdir / "work", merged)
    root_disk = mdir / "root.raw"
    try:
        root_disk.unlink(missing_ok=True)
        runner.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(merged), str(root_disk),
                    VM_ROOT_SIZE], timeout=300)
    finally:
        runner.run(["umount", str(merged)], check=False)
    data_disk = mdir / "data.raw"
    if not data_disk.exists():
        runner.run(["truncate", "-s", VM_DATA_SIZE, str(data_disk)])
    tap_m, tap_d = tap_names(index)
    pidfile = mdir / "qemu.pid"
    pidfile.unlink(missing_ok=True)
    cmd = [
        "ip", "netns", "exec", bridge_ns,
        "qemu-system-x86_64", "-name", f"{PREFIX}-{host.name}",
        "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", str(VM_MEMORY_MB),
        "-kernel", str(layer.kernel), "-initrd", str(layer.initrd),
        "-append", "root=/dev/disk/by-id/virtio-safemail-root rw console=ttyS0 "
                   f"systemd.hostname={host.name}",
        "-drive", f"file={root_disk},format=raw,if=none,id=root,cache=unsafe",
        "-device", "virtio-blk-pci,drive=root,serial=safemail-root",
        # The data disk shows in the guest as /dev/disk/by-id/virtio-safemail-data.
        "-drive", f"file={data_disk},format=raw,if=none,id=data",
        "-device", "virtio-blk-pci,drive=data,serial=safemail-data",
        # The data NIC first: the kernel names it eth0, the name its .link file gives it, so
        # the rename by MAC never races the management NIC for "eth0" (it did once the
        # initramfs stopped loading virtio_net early: relay1 came up with an unnamed eth1).
        "-netdev", f"tap,id=data,ifname={tap_d},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=data,mac={host.data.mac}",
        "-netdev", f"tap,id=mgmt,ifname={tap_m},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=mgmt,mac={host.mgmt.mac}",
        "-display", "none", "-monitor", "none", "-nodefaults",
        "-serial", f"file:{mdir / 'console.log'}",
        "-qmp", f"unix:{mdir / 'qmp.sock'},server=on,wait=off",
        "-daemonize", "-pidfile", str(pidfile),
    ]
    runner.run(cmd, timeout=60)
    return int(pidfile.read_text().strip())


# What an emulated guest kernel prints when it hangs during boot. Seen once (session 11, store1
# under a loaded host): systemd and modprobe stuck for minutes in an audit netlink loop, "soft
# lockup" and "rcu_preempt detected stalls" repeated on the console, no SSH ever. A reset of
# the VM (same disks, nothing written yet by Ansible) boots it normally.
KERNEL_HANG_MARKERS = ("watchdog: BUG: soft lockup", "detected stalls on CPUs/tasks")


def console_hang(console: Path, offset: int = 0) -> bool:
    """True if the console log, from byte `offset` on, shows the guest kernel hung."""
    try:
        with console.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return False
    return any(marker in text for marker in KERNEL_HANG_MARKERS)


def qmp(sock: Path, command: str, timeout: float = 10.0) -> dict:
    """Run one QMP command on a lab VM (the `-qmp unix:` socket start_qemu gives it)."""
    def read(stream) -> dict:
        while True:
            line = stream.readline()
            if not line:
                raise SafeMailError(f"QMP socket {sock} closed before answering {command}")
            message = json.loads(line)
            if "event" not in message:      # events may come in between; skip them
                return message

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            stream = s.makefile("rwb")
            read(stream)                    # the greeting
            for execute in ("qmp_capabilities", command):
                stream.write(json.dumps({"execute": execute}).encode() + b"\n")
                stream.flush()
                answer = read(stream)
                if "error" in answer:
                    raise SafeMailError(f"QMP {execute} on {sock}: {answer['error']}")
            return answer
    except (OSError, ValueError) as exc:
        raise SafeMailError(f"QMP {command} on {sock} failed: {exc}") from exc


def process_alive(pid: int, marker: str) -> bool:
    """True if `pid` runs and its command line contains `marker` (it is one of ours)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return marker in cmdline


def stop_process(pid: int, marker: str, timeout: float = 20.0) -> None:
    """End one process the lab started: SIGTERM (nspawn powers the machine off), then KILL."""
    if not process_alive(pid, marker):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid, marker):
            return
        time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if not process_alive(pid, marker):
            return
        time.sleep(0.1)
    raise SafeMailError(f"process {pid} ({marker}) did not end")


def remove_machine_dir(mdir: Path) -> None:
    for sub in ("root", "stage"):
        p = mdir / sub
        if os.path.ismount(p):
            runner.run(["umount", str(p)], check=False)
    shutil.rmtree(mdir, ignore_errors=True)

