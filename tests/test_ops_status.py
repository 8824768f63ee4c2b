"""`safemail patch status` / `apply`: host selection, SSH settings, table, exit codes, gate."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from safemail.errors import SafeMailError
from safemail.gate.promote import Decision
from safemail.inventory import Host, parse_inventory_list
from safemail.ops import apply, status
from safemail.ops import patchcheck as pc
from safemail.project import Project

NOW = dt.datetime(2026, 11, 28, 15, 0, tzinfo=dt.UTC)
SIM = "Inst lsb-base [11.6] (11.6+safemail1 SafeMail lab mirror:bookworm/bookworm [all])\n"

INVENTORY = {
    "_meta": {"hostvars": {
        "relay1": {"ansible_host": "198.18.0.16", "ansible_user": "root",
                   "ansible_ssh_private_key_file": "/lab/ssh/id_ed25519",
                   "ansible_ssh_common_args": "-o UserKnownHostsFile=/lab/ssh/known_hosts "
                                              "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"},
        "auth1": {"ansible_host": "198.18.0.10"},
        "practice1": {"ansible_host": "198.18.0.14"},
    }},
    "all": {"children": ["service", "participants"]},
    "service": {"children": ["relay", "auth"]},
    "relay": {"hosts": ["relay1"]},
    "auth": {"hosts": ["auth1"]},
    "participants": {"hosts": ["practice1"]},
}


def _hosts():
    return parse_inventory_list(INVENTORY)


def _ok(host, sim=SIM, reboot=False):
    return status.HostResult(host, status=pc.build_status(host, NOW - dt.timedelta(minutes=5),
                                                          sim, reboot_flag=reboot))


def test_select_hosts_takes_service_hosts_from_the_inventory():
    assert [h.name for h in status.select_hosts(_hosts())] == ["auth1", "relay1"]
    assert [h.name for h in status.select_hosts(_hosts(), names=["relay1"])] == ["relay1"]
    with pytest.raises(SafeMailError, match="practice1"):
        status.select_hosts(_hosts(), names=["practice1"])


def test_ssh_settings_come_from_the_ansible_variables():
    relay = next(h for h in _hosts() if h.name == "relay1")
    assert status.ssh_settings(relay) == {
        "ssh_hostname": "198.18.0.16", "ssh_user": "root", "ssh_port": 22,
        "ssh_key": "/lab/ssh/id_ed25519", "ssh_known_hosts_file": "/lab/ssh/known_hosts",
        "ssh_strict_host_key_checking": "yes"}
    bare = Host("x", ("service",), {})
    assert status.ssh_settings(bare) == {"ssh_hostname": "x", "ssh_user": "root", "ssh_port": 22}


def test_table_and_exit_codes():
    results = [_ok("auth1", reboot=True), _ok("relay1", sim="")]
    table = status.rows(results, NOW)
    assert table[0]["pending"] == "1" and table[0]["security"] == "0"
    assert table[0]["reboot"] == "yes" and "5 min ago" in table[0]["last check"]
    assert "lsb-base 11.6 -> 11.6+safemail1" in table[0]["note"]
    assert table[1]["pending"] == "0"
    text = status.render_table(table)
    assert text.splitlines()[0].split()[:5] == ["HOST", "PENDING", "SECURITY", "REBOOT", "LAST"]
    assert status.exit_code(results) == 0
    down = status.HostResult("store1", error="unreachable (SSH failed)")
    missing = status.parse_status_text("ca-ra", None)
    assert status.exit_code([*results, missing]) == 4
    assert status.exit_code([*results, missing, down]) == 3
    assert status.rows([down], NOW)[0]["note"] == "unreachable (SSH failed)"


def test_parse_status_text():
    good = json.dumps(pc.build_status("a", NOW, SIM, reboot_flag=False).to_json())
    assert status.parse_status_text("a", good).status.pending[0].package == "lsb-base"
    assert "unreadable" in status.parse_status_text("a", "{not json").error


def test_production_needs_the_gate_and_a_patched_test_stage():
    allowed = Decision(True, [], revision="abc")
    refused = Decision(False, ["the verification failed (failing requirements: SYS-04)"])
    clean = [_ok("auth1", sim=""), _ok("relay1", sim="")]
    assert apply.production_refusals(allowed, clean) == []
    reasons = apply.production_refusals(refused, clean)
    assert reasons == ["promotion gate: the verification failed (failing requirements: SYS-04)"]
    reasons = apply.production_refusals(allowed, [_ok("auth1")])
    assert "still has pending updates (lsb-base)" in reasons[0]
    assert apply.production_refusals(allowed, [])
    down = status.HostResult("relay1", error="unreachable (SSH failed)")
    assert "unreachable" in apply.production_refusals(allowed, [down])[0]


def test_playbook_command(tmp_path):
    cmd = apply.playbook_command(Project(tmp_path), "test", ["auth1", "ca-ra"], "alice",
                                 program="a-p")
    assert cmd == ["a-p", "-i", str(tmp_path / "inventories/test"),
                   str(tmp_path / "playbooks/patch.yml"), "--limit", "auth1,ca-ra",
                   "-e", "patch_operator=alice"]
    with pytest.raises(SafeMailError):
        apply.playbook_command(Project(tmp_path), "staging", ["a"], "alice", program="a-p")
    with pytest.raises(SafeMailError):
        apply.playbook_command(Project(tmp_path), "test", [], "alice", program="a-p")


def test_cli_production_refused_without_report(monkeypatch, tmp_path, capsys):
    from safemail import cli
    from safemail.ops import cli as ops_cli

    (tmp_path / "ansible.cfg").touch()
    (tmp_path / "inventories").mkdir()
    monkeypatch.setenv("SAFEMAIL_PROJECT", str(tmp_path))
    monkeypatch.setattr(status, "inventory_hosts", lambda inv, names=None: [
        Host("auth1", ("service",), {})])
    monkeypatch.setattr(status, "collect", lambda hosts: [_ok("auth1", sim="")])
    monkeypatch.setattr(ops_cli.promote, "evaluate", lambda *a, **k: Decision(
        False, ["no verification report of the test stage was found"]))
    ran = []
    monkeypatch.setattr(ops_cli.ansible, "run", lambda cmd, repo: ran.append(cmd) or 0)
    assert cli.main(["patch", "apply", "--stage", "production"]) == 3
    assert "no verification report" in capsys.readouterr().out
    assert ran == []
    assert cli.main(["patch", "apply", "--stage", "test", "--operator", "bob"]) == 0
    assert ran and "patch_operator=bob" in ran[0]
