"""The VMware template's pieces (src/safemail/lab/template.py), without root or a build.

The partition table and boot code on a small disk read back by sfdisk; the OVF's hardware
and references; the manifest; `check` on a template directory made of a tiny real VMDK
(qemu-img), each broken once; the golden image digest. The build and the boot need root
and the golden image: `make template` (docs/production.md, "The template").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from safemail.errors import SafeMailError
from safemail.lab import template

BOOT_IMG = b"\xeb\x63\x90" + b"GRUB-boot-code".ljust(437, b"\x90") + b"\0" * 72
CORE_IMG = b"core".ljust(3 * 512, b"\x11")


def _disk(tmp: Path, mb: int = 4) -> Path:
    rootfs = tmp / "rootfs.ext4"
    rootfs.write_bytes(b"\x22" * (mb << 20))
    raw = tmp / "disk.raw"
    template.write_disk(raw, rootfs, BOOT_IMG, CORE_IMG, 0x1234ABCD)
    return raw


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk missing (Debian fdisk)")
def test_the_disk_has_one_bootable_linux_partition_at_1_mib(tmp_path):
    raw = _disk(tmp_path)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    assert table["label"] == "dos"
    assert table["id"] == "0x1234abcd"
    (part,) = table["partitions"]
    assert part["start"] == template.PART_START == 2048
    assert part["size"] == (4 << 20) // 512
    assert part["type"] == "83" and part.get("bootable") is True
    assert raw.stat().st_size == (2048 + part["size"]) * 512
    data = raw.read_bytes()
    assert data[:440] == BOOT_IMG[:440]          # GRUB's boot code in the MBR
    assert data[512:512 + len(CORE_IMG)] == CORE_IMG  # core.img from sector 1
    assert data[2048 * 512:2048 * 512 + 4] == b"\x22" * 4  # the root file system at 1 MiB
    mbr = template.read_mbr(raw)
    assert mbr["signature"] and mbr["grub_boot"] and mbr["core_img"]


def test_bad_disk_inputs_are_refused(tmp_path):
    rootfs = tmp_path / "odd.ext4"
    rootfs.write_bytes(b"x" * 1000)
    with pytest.raises(SafeMailError, match="not a multiple of 512"):
        template.write_disk(tmp_path / "d", rootfs, BOOT_IMG, CORE_IMG, 1)
    rootfs.write_bytes(b"x" * 1024)
    with pytest.raises(SafeMailError, match="does not fit before the partition"):
        template.write_disk(tmp_path / "d", rootfs, BOOT_IMG, b"c" * (2047 * 512 + 1), 1)
    with pytest.raises(SafeMailError, match="shorter than the MBR code area"):
        template.mbr(b"short", 2048, 10, 1)


def test_the_ovf_declares_pvscsi_vmxnet3_and_the_disk():
    text = template.ovf_descriptor("t.vmdk", 12345, 3 << 30, "base-x+abc")
    s = template.ovf_summary(text)
    assert s["files"] == {"t.vmdk": 12345}
    assert s["disks"] == [{"capacity": 3 << 30, "file": "file1", "format":
                           "http://www.vmware.com/interfaces/specifications/vmdk.html"
                           "#streamOptimized"}]
    assert s["disk_controllers"] == ["VirtualSCSI"]
    assert s["nics"] == ["VmxNet3"]
    assert s["os_type"] == template.OVF_OS_TYPE
    assert "base-x+abc" in text
    with pytest.raises(SafeMailError, match="not well-formed"):
        template.ovf_summary(text[:-20])


def test_manifest_round_trip_and_bad_lines(tmp_path):
    a, b = tmp_path / "a.ovf", tmp_path / "b.vmdk"
    a.write_text("x")
    b.write_bytes(b"y")
    sums = template.read_manifest(template.manifest([a, b]))
    assert sums == {"a.ovf": template.sha256_file(a), "b.vmdk": template.sha256_file(b)}
    with pytest.raises(SafeMailError, match="line 1"):
        template.read_manifest("SHA1(a.ovf)= 00\n")


def tiny_template(out: Path) -> Path:
    """A template directory as `build` leaves it, around a tiny real streamOptimized VMDK
    (also tests/test_vmware_template_sim.py's upload)."""
    (out / "work").mkdir(parents=True)
    files = template.Files(out)
    raw = _disk(out / "work", mb=1)
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(raw), str(files.vmdk)], check=True)
    files.ovf.write_text(template.ovf_descriptor(files.vmdk.name, files.vmdk.stat().st_size,
                                                 raw.stat().st_size, "test"))
    files.mf.write_text(template.manifest([files.ovf, files.vmdk]))
    files.metadata.write_text(json.dumps({
        "golden_image": {"base_layer": "base-test", "rootfs_digest": "0" * 64},
        "disk": {"capacity_bytes": raw.stat().st_size}}))
    return out


