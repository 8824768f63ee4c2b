"""`safemail patch status` / `apply`: host selection, SSH command, table, exit codes, gate."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from safemail.errors import SafeMailError
from safemail.gate.promote import Decision
from safemail.inventory import Host, parse_inventory_list
from safemail.ops import apply, sshcmd, status
from safemail.ops import patchcheck as pc
from safemail.project import Project

REPO = Path(__file__).resolve().parents[1]
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


def test_ssh_command_is_the_one_ansible_builds_with_every_setting():
    """Key, user, known_hosts, a bastion and ansible.cfg's ControlPersist all reach ssh; the
    old pyinfra settings kept only key, user, port, known_hosts and StrictHostKeyChecking."""
    relay = next(h for h in _hosts() if h.name == "relay1")
    hv = {**relay.vars, "ansible_port": 2222,
          "ansible_ssh_common_args": relay.vars["ansible_ssh_common_args"]
          + " -o ProxyJump=ops@bastion.example:2200"}
    argv = sshcmd.ssh_commands(REPO, {"relay1": hv})["relay1"]
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert argv[0].endswith("ssh") and argv[-1] == "198.18.0.16"
    for expected in ("ProxyJump=ops@bastion.example:2200", "Port=2222", 'User="root"',
                     'IdentityFile="/lab/ssh/id_ed25519"', "StrictHostKeyChecking=yes",
                     "UserKnownHostsFile=/lab/ssh/known_hosts", "ControlPersist=120s",
                     "ConnectTimeout=30"):
        assert expected in opts, (expected, argv)


def test_a_bastion_proxy_command_is_really_used(tmp_path):
    """collect() connects through the ProxyCommand of the inventory: the command runs (it
    leaves a mark) and, as it fails, the host is reported unreachable, nothing else."""
    mark = tmp_path / "proxy-was-used"
    proxy = f"sh -c 'touch {mark}; exit 1'"
    # A name no master connection of a running lab can match (ControlMaster=auto would reuse
    # one and skip the proxy), never resolved: the ProxyCommand replaces the connection.
    host = Host("relay1", ("service",), {
        "ansible_host": "relay1.bastion-test.invalid",
        "ansible_ssh_common_args": f'-o "ProxyCommand={proxy}" -o ConnectTimeout=5'})
    [result] = status.collect([host], repo=REPO)
    assert mark.exists()
    assert not result.reachable and result.error.startswith("unreachable (SSH failed"), result


def test_a_host_without_ssh_is_refused_clearly():
    with pytest.raises(SafeMailError, match="ansible_connection is 'local'"):
        sshcmd.ssh_commands(REPO, {"x": {"ansible_connection": "local"}})


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
    monkeypatch.setattr(status, "collect", lambda hosts, **_kw: [_ok("auth1", sim="")])
    monkeypatch.setattr(ops_cli.promote, "evaluate", lambda *a, **k: Decision(
        False, ["no verification report of the test stage was found"]))
    ran = []
    monkeypatch.setattr(ops_cli.ansible, "run", lambda cmd, repo: ran.append(cmd) or 0)
    assert cli.main(["patch", "apply", "--stage", "production"]) == 3
    assert "no verification report" in capsys.readouterr().out
    assert ran == []
    assert cli.main(["patch", "apply", "--stage", "test", "--operator", "bob"]) == 0
    assert ran and "patch_operator=bob" in ran[0]
