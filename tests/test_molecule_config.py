"""Molecule scenarios share one base config (.config/molecule/config.yml, deep-merged under
each molecule.yml): a scenario states only what is its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / ".config" / "molecule" / "config.yml").read_text())
SCENARIOS = sorted((REPO / "molecule").glob("*/molecule.yml"))


def _repeats(own: dict, base: dict, path: str = "") -> list[str]:
    """Settings of ``own`` equal to the base's (they belong in the base only)."""
    found = []
    for key, value in own.items():
        where = f"{path}{key}"
        if key not in base:
            continue
        if isinstance(value, dict) and isinstance(base[key], dict):
            found += _repeats(value, base[key], where + ".")
        elif value == base[key]:
            found.append(where)
    return found


def test_base_holds_the_shared_settings():
    assert BASE["driver"]["name"] == "default"
    assert BASE["ansible"]["env"]["ANSIBLE_CONFIG"] == "${MOLECULE_PROJECT_DIRECTORY}/ansible.cfg"
    assert BASE["provisioner"]["inventory"]["links"]["hosts"] == "../../inventories/test"
    assert "-o StrictHostKeyChecking=yes" in BASE["driver"]["ssh_connection_options"]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.parent.name)
def test_scenario_repeats_nothing_of_the_base(scenario: Path):
    own = yaml.safe_load(scenario.read_text())
    assert own.get("platforms"), "a scenario names its hosts"
    assert _repeats(own, BASE) == []


def test_the_standalone_volume_scenario_keeps_its_own_playbooks_and_state():
    own = yaml.safe_load((REPO / "molecule" / "encrypted_storage" / "molecule.yml").read_text())
    assert own["shared_state"] is False
    for step in ("create", "destroy", "converge", "verify"):
        assert own["ansible"]["playbooks"][step] == f"{step}.yml"
