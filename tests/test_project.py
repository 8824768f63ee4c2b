"""The checkout (safemail.project) and the Ansible programs (safemail.ansible)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from safemail import ansible
from safemail.errors import SafeMailError, UsageError
from safemail.project import STAGES, Project, check_stage


def _checkout(root: Path) -> Path:
    (root / "inventories" / "test").mkdir(parents=True)
    (root / "ansible.cfg").write_text("[defaults]\n")
    return root


def test_find_walks_up_from_a_subdirectory(tmp_path, monkeypatch):
    root = _checkout(tmp_path / "repo")
    (root / "roles" / "auth").mkdir(parents=True)
    monkeypatch.delenv("SAFEMAIL_PROJECT", raising=False)
    monkeypatch.chdir(root / "roles" / "auth")
    assert Project.find().root == root
    assert Project.find(root / "roles").root == root


def test_find_prefers_the_environment(tmp_path, monkeypatch):
    root = _checkout(tmp_path / "repo")
    monkeypatch.setenv("SAFEMAIL_PROJECT", str(root))
    monkeypatch.chdir(tmp_path)
    assert Project.find().root == root


def test_a_directory_is_a_checkout_only_with_ansible_cfg_and_inventories(tmp_path):
    (tmp_path / "inventories").mkdir()
    with pytest.raises(SafeMailError, match="cannot find the SafeMail checkout"):
        Project.find(tmp_path)


def test_outside_a_checkout_find_refuses_and_never_falls_back(tmp_path, monkeypatch):
    """A git repository that is no checkout (no ansible.cfg): `safemail verify` or `promote`
    run there must not act on the checkout this package was installed from."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "inventories" / "test").mkdir(parents=True)
    monkeypatch.delenv("SAFEMAIL_PROJECT", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SafeMailError, match="cannot find the SafeMail checkout") as info:
        Project.find()
    assert info.value.hint and "SAFEMAIL_PROJECT" in info.value.hint


def test_paths_and_stages(tmp_path):
    project = Project(tmp_path)
    assert project.inventory("test") == tmp_path / "inventories" / "test"
    assert project.inventory_name("production") == "inventories/production"
    assert project.playbook("site.yml") == tmp_path / "playbooks" / "site.yml"
    assert project.path(Path("reports/x")) == tmp_path / "reports" / "x"
    assert project.path(Path("/abs")) == Path("/abs")
    assert STAGES == ("test", "production") and check_stage("test") == "test"
    for bad in ("staging", "../production", ""):
        with pytest.raises(UsageError, match="unknown stage"):
            project.inventory(bad)


def test_revision_is_the_commit_or_none(tmp_path):
    assert Project(tmp_path).revision() is None
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert Project(tmp_path).revision() is None  # no commit yet
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@e",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert Project(tmp_path).revision() == head


def test_ansible_command_path_first_then_beside_python(tmp_path, monkeypatch):
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ansible-playbook").write_text("#!/bin/sh\n")
    monkeypatch.setattr(ansible.sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(ansible.shutil, "which", lambda name: "/on/path/" + name)
    assert ansible.command("ansible-playbook") == "/on/path/ansible-playbook"
    monkeypatch.setattr(ansible.shutil, "which", lambda name: None)
    assert ansible.command("ansible-playbook") == str(bin_dir / "ansible-playbook")
    with pytest.raises(ansible.AnsibleNotFound, match="ansible-inventory not found") as info:
        ansible.command("ansible-inventory")
    assert info.value.hint and "make setup" in info.value.hint


def test_playbook_command_and_run(tmp_path, monkeypatch, capsys):
    for name in ("ANSIBLE_VAULT_IDENTITY_LIST", "ANSIBLE_VAULT_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    project = Project(tmp_path)
    cmd = ansible.playbook_command(project, "test", "site.yml", "--check", program="a-p")
    assert cmd == ["a-p", "-i", str(tmp_path / "inventories" / "test"),
                   str(tmp_path / "playbooks" / "site.yml"), "--check"]
    assert ansible.run(["sh", "-c", "exit 4"], tmp_path) == 4
    assert "running: sh -c exit 4" in capsys.readouterr().out
    with pytest.raises(SafeMailError, match="cannot run no-such-program"):
        ansible.run([str(tmp_path / "no-such-program")], tmp_path, echo=False)
