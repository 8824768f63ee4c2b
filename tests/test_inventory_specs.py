"""Both inventories against the roles' interfaces (issue 15), without a lab and without vSphere.

Every host of the test and the production inventory is rendered through playbooks/site.yml
(``safemail.rolevars``: Ansible's own variable manager, the role wiring in playbooks/group_vars,
every role's options templated) and checked against each role's meta/argument_specs.yml: a
missing required option, a value of the wrong type or one that cannot be templated fails
with host, role and option. Every playbook passes ``ansible-playbook --syntax-check`` against
production.

The vaults. The test works on a copy of each inventory in tmp_path:

- test: the lab's generated part (zz_lab_generated.yml: addresses, key) is made from the lab
  plan of hosts.yml (src/safemail/lab/plan.py), as `safemail lab up` would write it;
- production: the committed vault.yml is replaced by one this test makes: fresh random values
  for the same variables, encrypted with vault id ``production`` and a random password that
  exists only in tmp_path for the run. The committed example vault itself is checked by
  test_the_example_vault_holds_the_same_variables with its published example password
  (docs/production.md), which protects example values only.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from safemail import rolevars, vault
from safemail.inventory import parse_inventory_list
from safemail.lab import plan as lab_plan
from safemail.network import matrix
from safemail.project import Project

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("test", "production")
VAULT_ID = "production"
# Production-only secrets (the lab unlocks its LUKS volume with a key file, no passphrase).
PRODUCTION_ONLY_SECRETS = {"encrypted_storage_passphrase"}
# Files only one inventory has, and why (docs/production.md, "Where variables live").
ONLY_IN = {
    "production": {"group_vars/all/vsphere.yml"},  # the VMs on vSphere; the lab sizes its own
    "test": set(),
}
PLAYBOOKS = sorted(p.name for p in (REPO / "playbooks").glob("*.yml"))

pytestmark = pytest.mark.skipif(not (BIN / "ansible-playbook").exists(),
                                reason="ansible is not installed in this environment")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("ANSIBLE_VAULT_IDENTITY_LIST", "ANSIBLE_VAULT_PASSWORD_FILE"):
        env.pop(name, None)
    return {**env, **(extra or {})}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False, **kw)


def _stand_in_lab(inventory: Path) -> None:
    data = yaml.safe_load((inventory / "hosts.yml").read_text())
    plan = lab_plan.make_plan(lab_plan.hosts_from_inventory(data))
    generated = lab_plan.generated_inventory(
        plan, "/var/lib/safemail-lab/ssh/id_ed25519", "/var/lib/safemail-lab/ssh/known_hosts",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHN0YW5kLWluIGtleSBmb3IgdGhlIHVuaXQgdGVzdA lab")
    (inventory / "zz_lab_generated.yml").write_text(yaml.safe_dump(generated))


def _test_vault_plaintext() -> dict:
    """The variables of production's vault: the test stage's (same shape), fresh values."""
    lab = yaml.safe_load((REPO / "inventories/test/group_vars/all/vault.yml").read_text())
    participants = yaml.safe_load(
        (REPO / "inventories/production/group_vars/all/participants.yml").read_text())
    out = {name: secrets.token_urlsafe(12) for name, value in lab.items()
           if not isinstance(value, dict)}
    out["safemail_participant_passwords"] = {
        str(p["number"]): secrets.token_urlsafe(12)
        for p in participants["safemail_participants"]}
    out.update({name: secrets.token_urlsafe(12) for name in PRODUCTION_ONLY_SECRETS})
    return out


class Copy:
    """A copy of one inventory in tmp_path, ready to render."""

    def __init__(self, stage: str, root: Path) -> None:
        self.stage = stage
        self.path = root / "inventories" / stage
        shutil.copytree(REPO / "inventories" / stage, self.path,
                        ignore=shutil.ignore_patterns("zz_lab_generated.yml"))
        self.vault_ids: list[tuple[str, Path]] = []
        if stage == "test":
            _stand_in_lab(self.path)
        else:
            password = root / "vault-password"
            password.write_text(secrets.token_urlsafe(24) + "\n")
            password.chmod(0o600)
            self.vault_ids = [(VAULT_ID, password)]
            vault = self.path / "group_vars/all/vault.yml"
            vault.write_text(yaml.safe_dump(_test_vault_plaintext()))
            proc = _run([str(BIN / "ansible-vault"), "encrypt", "--vault-id",
                         f"{VAULT_ID}@{password}", "--encrypt-vault-id", VAULT_ID, str(vault)],
                        env=_env())
            assert proc.returncode == 0, proc.stderr

    @property
    def vault_args(self) -> list[str]:
        return [a for vid, path in self.vault_ids for a in ("--vault-id", f"{vid}@{path}")]

    def edit(self, relative: str, old: str, new: str) -> None:
        path = self.path / relative
        text = path.read_text()
        assert old in text, f"{old!r} not in {path}"
        path.write_text(text.replace(old, new, 1))

    def render(self) -> dict:
        return rolevars.run(REPO, self.path, vault_ids=self.vault_ids)

    def hosts(self):
        proc = _run([str(BIN / "ansible-inventory"), "-i", str(self.path), "--list",
                     *self.vault_args], env=_env())
        assert proc.returncode == 0, proc.stderr
        return parse_inventory_list(yaml.safe_load(proc.stdout))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, tuple[Copy, dict]]:
    out = {}
    for stage in STAGES:
        copy = Copy(stage, tmp_path_factory.mktemp(stage))
        out[stage] = (copy, copy.render())
    return out


def _problems(data: dict) -> list[str]:
    return [str(rolevars.Problem(**p)) for p in data["problems"]]


@pytest.mark.parametrize("stage", STAGES)
def test_every_role_gets_what_its_argument_spec_asks_for(rendered, stage):
    _, data = rendered[stage]
    problems = _problems(data)
    assert not problems, "\n".join(problems)


# Which roles site.yml applies per group: the check above covered them (a play that matched
# no host would pass it silently).
EXPECTED_ROLES = {
    "service": {"common", "admin_log", "patch_monitor", "firewall"},
    "relay": {"encrypted_storage", "safemail_runtime", "mailrelay", "accounting"},
    "store": {"encrypted_storage", "mailstore"},
    "auth": {"auth"},
    "ca_ra": {"safemail_runtime", "ca_hosts"},
    "ca_signer": {"safemail_runtime", "ca_hosts"},
    "ca_dist": {"safemail_runtime", "ca_hosts"},
    "participants": {"common", "safemail_runtime", "service_tls"},
}


@pytest.mark.parametrize("stage", STAGES)
def test_every_host_of_every_group_was_rendered(rendered, stage):
    copy, data = rendered[stage]
    hosts = copy.hosts()
    assert hosts, "the inventory lists no host"
    groups = {g for h in hosts for g in h.groups}
    assert set(EXPECTED_ROLES) - {"participants"} <= groups
    for host in hosts:
        got = {key.split(" | ")[-1] for key in data["roles"].get(host.name, {})}
        want = set().union(*(EXPECTED_ROLES.get(g, set()) for g in host.groups))
        assert want <= got, f"{host.name}: no rendering for {sorted(want - got)}"


@pytest.mark.parametrize(("stage", "relative", "line"), [
    ("test", "group_vars/all/common.yml", "common_ntp_servers:"),
    ("production", "group_vars/all/common.yml", "common_ntp_servers:"),
])
def test_a_deleted_required_value_fails_naming_host_role_and_option(tmp_path, stage,
                                                                   relative, line):
    copy = Copy(stage, tmp_path)
    copy.edit(relative, line, "unused_" + line)
    problems = _problems(copy.render())
    service = [h.name for h in copy.hosts() if "service" in h.groups]
    for host in service:
        assert (f"host {host}, role common, option common_ntp_servers: required, but not set"
                in problems), problems


def test_a_deleted_host_value_fails_for_that_host_only(tmp_path):
    copy = Copy("production", tmp_path)
    hosts = (copy.path / "hosts.yml").read_text()
    relay_device = re.search(r"( +encrypted_storage_device: .*\n)", hosts.split("store:")[0])
    assert relay_device
    (copy.path / "hosts.yml").write_text(hosts.replace(relay_device.group(1), "", 1))
    problems = _problems(copy.render())
    assert problems == ["host relay1.safenet.example, role encrypted_storage, option "
                        "encrypted_storage_device: required, but not set"]


def test_a_value_of_the_wrong_type_fails_naming_the_option(tmp_path):
    copy = Copy("production", tmp_path)
    copy.edit("group_vars/all/ops.yml", "admin_log_retention_days: 90",
              "admin_log_retention_days: ninety")
    problems = _problems(copy.render())
    assert any(p.startswith("host auth1.safenet.example, role admin_log, option "
                            "admin_log_retention_days: argument 'admin_log_retention_days' is "
                            "of type str") for p in problems), problems


def test_a_value_that_cannot_be_templated_fails_naming_the_option(tmp_path):
    copy = Copy("test", tmp_path)
    copy.edit("group_vars/all/ldap.yml", 'safemail_ldap_uri: "ldap://auth1"',
              'safemail_ldap_uri_typo: "ldap://auth1"')
    problems = _problems(copy.render())
    assert any(p.startswith("host relay1, role mailrelay, option mailrelay_ldap_uri: cannot be "
                            "templated") and "safemail_ldap_uri" in p for p in problems), problems


# --- shape: wiring in one place, same files in both inventories ---------------------------


def _files(stage: str) -> set[str]:
    root = REPO / "inventories" / stage
    return {str(p.relative_to(root)) for p in root.rglob("*.yml")
            if p.name != "zz_lab_generated.yml"}


def test_both_inventories_have_the_same_files():
    test, production = _files("test"), _files("production")
    assert ONLY_IN["test"] <= test and ONLY_IN["production"] <= production
    assert test - ONLY_IN["test"] == production - ONLY_IN["production"]
    assert "hosts.yml" in test
    assert "group_vars/all/vault.yml" in test


@pytest.mark.parametrize("stage", STAGES)
def test_inventories_hold_no_role_wiring(stage):
    """Group files and wiring variables live in playbooks/group_vars only (one place)."""
    root = REPO / "inventories" / stage
    assert sorted(p.name for p in (root / "group_vars").glob("*.yml")) == []
    wiring = set()
    for path in (REPO / "playbooks/group_vars").glob("*.yml"):
        wiring |= set(yaml.safe_load(path.read_text()) or {})
    for path in sorted((root / "group_vars/all").glob("*.yml")):
        if path.read_text().startswith("$ANSIBLE_VAULT"):
            continue
        both = wiring & set(yaml.safe_load(path.read_text()) or {})
        assert not both, f"{path} sets role wiring {sorted(both)} (playbooks/group_vars/)"


def test_commands_without_a_playbook_see_the_wiring(rendered):
    """ansible.cfg's playbook_dir: ansible-inventory (testinfra in verify/ reads variables
    through it, e.g. ca_hosts_function) sees playbooks/group_vars as ansible-playbook does."""
    copy, _ = rendered["test"]
    hostvars = {h.name: h.vars for h in copy.hosts()}
    assert {hostvars[h]["ca_hosts_function"] for h in ("ca-ra", "ca-signer", "ca-dist")} == {
        "ra", "signer", "dist"}
    assert hostvars["relay1"]["mailrelay_store_host"] == "{{ groups['store'] | first }}"


# --- production: addresses, firewall, vault ---------------------------------------------------


def test_production_addresses_follow_the_network_plan(rendered):
    copy, _ = rendered["production"]
    hosts = copy.hosts()
    spec, flows = matrix.load_matrix(REPO, "production")
    topo = matrix.topology(spec, hosts)
    matrix.check(flows, topo)  # every host inside its segment, every flow end known
    mgmt = spec.segments["mgmt"]
    addresses = []
    for host in hosts:
        assert host.segment and host.segment != "mgmt", host.name
        assert host.address and ipaddress.ip_address(host.address) in mgmt, host.name
        addresses += [host.address, str(host.vars["safemail_address"])]
        rules = matrix.host_rules(flows, topo, host.name)
        assert any(r.port == 22 for r in rules["input"]), f"{host.name}: no admin SSH"
    assert len(addresses) == len(set(addresses)), "an address is used twice"
    relay = matrix.host_rules(flows, topo, "relay1.safenet.example")
    assert any(r.port == 587 and str(spec.segments["safenet"]) in r.networks
               for r in relay["input"]), "participants cannot submit mail"


def test_production_port_groups_follow_the_network_plan(rendered):
    copy, _ = rendered["production"]
    vsphere = yaml.safe_load((copy.path / "group_vars/all/vsphere.yml").read_text())
    segments = vsphere["safemail_vsphere_segments"]
    spec = matrix.read_network(copy.path)
    assert set(segments) == set(spec.segments), "one port group per segment, no other"
    for name, seg in segments.items():
        net = spec.segments[name]
        assert seg["netmask"] == str(net.netmask), name
        if "gateway" in seg:
            assert ipaddress.ip_address(seg["gateway"]) in net, name
    for key in ("portgroup", "vlan"):
        values = [seg[key] for seg in segments.values()]
        assert len(values) == len(set(values)), f"a {key} is used twice"
    assert "gateway" not in segments["mgmt"], "mgmt is not routed"
    for host in copy.hosts():
        assert "gateway" in segments[host.segment], f"{host.name}: no gateway on its segment"


def test_vmware_provisioning_renders_for_every_production_host(rendered):
    """What can be checked of playbooks/vmware-provision.yml without a vCenter: the arguments
    every task would get, per host (nothing runs, no pyvmomi needed)."""
    copy, _ = rendered["production"]
    data = rolevars.run(REPO, copy.path, REPO / "playbooks/vmware-provision.yml",
                        vault_ids=copy.vault_ids, task_args=True)
    assert _problems(data) == []
    vsphere = yaml.safe_load((copy.path / "group_vars/all/vsphere.yml").read_text())
    segments = vsphere["safemail_vsphere_segments"]
    hosts = copy.hosts()
    assert sorted(data["tasks"]) == sorted(h.name for h in hosts)
    for host in hosts:
        tasks = data["tasks"][host.name]
        groups = [v for k, v in tasks.items() if "port group" in k]
        assert len(groups) == 1
        assert {(g["portgroup_name"], g["vlan_id"]) for g in groups[0]} == {
            (seg["portgroup"], seg["vlan"]) for seg in segments.values()}
        (vm,) = [v for k, v in tasks.items() if "Create or update the VM" in k]
        assert vm["name"] == host.name and vm["template"] == vsphere["safemail_vsphere_template"]
        assert {"key": "disk.EnableUUID", "value": "TRUE"} in vm["advanced_settings"]
        data_disk = bool({"relay", "store"} & set(host.groups))
        assert len(vm["disk"]) == (2 if data_disk else 1), host.name
        if data_disk:
            assert vm["disk"][1]["unit_number"] == 1
            assert host.vars.get("encrypted_storage_device", "").startswith("/dev/disk/by-id/")
        nics = [(n["name"], n["ip"]) for n in vm["networks"]]
        assert nics == [(segments["mgmt"]["portgroup"], host.address),
                        (segments[host.segment]["portgroup"], host.vars["safemail_address"])]


def test_no_inventory_uses_the_machines_uplink_range():
    for path in (REPO / "inventories").rglob("*.yml"):
        assert "192.0.2." not in path.read_text(), path


def test_production_vault_is_encrypted_with_its_vault_id():
    vault = REPO / "inventories/production/group_vars/all/vault.yml"
    assert vault.read_text().startswith(f"$ANSIBLE_VAULT;1.2;AES256;{VAULT_ID}\n")
    names = set(_test_vault_plaintext())
    for path in (REPO / "inventories/production").rglob("*.yml"):
        if path != vault:
            clear = set(yaml.safe_load(path.read_text()) or {})
            assert not names & clear, f"{path} holds a secret in clear text"


def _example_password() -> str:
    text = (REPO / "docs/production.md").read_text()
    found = re.search(r"example vault password is `([^`]+)`", text)
    assert found, "docs/production.md publishes the example vault password"
    return found.group(1)


def test_the_example_vault_holds_the_same_variables(tmp_path):
    password = tmp_path / "example-password"
    password.write_text(_example_password() + "\n")
    proc = _run([str(BIN / "ansible-vault"), "view", "--vault-id", f"{VAULT_ID}@{password}",
                 "inventories/production/group_vars/all/vault.yml"], env=_env())
    assert proc.returncode == 0, proc.stderr
    example = yaml.safe_load(proc.stdout)
    wanted = _test_vault_plaintext()
    assert set(example) == set(wanted)
    assert set(example["safemail_participant_passwords"]) == set(
        wanted["safemail_participant_passwords"])


# --- every playbook against production ----------------------------------------------------


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax_against_production(rendered, playbook):
    copy, _ = rendered["production"]
    proc = _run([str(BIN / "ansible-playbook"), "--syntax-check", "-i", str(copy.path),
                 *copy.vault_args, f"playbooks/{playbook}"], env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_reading_production_without_the_vault_password_says_how_to_give_it(tmp_path,
                                                                           monkeypatch):
    from safemail.errors import SafeMailError
    from safemail.inventory import read_inventory

    for name in vault.SOURCE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))
    monkeypatch.setenv("SAFEMAIL_VAULT_PASSWORD_FILE", str(tmp_path / "no-such-file"))
    with pytest.raises(SafeMailError) as info:
        read_inventory(REPO / "inventories" / "production")
    assert "no password file for vault id 'production'" in info.value.message
    assert "SAFEMAIL_VAULT_PASSWORD_FILE" in (info.value.hint or "")


def test_safemail_reads_production_through_the_vault_client(tmp_path, monkeypatch):
    """What `safemail docs`, `patch status` and `promote` do: the client opens the vault."""
    from safemail.inventory import read_inventory

    for name in vault.SOURCE_VARS:
        monkeypatch.delenv(name, raising=False)
    password = tmp_path / "vault-production.pass"
    password.write_text(_example_password() + "\n")
    password.chmod(0o600)
    monkeypatch.setenv("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))
    monkeypatch.setenv("SAFEMAIL_VAULT_PASSWORD_FILE", str(password))
    hosts = read_inventory(REPO / "inventories" / "production")
    assert len(hosts) == 7
    assert {g for h in hosts for g in h.groups} >= set(EXPECTED_ROLES) - {"participants"}


def test_vault_arguments_only_for_an_encrypted_inventory(tmp_path):
    production, test = REPO / "inventories/production", REPO / "inventories/test"
    assert vault.vault_id(production) == "production"
    assert vault.vault_args(REPO, production, env={}) == [
        "--vault-id", f"production@{REPO / 'scripts/vault-pass-client'}"]
    assert vault.vault_args(REPO, test, env={}) == []
    chosen = {"ANSIBLE_VAULT_IDENTITY_LIST": "production@prompt"}
    assert vault.vault_args(REPO, production, env=chosen) == []
    secret = (tmp_path / "inventories/x/group_vars/all")
    secret.mkdir(parents=True)
    (secret / "vault.yml").write_text("$ANSIBLE_VAULT;1.1;AES256\n0011\n")
    assert vault.vault_id(tmp_path / "inventories/x") == "x"


def test_the_patch_run_names_the_vault_client(monkeypatch):
    from safemail.ops import apply

    for name in vault.SOURCE_VARS:
        monkeypatch.delenv(name, raising=False)
    cmd = apply.playbook_command(Project(REPO), "production", ["auth1"], "alice", program="a-p")
    assert cmd[3:5] == ["--vault-id", f"production@{REPO / 'scripts/vault-pass-client'}"]
    assert "--vault-id" not in apply.playbook_command(Project(REPO), "test", ["auth1"], "alice",
                                                      program="a-p")


def test_a_string_where_a_list_belongs_fails_naming_the_option(tmp_path):
    """Ansible's own check turns "a b" into ["a b"] and says nothing; the NTP template would
    then join the characters of one server name. The spec check refuses it."""
    copy = Copy("production", tmp_path)
    servers = re.search(r"common_ntp_servers:\n(?: +- .*\n)+",
                        (copy.path / "group_vars/all/common.yml").read_text())
    assert servers
    copy.edit("group_vars/all/common.yml", servers.group(0),
              'common_ntp_servers: "10.77.4.5 10.77.4.6"\n')
    problems = _problems(copy.render())
    assert any(p.startswith("host auth1.safenet.example, role common, option "
                            "common_ntp_servers: is a string, not a list") for p in problems), \
        problems


def test_an_empty_required_string_fails_naming_the_option(tmp_path):
    copy = Copy("production", tmp_path)
    copy.edit("group_vars/all/common.yml",
              'common_apt_mirror_url: "http://{{ safemail_network_endpoints.mirror.address }}'
              '/debian"', 'common_apt_mirror_url: ""')
    problems = _problems(copy.render())
    assert ("host auth1.safenet.example, role common, option common_apt_mirror_url: required, "
            "but empty" in problems), problems
