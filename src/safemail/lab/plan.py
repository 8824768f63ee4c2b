"""The lab's address plan: pure functions from the committed test inventory to addresses.

The committed inventory (inventories/test/hosts.yml) says which hosts exist, their groups,
their segment (``safemail_segment``) and how the lab runs them (``lab_hypervisor``). This
module turns that into interface addresses, MAC addresses and the generated inventory part
that ``safemail lab up`` writes. Nothing here touches the system.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safemail.errors import SafeMailError

# The machine's own uplink: the lab must never use it.
# (TEST-NET-1, RFC 5737; written as a number so no lab file names its dotted form.)
FORBIDDEN_NETWORKS = (ipaddress.ip_network((0xC0000200, 24)),)
# Everything the lab addresses lies inside these; the machine's own namespace holds
# `unreachable` routes for them so a down or mistyped lab address fails locally.
# The internet segment is only the first /28 of 203.0.113.0/24: on our machines the package
# registries' proxy answers at 203.0.113.80, and a route for the whole /24 would cut the
# machine off from its packages while the lab is up (`lab up` checks this, see
# `route_conflicts`).
LAB_RANGES = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("203.0.113.0/28"))

# Segment -> network. `mgmt` is admin SSH only and is not routed; every other segment is
# routed by the lab `router` (its address is .1 on each routed segment).
SEGMENTS: dict[str, ipaddress.IPv4Network] = {
    "mgmt": ipaddress.IPv4Network("198.18.0.0/24"),
    "safenet": ipaddress.IPv4Network("198.18.1.0/24"),
    "front": ipaddress.IPv4Network("198.18.2.0/24"),
    "back": ipaddress.IPv4Network("198.18.3.0/24"),
    "core": ipaddress.IPv4Network("198.18.4.0/24"),
    "internet": ipaddress.IPv4Network("203.0.113.0/28"),
}
ROUTED_SEGMENTS = ("safenet", "front", "back", "core", "internet")
HOST_SEGMENTS = ("safenet", "front", "back", "core")
CONTROLLER_MGMT = ipaddress.IPv4Address("198.18.0.1")
ROUTER_HOST_OCTET = 1
FIRST_HOST_OCTET = 10

# Lab infrastructure that is not managed by Ansible: (name, segment, last octet).
MIRROR = ("mirror", "core", 5)
INTERNET_SINK = ("internet", "internet", 10)

# Groups every stage must have (docs/architecture.md#hosts-roles-and-the-network).
SERVICE_GROUPS = ("relay", "store", "auth", "ca_ra", "ca_signer", "ca_dist", "backup")
LAB_GROUPS = ("participants",)
HYPERVISORS = ("nspawn", "qemu")
# AV-02: `lab up --redundant` gives these groups a second host (docs/availability.md).
REDUNDANT_GROUPS = ("relay", "auth")


@dataclass(frozen=True)
class HostSpec:
    """One Ansible-managed lab host, as the committed inventory describes it."""

    name: str
    groups: tuple[str, ...]
    segment: str
    hypervisor: str
    # Added by `lab up --redundant` (not in the committed inventory): the generated
    # inventory must also put it in its group.
    added: bool = False

    @property
    def is_service(self) -> bool:
        return any(g in SERVICE_GROUPS for g in self.groups)


@dataclass(frozen=True)
class Interface:
    name: str  # name inside the machine: mgmt0 or eth0
    segment: str
    address: ipaddress.IPv4Address
    mac: str

    @property
    def cidr(self) -> str:
        return f"{self.address}/{SEGMENTS[self.segment].prefixlen}"


@dataclass(frozen=True)
class HostPlan:
    spec: HostSpec
    mgmt: Interface
    data: Interface
    gateway: ipaddress.IPv4Address

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class LabPlan:
    hosts: tuple[HostPlan, ...]
    mirror: ipaddress.IPv4Address
    internet_sink: ipaddress.IPv4Address
    extra: Mapping[str, Any] = field(default_factory=dict)

    def host(self, name: str) -> HostPlan:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts)
        raise SafeMailError(f"no lab host named {name!r}", hint=f"known hosts: {known}")

    def router_address(self, segment: str) -> ipaddress.IPv4Address:
        return SEGMENTS[segment].network_address + ROUTER_HOST_OCTET


def _walk_groups(
    name: str, node: Mapping[str, Any] | None, parents: tuple[str, ...], out: dict[str, dict]
) -> None:
    node = node or {}
    chain = (*parents, name) if name != "all" else parents
    for hostname, hostvars in (node.get("hosts") or {}).items():
        entry = out.setdefault(hostname, {"groups": [], "vars": {}})
        for g in chain:
            if g not in entry["groups"]:
                entry["groups"].append(g)
        entry["vars"].update(hostvars or {})
    for child, child_node in (node.get("children") or {}).items():
        _walk_groups(child, child_node, chain, out)


def hosts_from_inventory(inventory: Mapping[str, Any], all_vms: bool = False) -> list[HostSpec]:
    """Read the committed YAML inventory (the ``all:`` tree) into host specs.

    ``all_vms`` runs every service host as a QEMU VM (participants stay nspawn machines).
    """
    if "all" not in inventory:
        raise SafeMailError("the test inventory has no top-level 'all' group",
                            hint="check inventories/test/hosts.yml")
    found: dict[str, dict] = {}
    _walk_groups("all", inventory["all"], (), found)
    specs = []
    for name, entry in found.items():
        hv = entry["vars"]
        segment = hv.get("safemail_segment")
        hypervisor = hv.get("lab_hypervisor", "nspawn")
        if segment not in HOST_SEGMENTS:
            raise SafeMailError(
                f"host {name}: safemail_segment is {segment!r}",
                hint=f"set it to one of {', '.join(HOST_SEGMENTS)} in inventories/test/hosts.yml",
            )
        if hypervisor not in HYPERVISORS:
            raise SafeMailError(f"host {name}: lab_hypervisor is {hypervisor!r}",
                                hint=f"use one of {', '.join(HYPERVISORS)}")
        spec = HostSpec(name, tuple(entry["groups"]), segment, hypervisor)
        if all_vms and spec.is_service:
            spec = HostSpec(name, spec.groups, segment, "qemu")
        specs.append(spec)
    missing = [g for g in (*SERVICE_GROUPS, *LAB_GROUPS)
               if not any(g in s.groups for s in specs)]
    if missing:
        raise SafeMailError(f"the test inventory lacks the group(s) {', '.join(missing)}",
                            hint="every group of docs/architecture.md (\"Hosts, roles and the "
                                 "network\") needs at least one host")
    return sorted(specs, key=lambda s: s.name)


def redundant_hosts(specs: Iterable[HostSpec]) -> list[HostSpec]:
    """AV-02: the specs plus a second host for each of REDUNDANT_GROUPS that has only one.

    The new host copies the group's host (groups, segment, hypervisor: relay1 is a QEMU VM
    for LUKS, so relay2 is one too) and takes its name with the next number (relay1 ->
    relay2). A group that already has two hosts in the committed inventory is left alone.
    """
    specs = list(specs)
    names = {s.name for s in specs}
    added = []
    for group in REDUNDANT_GROUPS:
        members = sorted((s for s in specs if group in s.groups), key=lambda s: s.name)
        if len(members) != 1:
            continue
        first = members[0]
        match = re.fullmatch(r"(.*?)(\d+)", first.name)
        if match is None:
            raise SafeMailError(f"host {first.name}: --redundant names the second {group} host "
                                "after the first, which must end in a number (e.g. relay1)",
                                hint="rename it in inventories/test/hosts.yml")
        name = f"{match.group(1)}{int(match.group(2)) + 1}"
        if name in names:
            raise SafeMailError(f"--redundant would add {name} to {group}, but the inventory "
                                f"has a host {name} already")
        added.append(HostSpec(name, first.groups, first.segment, first.hypervisor, added=True))
        names.add(name)
    return sorted([*specs, *added], key=lambda s: s.name)


def mac_for(host: str, segment: str) -> str:
    """A stable, locally administered unicast MAC for a host interface."""
    digest = hashlib.sha256(f"{host}/{segment}".encode()).digest()
    return "52:54:" + ":".join(f"{b:02x}" for b in digest[:4])


def route_conflicts(used: dict[str, str]) -> list[str]:
    """Which of the machine's own destinations (name -> address) the lab's routes would cut."""
    out = []
    for name, addr in sorted(used.items()):
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            continue
        for net in LAB_RANGES:
            if ip in net:
                out.append(f"{name} ({addr}) lies in the lab range {net}")
    return out


def make_plan(specs: Iterable[HostSpec]) -> LabPlan:
    """Give each host a mgmt address and an address on its own segment.

    Addresses are assigned in name order, so they are stable for a given inventory.
    """
    specs = sorted(specs, key=lambda s: s.name)
    per_segment: dict[str, int] = {}
    plans = []
    for index, spec in enumerate(specs):
        seg_index = per_segment.get(spec.segment, 0)
        per_segment[spec.segment] = seg_index + 1
        mgmt_addr = SEGMENTS["mgmt"].network_address + FIRST_HOST_OCTET + index
        data_addr = SEGMENTS[spec.segment].network_address + FIRST_HOST_OCTET + seg_index
        for addr, seg in ((mgmt_addr, "mgmt"), (data_addr, spec.segment)):
            if addr not in SEGMENTS[seg] or addr == SEGMENTS[seg].broadcast_address:
                raise SafeMailError(f"segment {seg} has no room for host {spec.name}")
        plans.append(HostPlan(
            spec=spec,
            mgmt=Interface("mgmt0", "mgmt", mgmt_addr, mac_for(spec.name, "mgmt")),
            data=Interface("eth0", spec.segment, data_addr, mac_for(spec.name, spec.segment)),
            gateway=SEGMENTS[spec.segment].network_address + ROUTER_HOST_OCTET,
        ))
    plan = LabPlan(
        hosts=tuple(plans),
        mirror=SEGMENTS[MIRROR[1]].network_address + MIRROR[2],
        internet_sink=SEGMENTS[INTERNET_SINK[1]].network_address + INTERNET_SINK[2],
    )
    check_plan(plan)
    return plan


def all_addresses(plan: LabPlan) -> list[tuple[str, ipaddress.IPv4Address]]:
    """Every address the lab assigns, labelled with who holds it."""
    out: list[tuple[str, ipaddress.IPv4Address]] = [("controller/mgmt", CONTROLLER_MGMT)]
    for seg in ROUTED_SEGMENTS:
        out.append((f"router/{seg}", plan.router_address(seg)))
    out.append(("mirror", plan.mirror))
    out.append(("internet", plan.internet_sink))
    for h in plan.hosts:
        out.append((f"{h.name}/mgmt", h.mgmt.address))
        out.append((f"{h.name}/{h.data.segment}", h.data.address))
    return out


def check_plan(plan: LabPlan) -> None:
    """Refuse a plan with duplicate addresses or an address outside the lab's ranges."""
    seen: dict[ipaddress.IPv4Address, str] = {}
    for who, addr in all_addresses(plan):
        if any(addr in net for net in FORBIDDEN_NETWORKS):
            raise SafeMailError(f"{who} would get {addr}, inside the machine's own uplink range")
        if not any(addr in net for net in LAB_RANGES):
            raise SafeMailError(f"{who} would get {addr}, outside the lab ranges")
        if addr in seen:
            raise SafeMailError(f"{who} and {seen[addr]} would share {addr}")
        seen[addr] = who
    macs = [i.mac for h in plan.hosts for i in (h.mgmt, h.data)]
    if len(set(macs)) != len(macs):
        raise SafeMailError("two lab interfaces would share a MAC address")


