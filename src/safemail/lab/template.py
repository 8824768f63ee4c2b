"""The VMware VM template, built from the lab's golden image (issue 15, "The image").

The lab boots the golden image's base layer (``base-<hash>/rootfs``, src/safemail/lab/image.py)
as nspawn machines and, with a VM layer, under QEMU with an external kernel. A VMware template
needs a disk that boots on its own. `build` makes one from the SAME base layer, read-only
(an overlay on it; the cache is not changed), and adds only what booting on VMware needs:

- the lab VMs' kernel packages (``image.VM_PACKAGES``, the same .debs the lab's mirror
  serves), GRUB for BIOS boot (grub-pc, from the Debian mirror the image build uses) and the
  guest tools the common role installs on VMware guests (``common_vmware_packages``);
- an initramfs with the VMware drivers (``MODULES=list``: pvscsi, sd_mod, vmxnet3; ahci where
  the kernel has it: Debian's cloud kernel has no AHCI, so the disk must be on pvscsi);
- fstab and the boot entry by file-system UUID, the serial console on the kernel command line,
  SSH host keys made on first boot (the image carries none), optionally root's authorized_keys.

The disk is made without loop devices or mounts of it: ``mkfs.ext4 -d`` writes the root file
system into a file, which goes into a raw disk after an MBR (one partition at 1 MiB);
GRUB's boot.img goes into the MBR's code area and a core.img (made by the image's own
grub-mkimage, with the root's UUID in its embedded config) into the gap before the partition.
Then a streamOptimized VMDK, an OVF (paravirtual SCSI, vmxnet3, BIOS), a manifest with the
SHA-256 of both, an OVA (tar of the three), and template.json: the base layer's name, input
hash and content digest, every package added with its version and origin, the base files the
install changed, and the kernel and initramfs modules.

`check` re-reads a template directory: manifest checksums, the OVF's references and hardware,
the disk's partition table and boot code, the digest of the base layer still in the cache;
with ``boot``, it boots the VMDK under QEMU (no external kernel, pvscsi disk, vmxnet3 NIC on a
restricted user-mode network, serial console to a file) until a login prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import yaml

from safemail.errors import SafeMailError
from safemail.lab import image as image_mod
from safemail.lab import runner
from safemail.lab.config import LabPaths

TEMPLATE_NAME = "safemail-bookworm-golden"
SECTOR = 512
PART_START = 2048  # sectors: 1 MiB, room for GRUB's core.img after the MBR
BOOTLOADER_PACKAGES = ("grub-pc",)
# The initramfs loads exactly these (MODULES=list). REQUIRED ones must be in it.
REQUIRED_INITRAMFS_MODULES = ("vmw_pvscsi", "sd_mod", "vmxnet3")
OPTIONAL_INITRAMFS_MODULES = ("ahci",)
KERNEL_CMDLINE = "ro console=tty0 console=ttyS0,115200n8"
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "search", "search_fs_uuid", "normal",
                "configfile", "linux", "echo", "serial", "terminal")
# OVF: hardware the provisioning playbook expects (playbooks/vmware-provision.yml).
OVF_OS_TYPE = "debian11_64Guest"  # vSphere 7 and 8 know it; debian12_64Guest is 8.0+ only
OVF_OS_ID = "96"                  # CIM "Debian" (64-bit)
OVF_HW_VERSION = "vmx-14"         # ESXi 6.7 U2 and later
OVF_CPUS = 2
OVF_MEMORY_MB = 2048
OVF_NETWORK = "mgmt"
ROOT_MARGIN = 1.5  # the root file system: content size x this, at least MIN_DISK_MB
MIN_DISK_MB = 2048
QEMU_BOOT_TIMEOUT = 240
SSH_HOSTKEY_UNIT = """\
[Unit]
Description=SafeMail template: SSH host keys for this machine (first boot)
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""
# A clone gets the inventory's disk size (safemail_vm_disk_gb), bigger than the template's:
# on every boot, grow the root partition (the last one, MBR) to the end of the disk and its
# ext4 online. Python because the image has it (cloud-guest-utils' growpart would add
# packages); partx and resize2fs are in the base image.
GROWROOT_SCRIPT = '''#!/usr/bin/python3
"""Grow the root partition and its ext4 to the end of the disk (SafeMail template)."""
import os
import struct
import subprocess
import sys


def grow_entry(mbr, number, disk_sectors):
    """The MBR with partition `number` reaching the end of the disk, or None (nothing to do)."""
    if len(mbr) < 512 or mbr[510:512] != b"\\x55\\xaa" or not 1 <= number <= 4:
        return None
    if any(mbr[446 + 16 * i + 4] == 0xEE for i in range(4)):
        return None  # GPT: not this script's
    off = 446 + 16 * (number - 1)
    start, count = struct.unpack_from("<II", mbr, off + 8)
    for i in range(4):
        s, c = struct.unpack_from("<II", mbr, 446 + 16 * i + 8)
        if i != number - 1 and mbr[446 + 16 * i + 4] and s > start:
            return None  # not the last partition
    new = min(disk_sectors, 0xFFFFFFFF) - start
    if new < count + 2048:  # less than 1 MiB to gain
        return None
    out = bytearray(mbr)
    struct.pack_into("<I", out, off + 12, new)
    return bytes(out)


def main():
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "/"], capture_output=True,
                            text=True, check=True).stdout.strip()
    part = os.path.basename(os.path.realpath(source))
    sysdir = "/sys/class/block/" + part
    with open(sysdir + "/partition") as f:
        number = int(f.read())
    disk = os.path.basename(os.path.realpath(sysdir + "/.."))
    with open("/sys/class/block/%s/size" % disk) as f:
        disk_sectors = int(f.read())
    with open("/dev/" + disk, "r+b") as dev:
        mbr = dev.read(512)
        new = grow_entry(mbr, number, disk_sectors)
        if new is None:
            print("safemail-growroot: /dev/%s already fills /dev/%s" % (part, disk))
            return 0
        dev.seek(0)
        dev.write(new)
        dev.flush()
        os.fsync(dev.fileno())
    subprocess.run(["partx", "-u", "--nr", str(number), "/dev/" + disk], check=True)
    subprocess.run(["resize2fs", "/dev/" + part], check=True)
    print("safemail-growroot: grew /dev/%s to the end of /dev/%s" % (part, disk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''
GROWROOT_UNIT = """\
[Unit]
Description=SafeMail template: grow the root partition to the disk's size
After=local-fs.target
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/safemail-growroot
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
"""
GRUB_DEFAULTS = f"""\
# SafeMail template (src/safemail/lab/template.py): serial console, as the lab VMs have.
GRUB_TIMEOUT=1
GRUB_CMDLINE_LINUX="{KERNEL_CMDLINE.removeprefix('ro ')}"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
"""
# Files of the base layer the install may change without being a surprise worth listing apart.
CHANGED_NOISE = ("var/lib/dpkg/", "var/cache/", "var/log/", "var/lib/apt/", "var/lib/systemd/")


@dataclass(frozen=True)
class Files:
    """The names of a template's files in its directory."""

    out: Path

    @property
    def vmdk(self) -> Path:
        return self.out / f"{TEMPLATE_NAME}.vmdk"

    @property
    def ovf(self) -> Path:
        return self.out / f"{TEMPLATE_NAME}.ovf"

    @property
    def mf(self) -> Path:
        return self.out / f"{TEMPLATE_NAME}.mf"

    @property
    def ova(self) -> Path:
        return self.out / f"{TEMPLATE_NAME}.ova"

    @property
    def metadata(self) -> Path:
        return self.out / "template.json"

    @property
    def raw(self) -> Path:
        return self.out / "work" / "disk.raw"


# --- pieces without root: digests, the partition table, the OVF and manifest -------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """SHA-256 over every entry of a tree: path, type, mode, owner, content or link target.

    Two trees with the same digest have the same files with the same bytes and metadata
    (times excepted)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = Path(dirpath, name)
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            h.update(f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(sha256_file(path).encode())
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                h.update(f"{st.st_rdev}".encode())
            h.update(b"\n")
    return h.hexdigest()


def mbr(boot_code: bytes, start: int, sectors: int, disk_id: int) -> bytes:
    """A DOS partition table with one bootable Linux partition [start, start+sectors)."""
    if len(boot_code) < 440:
        raise SafeMailError("GRUB's boot.img is shorter than the MBR code area (440 bytes)")
    if start + sectors > 0xFFFFFFFF:
        raise SafeMailError("the disk is too large for an MBR partition table (2 TiB)")
    chs_max = b"\xfe\xff\xff"  # LBA addressing: CHS fields at their maximum
    entry = (b"\x80" + chs_max + b"\x83" + chs_max + struct.pack("<II", start, sectors))
    return (boot_code[:440] + struct.pack("<I", disk_id) + b"\0\0" + entry + b"\0" * 48
            + b"\x55\xaa")


def write_disk(raw: Path, rootfs_img: Path, boot_img: bytes, core_img: bytes,
               disk_id: int) -> None:
    """raw = MBR with GRUB's boot code, core.img from sector 1, the root file system at 1 MiB."""
    size = rootfs_img.stat().st_size
    if size % SECTOR:
        raise SafeMailError(f"{rootfs_img}: size {size} is not a multiple of {SECTOR}")
    if len(core_img) > (PART_START - 1) * SECTOR:
        raise SafeMailError(f"GRUB's core.img ({len(core_img)} bytes) does not fit before the "
                            f"partition at sector {PART_START}")
    sectors = size // SECTOR
    with raw.open("wb") as out:
        out.write(mbr(boot_img, PART_START, sectors, disk_id))
        out.write(core_img)
        out.seek(PART_START * SECTOR)
        with rootfs_img.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        out.truncate((PART_START + sectors) * SECTOR)


OVF_NS = {"ovf": "http://schemas.dmtf.org/ovf/envelope/1",
          "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
          "vssd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData",
          "vmw": "http://www.vmware.com/schema/ovf"}


def ovf_descriptor(vmdk_name: str, vmdk_size: int, capacity: int, build_id: str) -> str:
    """An OVF 1.0 envelope: one VM, BIOS, paravirtual SCSI with the disk, one vmxnet3 NIC."""
    def item(rid: int, rtype: int, name: str, extra: str) -> str:
        return (f"      <Item>\n        <rasd:ElementName>{name}</rasd:ElementName>\n"
                f"        <rasd:InstanceID>{rid}</rasd:InstanceID>\n"
                f"        <rasd:ResourceType>{rtype}</rasd:ResourceType>\n{extra}      </Item>\n")

    ns = " ".join(f'xmlns:{k}="{v}"' for k, v in OVF_NS.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Envelope xmlns="{OVF_NS["ovf"]}" {ns}>\n'
        "  <References>\n"
        f'    <File ovf:href="{vmdk_name}" ovf:id="file1" ovf:size="{vmdk_size}"/>\n'
        "  </References>\n"
        "  <DiskSection>\n    <Info>Virtual disks</Info>\n"
        f'    <Disk ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte" '
        'ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format='
        '"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>\n'
        "  </DiskSection>\n"
        "  <NetworkSection>\n    <Info>Networks</Info>\n"
        f'    <Network ovf:name="{OVF_NETWORK}">\n      <Description>The management segment '
        "(the provisioning playbook puts each VM on its port groups)</Description>\n"
        "    </Network>\n  </NetworkSection>\n"
        f'  <VirtualSystem ovf:id="{TEMPLATE_NAME}">\n'
        "    <Info>SafeMail golden image (Debian 12)</Info>\n"
        f"    <Name>{TEMPLATE_NAME}</Name>\n"
        f"    <AnnotationSection>\n      <Info>Build</Info>\n"
        f"      <Annotation>SafeMail template from golden image {build_id}</Annotation>\n"
        "    </AnnotationSection>\n"
        f'    <OperatingSystemSection ovf:id="{OVF_OS_ID}" vmw:osType="{OVF_OS_TYPE}">\n'
        "      <Info>Guest operating system</Info>\n"
        "      <Description>Debian GNU/Linux 12 (64-bit)</Description>\n"
        "    </OperatingSystemSection>\n"
        "    <VirtualHardwareSection>\n      <Info>Virtual hardware</Info>\n"
        "      <System>\n        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n"
        "        <vssd:InstanceID>0</vssd:InstanceID>\n"
        f"        <vssd:VirtualSystemIdentifier>{TEMPLATE_NAME}</vssd:VirtualSystemIdentifier>\n"
        f"        <vssd:VirtualSystemType>{OVF_HW_VERSION}</vssd:VirtualSystemType>\n"
        "      </System>\n"
        + item(1, 3, f"{OVF_CPUS} virtual CPU(s)",
               "        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>\n"
               f"        <rasd:VirtualQuantity>{OVF_CPUS}</rasd:VirtualQuantity>\n")
        + item(2, 4, f"{OVF_MEMORY_MB} MB of memory",
               "        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>\n"
               f"        <rasd:VirtualQuantity>{OVF_MEMORY_MB}</rasd:VirtualQuantity>\n")
        + item(3, 6, "SCSI controller 0",
               "        <rasd:Address>0</rasd:Address>\n"
               "        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>\n")
        + item(4, 17, "Hard disk 1",
               "        <rasd:AddressOnParent>0</rasd:AddressOnParent>\n"
               "        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>\n"
               "        <rasd:Parent>3</rasd:Parent>\n")
        + item(5, 10, "Network adapter 1",
               "        <rasd:AddressOnParent>7</rasd:AddressOnParent>\n"
               "        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>\n"
               f"        <rasd:Connection>{OVF_NETWORK}</rasd:Connection>\n"
               "        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>\n")
        + '      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>\n'
        '      <vmw:Config ovf:required="false" vmw:key="tools.syncTimeWithHost" '
        'vmw:value="false"/>\n'
        "    </VirtualHardwareSection>\n  </VirtualSystem>\n</Envelope>\n")


def manifest(files: list[Path]) -> str:
    """An OVF manifest: ``SHA256(name)= hex`` per file (ovftool and vSphere read it)."""
    return "".join(f"SHA256({f.name})= {sha256_file(f)}\n" for f in files)


MF_LINE = re.compile(r"^SHA256\(([^)/]+)\)= ([0-9a-f]{64})$")


def read_manifest(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        found = MF_LINE.match(line.strip())
        if not found:
            raise SafeMailError(f"manifest line {n} is not `SHA256(file)= <64 hex>`: {line!r}")
        out[found.group(1)] = found.group(2)
    return out


def ovf_summary(text: str) -> dict:
    """What an OVF says about files, disk and hardware (for `check` and the tests)."""
    try:
        # expat (Python 3.11, libexpat >= 2.4) resolves no external entities and limits
        # entity expansion; the OVF is the template's own file
        root = ElementTree.fromstring(text)  # noqa: S314
    except ElementTree.ParseError as exc:
        raise SafeMailError(f"the OVF is not well-formed XML: {exc}") from exc
    o, r = f"{{{OVF_NS['ovf']}}}", f"{{{OVF_NS['rasd']}}}"
    files = {f.get(f"{o}href"): int(f.get(f"{o}size", "-1"))
             for f in root.iter(f"{o}File")}
    disks = [{"capacity": int(d.get(f"{o}capacity", "0")), "format": d.get(f"{o}format"),
              "file": d.get(f"{o}fileRef")} for d in root.iter(f"{o}Disk")]
    items = []
    for it in root.iter(f"{o}Item"):
        items.append({child.tag.removeprefix(r): (child.text or "") for child in it})
    controllers = {i["InstanceID"]: i.get("ResourceSubType") for i in items
                   if i.get("ResourceType") == "6"}
    disk_items = [i for i in items if i.get("ResourceType") == "17"]
    return {
        "files": files, "disks": disks,
        "scsi": sorted(controllers.values()),
        "disk_controllers": [controllers.get(i.get("Parent", "")) for i in disk_items],
        "nics": [i.get("ResourceSubType") for i in items if i.get("ResourceType") == "10"],
        "os_type": next((s.get(f"{{{OVF_NS['vmw']}}}osType")
                         for s in root.iter(f"{o}OperatingSystemSection")), None),
    }


def read_mbr(raw: Path) -> dict:
    """The boot signature, GRUB's presence and the partition entries of a disk image."""
    with raw.open("rb") as f:
        sector0 = f.read(SECTOR)
        sector1 = f.read(SECTOR)
    parts = []
    for i in range(4):
        e = sector0[446 + 16 * i: 446 + 16 * (i + 1)]
        start, count = struct.unpack("<II", e[8:16])
        if e[4]:
            parts.append({"bootable": e[0] == 0x80, "type": e[4], "start": start,
                          "sectors": count})
    return {"signature": sector0[510:512] == b"\x55\xaa", "grub_boot": b"GRUB" in sector0,
            "core_img": len(sector1) == SECTOR and sector1 != b"\0" * SECTOR,
            "partitions": parts}


# --- building (root: overlay mount, nspawn, mkfs) ----------------------------------------

def _dpkg_list(root: Path) -> dict[str, str]:
    status = (root / "var/lib/dpkg/status").read_text(errors="replace")
    out: dict[str, str] = {}
    for block in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", block, re.MULTILINE))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out[fields["Package"]] = fields.get("Version", "")
    return out


def _changed_base_files(upper: Path, lower: Path) -> list[str]:
    """Files of the base layer the install replaced (in the overlay's upper and the lower)."""
    out = []
    for dirpath, _dirs, files in os.walk(upper):
        for name in files:
            rel = Path(dirpath, name).relative_to(upper).as_posix()
            if (lower / rel).exists() and not rel.startswith(CHANGED_NOISE):
                out.append(rel)
    return sorted(out)


def _vmware_packages(project: Path) -> list[str]:
    defaults = yaml.safe_load((project / "roles/common/defaults/main.yml").read_text()) or {}
    pkgs = defaults.get("common_vmware_packages") or []
    if not isinstance(pkgs, list) or not all(isinstance(p, str) for p in pkgs):
        raise SafeMailError("roles/common/defaults/main.yml: common_vmware_packages must be a "
                            "list of package names")
    return pkgs


def _install_script(packages: list[str], uuid_: str) -> str:
    required = " ".join(REQUIRED_INITRAMFS_MODULES)
    modules = "\\n".join((*REQUIRED_INITRAMFS_MODULES, *OPTIONAL_INITRAMFS_MODULES))
    early = (f"search --no-floppy --fs-uuid --set=root {uuid_}\\n"
             "set prefix=($root)/boot/grub\\n")
    return " && ".join([
        image_mod._seed_apt_cache("true"),  # noqa: SLF001 - the image build's own helper
        "echo 'grub-pc grub-pc/install_devices multiselect /dev/sda' | debconf-set-selections",
        "apt-get update -q",
        f"apt-get install -y -q {' '.join(packages)}",
        "printf 'MODULES=list\\n' > /etc/initramfs-tools/conf.d/safemail-template",
        f"printf '{modules}\\n' > /etc/initramfs-tools/modules",
        "update-initramfs -u -k all",
        # REQUIRED modules must be in the initramfs (the lab kernel might lack one)
        f"for m in {required}; do lsinitramfs /boot/initrd.img-* | grep -q \"/$m.ko\" "
        "|| { echo \"initramfs lacks $m\" >&2; exit 1; }; done",
        "lsinitramfs /boot/initrd.img-* | sed -n 's|.*/\\([^/]*\\)\\.ko.*|\\1|p' | sort -u "
        "> /run/tmpl/initramfs-modules",
        "mkdir -p /boot/grub/i386-pc",
        "cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst /boot/grub/i386-pc/",
        f"printf '{early}' > /run/tmpl/early.cfg",
        "grub-mkimage -O i386-pc -o /run/tmpl/core.img -c /run/tmpl/early.cfg "
        f"-p /boot/grub {' '.join(GRUB_MODULES)}",
        "cp /usr/lib/grub/i386-pc/boot.img /run/tmpl/boot.img",
    ])


def _grub_cfg(uuid_: str, kernel: str) -> str:
    return (f"# Written by the SafeMail template build; `update-grub` on the VM replaces it\n"
            "serial --unit=0 --speed=115200\nterminal_input console serial\n"
            "terminal_output console serial\nset timeout=1\n"
            f"search --no-floppy --fs-uuid --set=root {uuid_}\n"
            f"menuentry 'SafeMail golden image (Debian 12, {kernel})' {{\n"
            f"  linux /boot/vmlinuz-{kernel} root=UUID={uuid_} {KERNEL_CMDLINE}\n"
            f"  initrd /boot/initrd.img-{kernel}\n}}\n")


def _configure(root: Path, uuid_: str, authorized_keys: Path | None) -> str:
    """fstab, grub.cfg, GRUB defaults, first-boot SSH host keys, root's keys. Returns kernel."""
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise SafeMailError(f"the template has {len(kernels)} kernels in /boot, expected one")
    kernel = kernels[0]
    (root / "etc/fstab").write_text(f"UUID={uuid_} / ext4 errors=remount-ro 0 1\n")
    (root / "boot/grub/grub.cfg").write_text(_grub_cfg(uuid_, kernel))
    (root / "etc/default/grub.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/default/grub.d/safemail.cfg").write_text(GRUB_DEFAULTS)
    script = root / "usr/local/sbin/safemail-growroot"
    script.write_text(GROWROOT_SCRIPT)
    script.chmod(0o755)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for name, text in (("safemail-ssh-hostkeys.service", SSH_HOSTKEY_UNIT),
                       ("safemail-growroot.service", GROWROOT_UNIT)):
        (root / "etc/systemd/system" / name).write_text(text)
        link = wants / name
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{name}")
    if authorized_keys is not None:
        ssh = root / "root/.ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text(authorized_keys.read_text())
        (ssh / "authorized_keys").chmod(0o600)
    return kernel


def _read_keys(path: Path | None) -> None:
    if path is None:
        return
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()
                 and not ln.startswith("#")]
    except OSError as exc:
        raise SafeMailError(f"cannot read {path}: {exc}") from exc
    bad = [ln for ln in lines if not re.match(r"^(ssh-(ed25519|rsa)|ecdsa-sha2-\S+|sk-\S+) ", ln)]
    if not lines or bad:
        raise SafeMailError(f"{path}: not an authorized_keys file (one public key a line)",
                            hint=f"offending line: {bad[0][:60]!r}" if bad else None)


def build(paths: LabPaths, project: Path, out: Path, *,
          authorized_keys: Path | None = None) -> dict:
    """Build the template into `out` from the golden image's base layer; return its metadata."""
    runner.require_root()
    runner.require_tools("systemd-nspawn", "mkfs.ext4", "qemu-img")
    _read_keys(authorized_keys)
    img = image_mod.image_for(paths, project)
    for part in (img.base, img.debs_dir):
        if not (part / "complete").exists():
            raise SafeMailError(f"the golden image is not built ({part} is missing)",
                                hint="build it first: safemail lab image")
    files = Files(out)
    # A failed build leaves only work/ and build.log behind: a rerun may reuse the directory.
    if out.exists() and any(p for p in out.iterdir() if p.name not in ("work", "build.log")):
        raise SafeMailError(f"{out} is not empty", hint="give a new directory to --out")
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    upper, ovl, merged, tmpl = work / "upper", work / "ovl", work / "merged", work / "tmpl"
    for d in (upper, ovl, merged, tmpl):
        d.mkdir(parents=True)
    log = out / "build.log"
    started = time.monotonic()
    runner.info(f"template: digest of the golden image's base layer {img.base.name}")
    base_digest = tree_digest(img.rootfs)
    root_uuid = str(uuid.uuid4())
    packages = sorted({*image_mod.VM_PACKAGES, *BOOTLOADER_PACKAGES, *_vmware_packages(project)})
    base_pkgs = _dpkg_list(img.rootfs)
    runner.run(["mount", "-t", "overlay", "overlay", "-o",
                f"lowerdir={img.rootfs},upperdir={upper},workdir={ovl}", str(merged)])
    try:
        (merged / "etc/apt/sources.list").write_text(image_mod.BUILD_SOURCES)
        runner.run_logged(
            f"install kernel, GRUB and {', '.join(_vmware_packages(project))} (about 1 min)",
            ["systemd-nspawn", "-q", "-D", str(merged), "--register=no", "--keep-unit",
             f"--bind-ro={img.debs_dir / 'debs'}:{image_mod.SEED}", f"--bind={tmpl}:/run/tmpl",
             "--resolv-conf=copy-host", "--timezone=off", "-E", "DEBIAN_FRONTEND=noninteractive",
             "/bin/sh", "-ec", _install_script(packages, root_uuid)],
            log, hints=image_mod.APT_HINTS)
        shutil.copy2(merged / "etc/apt/sources.list", tmpl / "build-sources.list")
        (merged / "etc/apt/sources.list").write_text("")
        for p in (merged / "var/lib/apt/lists").glob("*_*"):
            p.unlink()
        seeded = {d.name for d in (img.debs_dir / "debs").glob("*.deb")}
        for deb in (merged / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        kernel = _configure(merged, root_uuid, authorized_keys)
        after = _dpkg_list(merged)
        added = {p: v for p, v in sorted(after.items()) if base_pkgs.get(p) != v}
        changed = _changed_base_files(upper, img.rootfs)
        used_kb = int(runner.run(["du", "-sk", "--apparent-size", str(merged)],
                                 timeout=300).stdout.split()[0])
        size_mb = max(MIN_DISK_MB, int(used_kb / 1024 * ROOT_MARGIN) // 64 * 64 + 64)
        rootfs_img = work / "rootfs.ext4"
        runner.run_logged("mkfs.ext4 -d (the root file system)",
                          ["mkfs.ext4", "-q", "-F", "-U", root_uuid, "-L", "safemail-root",
                           "-d", str(merged), str(rootfs_img), f"{size_mb}M"], log)
    finally:
        runner.run(["umount", str(merged)], check=False)
    boot_img = (tmpl / "boot.img").read_bytes()
    core_img = (tmpl / "core.img").read_bytes()
    write_disk(files.raw, rootfs_img, boot_img, core_img, int.from_bytes(os.urandom(4), "big"))
    rootfs_img.unlink()
    runner.run_logged("qemu-img convert -O vmdk (streamOptimized)",
                      ["qemu-img", "convert", "-O", "vmdk", "-o",
                       "subformat=streamOptimized,adapter_type=lsilogic",
                       str(files.raw), str(files.vmdk)], log)
    capacity = files.raw.stat().st_size
    build_id = f"{img.base.name}+{base_digest[:12]}"
    files.ovf.write_text(ovf_descriptor(files.vmdk.name, files.vmdk.stat().st_size, capacity,
                                        build_id))
    files.mf.write_text(manifest([files.ovf, files.vmdk]))
    with tarfile.open(files.ova, "w", format=tarfile.USTAR_FORMAT) as ova:
        for f in (files.ovf, files.mf, files.vmdk):  # the OVF first, as the format wants
            ova.add(f, arcname=f.name)
    metadata = {
        "name": TEMPLATE_NAME,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started),
        "golden_image": {"base_layer": img.base.name, "inputs": image_mod.base_inputs(),
                         "rootfs_digest": base_digest,
                         "packages_mirror": img.debs_dir.name},
        "added_packages": {p: {"version": v,
                               "from": ("lab mirror" if any(n.startswith(f"{p}_")
                                                            for n in seeded) else "debian")}
                           for p, v in added.items()},
        "requested_packages": packages,
        "changed_base_files": changed,
        "kernel": kernel,
        "kernel_cmdline": f"root=UUID={root_uuid} {KERNEL_CMDLINE}",
        "initramfs_modules": (tmpl / "initramfs-modules").read_text().split(),
        "initramfs_modules_missing": [
            m for m in OPTIONAL_INITRAMFS_MODULES
            if m not in (tmpl / "initramfs-modules").read_text().split()],
        "root_uuid": root_uuid,
        "disk": {"partition_table": "dos", "partition_start_sector": PART_START,
                 "capacity_bytes": capacity, "raw_sha256": sha256_file(files.raw)},
        "files": {f.name: sha256_file(f) for f in (files.vmdk, files.ovf, files.mf, files.ova)},
        "authorized_keys": authorized_keys is not None,
    }
    files.metadata.write_text(json.dumps(metadata, indent=2) + "\n")
    shutil.rmtree(upper, ignore_errors=True)
    shutil.rmtree(ovl, ignore_errors=True)
    return metadata


# --- checking ------------------------------------------------------------------------------

def check(out: Path, *, paths: LabPaths | None = None) -> list[str]:
    """Problems of a template directory (empty: fine). Reads, never writes."""
    files = Files(out)
    problems: list[str] = []
    for f in (files.ovf, files.mf, files.vmdk, files.metadata):
        if not f.is_file():
            problems.append(f"{f.name} is missing")
    if problems:
        return problems
    try:
        sums = read_manifest(files.mf.read_text())
    except SafeMailError as exc:
        return [f"{files.mf.name}: {exc.message}"]
    for name in (files.ovf.name, files.vmdk.name):
        if name not in sums:
            problems.append(f"{files.mf.name} does not list {name}")
        elif sha256_file(out / name) != sums[name]:
            problems.append(f"{name}: SHA-256 differs from {files.mf.name}")
    summary = ovf_summary(files.ovf.read_text())
    if summary["files"] != {files.vmdk.name: files.vmdk.stat().st_size}:
        problems.append(f"the OVF references {summary['files']}, not {files.vmdk.name} "
                        f"with its size {files.vmdk.stat().st_size}")
    if summary["disk_controllers"] != ["VirtualSCSI"]:
        problems.append(f"the OVF's disk is on {summary['disk_controllers']}, not one "
                        "paravirtual SCSI (VirtualSCSI) controller")
    if summary["nics"] != ["VmxNet3"]:
        problems.append(f"the OVF's NICs are {summary['nics']}, not one VmxNet3")
    meta = json.loads(files.metadata.read_text())
    if paths is not None:
        base = paths.images / meta["golden_image"]["base_layer"] / "rootfs"
        if not base.is_dir():
            problems.append(f"the golden image {base} is no longer in the cache (cannot "
                            "compare)")
        elif tree_digest(base) != meta["golden_image"]["rootfs_digest"]:
            problems.append(f"{base} differs from the golden image the template was built "
                            "from (rootfs_digest)")
    info = subprocess.run(["qemu-img", "info", "--output=json", str(files.vmdk)],
                          capture_output=True, text=True, check=False)
    if info.returncode != 0:
        problems.append(f"qemu-img cannot read {files.vmdk.name}: {info.stderr.strip()}")
    else:
        data = json.loads(info.stdout)
        sub = (data.get("format-specific", {}).get("data", {}).get("create-type"))
        if data.get("format") != "vmdk" or sub != "streamOptimized":
            problems.append(f"{files.vmdk.name} is {data.get('format')}/{sub}, not "
                            "vmdk/streamOptimized")
        if data.get("virtual-size") != meta["disk"]["capacity_bytes"]:
            problems.append(f"{files.vmdk.name}: virtual size {data.get('virtual-size')} is not "
                            f"the built disk's {meta['disk']['capacity_bytes']}")
    return problems


# The prompt; kernel or service lines may follow on the same console line.
BOOT_DONE = re.compile(r"^\S+ login: ", re.MULTILINE)
BOOT_EVIDENCE = {
    "the paravirtual SCSI driver found the disk": re.compile(r"vmw_pvscsi"),
    "the root file system was mounted from the disk": re.compile(r"EXT4-fs \(sda1\): mounted"),
    "the vmxnet3 NIC was bound": re.compile(r"vmxnet3"),
    # systemd's status lines stop once the serial getty owns the console: the login prompts'
    # target is the last one it prints (measured; multi-user.target comes later, unprinted).
    "systemd reached the login prompts target": re.compile(r"Reached target.*Login Prompts"),
    "the root partition grew to the bigger disk": re.compile(
        r"safemail-growroot: grew /dev/sda1 to the end of /dev/sda"),
}


def boot(vmdk: Path, console_log: Path, *, timeout: float = QEMU_BOOT_TIMEOUT,
         memory_mb: int = 1024, grow_mb: int = 1024) -> dict:
    """Boot the disk under QEMU on its own (no -kernel) with VMware's paravirtual devices.

    The VMDK is only read: QEMU writes to a qcow2 overlay `grow_mb` larger (as a clone with a
    bigger disk; removed afterwards), so the root partition must grow. The NIC's user-mode
    network has restrict=on (nothing leaves the VM). Waits for a login prompt on the serial
    console, at most `timeout` seconds, then stops the QEMU it started. Returns seconds and
    the evidence found and missing on the console."""
    runner.require_tools("qemu-system-x86_64", "qemu-img")
    fmt = "vmdk" if vmdk.suffix == ".vmdk" else "raw"
    virtual = json.loads(runner.run(["qemu-img", "info", "--output=json", "-f", fmt,
                                     str(vmdk)]).stdout)["virtual-size"]
    overlay = console_log.with_name(console_log.name + ".overlay.qcow2")
    overlay.unlink(missing_ok=True)
    runner.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(vmdk.resolve()),
                "-F", fmt, str(overlay), str(virtual + (grow_mb << 20))])
    try:
        return _boot(overlay, console_log, timeout, memory_mb)
    finally:
        overlay.unlink(missing_ok=True)


def _boot(disk: Path, console_log: Path, timeout: float, memory_mb: int) -> dict:
    cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-smp", "2",
           "-m", str(memory_mb), "-display", "none", "-monitor", "none", "-no-reboot",
           "-serial", f"file:{console_log}",
           "-device", "pvscsi,id=pvscsi0",
           "-drive", f"file={disk},format=qcow2,if=none,id=disk0",
           "-device", "scsi-hd,drive=disk0,bus=pvscsi0.0,bootindex=0",
           "-netdev", "user,id=net0,restrict=on", "-device", "vmxnet3,netdev=net0"]
    console_log.write_text("")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    text = ""
    try:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                break
            text = console_log.read_text(errors="replace").replace("\r", "")
            if BOOT_DONE.search(text):
                break
            time.sleep(1)
    finally:
        elapsed = time.monotonic() - start
        if proc.poll() is None:
            proc.kill()  # by its own PID: this process started it
        proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
    text = console_log.read_text(errors="replace").replace("\r", "")
    found = sorted(k for k, rx in BOOT_EVIDENCE.items() if rx.search(text))
    return {"seconds": round(elapsed, 1), "login_prompt": bool(BOOT_DONE.search(text)),
            "evidence": found, "missing": sorted(set(BOOT_EVIDENCE) - set(found)),
            "qemu_exit": proc.returncode, "qemu_stderr": stderr.strip()[-500:],
            "command": cmd}
