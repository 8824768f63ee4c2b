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


def test_optional_package_lists_go_to_the_mirror_only(tmp_path):
    _role(tmp_path, "storage", "storage_packages: [cryptsetup]\n"
                               "storage_tang_packages: [clevis, clevis-luks]\n"
                               "other_tang_packages: [not-this-roles]\n")
    assert image.role_packages(tmp_path) == ["cryptsetup"]
    assert image.role_packages(tmp_path, optional=True) == ["clevis", "clevis-luks", "cryptsetup"]
    _role(tmp_path, "bad", "bad_extra_packages: clevis\n")
    with pytest.raises(SafeMailError, match="bad_extra_packages must be a list"):
        image.role_packages(tmp_path, optional=True)


def test_the_mirror_carries_the_tang_packages_and_the_test_server(tmp_path):
    root = Path(__file__).resolve().parents[1]
    img = image.image_for(LabPaths(state=tmp_path / "s", images=tmp_path / "i"), root)
    assert {"clevis", "clevis-luks", "clevis-systemd", "tang"} <= set(img.packages)


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
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    _role(tmp_path / "roles", "common", "common_packages: [sudo]\n")
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "playbooks/site.yml").write_text(
        "- hosts: service\n  roles: [common]\n- hosts: store\n  roles: [mailstore]\n")
    vms = {"relay1": ("service", "relay"), "store1": ("service", "store")}
    first = image.image_for(paths, tmp_path, vms)
    _role(tmp_path / "roles", "mailstore", "mailstore_packages: [dovecot-imapd]\n")
    second = image.image_for(paths, tmp_path, vms)
    assert first.base == second.base
    assert first.wheels == second.wheels
    # The store's layer and the mirror's download change; the relay's layer does not.
    assert first.vms["relay1"] == second.vms["relay1"]
    assert first.vms["store1"] != second.vms["store1"]
    assert first.debs_dir != second.debs_dir
    assert "dovecot-imapd" in second.vms["store1"].packages
    assert "dovecot-imapd" not in second.vms["relay1"].packages
    assert not image.is_built(second)


PYPROJECT = """
[project]
name = "x"
dependencies = ["cryptography==50.0.2", "asn1crypto==1.5.1"]
[project.optional-dependencies]
controller = ["ansible==12.3.0"]
"""


def test_host_requirements_are_the_non_optional_dependencies(tmp_path):
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    assert image.host_requirements(tmp_path / "pyproject.toml") == [
        "asn1crypto==1.5.1", "cryptography==50.0.2"]


def test_changing_a_host_requirement_changes_only_the_wheelhouse(tmp_path):
    paths = LabPaths(state=tmp_path / "s", images=tmp_path / "i")
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "playbooks/site.yml").write_text("- hosts: service\n  roles: [common]\n")
    first = image.image_for(paths, tmp_path, {"relay1": ("service",)})
    (tmp_path / "pyproject.toml").write_text(PYPROJECT.replace("50.0.2", "50.0.1"))
    second = image.image_for(paths, tmp_path, {"relay1": ("service",)})
    assert (first.base, first.debs_dir, first.vms) == (second.base, second.debs_dir, second.vms)
    assert first.wheels != second.wheels


def test_project_pyproject_keeps_controller_tools_out_of_the_host_runtime():
    root = Path(__file__).resolve().parents[1]
    reqs = image.host_requirements(root / "pyproject.toml")
    names = {r.split("=")[0].lower() for r in reqs}
    assert {"cryptography", "asn1crypto"} <= names
    assert not names & {"ansible", "ansible-core", "molecule", "pytest"}


def test_every_role_of_the_project_declares_a_plain_package_list():
    # The image builder cannot evaluate Jinja: a templated list would stop `lab up`.
    root = Path(__file__).resolve().parents[1]
    assert image.role_packages(root / "roles")