@pytest.fixture
def built(tmp_path):
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img missing (Debian qemu-utils)")
    return tiny_template(tmp_path / "tpl")


def test_check_accepts_a_consistent_template(built):
    assert template.check(built) == []


def test_check_finds_a_changed_disk_byte(built):
    vmdk = template.Files(built).vmdk
    data = bytearray(vmdk.read_bytes())
    data[-600] ^= 1
    vmdk.write_bytes(bytes(data))
    assert any("SHA-256 differs" in p for p in template.check(built))


def test_check_finds_an_ovf_edited_and_its_manifest_updated(built):
    """A hand edit that keeps the manifest in step still fails on the hardware."""
    files = template.Files(built)
    files.ovf.write_text(files.ovf.read_text().replace("VmxNet3", "E1000")
                         .replace("VirtualSCSI", "lsilogic"))
    files.mf.write_text(template.manifest([files.ovf, files.vmdk]))
    problems = template.check(built)
    assert any("not one VmxNet3" in p for p in problems)
    assert any("not one paravirtual SCSI" in p for p in problems)


def test_check_finds_a_vmdk_that_is_not_stream_optimized(built):
    files = template.Files(built)
    raw = built / "work" / "disk.raw"
    files.vmdk.unlink()
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(raw), str(files.vmdk)],
                   check=True)
    files.ovf.write_text(template.ovf_descriptor(files.vmdk.name, files.vmdk.stat().st_size,
                                                 raw.stat().st_size, "test"))
    files.mf.write_text(template.manifest([files.ovf, files.vmdk]))
    assert any("not vmdk/streamOptimized" in p for p in template.check(built))


def test_check_compares_the_golden_image_digest(built, tmp_path):
    from safemail.lab.config import LabPaths

    base = tmp_path / "images" / "base-test" / "rootfs"
    (base / "etc").mkdir(parents=True)
    (base / "etc/os-release").write_text("bookworm\n")
    meta_file = template.Files(built).metadata
    meta = json.loads(meta_file.read_text())
    meta["golden_image"]["rootfs_digest"] = template.tree_digest(base)
    meta_file.write_text(json.dumps(meta))
    paths = LabPaths(state=tmp_path / "state", images=tmp_path / "images")
    assert template.check(built, paths=paths) == []
    (base / "etc/os-release").write_text("changed\n")
    assert any("differs from the golden image" in p for p in template.check(built, paths=paths))


def test_tree_digest_sees_content_mode_and_link_changes(tmp_path):
    (tmp_path / "d").mkdir()
    f = tmp_path / "d/f"
    f.write_text("a")
    (tmp_path / "d/l").symlink_to("f")
    first = template.tree_digest(tmp_path)
    assert first == template.tree_digest(tmp_path)
    f.write_text("b")
    second = template.tree_digest(tmp_path)
    assert second != first
    f.chmod(0o600)
    third = template.tree_digest(tmp_path)
    assert third != second
    (tmp_path / "d/l").unlink()
    (tmp_path / "d/l").symlink_to("g")
    assert template.tree_digest(tmp_path) != third


