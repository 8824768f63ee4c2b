"""Reading which roles site.yml gives a host (for per-host VM images)."""

from __future__ import annotations

from pathlib import Path

from safemail.lab import playbook

ROOT = Path(__file__).resolve().parents[1]


def test_roles_follow_group_patterns_and_imports(tmp_path):
    (tmp_path / "other.yml").write_text("- hosts: relay\n  roles: [mailrelay]\n")
    (tmp_path / "site.yml").write_text(
        "- hosts: service\n  roles:\n    - role: common\n"
        "- hosts: ca_ra:ca_signer, ca_dist\n  roles: [ca_hosts]\n"
        "- import_playbook: other.yml\n")
    plays = playbook.read_plays(tmp_path / "site.yml")
    assert playbook.roles_for("relay1", ["service", "relay"], plays) == ["common", "mailrelay"]
    assert playbook.roles_for("ca-dist", ["service", "ca_dist"], plays) == ["common", "ca_hosts"]
    assert playbook.roles_for("practice1", ["participants"], plays) == []


def test_site_gives_the_relay_no_directory_server():
    plays = playbook.read_plays(ROOT / "playbooks/site.yml")
    roles = playbook.roles_for("relay1", ["service", "relay"], plays)
    assert "common" in roles
    assert "auth" not in roles


def test_keepalived_is_in_the_mirror_but_not_preinstalled_on_a_relay():
    """AV-02: a single-relay lab's relay1 image carries no keepalived (the role is skipped
    there); the mirror has it for relay2 of `lab up --redundant`."""
    from safemail.lab import image

    root = Path(__file__).resolve().parents[1]
    plays = playbook.read_plays(root / "playbooks" / "site.yml")
    assert "relay_vrrp" in playbook.roles_for("relay1", ("relay", "service"), plays)
    layer = image.role_packages(root / "roles", playbook.roles_for("relay1", ("relay", "service"),
                                                                   plays))
    assert "keepalived" not in layer
    assert "keepalived" in image.role_packages(root / "roles", optional=True)
