"""The lab's internal package mirror: an apt repository built from Debian's own packages.

Hosts reach it at http://<mirror>/debian (sources marked trusted: it lives only inside the
lab). `publish` adds packages later (e.g. a newer version, so patch monitoring has something
real to find) and re-indexes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from safemail.errors import SafeMailError
from safemail.lab import runner
from safemail.lab.config import DEBIAN_SUITE


def repo_dir(mirror_root: Path) -> Path:
    return mirror_root / "debian"


def publish(mirror_root: Path, debs: Iterable[Path]) -> int:
    """Add .deb files to the pool (hard links where possible) and rebuild the index."""
    runner.require_tools("apt-ftparchive")
    repo = repo_dir(mirror_root)
    pool = repo / "pool" / "main"
    pool.mkdir(parents=True, exist_ok=True)
    count = 0
    for deb in debs:
        if deb.suffix != ".deb" or not deb.is_file():
            raise SafeMailError(f"{deb} is not a .deb file")
        dest = pool / deb.name
        if dest.exists():
            continue
        _link(deb, dest)
        count += 1
    index(mirror_root)
    return count


def publish_wheels(mirror_root: Path, wheels: Iterable[Path]) -> int:
    """Serve Python wheels at http://<mirror>/wheels/ (a pip --find-links page)."""
    dest_dir = mirror_root / "wheels"
    dest_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for whl in wheels:
        dest = dest_dir / whl.name
        if not dest.exists():
            _link(whl, dest)
        count += 1
    return count


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def index(mirror_root: Path) -> None:
    repo = repo_dir(mirror_root)
    dist = repo / "dists" / DEBIAN_SUITE
    binary = dist / "main" / "binary-amd64"
    binary.mkdir(parents=True, exist_ok=True)
    packages = runner.run(["apt-ftparchive", "packages", "pool"], timeout=300,
                          capture=True, check=True, cwd=repo).stdout
    (binary / "Packages").write_text(packages)
    release = runner.run([
        "apt-ftparchive",
        "-o", f"APT::FTPArchive::Release::Suite={DEBIAN_SUITE}",
        "-o", f"APT::FTPArchive::Release::Codename={DEBIAN_SUITE}",
        "-o", "APT::FTPArchive::Release::Origin=SafeMail lab mirror",
        "-o", "APT::FTPArchive::Release::Components=main",
        "-o", "APT::FTPArchive::Release::Architectures=amd64",
        "release", str(dist.relative_to(repo)),
    ], timeout=120, cwd=repo).stdout
    (dist / "Release").write_text(release)
