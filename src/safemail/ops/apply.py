"""`safemail patch apply`: the manual patch run, host by host, through playbooks/patch.yml.

The test stage may be patched at any time. Production only when the promotion gate allows it
(:func:`safemail.gate.promote.evaluate`: a passing, complete verification report of this very
revision on the test stage) AND the test stage has no pending update left (it was patched
first). :func:`production_refusals` is the pure part of that rule.
"""

from __future__ import annotations

from collections.abc import Sequence

from safemail import ansible
from safemail.errors import SafeMailError
from safemail.gate.promote import Decision
from safemail.ops.status import HostResult
from safemail.project import Project


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


def playbook_command(project: Project, stage: str, hosts: Sequence[str], operator: str,
                     program: str | None = None) -> list[str]:
    """ansible-playbook for playbooks/patch.yml on `hosts` of `stage`, recording `operator`."""
    if not hosts:
        raise SafeMailError("no hosts to patch")
    return ansible.playbook_command(project, stage, "patch.yml", "--limit", ",".join(hosts),
                                    "-e", f"patch_operator={operator}", program=program)
