"""The golden image (the lab's VMware template) and the VM layer, cached by input hash.

Each part lives in its own cache directory named by the hash of its inputs:

- ``base-<hash>/rootfs``: debootstrap bookworm with systemd, ssh and python3, nothing
  service-specific. nspawn machines boot an overlay of it.
- ``debs-<hash>/debs``: every package any role declares (``<role>_packages`` and optional
  lists such as ``encrypted_storage_tang_packages``), the lab's test-only packages and the VM
  kernel, downloaded on top of base: with base's own .debs, the content of the lab mirror,
  from which hosts install the roles' packages.
- ``vm-<hash>/upper``: per VM, an overlay layer on base with Debian's cloud kernel and the
  packages of exactly the roles site.yml applies to that host, preinstalled (installing under
  software emulation takes minutes; the roles still declare and "install" them). A relay VM
  therefore carries no directory server. QEMU VMs boot a disk made from base + their layer.
- ``wheels-<hash>/wheels``: binary wheels of the host-side Python runtime (the package's own
  dependencies), served by the mirror as the internal wheelhouse.
A finished layer has a ``complete`` marker; building an unchanged image is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from safemail.errors import SafeMailError
from safemail.lab import playbook, runner
from safemail.lab.config import DEBIAN_MIRROR, DEBIAN_SUITE, LabPaths

# Bump when the build steps below change in a way the inputs do not show.
BUILDER_VERSION = "1"
BASE_PACKAGES = (
    "systemd-sysv", "udev", "dbus", "openssh-server", "python3", "python3-apt",
    "iproute2", "procps", "iputils-ping", "ca-certificates", "apt-utils",
)
VM_PACKAGES = ("linux-image-cloud-amd64", "initramfs-tools", "systemd-timesyncd")
# The lab VMs' initramfs holds only what finds the root disk (ext4 is built into Debian's
# cloud kernel; virtio-blk is a module). With initramfs-tools' default MODULES=most the
# initramfs loads dozens of modules under software emulation: its phase took 17-88 s of a
# reboot on this machine, against about 5 s with this list.
VM_INITRAMFS_MODULES = ("virtio_pci", "virtio_blk")
# In the mirror only, for tests: a tang server the encrypted_storage scenario runs on a VM's
# loopback to exercise the role's network-bound unlock (molecule/encrypted_storage/tang.yml).
LAB_TEST_PACKAGES = ("tang",)
# Wheels for the hosts' Python (Debian bookworm: CPython 3.11, glibc 2.36).
WHEEL_PYTHON = "3.11"
WHEEL_PLATFORMS = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64",
                   "manylinux_2_17_x86_64"]

DEBOOTSTRAP_HINTS = {
    "Failed getting release file": "debootstrap could not reach the Debian mirror "
                                   f"({DEBIAN_MIRROR}); check the network or set "
                                   "SAFEMAIL_DEBIAN_MIRROR",
    "Temporary failure resolving": "debootstrap could not resolve the Debian mirror's name",
    "No space left on device": "the disk holding the image cache is full",
}
APT_HINTS = {
    "Unable to locate package": "a role names a package Debian bookworm does not have",
    "Temporary failure resolving": "the image build could not reach the Debian mirror",
    "No space left on device": "the disk holding the image cache is full",
}


def role_packages(roles_dir: Path, roles: list[str] | None = None,
                  optional: bool = False) -> list[str]:
    """Every package a role declares in ``<role>_packages`` in its defaults/main.yml
    (of all roles, or of `roles` only); with `optional`, also its other package lists
    ``<role>_<what>_packages`` (installed only in some modes, e.g. clevis for tang unlock)."""
    found: set[str] = set()
    for defaults in sorted(roles_dir.glob("*/defaults/main.yml")):
        role = defaults.parent.parent.name
        if roles is not None and role not in roles:
            continue
        try:
            data = yaml.safe_load(defaults.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SafeMailError(f"{defaults}: not valid YAML: {exc}") from exc
        names = [f"{role}_packages"]
        if optional:
            names += sorted(k for k in data if isinstance(k, str) and k.startswith(f"{role}_")
                            and k.endswith("_packages") and k != f"{role}_packages")
        for name in names:
            value = data.get(name)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise SafeMailError(f"{defaults}: {name} must be a list of package names")
            found.update(value)
    return sorted(found)


def host_requirements(pyproject: Path) -> list[str]:
    """The host-side runtime requirements: the package's own (non-optional) dependencies."""
    import tomllib

    try:
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise SafeMailError(f"cannot read the dependencies of {pyproject}: {exc}") from exc
    return sorted(deps)


def input_hash(inputs: dict) -> str:
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def base_inputs() -> dict:
    return {"builder": BUILDER_VERSION, "suite": DEBIAN_SUITE, "variant": "minbase",
            "packages": sorted(BASE_PACKAGES)}


def vm_inputs(base_hash: str, packages: list[str]) -> dict:
    return {"builder": BUILDER_VERSION, "base": base_hash,
            "packages": sorted({*VM_PACKAGES, *packages}),
            "initramfs_modules": list(VM_INITRAMFS_MODULES)}


