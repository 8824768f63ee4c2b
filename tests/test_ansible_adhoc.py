"""Ad-hoc `ansible` commands work from the checkout under the Mitogen strategy (ansible.cfg).

docs/production.md and the runbooks use ad-hoc module calls on localhost (vSphere info
modules). Under ansible-core 2.19 they failed with "cannot unpickle ... _AnsibleTaggedStr"
(plugins/strategy/mitogen_linear.py says why); this runs one, as an operator would, and
checks it ran in the same directory plain Ansible uses (the configured playbook_dir).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = Path(sys.executable).parent / "ansible"


def test_an_ad_hoc_command_on_localhost_runs_under_mitogen():
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    env.pop("ANSIBLE_STRATEGY", None)
    proc = subprocess.run([str(ANSIBLE), "localhost", "-m", "ansible.builtin.command",
                           "-a", "pwd"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CHANGED | rc=0" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == str(REPO / "playbooks")


def test_a_command_run_by_a_playbook_may_use_every_cpu(tmp_path):
    """Mitogen's CPU pinning would confine every command a playbook runs on the controller to
    one core on a 2-core machine; Molecule's `safemail lab up` and `safemail verify` run that
    way (plugins/strategy/mitogen_linear.py turns the pinning off)."""
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        import pytest

        pytest.skip(f"this process may use only CPU {mine}: nothing to compare")
    play = tmp_path / "cpus.yml"
    play.write_text("- hosts: localhost\n  gather_facts: false\n  tasks:\n"
                    "    - ansible.builtin.command: >-\n"
                    "        python3 -c 'import os;\n"
                    "        print(\"CPUS\", sorted(os.sched_getaffinity(0)))'\n"
                    "      register: cpus\n"
                    "    - ansible.builtin.debug:\n        msg: \"{{ cpus.stdout }}\"\n")
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    env.pop("ANSIBLE_STRATEGY", None)
    proc = subprocess.run([str(ANSIBLE) + "-playbook", "-i", "localhost,", "-c", "local",
                           str(play)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mitogen" in (REPO / "ansible.cfg").read_text()  # the strategy this is about
    line = next(x for x in proc.stdout.splitlines() if '"msg": "CPUS' in x)
    allowed = line.split("CPUS", 1)[1].strip().rstrip('"').strip()
    assert allowed == str(mine), f"the playbook's command may use CPUs {allowed}, this test {mine}"
