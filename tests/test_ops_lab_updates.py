"""`safemail lab publish-update`: next lab version of a package, and a real re-versioned .deb."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from safemail.lab import updates


@pytest.mark.parametrize("versions,expected", [
    (["11.6"], "11.6+safemail1"),
    (["11.6", "11.6+safemail1"], "11.6+safemail2"),
    (["11.6+safemail9", "11.6", "11.6+safemail10"], "11.6+safemail11"),
    (["1:2.38.1-5+deb12u3"], "1:2.38.1-5+deb12u3+safemail1"),
])
def test_next_version(versions, expected):
    assert updates.next_version(versions) == expected


def test_next_version_refuses_mixed_upstreams():
    with pytest.raises(ValueError):
        updates.next_version(["11.6", "11.7"])
    with pytest.raises(ValueError):
        updates.next_version([])


def test_parse_pool_name():
    d = updates.parse_pool_name(Path("bsdutils_1%3a2.38.1-5+deb12u3_amd64.deb"))
    assert (d.package, d.version, d.arch) == ("bsdutils", "1:2.38.1-5+deb12u3", "amd64")
    assert updates.parse_pool_name(Path("Packages")) is None
    assert updates.deb_filename_version("1:2.0") == "1%3a2.0"


def test_rewrite_control():
    control = ("Package: lsb-base\nVersion: 11.6\nArchitecture: all\n"
               "Description: transitional\n more\n")
    out = updates.rewrite_control(control, "11.6+safemail1")
    assert "Version: 11.6+safemail1\n" in out and "Version: 11.6\n" not in out
    assert "Description: transitional (SafeMail lab re-version" in out
    with pytest.raises(ValueError):
        updates.rewrite_control("Package: x\n", "1")


@pytest.mark.skipif(not (shutil.which("dpkg-deb") and shutil.which("apt-ftparchive")),
                    reason="needs dpkg-deb and apt-ftparchive (Debian)")
def test_publish_update_builds_a_real_deb_and_indexes_it(tmp_path):
    tree = tmp_path / "src"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr/share/doc/tiny").mkdir(parents=True)
    (tree / "usr/share/doc/tiny/README").write_text("tiny\n")
    (tree / "DEBIAN/control").write_text(
        "Package: tiny\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: tiny test package\n")
    pool = tmp_path / "mirror/debian/pool/main"
    pool.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree),
                    str(pool / "tiny_1.0-1_all.deb")], check=True, capture_output=True)
    first = updates.publish_update(tmp_path / "mirror", "tiny")
    second = updates.publish_update(tmp_path / "mirror", "tiny")
    assert (first.version, second.version) == ("1.0-1+safemail1", "1.0-1+safemail2")
    out = subprocess.run(["dpkg-deb", "-f", str(second.path), "Version"], check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == "1.0-1+safemail2"
    packages = (tmp_path / "mirror/debian/dists/bookworm/main/binary-amd64/Packages").read_text()
    assert "Version: 1.0-1+safemail2" in packages and "Version: 1.0-1\n" in packages
    from safemail.errors import SafeMailError
    with pytest.raises(SafeMailError, match="no absent package"):
        updates.publish_update(tmp_path / "mirror", "absent")
