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
