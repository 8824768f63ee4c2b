"""docs/generated/: the host list and the role settings (requirement SYS-06, audit report 2.2).

``safemail docs`` writes Markdown into docs/generated/:

- ``hosts.md``: every inventory host with groups, segment, hypervisor, location and address,
  then the hosts per network segment (read via ``ansible-inventory --list``);
- ``roles.md``: every role's settings from ``roles/*/meta/argument_specs.yml`` (option, type,
  required, default, description); roles without a spec are listed as such;
- ``index.md``: what was generated, from which inventory and revision.

Output is deterministic for the same inputs (no timestamps), so it can be committed and diffed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from safemail.docs.hosts import render_hosts
from safemail.docs.markdown import HEADER
from safemail.docs.roles import read_roles, render_roles
from safemail.inventory import Host, read_inventory
from safemail.project import Project


def render_index(inventory: str, revision: str | None, files: Iterable[str]) -> str:
    lines = [HEADER, "# Generated documentation", ""]
    lines.append(
        f"Generated from inventory `{inventory}`"
        + (f" at revision `{revision}`." if revision else ".")
    )
    lines.append("")
    lines += [f"- [{name}]({name})" for name in files]
    lines.append("")
    return "\n".join(lines)


def generate(
    repo: Path,
    out_dir: Path,
    stage: str = "production",
    revision: str | None = None,
    hosts: Sequence[Host] | None = None,
) -> list[Path]:
    """Write hosts.md, roles.md and index.md; return the written paths."""
    project = Project(repo)
    if hosts is None:
        hosts = read_inventory(project.inventory(stage))
    roles = read_roles(project.roles)
    inv_name = project.inventory_name(stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {
        "hosts.md": render_hosts(hosts, inv_name),
        "roles.md": render_roles(roles, base=repo),
    }
    written["index.md"] = render_index(inv_name, revision, ["hosts.md", "roles.md"])
    paths = []
    for name, text in written.items():
        path = out_dir / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