def vm_initramfs_script() -> str:
    """Shell run after the VM layer's packages: a small initramfs (MODULES=list)."""
    modules = "\\n".join(VM_INITRAMFS_MODULES)
    return ("printf 'MODULES=list\\n' > /etc/initramfs-tools/conf.d/safemail-lab && "
            f"printf '{modules}\\n' >> /etc/initramfs-tools/modules && "
            "update-initramfs -u -k all")


def debs_inputs(base_hash: str, packages: list[str]) -> dict:
    return {"builder": BUILDER_VERSION, "base": base_hash, "download": True,
            "packages": sorted({*VM_PACKAGES, *packages})}


@dataclass(frozen=True)
class VmLayer:
    path: Path  # vm-<hash>/
    packages: tuple[str, ...]

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"


@dataclass(frozen=True)
class Image:
    base: Path  # base-<hash>/
    debs_dir: Path  # debs-<hash>/: every role package, for the mirror
    vms: dict[str, VmLayer]  # VM host name -> its layer
    wheels: Path  # wheels-<hash>/: the host-side Python runtime, for the mirror
    packages: tuple[str, ...]  # every role package

    @property
    def rootfs(self) -> Path:
        return self.base / "rootfs"

    def debs(self) -> list[Path]:
        return sorted([*(self.base / "debs").glob("*.deb"),
                       *(self.debs_dir / "debs").glob("*.deb")])

    def parts(self) -> list[Path]:
        return [self.base, self.debs_dir, *{v.path for v in self.vms.values()}, self.wheels]


def wheel_inputs(requirements: list[str]) -> dict:
    return {"builder": BUILDER_VERSION, "python": WHEEL_PYTHON, "platforms": WHEEL_PLATFORMS,
            "requirements": sorted(requirements)}


def image_for(paths: LabPaths, project: Path,
              vm_hosts: dict[str, tuple[str, ...]] | None = None) -> Image:
    """Where the image for the current inputs lives (built or not).

    `vm_hosts` maps each VM host to its inventory groups; its layer holds the packages of the
    roles site.yml applies to it.
    """
    roles_dir = project / "roles"
    base_hash = input_hash(base_inputs())
    every = sorted({*role_packages(roles_dir, optional=True), *LAB_TEST_PACKAGES})
    plays = playbook.read_plays(project / "playbooks" / "site.yml")
    vms = {}
    for host, groups in (vm_hosts or {}).items():
        pkgs = role_packages(roles_dir, playbook.roles_for(host, groups, plays))
        vms[host] = VmLayer(paths.images / f"vm-{input_hash(vm_inputs(base_hash, pkgs))}",
                            tuple(pkgs))
    wheel_hash = input_hash(wheel_inputs(host_requirements(project / "pyproject.toml")))
    return Image(base=paths.images / f"base-{base_hash}",
                 debs_dir=paths.images / f"debs-{input_hash(debs_inputs(base_hash, every))}",
                 vms=vms, wheels=paths.images / f"wheels-{wheel_hash}", packages=tuple(every))


def is_built(image: Image) -> bool:
    return all((d / "complete").exists() for d in image.parts())


def _nspawn_run(root: Path, script: str, log: Path, title: str, hints: dict[str, str],
                binds: tuple[str, ...] = ()) -> None:
    """Run a shell script inside the image tree (host network, for apt)."""
    runner.run_logged(title, ["systemd-nspawn", "-q", "-D", str(root), "--register=no",
                              *(f"--bind-ro={b}" for b in binds),
                              "--keep-unit", "--resolv-conf=copy-host", "--timezone=off",
                              "-E", "DEBIAN_FRONTEND=noninteractive", "/bin/sh", "-ec", script],
                      log, hints=hints)


