"""``safemail docs network``: write the network plan (docs/network.md, docs/network.svg)."""

from __future__ import annotations

from pathlib import Path

from safemail.inventory import Host, read_inventory
from safemail.network import matrix, plan
from safemail.project import Project


def generate(repo: Path, out_dir: Path, stage: str,
             hosts: list[Host] | None = None) -> list[Path]:
    """Read the stage's matrix and inventory, write the plan, return the written paths.

    The plan documents the committed inventory (inventories/<stage>/hosts.yml with its
    group_vars), not what `safemail lab up` adds beside it: a `lab up --redundant` stage's
    relay2 and auth2 live only in the generated zz_lab_generated.yml, and docs/network.md
    must render the same whichever lab happens to be running.
    """
    spec, flows = matrix.load_matrix(repo, stage)
    if hosts is None:
        inventory = Project(repo).inventory(stage)
        committed = inventory / "hosts.yml"
        hosts = read_inventory(inventory, committed if committed.is_file() else None)
    if not hosts:
        raise matrix.MatrixError(
            f"inventories/{stage} has no hosts: the plan places groups by their hosts' segments",
            hint="document the test stage (--stage test) or add the production hosts",
        )
    topo = matrix.topology(spec, hosts)
    return plan.write(flows, topo, stage, out_dir)
