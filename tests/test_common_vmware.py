"""The common role installs and enables the VMware guest tools on VMware guests only.

Runs the role's own tasks (``include_role: common, tasks_from: vmware``: its defaults and vars)
against this machine in check mode, with the virtualization facts of a VMware guest and of the
lab's machine kinds given as play vars (they outrank gathered facts). Check mode: nothing is
installed or started here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    not (BIN / "ansible-playbook").exists() or not shutil.which("apt-get"),
    reason="needs ansible and a Debian-like machine (apt in check mode)")


def _run(tmp_path: Path, vtype: str) -> str:
    play = [{
        "name": "VMware guest tools",
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars": {"ansible_facts": {"virtualization_role": "guest",
                                   "virtualization_type": vtype}},
        "tasks": [{"name": "The common role's VMware tasks",
                   "ansible.builtin.include_role": {"name": "common",
                                                    "tasks_from": "vmware"}}],
    }]
    path = tmp_path / f"play-{vtype}.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "ANSIBLE_ROLES_PATH": str(REPO / "roles"), "ANSIBLE_NOCOLOR": "1"}
    proc = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "--check", str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _outcome(out: str, task: str) -> str:
    found = re.search(rf"TASK \[common : vmware \| {task}\][^\n]*\n(?:[^\n]*\n)*?"
                      r"(ok|changed|skipping|fatal)[:!]", out)
    assert found, out
    return found.group(1)


def test_a_vmware_guest_gets_the_guest_tools(tmp_path: Path) -> None:
    out = _run(tmp_path, "VMware")
    installed = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "open-vm-tools"],
                               capture_output=True, text=True, check=False).stdout
    expected = "ok" if "install ok installed" in installed else "changed"
    assert _outcome(out, "Install the VMware guest tools") == expected, out
    if expected == "changed":  # check mode: no unit to look at before the package exists
        assert _outcome(out, "Enable and start the VMware guest tools service") == "skipping"


@pytest.mark.parametrize("vtype", ["kvm", "qemu", "systemd-nspawn"])
def test_the_lab_machines_skip_them(tmp_path: Path, vtype: str) -> None:
    out = _run(tmp_path, vtype)
    assert _outcome(out, "Install the VMware guest tools") == "skipping", out
    assert _outcome(out, "Enable and start the VMware guest tools service") == "skipping"
    assert re.search(r"changed=0 ", out), out


def test_the_role_imports_the_vmware_tasks() -> None:
    tasks = yaml.safe_load((REPO / "roles/common/tasks/main.yml").read_text())
    assert {"name": "Import the VMware guest tasks",
            "ansible.builtin.import_tasks": "vmware.yml"} in tasks
