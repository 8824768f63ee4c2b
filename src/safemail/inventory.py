"""Read an Ansible inventory through ``ansible-inventory --list`` (the one reader Ansible trusts).

The controller's one host list: the gate (which hosts were tested), the mutation run, patch
status, the network plan and the documentation generator all read hosts here.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safemail import ansible, vault
from safemail.errors import SafeMailError

# Host variables the documentation shows, by the first name that is set.
SEGMENT_VARS = ("safemail_segment", "segment", "lab_segment")
HYPERVISOR_VARS = ("safemail_hypervisor", "hypervisor", "lab_hypervisor")
LOCATION_VARS = ("safemail_location", "location", "site")
ADDRESS_VARS = ("ansible_host",)


class InventoryError(SafeMailError):
    """The inventory cannot be read."""


@dataclass(frozen=True)
class Host:
    name: str
    groups: tuple[str, ...]
    vars: Mapping[str, Any] = field(default_factory=dict)

    def first(self, names: tuple[str, ...]) -> str | None:
        for name in names:
            value = self.vars.get(name)
            if value not in (None, ""):
                return str(value)
        return None

    @property
    def segment(self) -> str | None:
        return self.first(SEGMENT_VARS)

    @property
    def hypervisor(self) -> str | None:
        return self.first(HYPERVISOR_VARS)

    @property
    def location(self) -> str | None:
        return self.first(LOCATION_VARS)

    @property
    def address(self) -> str | None:
        return self.first(ADDRESS_VARS)


def parse_inventory_list(data: Mapping[str, Any]) -> list[Host]:
    """Hosts with their (transitive) groups from ``ansible-inventory --list`` JSON."""
    hostvars: Mapping[str, Any] = data.get("_meta", {}).get("hostvars", {})
    direct: dict[str, set[str]] = {}
    parents: dict[str, set[str]] = {}
    for group, body in data.items():
        if group == "_meta" or not isinstance(body, Mapping):
            continue
        for host in body.get("hosts", []) or []:
            direct.setdefault(host, set()).add(group)
        for child in body.get("children", []) or []:
            parents.setdefault(child, set()).add(group)

    def ancestors(group: str, seen: set[str]) -> set[str]:
        out = set()
        for parent in parents.get(group, ()):
            if parent not in seen:
                seen.add(parent)
                out |= {parent} | ancestors(parent, seen)
        return out

    names = set(direct) | set(hostvars)
    hosts = []
    for name in sorted(names):
        groups = set(direct.get(name, ()))
        for group in list(groups):
            groups |= ancestors(group, set())
        groups -= {"all", "ungrouped"}
        hosts.append(Host(name, tuple(sorted(groups)), dict(hostvars.get(name, {}))))
    return hosts


def failure_hint(inventory: Path, stderr: str) -> str:
    """What to do when ansible-inventory fails: a vault it cannot open, else the syntax."""
    if "vault" in stderr.lower():
        return (f"give Ansible the vault password of {inventory.name}: put it into "
                f"~/.config/safemail/vault-{inventory.name}.pass (mode 0600) or name the file in "
                "SAFEMAIL_VAULT_PASSWORD_FILE, or export ANSIBLE_VAULT_IDENTITY_LIST="
                f"{inventory.name}@$PWD/scripts/vault-pass-client (docs/production.md, "
                "\"The vault\")")
    return "check the inventory files for syntax errors"


def read_inventory(inventory: Path, source: Path | None = None) -> list[Host]:
    """Run ``ansible-inventory -i <inventory> --list`` and return its hosts.

    ``source``: one file of the inventory directory to read instead of all of it (its
    group_vars still apply); the vault password is still the inventory's.
    """
    if not inventory.exists():
        raise InventoryError(
            f"inventory {inventory} does not exist",
            "for the test stage run `safemail lab up` first",
        )
    # The checkout holding this inventory (inventories/<stage>), for the vault client.
    repo = inventory.resolve().parent.parent
    try:
        program = ansible.command("ansible-inventory")
    except ansible.AnsibleNotFound as exc:
        raise InventoryError(exc.message, exc.hint) from exc
    cmd = [program, "-i", str(source or inventory), *vault.vault_args(repo, inventory), "--list"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InventoryError(f"cannot run {' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        raise InventoryError(
            f"ansible-inventory failed for {inventory}: {proc.stderr.strip()[-2000:]}",
            failure_hint(inventory, proc.stderr),
        )
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"ansible-inventory printed no JSON for {inventory}: {exc}") from exc
    return parse_inventory_list(data)
