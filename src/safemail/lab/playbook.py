"""Which roles a host gets: read from playbooks/site.yml, for the lab's image builder.

A VM's disk carries exactly the packages of the roles that site.yml applies to its groups
(front systems carry as little as possible), so the image builder needs host -> roles.
Plays name their hosts by group patterns joined with ':' or ','; `import_playbook` is followed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from safemail.errors import SafeMailError


@dataclass(frozen=True)
class Play:
    patterns: tuple[str, ...]
    roles: tuple[str, ...]


def _role_name(entry: object) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("role") or entry.get("name"), str):
        return str(entry.get("role") or entry.get("name"))
    raise SafeMailError(f"cannot read the role entry {entry!r}")


def read_plays(playbook: Path) -> list[Play]:
    try:
        data = yaml.safe_load(playbook.read_text()) or []
    except (OSError, yaml.YAMLError) as exc:
        raise SafeMailError(f"cannot read {playbook}: {exc}") from exc
    plays: list[Play] = []
    for entry in data:
        if "import_playbook" in entry:
            plays += read_plays(playbook.parent / entry["import_playbook"])
            continue
        hosts = entry.get("hosts", "")
        if isinstance(hosts, list):
            hosts = ":".join(hosts)
        patterns = tuple(p.strip() for p in str(hosts).replace(",", ":").split(":") if p.strip())
        roles = tuple(_role_name(r) for r in entry.get("roles") or [])
        roles += tuple(t["ansible.builtin.include_role"]["name"]
                       for t in entry.get("tasks") or []
                       if isinstance(t, dict) and "ansible.builtin.include_role" in t)
        plays.append(Play(patterns, roles))
    return plays


def roles_for(host: str, groups: Iterable[str], plays: Iterable[Play]) -> list[str]:
    """The roles plays apply to a host that is in `groups` (plus `all` and its own name)."""
    names = {host, "all", *groups}
    out: list[str] = []
    for play in plays:
        if names & set(play.patterns):
            out += [r for r in play.roles if r not in out]
    return out
