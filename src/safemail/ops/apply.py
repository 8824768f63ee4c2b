"""`safemail patch apply`: the manual patch run, host by host, through playbooks/patch.yml.

The test stage may be patched at any time. Production only when the promotion gate allows it
(:func:`safemail.gate.promote.evaluate`: a passing, complete verification report of this very
revision on the test stage) AND the test stage has no pending update left (it was patched
first). :func:`production_refusals` is the pure part of that rule.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from safemail import vault
from safemail.errors import SafeMailError
from safemail.gate.promote import Decision
from safemail.ops.status import HostResult

STAGES = ("test", "production")


def production_refusals(decision: Decision, test_stage: Sequence[HostResult]) -> list[str]:
    """Every reason production may not be patched now (empty: allowed)."""
    reasons = [] if decision.allowed else [f"promotion gate: {r}" for r in decision.reasons]
    if not test_stage:
        reasons.append("the test stage's patch status could not be read: no hosts")
    for r in test_stage:
        if r.status is None:
            reasons.append(f"test stage host {r.host}: {r.error}")
        elif not r.status.ok:
            reasons.append(f"test stage host {r.host}: last patch check failed ({r.status.error})")
        elif r.status.pending:
            names = ", ".join(p.package for p in r.status.pending)
            reasons.append(f"test stage host {r.host} still has pending updates ({names}): "
                           "patch and verify the test stage first")
    return reasons


def playbook_command(ansible_playbook: str, repo: Path, stage: str, hosts: Sequence[str],
                     operator: str) -> list[str]:
    if stage not in STAGES:
        raise SafeMailError(f"unknown stage {stage!r}", f"use one of {', '.join(STAGES)}")
    if not hosts:
        raise SafeMailError("no hosts to patch")
    inventory = repo / "inventories" / stage
    return [ansible_playbook, "-i", str(inventory), *vault.vault_args(repo, inventory),
            str(repo / "playbooks" / "patch.yml"), "--limit", ",".join(hosts),
            "-e", f"patch_operator={operator}"]


def ansible_playbook_command() -> str:
    found = shutil.which("ansible-playbook")
    if found:
        return found
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.exists():
        return str(beside)
    raise SafeMailError("ansible-playbook not found",
                        "install the project: .venv/bin/pip install -e '.[controller]'")


def run_playbook(cmd: Sequence[str], repo: Path) -> int:
    print("running: " + " ".join(cmd), flush=True)
    try:
        return subprocess.run(list(cmd), cwd=repo, check=False).returncode
    except OSError as exc:
        raise SafeMailError(f"cannot run ansible-playbook: {exc}") from exc
