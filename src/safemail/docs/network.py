"""``safemail docs network``: write the network plan (docs/network.md, docs/network.svg)."""

from __future__ import annotations

from pathlib import Path

from safemail.inventory import Host, read_inventory
from safemail.network import matrix, plan
from safemail.project import Project


def generate(repo: Path, out_dir: Path, stage: str,
             hosts: list[Host] | None = None) -> list[Path]:
    """Read the stage's matrix and inventory, write the plan, return the written paths."""
    spec, flows = matrix.load_matrix(repo, stage)
    if hosts is None:
        hosts = read_inventory(Project(repo).inventory(stage))
    if not hosts:
        raise matrix.MatrixError(
            f"inventories/{stage} has no hosts: the plan places groups by their hosts' segments",
            hint="document the test stage (--stage test) or add the production hosts",
        )
    topo = matrix.topology(spec, hosts)
    return plan.write(flows, topo, stage, out_dir)
