"""roles/encrypted_storage: the device probe that decides whether the role may format.

The role formats only what the probe calls blank and opens only what it calls ours; anything
else stops the run. Tried on image files (blkid -p reads files as it reads block devices).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from safemail.project import project_root

PROBE = project_root() / "roles/encrypted_storage/files/safemail-storage-probe"
LABEL = "safemail-data"

needs = pytest.mark.skipif(shutil.which("blkid") is None, reason="blkid (util-linux) missing")


def probe(path: Path) -> str:
    proc = subprocess.run(["bash", str(PROBE), str(path), LABEL], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def image(tmp_path: Path, name: str = "disk.img", size: int = 32 << 20) -> Path:
    path = tmp_path / name
    with path.open("wb") as fh:
        fh.truncate(size)
    return path


@needs
def test_blank_device_is_blank(tmp_path):
    assert probe(image(tmp_path)) == "blank"


@needs
def test_unrecognised_data_is_foreign(tmp_path):
    path = image(tmp_path)
    with path.open("r+b") as fh:
        fh.seek(600 * 1024)
        fh.write(b"patient data without any filesystem signature")
    assert probe(path) == "foreign: data without a known signature in its first MiB"


@needs
@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 missing")
def test_filesystem_is_foreign(tmp_path):
    path = image(tmp_path)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    assert probe(path) == "foreign: a ext4 signature"


@needs
def test_partition_table_is_foreign(tmp_path):
    path = image(tmp_path)
    # An MBR with one Linux partition from sector 2048 (what fdisk writes on an empty disk).
    entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (
        (32 << 20) // 512 - 2048).to_bytes(4, "little")
    with path.open("r+b") as fh:
        fh.seek(446)
        fh.write(entry)
        fh.seek(510)
        fh.write(b"\x55\xaa")
    assert probe(path) == "foreign: a dos partition table"


@needs
@pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup missing")
@pytest.mark.parametrize("label,expected", [
    (LABEL, "ours"),
    ("other", "foreign: a LUKS header with label 'other' (not 'safemail-data')"),
])
def test_luks_header_is_ours_only_with_our_label(tmp_path, label, expected):
    path = image(tmp_path)
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    fmt = subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--label", label,
                          "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", str(path),
                          str(key)], capture_output=True, text=True, check=False)
    if fmt.returncode != 0:
        pytest.skip(f"cryptsetup luksFormat cannot run here: {fmt.stderr.strip()}")
    assert probe(path) == expected


def test_missing_device_is_an_error(tmp_path):
    proc = subprocess.run(["bash", str(PROBE), str(tmp_path / "nope"), LABEL],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "is not a block device" in proc.stderr
