"""Publish a newer version of an installed package in the lab mirror (`safemail lab
publish-update`), so the patch watch has a real pending update to find and `safemail patch
apply` has something real to install.

How: take the package's .deb from the mirror pool (the version the hosts have), unpack it with
``dpkg-deb -R``, give it the next version ``<upstream>+safemail<N>`` (Debian orders it above the
original and above every earlier bump), add a note to its description, rebuild it with
``dpkg-deb -b`` and publish it with :func:`safemail.lab.mirror.publish`. The default package,
``lsb-base``, is tiny, installed on every host, and has no maintainer scripts: installing the
re-versioned copy changes nothing on the host but the version dpkg records.

The version logic is pure and unit-tested (tests/test_ops_lab_updates.py).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safemail.errors import SafeMailError
from safemail.lab import mirror, runner

DEFAULT_PACKAGE = "lsb-base"
BUMP_TAG = "safemail"
_BUMP = re.compile(rf"^(?P<base>.+)\+{BUMP_TAG}(?P<n>\d+)$")


@dataclass(frozen=True)
class PoolDeb:
    package: str
    version: str
    arch: str
    path: Path


def deb_filename_version(version: str) -> str:
    """Version as it appears in pool file names (the epoch colon as %3a)."""
    return version.replace(":", "%3a")


def parse_pool_name(path: Path) -> PoolDeb | None:
    """``name_version_arch.deb`` -> PoolDeb (None for other names)."""
    parts = path.name.removesuffix(".deb").split("_")
    if len(parts) != 3 or not path.name.endswith(".deb"):
        return None
    name, version, arch = parts
    return PoolDeb(name, version.replace("%3a", ":"), arch, path)


def base_version(version: str) -> str:
    """The version before any lab bump (``11.6+safemail3`` -> ``11.6``)."""
    match = _BUMP.match(version)
    return match["base"] if match else version


def bump_number(version: str) -> int:
    match = _BUMP.match(version)
    return int(match["n"]) if match else 0


def next_version(versions: Iterable[str]) -> str:
    """The next lab version after every version of the package in the pool."""
    versions = list(versions)
    if not versions:
        raise ValueError("no version of the package to bump")
    bases = {base_version(v) for v in versions}
    if len(bases) != 1:
        raise ValueError(f"the pool holds different upstream versions: {sorted(bases)}")
    return f"{bases.pop()}+{BUMP_TAG}{max(bump_number(v) for v in versions) + 1}"


def rewrite_control(control: str, new_version: str) -> str:
    """The control file with the new Version and a description note (pure)."""
    if not re.search(r"^Version: ", control, flags=re.M):
        raise ValueError("control file has no Version field")
    out = re.sub(r"^Version: .*$", f"Version: {new_version}", control, count=1, flags=re.M)
    return re.sub(r"^(Description: .*)$",
                  r"\1 (SafeMail lab re-version: a patch-watch test update)",
                  out, count=1, flags=re.M)


def pool_versions(mirror_root: Path, package: str) -> list[PoolDeb]:
    pool = mirror.repo_dir(mirror_root) / "pool" / "main"
    found = [d for p in sorted(pool.glob(f"{package}_*.deb"))
             if (d := parse_pool_name(p)) is not None and d.package == package]
    return found


def publish_update(mirror_root: Path, package: str = DEFAULT_PACKAGE) -> PoolDeb:
    """Build and publish the next lab version of `package`; return the new pool entry."""
    runner.require_tools("dpkg-deb", "dpkg", "apt-ftparchive")
    debs = pool_versions(mirror_root, package)
    if not debs:
        raise SafeMailError(
            f"the lab mirror has no {package} package to re-version",
            f"pick a package the hosts have: ls {mirror.repo_dir(mirror_root)}/pool/main",
        )
    try:
        version = next_version(d.version for d in debs)
    except ValueError as exc:
        raise SafeMailError(f"cannot bump {package}: {exc}") from exc
    # The original Debian build (not a bump) is the one to unpack.
    source = next((d for d in debs if bump_number(d.version) == 0), debs[0])
    with tempfile.TemporaryDirectory(prefix="safemail-update-") as tmp:
        tree = Path(tmp) / "tree"
        runner.run(["dpkg-deb", "-R", str(source.path), str(tree)], check=True)
        control = tree / "DEBIAN" / "control"
        control.write_text(rewrite_control(control.read_text(), version))
        out = Path(tmp) / f"{package}_{deb_filename_version(version)}_{source.arch}.deb"
        runner.run(["dpkg-deb", "--root-owner-group", "-Zxz", "-b", str(tree), str(out)],
                   check=True, capture=True)
        check = runner.run(["dpkg-deb", "-f", str(out), "Version"], check=True,
                           capture=True).stdout.strip()
        if check != version:
            raise SafeMailError(f"built {out.name} reports version {check!r}, not {version!r}")
        mirror.publish(mirror_root, [out])
    dest = mirror.repo_dir(mirror_root) / "pool" / "main" / out.name
    return PoolDeb(package, version, source.arch, dest)


def _cmd_publish_update(args) -> int:  # argparse.Namespace
    from safemail.lab.config import LabPaths

    paths = LabPaths.default()
    if not mirror.repo_dir(paths.mirror).is_dir():
        raise SafeMailError(f"no lab mirror at {paths.mirror}", "start the lab: safemail lab up")
    deb = publish_update(paths.mirror, args.package)
    print(f"published {deb.package} {deb.version} ({deb.path.name}) in the lab mirror; "
          "hosts see it at their next apt update (the patch watch runs one)")
    return 0


def register(lsub) -> None:  # the `safemail lab` subparsers
    p = lsub.add_parser("publish-update",
                        help="publish a newer version of an installed package in the lab "
                             "mirror (for the patch watch)")
    p.add_argument("--package", default=DEFAULT_PACKAGE,
                   help=f"package to re-version (default {DEFAULT_PACKAGE}: tiny, on every "
                        "host, no maintainer scripts)")
    p.set_defaults(func=_cmd_publish_update)