def _collect_debs(root: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        shutil.move(str(deb), dest / deb.name)


BUILD_SOURCES = f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
NO_RECOMMENDS = 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'


def _build_base(target: Path, log: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    rootfs = tmp / "rootfs"
    tmp.mkdir(parents=True)
    runner.run_logged(
        "debootstrap bookworm (about 1 min)",
        ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
         DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR],
        log, hints=DEBOOTSTRAP_HINTS)
    _collect_debs(rootfs, tmp / "debs")
    # Template hygiene: every machine gets its own identity and its apt sources from the
    # common role (the internal mirror); nothing points at the outside world.
    (rootfs / "etc/apt/sources.list").write_text("")
    (rootfs / "etc/apt/apt.conf.d/90safemail-no-recommends").write_text(NO_RECOMMENDS)
    (rootfs / "etc/machine-id").write_text("")
    for p in [rootfs / "var/lib/dbus/machine-id", rootfs / "etc/hostname",
              *(rootfs / "etc/ssh").glob("ssh_host_*")]:
        p.unlink(missing_ok=True)
    for p in (rootfs / "var/lib/apt/lists").glob("*_*"):
        p.unlink()
    tmp.joinpath("inputs.json").write_text(json.dumps(base_inputs(), indent=2))
    tmp.joinpath("complete").write_text("")
    tmp.rename(target)


def _layer_run(image: Image, target: Path, title: str, script: str, log: Path,
               keep: list[str], binds: tuple[str, ...] = ()) -> Path:
    """Run `script` in an overlay on base (host network, the downloaded .debs as apt's
    cache) and keep the overlay's upper layer in `target`. Returns target."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        runner.run(["umount", str(tmp / "merged")], check=False)
        shutil.rmtree(tmp)
    upper, work, merged = tmp / "upper", tmp / "work", tmp / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    runner.run(["mount", "-t", "overlay", "overlay", "-o",
                f"lowerdir={image.rootfs},upperdir={upper},workdir={work}", str(merged)])
    try:
        (merged / "etc/apt/sources.list").write_text(BUILD_SOURCES)
        _nspawn_run(merged, script, log, title, APT_HINTS, binds)
        (merged / "etc/apt/sources.list").write_text("")
        for p in (merged / "var/lib/apt/lists").glob("*_*"):
            p.unlink()
        for name in keep:
            found = sorted((merged / "boot").glob(f"{name}-*"))
            if not found:
                raise SafeMailError(f"the VM layer has no {name} in /boot", hint=f"see {log}")
            shutil.copy2(found[-1], tmp / name)
        if not keep:  # the download step: keep the .debs, not the layer
            _collect_debs(merged, tmp / "debs")
        for deb in (merged / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
    finally:
        runner.run(["umount", str(merged)], check=False)
    shutil.rmtree(work, ignore_errors=True)
    merged.rmdir()
    if not keep:
        shutil.rmtree(upper)
    tmp.joinpath("complete").write_text("")
    tmp.rename(target)
    return target


SEED = "/run/safemail-debs"


def _seed_apt_cache(script: str) -> str:
    """Prefix a build script so apt takes the .debs already downloaded (bound at SEED)."""
    return f"cp {SEED}/*.deb /var/cache/apt/archives/; {script}"


def _build_wheels(target: Path, requirements: list[str], log: Path) -> None:
    """Download binary wheels of the host runtime for the hosts' Python (no compiling)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "wheels").mkdir(parents=True)
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    runner.run_logged(
        f"download {len(requirements)} host runtime wheel(s) and their dependencies",
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
         "--python-version", WHEEL_PYTHON, "--implementation", "cp", *platforms,
         "-d", str(tmp / "wheels"), *requirements],
        log, hints={"No matching distribution": "a host requirement has no wheel for "
                                                "CPython 3.11 on manylinux x86_64"})
    tmp.joinpath("inputs.json").write_text(json.dumps(wheel_inputs(requirements), indent=2))
    tmp.joinpath("complete").write_text("")
    tmp.rename(target)


def build(paths: LabPaths, project: Path,
          vm_hosts: dict[str, tuple[str, ...]] | None = None, *, force: bool = False) -> Image:
    """Build what is missing of the image for the current inputs; return it."""
    runner.require_root()
    runner.require_tools("debootstrap", "systemd-nspawn")
    image = image_for(paths, project, vm_hosts)
    log = paths.logs / "image-build.log"
    if force:
        for d in image.parts():
            if d.exists():
                shutil.rmtree(d)
    if (image.base / "complete").exists():
        runner.info(f"image: base layer {image.base.name} is up to date")
    else:
        runner.info(f"image: building base layer {image.base.name}")
        _build_base(image.base, log)
    if (image.debs_dir / "complete").exists():
        runner.info(f"image: package download {image.debs_dir.name} is up to date")
    else:
        pkgs = " ".join(sorted({*VM_PACKAGES, *image.packages}))
        runner.info(f"image: downloading {len(image.packages)} role packages for the mirror")
        (paths.images).mkdir(parents=True, exist_ok=True)
        _layer_run(image, image.debs_dir,
                   f"download kernel and {len(image.packages)} role package(s)",
                   f"apt-get update -q && apt-get install -y -q --download-only {pkgs}",
                   log, keep=[])
        (image.debs_dir / "inputs.json").write_text(json.dumps(image.packages))
    for host, layer in sorted(image.vms.items()):
        if (layer.path / "complete").exists():
            runner.info(f"image: VM layer {layer.path.name} ({host}) is up to date")
            continue
        pkgs = " ".join(sorted({*VM_PACKAGES, *layer.packages}))
        runner.info(f"image: building VM layer {layer.path.name} for {host} "
                    f"({len(layer.packages)} role packages)")
        _layer_run(image, layer.path, f"install kernel and {host}'s packages",
                   _seed_apt_cache(f"apt-get update -q && apt-get install -y -q {pkgs} && "
                                   + vm_initramfs_script()),
                   log, keep=["vmlinuz", "initrd.img"],
                   binds=(f"{image.debs_dir / 'debs'}:{SEED}",))
        (layer.path / "inputs.json").write_text(json.dumps(layer.packages))
    if (image.wheels / "complete").exists():
        runner.info(f"image: wheelhouse {image.wheels.name} is up to date")
    else:
        runner.info(f"image: downloading wheelhouse {image.wheels.name}")
        _build_wheels(image.wheels, host_requirements(project / "pyproject.toml"), log)
    return image
