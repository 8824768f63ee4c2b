"""The stage under test as its inventory describes it: groups and their hosts.

One reader for the verify modules that parametrize or select by group (availability,
redundancy, faults, the `redundant_stage` selection in conftest.py): `ansible-inventory --list`
on the stage's inventory, as testinfra reads it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import testinfra

from safemail import ansible
from safemail.inventory import parse_inventory_list
from safemail.project import project_root


def inventory(config: pytest.Config) -> str:
    return config.getoption("ansible_inventory", default=None) or "inventories/test"


def groups(config: pytest.Config, strict: bool = True) -> dict[str, list[str]]:
    """Group -> host names. An unreadable inventory fails (strict) or gives {}."""
    proc = subprocess.run([ansible.command("ansible-inventory"), "-i", inventory(config),
                           "--list"], capture_output=True, text=True, check=False,
                          cwd=project_root())
    if proc.returncode != 0:
        assert not strict, f"ansible-inventory -i {inventory(config)}: {proc.stderr}"
        return {}
    out: dict[str, list[str]] = {}
    for h in parse_inventory_list(json.loads(proc.stdout)):
        for g in h.groups:
            out.setdefault(g, []).append(h.name)
    return out


def first_host(config: pytest.Config, group: str) -> str | None:
    """The group's first host in inventory order, as the playbooks' ``groups[group] | first``
    (the directory provider for ``auth``); None if the group has no host. An inventory that
    Ansible cannot read raises RuntimeError with Ansible's own words."""
    # ANSIBLE_VERBOSITY=0 as testinfra sets it: with a higher verbosity Ansible first prints
    # "Using ... as config file", and a parser that skipped one line read the header as a host.
    proc = subprocess.run([ansible.command("ansible"), "-i", inventory(config), group,
                           "--list-hosts"], capture_output=True, text=True, check=False,
                          cwd=project_root(), env={**os.environ, "ANSIBLE_VERBOSITY": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"ansible -i {inventory(config)} {group} --list-hosts: "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    # "  hosts (2):" then one indented name per line, in Ansible's group order.
    lines = proc.stdout.splitlines()
    header = next((i for i, line in enumerate(lines)
                   if re.fullmatch(r"\s*hosts \(\d+\):", line)), None)
    if header is None:
        raise RuntimeError(f"ansible {group} --list-hosts printed no 'hosts (N):' line: "
                           f"{proc.stdout.strip()[-300:]}")
    names = [line.strip() for line in lines[header + 1:] if line.strip()]
    return names[0] if names else None


def host(config: pytest.Config, name: str):
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory(config))


def holders(relays: dict, address: str) -> list[str]:
    """The relays (name -> testinfra host) holding ``address`` on an interface now."""
    return [name for name, h in relays.items()
            if f" {address}/" in h.run("ip -4 -o addr show").stdout]
