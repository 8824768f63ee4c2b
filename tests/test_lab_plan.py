"""The lab address plan and generated inventory (no lab needed)."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path

import pytest
import yaml

from safemail.errors import SafeMailError
from safemail.lab import plan as P

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def inventory() -> dict:
    return yaml.safe_load((ROOT / "inventories/test/hosts.yml").read_text())


def test_every_design_group_has_a_host(inventory):
    specs = P.hosts_from_inventory(inventory)
    groups = {g for s in specs for g in s.groups}
    for g in (*P.SERVICE_GROUPS, *P.LAB_GROUPS):
        assert g in groups


def test_relay_and_store_are_vms_the_rest_nspawn(inventory):
    specs = {s.name: s for s in P.hosts_from_inventory(inventory)}
    assert specs["relay1"].hypervisor == "qemu"
    assert specs["store1"].hypervisor == "qemu"
    assert {n for n, s in specs.items() if s.hypervisor == "qemu"} == {"relay1", "store1"}


def test_all_vms_makes_every_service_host_a_vm_but_not_participants(inventory):
    specs = P.hosts_from_inventory(inventory, all_vms=True)
    for s in specs:
        assert s.hypervisor == ("qemu" if s.is_service else "nspawn"), s


def test_plan_has_no_overlaps_and_stays_in_lab_ranges(inventory):
    plan = P.make_plan(P.hosts_from_inventory(inventory))
    addrs = P.all_addresses(plan)
    assert len({a for _, a in addrs}) == len(addrs)
    for who, a in addrs:
        assert any(a in n for n in P.LAB_RANGES), who
        assert a not in ipaddress.ip_network("192.0.2.0/24"), who


def test_segments_do_not_overlap_each_other_or_the_uplink():
    nets = list(P.SEGMENTS.values())
    for i, a in enumerate(nets):
        assert not a.overlaps(ipaddress.ip_network("192.0.2.0/24"))
        for b in nets[i + 1:]:
            assert not a.overlaps(b)


def test_each_host_sits_on_its_segment_with_the_router_as_gateway(inventory):
    plan = P.make_plan(P.hosts_from_inventory(inventory))
    for h in plan.hosts:
        assert h.mgmt.address in P.SEGMENTS["mgmt"]
        assert h.data.address in P.SEGMENTS[h.spec.segment]
        assert h.gateway == plan.router_address(h.spec.segment)
    assert plan.host("relay1").data.segment == "front"
    assert plan.host("practice1").data.segment == "safenet"


def test_plan_is_stable_and_macs_unique(inventory):
    a = P.make_plan(P.hosts_from_inventory(inventory))
    b = P.make_plan(P.hosts_from_inventory(copy.deepcopy(inventory)))
    assert a == b
    macs = [i.mac for h in a.hosts for i in (h.mgmt, h.data)]
    assert len(set(macs)) == len(macs)
    assert all(m.startswith("52:54:") for m in macs)


def test_missing_group_is_refused_with_its_name(inventory):
    del inventory["all"]["children"]["service"]["children"]["ca_signer"]
    with pytest.raises(SafeMailError, match="ca_signer"):
        P.hosts_from_inventory(inventory)


def test_bad_segment_and_hypervisor_are_refused(inventory):
    relay = inventory["all"]["children"]["service"]["children"]["relay"]["hosts"]["relay1"]
    relay["safemail_segment"] = "dmz"
    with pytest.raises(SafeMailError, match="safemail_segment"):
        P.hosts_from_inventory(inventory)
    relay["safemail_segment"] = "front"
    relay["lab_hypervisor"] = "vmware"
    with pytest.raises(SafeMailError, match="lab_hypervisor"):
        P.hosts_from_inventory(inventory)


def test_check_plan_refuses_uplink_and_duplicates(inventory):
    plan = P.make_plan(P.hosts_from_inventory(inventory))
    h = plan.hosts[0]
    bad_if = P.Interface("eth0", "front", ipaddress.IPv4Address("192.0.2.7"), h.data.mac)
    bad = P.LabPlan(hosts=(P.HostPlan(h.spec, h.mgmt, bad_if, h.gateway), *plan.hosts[1:]),
                    mirror=plan.mirror, internet_sink=plan.internet_sink)
    with pytest.raises(SafeMailError, match="uplink"):
        P.check_plan(bad)
    dup = P.LabPlan(hosts=plan.hosts, mirror=plan.hosts[0].data.address,
                    internet_sink=plan.internet_sink)
    with pytest.raises(SafeMailError, match="share"):
        P.check_plan(dup)


def test_generated_inventory_names_every_host_with_mgmt_address(inventory):
    plan = P.make_plan(P.hosts_from_inventory(inventory))
    gen = P.generated_inventory(plan, "/k", "/kh", "ssh-ed25519 AAAA lab")
    hosts = gen["all"]["hosts"]
    assert set(hosts) == {h.name for h in plan.hosts}
    for h in plan.hosts:
        assert hosts[h.name]["ansible_host"] == str(h.mgmt.address)
        assert hosts[h.name]["lab_machine"] == h.spec.hypervisor
    assert "StrictHostKeyChecking=yes" in gen["all"]["vars"]["ansible_ssh_common_args"]


def test_no_lab_code_or_inventory_uses_the_uplink_range():
    for p in [*ROOT.glob("src/**/*.py"), *ROOT.glob("inventories/**/*.yml"),
              *ROOT.glob("roles/**/*.j2")]:
        assert "192.0.2." not in p.read_text().replace('"192.0.2.0/24"', ""), p


def test_route_conflicts_names_what_the_lab_would_cut():
    used = {"deb.debian.org": "203.0.113.80", "pypi.org": "203.0.113.5",
            "nameserver": "10.255.255.53", "weird": "198.19.1.1", "bad": "not-an-ip"}
    found = P.route_conflicts(used)
    assert len(found) == 2
    assert any("pypi.org" in f for f in found)
    assert any("weird" in f for f in found)


def test_lab_ranges_leave_the_machines_package_proxy_reachable():
    # On our machines the registries' proxy answers at 203.0.113.80 (see plan.LAB_RANGES).
    assert P.route_conflicts({"proxy": "203.0.113.80"}) == []


def test_vm_boot_settings_mask_the_lab_only_units(tmp_path):
    from safemail.lab import machines

    machines.write_vm_boot_settings(tmp_path)
    machines.write_vm_boot_settings(tmp_path)  # a second lab up over the same tree
    system = tmp_path / "etc/systemd/system"
    for unit in machines.VM_MASKED_UNITS:
        assert (system / unit).is_symlink()
        assert str((system / unit).readlink()) == "/dev/null"


# --- AV-02: `lab up --redundant` ----------------------------------------------------------------


def test_default_plan_has_no_second_relay_or_directory(inventory):
    """`lab up` without --redundant: the same hosts and addresses as the committed inventory
    (CI's stage and time unchanged)."""
    specs = P.hosts_from_inventory(inventory)
    assert not any(s.added for s in specs)
    assert [s.name for s in specs if "relay" in s.groups] == ["relay1"]
    assert [s.name for s in specs if "auth" in s.groups] == ["auth1"]


def test_redundant_adds_relay2_and_auth2_like_the_first(inventory):
    specs = P.redundant_hosts(P.hosts_from_inventory(inventory))
    by_name = {s.name: s for s in specs}
    assert {n for n, s in by_name.items() if s.added} == {"relay2", "auth2"}
    for new, old in (("relay2", "relay1"), ("auth2", "auth1")):
        assert (by_name[new].groups, by_name[new].segment, by_name[new].hypervisor) == (
            by_name[old].groups, by_name[old].segment, by_name[old].hypervisor)
    assert by_name["relay2"].hypervisor == "qemu"  # LUKS for the queue, as relay1
    plan = P.make_plan(specs)
    P.check_plan(plan)
    assert plan.host("relay2").data.segment == "front"
    assert plan.host("auth2").data.segment == "back"
    # --redundant with --all-vms: both stay copies of their group's host
    vms = {s.name: s for s in P.redundant_hosts(P.hosts_from_inventory(inventory, all_vms=True))}
    assert vms["auth2"].hypervisor == "qemu"


def test_redundant_leaves_a_group_with_two_hosts_alone_and_refuses_odd_names(inventory):
    specs = P.redundant_hosts(P.hosts_from_inventory(inventory))
    assert P.redundant_hosts(specs) == specs  # twice: nothing more is added
    odd = copy.deepcopy(inventory)
    relay = odd["all"]["children"]["service"]["children"]["relay"]["hosts"]
    relay["relay-main"] = relay.pop("relay1")
    with pytest.raises(SafeMailError, match="must end in a number"):
        P.redundant_hosts(P.hosts_from_inventory(odd))
    clash = copy.deepcopy(inventory)
    clash["all"]["children"]["participants"]["hosts"]["relay2"] = {
        "safemail_segment": "safenet"}
    with pytest.raises(SafeMailError, match="has a host relay2 already"):
        P.redundant_hosts(P.hosts_from_inventory(clash))


def test_generated_inventory_puts_the_added_hosts_in_their_groups(inventory, tmp_path):
    """What Ansible itself makes of hosts.yml plus the generated part: relay2 and auth2 in
    relay/auth and, through hosts.yml's nesting, in service; auth2 a replica of auth1."""
    import json
    import os
    import subprocess
    import sys

    plan = P.make_plan(P.redundant_hosts(P.hosts_from_inventory(inventory)))
    inv = tmp_path / "test"
    inv.mkdir()
    (inv / "hosts.yml").write_text((ROOT / "inventories/test/hosts.yml").read_text())
    (inv / "zz_lab_generated.yml").write_text(
        yaml.safe_dump(P.generated_inventory(plan, "/k", "/kh", "ssh-ed25519 AAAA lab")))
    out = subprocess.run([str(Path(sys.executable).parent / "ansible-inventory"), "-i",
                          str(inv), "--list"], capture_output=True, text=True, check=True,
                         env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
                         cwd=ROOT)
    data = json.loads(out.stdout)
    assert sorted(data["relay"]["hosts"]) == ["relay1", "relay2"]
    assert sorted(data["auth"]["hosts"]) == ["auth1", "auth2"]
    hv = data["_meta"]["hostvars"]
    assert hv["relay2"]["lab_hypervisor"] == "qemu"
    assert hv["relay2"]["ansible_host"] == str(plan.host("relay2").mgmt.address)
    assert hv["auth2"]["safemail_segment"] == "back"
    default = P.generated_inventory(P.make_plan(P.hosts_from_inventory(inventory)), "/k",
                                    "/kh", "ssh-ed25519 AAAA lab")
    assert "children" not in default["all"]


def test_stage_plan_follows_the_running_lab(inventory, tmp_path):
    """`lab ssh relay2`, `lab status`: the plan of a lab started with --redundant."""
    import json

    from safemail.lab.config import LabPaths
    from safemail.lab.stage import Stage

    stage = Stage(LabPaths(state=tmp_path / "state", images=tmp_path / "img"), ROOT)
    assert "relay2" not in {h.name for h in stage.plan().hosts}
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text(json.dumps({"redundant": True}))
    assert stage.plan().host("relay2").spec.added
    assert "auth2" not in {h.name for h in stage.plan(redundant=False).hosts}
