"""`safemail docs`: host list and role settings generated from a small fake project."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from safemail import ansible, inventory
from safemail.docs import generated, roles
from safemail.errors import SafeMailError

SPEC = """\
argument_specs:
  main:
    short_description: Postfix relay with the S/MIME gate
    options:
      mailrelay_domains:
        type: list
        elements: str
        required: true
        description: Mail domains the relay accepts (no default; the site supplies them).
      mailrelay_max_message_size:
        type: int
        default: 52428800
        description: Largest accepted message in bytes | including attachments.
      mailrelay_tls_policy:
        type: str
        default: encrypt
        choices: [encrypt, dane]
        description:
          - TLS policy between servers.
          - Never "may".
  check:
    short_description: Read-only checks
"""

INVENTORY = """\
all:
  children:
    relay:
      hosts:
        relay:
          ansible_host: 198.18.1.10
          safemail_segment: front
          safemail_hypervisor: qemu
    store:
      hosts:
        store:
          safemail_segment: back
          safemail_location: "Bad Segeberg, server room 1"
    ca_hosts:
      children:
        ca_ra:
          hosts:
            ca-ra:
              safemail_segment: front
              safemail_hypervisor: nspawn
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "ansible.cfg").write_text("[defaults]\nroles_path = roles\n", encoding="utf-8")
    spec = tmp_path / "roles" / "mailrelay" / "meta" / "argument_specs.yml"
    spec.parent.mkdir(parents=True)
    spec.write_text(SPEC, encoding="utf-8")
    (tmp_path / "roles" / "firewall" / "tasks").mkdir(parents=True)  # role without a spec
    inv = tmp_path / "inventories" / "production" / "hosts.yml"
    inv.parent.mkdir(parents=True)
    inv.write_text(INVENTORY, encoding="utf-8")
    return tmp_path


def test_roles_markdown(project: Path) -> None:
    found = roles.read_roles(project / "roles")
    assert [r.name for r in found] == ["firewall", "mailrelay"]
    text = roles.render_roles(found, base=project)
    assert "## firewall" in text and "No `meta/argument_specs.yml`" in text
    assert "Source: `roles/mailrelay/meta/argument_specs.yml`" in text
    assert "| `mailrelay_domains` | list of str | yes |  | Mail domains" in text
    assert "| `mailrelay_max_message_size` | int | no | `52428800` |" in text
    assert "bytes \\| including" in text  # a pipe cannot break the table
    assert 'TLS policy between servers. Never "may". Choices: `encrypt`, `dane`' in text
    assert "### Entry point `check`" in text and "_No options._" in text


def test_empty_or_missing_roles_dir(tmp_path: Path) -> None:
    assert roles.read_roles(tmp_path / "roles") == []
    (tmp_path / "roles").mkdir()
    assert "No roles exist yet" in roles.render_roles(roles.read_roles(tmp_path / "roles"))


def test_broken_spec_is_a_clear_error(project: Path) -> None:
    spec = project / "roles" / "mailrelay" / "meta" / "argument_specs.yml"
    spec.write_text("argument_specs: [\n", encoding="utf-8")
    with pytest.raises(SafeMailError, match="argument_specs.yml is not valid YAML"):
        roles.read_roles(project / "roles")
    spec.write_text("options: {}\n", encoding="utf-8")
    with pytest.raises(SafeMailError, match="top-level 'argument_specs'"):
        roles.read_roles(project / "roles")


def test_inventory_groups_are_transitive() -> None:
    data = {
        "_meta": {"hostvars": {"ca-ra": {"safemail_segment": "front"}}},
        "all": {"children": ["ungrouped", "ca_hosts"]},
        "ca_hosts": {"children": ["ca_ra"]},
        "ca_ra": {"hosts": ["ca-ra"]},
    }
    (host,) = inventory.parse_inventory_list(data)
    assert host.groups == ("ca_hosts", "ca_ra")
    assert host.segment == "front" and host.hypervisor is None


def test_generate_with_real_ansible_inventory(project: Path) -> None:
    try:
        ansible.command("ansible-inventory")
    except SafeMailError:
        pytest.skip("ansible-inventory not installed")
    out = project / "docs" / "generated"
    paths = generated.generate(project, out, stage="production", revision="abc123")
    assert sorted(p.name for p in paths) == ["hosts.md", "index.md", "roles.md"]
    hosts = (out / "hosts.md").read_text(encoding="utf-8")
    assert "| `relay` | relay | front | qemu |  | 198.18.1.10 |" in hosts
    assert "| `store` | store | back |  | Bad Segeberg, server room 1 |  |" in hosts
    assert "| `ca-ra` | ca_hosts, ca_ra | front | nspawn |" in hosts
    assert "- **front**: `ca-ra`, `relay`" in hosts
    assert "revision `abc123`" in (out / "index.md").read_text(encoding="utf-8")
    first = {p.name: p.read_text(encoding="utf-8") for p in paths}
    generated.generate(project, out, stage="production", revision="abc123")
    assert first == {p.name: p.read_text(encoding="utf-8") for p in paths}  # deterministic


def test_missing_ansible_is_a_clear_error(
    project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ansible.shutil, "which", lambda name: None)
    monkeypatch.setattr(ansible.sys, "executable", str(tmp_path / "nobin" / "python"))
    with pytest.raises(SafeMailError) as info:
        generated.generate(project, project / "out")
    assert "ansible-inventory not found" in info.value.message
    assert info.value.hint and "pip install" in info.value.hint


def test_missing_inventory_is_a_clear_error(project: Path) -> None:
    with pytest.raises(SafeMailError, match="inventory .*inventories/test does not exist"):
        generated.generate(project, project / "out", stage="test")


def test_docs_cli(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    monkeypatch.chdir(project)
    monkeypatch.delenv("SAFEMAIL_PROJECT", raising=False)
    monkeypatch.setattr(generated, "read_inventory", lambda path: [])
    from safemail.cli import main

    assert main(["docs", "--out", "gen"]) == 0
    assert "The inventory has no hosts." in (project / "gen" / "hosts.md").read_text()
    assert "mailrelay_domains" in (project / "gen" / "roles.md").read_text()
