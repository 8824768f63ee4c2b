"""`safemail lab`: the local test stage (image, network, machines)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from safemail.errors import SafeMailError
from safemail.lab import image as image_mod
from safemail.lab import updates
from safemail.lab.config import LabPaths
from safemail.lab.stage import Stage, vm_hosts
from safemail.project import project_root


def _stage() -> Stage:
    return Stage(LabPaths.default(), project_root())


def _image(args: argparse.Namespace) -> int:
    stage = _stage()
    plan = stage.plan(all_vms=args.all_vms, redundant=args.redundant)
    img = image_mod.build(stage.paths, stage.project, vm_hosts(plan), force=args.rebuild)
    for part in img.parts():
        print(part)
    return 0


def _mirror(args: argparse.Namespace) -> int:
    """Publish the current role packages to a running lab's mirror (no restart)."""
    stage = _stage()
    state = stage.load_state()
    if state is None or not state.get("complete"):
        raise SafeMailError("the lab is not up", hint="start it with `safemail lab up`")
    plan = stage.plan(all_vms=state.get("all_vms", False))
    img = image_mod.build(stage.paths, stage.project, vm_hosts(plan))
    stage.publish_mirror(img)
    return 0


def _up(args: argparse.Namespace) -> int:
    return _stage().up(all_vms=args.all_vms, redundant=args.redundant)


def _down(args: argparse.Namespace) -> int:
    del args
    return _stage().down()


def _replace(args: argparse.Namespace) -> int:
    return _stage().replace(args.hosts)


def _status(args: argparse.Namespace) -> int:
    rows = _stage().status()
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        cols = ("host", "hypervisor", "groups", "mgmt", "address", "running", "answers")
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        print("  ".join(c.upper().ljust(widths[c]) for c in cols))
        for r in rows:
            print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0 if all(r["answers"] for r in rows) else 3


def _ssh(args: argparse.Namespace) -> int:
    stage = _stage()
    host = stage.plan().host(args.host)
    cmd = stage.ssh_cmd(str(host.mgmt.address), *args.command, interactive=not args.command)
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)  # noqa: S606 - replace this process with ssh, as `ssh` would
    return 0  # not reached


def _template_build(args: argparse.Namespace) -> int:
    from safemail.lab import template

    meta = template.build(LabPaths.default(), project_root(), args.out.resolve(),
                          authorized_keys=args.authorized_keys)
    files = template.Files(args.out)
    print(f"template {meta['name']} from {meta['golden_image']['base_layer']} "
          f"(rootfs {meta['golden_image']['rootfs_digest'][:16]}) in {meta['build_seconds']} s")
    for f in (files.ova, files.ovf, files.mf, files.vmdk, files.metadata):
        print(f)
    return 0


def _template_check(args: argparse.Namespace) -> int:
    from safemail.lab import template

    out = args.dir.resolve()
    if not out.is_dir():
        raise SafeMailError(f"{out} is not a directory",
                            hint="give the --out directory of `safemail lab template build`")
    problems = template.check(out, paths=None if args.no_golden else LabPaths.default())
    for p in problems:
        print(f"problem: {p}")
    if not problems:
        print(f"{out}: manifest, OVF, VMDK and golden image digest agree")
    if args.boot and not problems:
        console = args.console or out / "boot-console.log"
        result = template.boot(template.Files(out).vmdk, console, timeout=args.timeout)
        print(f"boot: {'login prompt' if result['login_prompt'] else 'NO login prompt'} "
              f"after {result['seconds']} s (serial console: {console})")
        for e in result["evidence"]:
            print(f"  seen: {e}")
        for m in result["missing"]:
            problems.append(f"boot: not seen on the console: {m}")
            print(f"problem: boot: not seen on the console: {m}")
        if not result["login_prompt"]:
            problems.append("boot: no login prompt")
            if result["qemu_stderr"]:
                print(f"qemu: {result['qemu_stderr']}")
    return 1 if problems else 0