def test_changed_base_files_ignores_package_bookkeeping(tmp_path):
    upper, lower = tmp_path / "u", tmp_path / "l"
    for root in (upper, lower):
        (root / "etc").mkdir(parents=True)
        (root / "var/lib/dpkg").mkdir(parents=True)
        (root / "etc/passwd").write_text("x")
        (root / "var/lib/dpkg/status").write_text("x")
    (upper / "etc/new-file").write_text("x")
    assert template._changed_base_files(upper, lower) == ["etc/passwd"]


def test_bad_authorized_keys_are_refused(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("ssh-ed25519 AAAAC3Nza admin@example\n")
    template._read_keys(keys)
    keys.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(SafeMailError, match="not an authorized_keys file"):
        template._read_keys(keys)
    with pytest.raises(SafeMailError, match="cannot read"):
        template._read_keys(tmp_path / "missing")


def test_grub_cfg_boots_by_uuid_with_the_serial_console():
    cfg = template._grub_cfg("1111-2222", "6.1.0-50-cloud-amd64")
    assert "search --no-floppy --fs-uuid --set=root 1111-2222" in cfg
    assert ("linux /boot/vmlinuz-6.1.0-50-cloud-amd64 root=UUID=1111-2222 ro console=tty0 "
            "console=ttyS0,115200n8") in cfg
    assert "initrd /boot/initrd.img-6.1.0-50-cloud-amd64" in cfg


def test_the_install_script_lists_the_vmware_drivers_and_checks_them():
    script = template._install_script(["grub-pc", "open-vm-tools"], "1111-2222")
    assert "MODULES=list" in script
    assert "vmw_pvscsi\\nsd_mod\\nvmxnet3\\nahci" in script
    assert "for m in vmw_pvscsi sd_mod vmxnet3; do lsinitramfs" in script
    assert "--fs-uuid --set=root 1111-2222" in script


def test_build_needs_root_and_the_golden_image(tmp_path, monkeypatch):
    from safemail.lab.config import LabPaths

    paths = LabPaths(state=tmp_path / "s", images=tmp_path / "i")
    root = Path(__file__).resolve().parents[1]
    if os.geteuid() != 0:
        with pytest.raises(SafeMailError, match="needs root"):
            template.build(paths, root, tmp_path / "out")
        return
    with pytest.raises(SafeMailError, match="golden image is not built"):
        template.build(paths, root, tmp_path / "out")


def test_cli_check_of_a_missing_directory(tmp_path, capsys):
    from safemail import cli

    code = cli.main(["lab", "template", "check", str(tmp_path / "nope")])
    assert code == 1
    assert "is not a directory" in capsys.readouterr().err


def _growroot() -> dict:
    namespace: dict = {"__name__": "growroot"}
    exec(compile(template.GROWROOT_SCRIPT, "safemail-growroot", "exec"), namespace)  # noqa: S102
    return namespace


def test_growroot_moves_the_last_partitions_end_to_the_disks_end():
    import struct

    grow = _growroot()["grow_entry"]
    table = template.mbr(BOOT_IMG, 2048, 4096, 7)
    disk = 2048 + 4096 + (1 << 20)
    grown = grow(table, 1, disk)
    assert struct.unpack_from("<II", grown, 446 + 8) == (2048, disk - 2048)
    assert grown[:446] == table[:446] and grown[462:] == table[462:]  # nothing else changed
    assert grow(table, 1, 2048 + 4096 + 2047) is None  # less than 1 MiB to gain: as is
    assert grow(table, 2, 1 << 24) is None             # no such partition: as is
    gpt = bytearray(table)
    gpt[446 + 4] = 0xEE
    assert grow(bytes(gpt), 1, 1 << 24) is None        # a GPT disk is not touched
    assert grow(table[:510] + b"\0\0", 1, 1 << 24) is None
    second = bytearray(table)
    second[462:478] = b"\0" * 4 + b"\x83" + b"\0" * 3 + struct.pack("<II", 8192, 100)
    assert grow(bytes(second), 1, 1 << 24) is None     # not the last partition