def generated_inventory(plan: LabPlan, key_file: str, known_hosts: str,
                        public_key: str) -> dict[str, Any]:
    """The part of inventories/test that `lab up` writes (addresses, hypervisor, ssh)."""
    hosts = {}
    children: dict[str, Any] = {}
    for h in plan.hosts:
        hosts[h.name] = {
            "ansible_host": str(h.mgmt.address),
            "safemail_address": str(h.data.address),
            "lab_machine": h.spec.hypervisor,
        }
        if h.spec.added:
            # A --redundant host: in its group (which hosts.yml nests under `service`), with
            # what hosts.yml says of the group's first host.
            group = next(g for g in REDUNDANT_GROUPS if g in h.spec.groups)
            children.setdefault(group, {"hosts": {}})["hosts"][h.name] = {
                "safemail_segment": h.spec.segment, "lab_hypervisor": h.spec.hypervisor}
    extra = {"children": children} if children else {}
    return {
        "all": {
            **extra,
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": key_file,
                "ansible_ssh_common_args": (
                    f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes "
                    "-o IdentitiesOnly=yes -o ConnectTimeout=10 "
                    # A host that stops answering (rebooted VM, dropped state) ends the
                    # session within a minute instead of hanging a run forever.
                    "-o ServerAliveInterval=15 -o ServerAliveCountMax=4"
                ),
                "lab_ssh_public_key": public_key,
                "lab_mirror_address": str(plan.mirror),
                "lab_internet_sink_address": str(plan.internet_sink),
                "lab_controller_address": str(CONTROLLER_MGMT),
            },
            "hosts": hosts,
        }
    }