def register(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="the local test stage: image, up, status, ssh, replace, down",
                         description="Build and run the local test stage (needs root).")
    lsub = lab.add_subparsers(dest="lab_command", metavar="ACTION")
    lsub.required = True
    p = lsub.add_parser("image", help="build the golden image (no-op when unchanged)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    p.add_argument("--all-vms", action="store_true",
                   help="also build the VM layers `lab up --all-vms` needs")
    p.add_argument("--redundant", action="store_true",
                   help="also the hosts `lab up --redundant` adds")
    p.set_defaults(func=_image)
    p = lsub.add_parser("up", help="start the lab (builds the image if needed)")
    p.add_argument("--all-vms", action="store_true",
                   help="run every service host as a QEMU VM (slow; default: only the "
                        "hosts the inventory marks qemu)")
    p.add_argument("--redundant", action="store_true",
                   help="AV-02: add a second relay and a second directory host (relay2, a "
                        "QEMU VM like relay1; auth2, a replica) for the availability tests; "
                        "slower, so the default stage and CI leave them out")
    p.set_defaults(func=_up)
    p = lsub.add_parser("mirror", help="publish the roles' current package lists to the "
                                       "running lab's mirror (after a role gains a package)")
    p.set_defaults(func=_mirror)
    p = lsub.add_parser("down", help="remove everything the lab created")
    p.set_defaults(func=_down)
    p = lsub.add_parser(
        "replace", help="a brand-new machine in place of a host (AV-01 restore drills)",
        description="Replace lab hosts by brand-new machines, as an operator deploys a new VM "
                    "from the template (needs root and a running lab). For each HOST: its "
                    "machine is stopped and its directory removed (a VM's data disk too, so its "
                    "LUKS volume is gone), a new machine is made from the running lab's golden "
                    "image with the same name, addresses and MACs and a new SSH host key (its "
                    "line in the lab's known_hosts is replaced), started and waited for. "
                    "Nothing on it is converged: rebuild and restore it with "
                    "playbooks/restore.yml (docs/availability.md, \"Restore\").")
    p.add_argument("hosts", nargs="+", metavar="HOST",
                   help="inventory name, e.g. store1, relay1 or ca-signer")
    p.set_defaults(func=_replace)
    p = lsub.add_parser("status", help="show each host and whether it answers "
                                       "(exit 3 if any does not)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)
    p = lsub.add_parser("ssh", help="open a shell (or run a command) on a lab host")
    p.add_argument("host", help="inventory name, e.g. relay or practice1")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command to run instead of a shell")
    p.set_defaults(func=_ssh)
    t = lsub.add_parser("template", help="the VMware template (OVA/OVF + VMDK) from the "
                                         "golden image (docs/production.md)",
                        description="Build the VMware VM template from the golden image's base "
                                    "layer, or check one (needs root to build).")
    tsub = t.add_subparsers(dest="template_command", metavar="STEP")
    tsub.required = True
    p = tsub.add_parser("build", help="build the template into a new directory (root; "
                                      "about 3 min; Debian mirror for GRUB)")
    p.add_argument("--out", type=Path, required=True, help="new or empty directory")
    p.add_argument("--authorized-keys", type=Path, metavar="FILE",
                   help="root's authorized_keys in the template (the named admins' keys; "
                        "Ansible logs in as root)")
    p.set_defaults(func=_template_build)
    p = tsub.add_parser("check", help="check a built template: manifest, OVF, VMDK, the golden "
                                      "image's digest; --boot boots it under QEMU")
    p.add_argument("dir", type=Path, help="the --out directory of `template build`")
    p.add_argument("--boot", action="store_true",
                   help="boot the VMDK under QEMU (pvscsi, vmxnet3, no external kernel) until "
                        "a login prompt (about 1-2 min)")
    p.add_argument("--timeout", type=float, default=240, help="boot time limit, s (240)")
    p.add_argument("--console", type=Path, help="serial console log (DIR/boot-console.log)")
    p.add_argument("--no-golden", action="store_true",
                   help="skip comparing with the golden image in the cache (another machine)")
    p.set_defaults(func=_template_check)
    updates.register(lsub)
