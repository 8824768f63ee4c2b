"""Image input hashing and the roles' package list (no build needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from safemail.errors import SafeMailError
from safemail.lab import image
from safemail.lab.config import LabPaths


def _role(tmp: Path, name: str, text: str) -> None:
    d = tmp / name / "defaults"
    d.mkdir(parents=True)
    (d / "main.yml").write_text(text)


def test_role_packages_collects_each_roles_list(tmp_path):
    _role(tmp_path, "common", "common_packages: [sudo, openssh-server]\nother: [x]\n")
    _role(tmp_path, "mailrelay", "mailrelay_packages:\n  - postfix\n  - sudo\n")
    _role(tmp_path, "firewall", "firewall_rules: []\n")
    assert image.role_packages(tmp_path) == ["openssh-server", "postfix", "sudo"]


def test_role_packages_refuses_a_non_list(tmp_path):
    _role(tmp_path, "common", "common_packages: sudo\n")
    with pytest.raises(SafeMailError, match="list of package names"):
        image.role_packages(tmp_path)


def test_hash_is_stable_and_changes_with_any_input():
    a = image.input_hash(image.base_inputs())
    assert a == image.input_hash(image.base_inputs())
    assert len(a) == 16
    vm1 = image.input_hash(image.vm_inputs(a, ["postfix"]))
    assert vm1 == image.input_hash(image.vm_inputs(a, ["postfix", "postfix"]))
    assert vm1 != image.input_hash(image.vm_inputs(a, ["postfix", "dovecot-imapd"]))
    assert vm1 != image.input_hash(image.vm_inputs("0" * 16, ["postfix"]))


def test_adding_a_role_package_changes_only_the_vm_layer(tmp_path):
    paths = LabPaths(state=tmp_path / "s", images=tmp_path / "i")
    _role(tmp_path / "roles", "common", "common_packages: [sudo]\n")
    first = image.image_for(paths, tmp_path / "roles")
    _role(tmp_path / "roles", "mailstore", "mailstore_packages: [dovecot-imapd]\n")
    second = image.image_for(paths, tmp_path / "roles")
    assert first.base == second.base
    assert first.vm != second.vm
    assert not image.is_built(second)
