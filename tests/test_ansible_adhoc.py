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
