"""The flow matrix: every network flow SafeMail allows, in one table (docs/firewall.md).

Where it comes from (the same for the firewall, the verify suite and the network plan):

- ``inventories/<stage>/group_vars/all/network.yml``: the segments (name -> network), named
  endpoints that are not inventory hosts (the admin controller, the package mirror) and the
  site's own flows (admin SSH, packages, time) in ``safemail_site_flows`` (site data);
- ``playbooks/group_vars/all.yml`` (the role wiring, the same for every site):
  ``safemail_flow_roles``, the roles whose exported flows the matrix combines;
- ``roles/<role>/defaults/main.yml``: each role's ``<role>_firewall_flows``, the flows its
  service needs.

A flow is ``{from, to, proto, port, purpose}``. ``from`` and ``to`` name an inventory group,
a segment or an endpoint. The same flow exported by two roles (relay -> auth tcp/389 is
needed by the relay and offered by the directory) is one flow with both purposes.

Everything here is pure: the callers read files or the inventory and pass data in. The
firewall role's filter plugin (roles/firewall/filter_plugins) calls :func:`host_rules`; the
verify suite calls :func:`probes`; ``safemail docs network`` renders :mod:`safemail.network.plan`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from safemail.errors import SafeMailError
from safemail.project import Project

PROTOCOLS = ("tcp", "udp", "vrrp")
# IP protocols without ports (AV-02: VRRP between the relays, IP protocol 112). A flow of one
# gives no port, or port 0; the firewall matches the protocol alone.
PORTLESS = ("vrrp",)
NETWORK_FILE = Path("group_vars") / "all" / "network.yml"
# The role wiring beside the playbooks (relative to the checkout): holds FLOW_ROLES_VAR.
WIRING_FILE = Path("playbooks") / "group_vars" / "all.yml"
# Variables of network.yml.
SEGMENTS_VAR = "safemail_network_segments"
ENDPOINTS_VAR = "safemail_network_endpoints"
SITE_FLOWS_VAR = "safemail_site_flows"
FLOW_ROLES_VAR = "safemail_flow_roles"
# The segment admin SSH comes from: a probe source there reaches hosts on their mgmt address.
MGMT_SEGMENT = "mgmt"


class MatrixError(SafeMailError):
    """The flow matrix is malformed or names something that does not exist."""


@dataclass(frozen=True, order=True)
class Flow:
    """One allowed flow. ``src``/``dst`` name a group, a segment or an endpoint."""

    src: str
    dst: str
    proto: str
    port: int
    purposes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.src, self.dst, self.proto, self.port)

    @property
    def purpose(self) -> str:
        return "; ".join(self.purposes)

    @property
    def service(self) -> str:
        return self.proto if self.proto in PORTLESS else f"{self.proto}/{self.port}"


@dataclass(frozen=True)
class Endpoint:
    """A place in the network that is not an inventory host (controller, package mirror)."""

    name: str
    address: ipaddress.IPv4Network
    segment: str
    description: str = ""


@dataclass(frozen=True)
class NetworkSpec:
    segments: Mapping[str, ipaddress.IPv4Network]
    endpoints: Mapping[str, Endpoint]
    site_flows: tuple[Mapping[str, Any], ...]
    flow_roles: tuple[str, ...]


@dataclass(frozen=True)
class Node:
    """A managed host as the matrix sees it."""

    name: str
    groups: tuple[str, ...]
    segment: str | None
    address: str | None  # on its own segment (safemail_address)
    mgmt_address: str | None = None  # on mgmt (ansible_host)


@dataclass(frozen=True)
class Topology:
    spec: NetworkSpec
    nodes: Mapping[str, Node]

    @property
    def groups(self) -> set[str]:
        return {g for n in self.nodes.values() for g in n.groups}

    def kind(self, ref: str) -> str:
        """group | segment | endpoint, or raise for an unknown name."""
        kinds = []
        if ref in self.groups:
            kinds.append("group")
        if ref in self.spec.segments:
            kinds.append("segment")
        if ref in self.spec.endpoints:
            kinds.append("endpoint")
        if len(kinds) > 1:
            raise MatrixError(f"flow matrix: {ref!r} is both a {' and a '.join(kinds)}",
                              hint="rename the endpoint so every name means one thing")
        if not kinds:
            raise MatrixError(
                f"flow matrix: {ref!r} is no inventory group, segment or endpoint",
                hint=f"known groups: {', '.join(sorted(self.groups))}; segments: "
                     f"{', '.join(self.spec.segments)}; endpoints: "
                     f"{', '.join(self.spec.endpoints) or '(none)'}",
            )
        return kinds[0]

    def members(self, ref: str) -> list[Node]:
        """Managed hosts that `ref` stands for (an endpoint stands for none)."""
        kind = self.kind(ref)
        if kind == "group":
            return [n for n in self.nodes.values() if ref in n.groups]
        if kind == "segment":
            return [n for n in self.nodes.values() if n.segment == ref]
        return []

    def networks(self, ref: str) -> list[str]:
        """Addresses (CIDR text, /32 for hosts) that `ref` stands for, sorted."""
        kind = self.kind(ref)
        if kind == "segment":
            return [str(self.spec.segments[ref])]
        if kind == "endpoint":
            return [str(self.spec.endpoints[ref].address)]
        out = set()
        for node in self.members(ref):
            if not node.address:
                raise MatrixError(f"host {node.name} has no address (safemail_address)",
                                  hint="for the test stage run `safemail lab up` first")
            out.add(str(ipaddress.ip_network(node.address)))
        return sorted(out, key=lambda a: ipaddress.ip_network(a))

    def covers(self, ref: str, who: str) -> bool:
        """Does flow end `ref` include the host or endpoint named `who`?"""
        kind = self.kind(ref)
        if who in self.nodes:
            node = self.nodes[who]
            if kind == "group":
                return ref in node.groups
            if kind == "segment":
                return node.segment == ref
            return False
        if who in self.spec.endpoints:
            ep = self.spec.endpoints[who]
            if kind == "endpoint":
                return ref == who
            if kind == "segment":
                return ep.segment == ref
        return False


# --- reading -----------------------------------------------------------------------------------


def _network(text: Any, where: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(str(text), strict=True)
    except ValueError as exc:
        raise MatrixError(f"{where}: {text!r} is not an IPv4 address or network ({exc})") from exc


def parse_network(data: Mapping[str, Any], where: str = "network.yml") -> NetworkSpec:
    """The network variables (segments, endpoints, site flows, flow roles) from YAML data."""
    raw_segments = data.get(SEGMENTS_VAR) or {}
    if not isinstance(raw_segments, Mapping) or not raw_segments:
        raise MatrixError(f"{where}: {SEGMENTS_VAR} must map segment names to networks")
    segments = {str(k): _network(v, f"{where}: segment {k}") for k, v in raw_segments.items()}
    endpoints = {}
    for name, body in (data.get(ENDPOINTS_VAR) or {}).items():
        if not isinstance(body, Mapping) or "address" not in body or "segment" not in body:
            raise MatrixError(f"{where}: endpoint {name} needs 'address' and 'segment'")
        segment = str(body["segment"])
        if segment not in segments:
            raise MatrixError(f"{where}: endpoint {name} names the unknown segment {segment!r}")
        address = _network(body["address"], f"{where}: endpoint {name}")
        if not address.subnet_of(segments[segment]):
            raise MatrixError(f"{where}: endpoint {name} ({address}) is not inside its "
                              f"segment {segment} ({segments[segment]})")
        endpoints[str(name)] = Endpoint(str(name), address, segment,
                                        str(body.get("description", "")))
    site_flows = data.get(SITE_FLOWS_VAR) or []
    roles = data.get(FLOW_ROLES_VAR) or []
    if not isinstance(site_flows, list) or not isinstance(roles, list):
        raise MatrixError(f"{where}: {SITE_FLOWS_VAR} and {FLOW_ROLES_VAR} must be lists")
    return NetworkSpec(segments, endpoints, tuple(site_flows), tuple(str(r) for r in roles))


def read_network(inventory_dir: Path) -> NetworkSpec:
    path = inventory_dir / NETWORK_FILE
    if not path.is_file():
        raise MatrixError(f"{path} does not exist",
                          hint="every inventory defines its segments and site flows there")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise MatrixError(f"{path} is not valid YAML: {exc}") from exc
    return parse_network(data, str(path))


def read_flow_roles(repo: Path) -> tuple[str, ...]:
    """The roles whose exported flows the matrix combines, from the role wiring."""
    path = repo / WIRING_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise MatrixError(f"cannot read {path}: {exc}",
                          hint=f"the role wiring defines {FLOW_ROLES_VAR} there") from exc
    roles = data.get(FLOW_ROLES_VAR)
    if not isinstance(roles, list) or not roles:
        raise MatrixError(f"{path}: {FLOW_ROLES_VAR} must be a non-empty list of roles")
    return tuple(str(r) for r in roles)


def role_exports(roles_dir: Path, roles: Iterable[str]) -> list[dict[str, Any]]:
    """Every listed role's ``<role>_firewall_flows`` from its defaults, tagged with the role."""
    out: list[dict[str, Any]] = []
    for role in roles:
        path = roles_dir / role / "defaults" / "main.yml"
        if not path.is_file():
            raise MatrixError(f"flow role {role}: {path} does not exist",
                              hint=f"fix {FLOW_ROLES_VAR} in {WIRING_FILE}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        var = f"{role}_firewall_flows"
        if var not in data:
            raise MatrixError(f"role {role} exports no {var} in {path}",
                              hint=f"add it, or drop {role} from {FLOW_ROLES_VAR}")
        for flow in data[var] or []:
            out.append({**flow, "_origin": f"role {role}"})
    return out


def combine(raw: Iterable[Mapping[str, Any]]) -> tuple[Flow, ...]:
    """Check each raw flow and merge duplicates; sorted, so the result is stable."""
    merged: dict[tuple[str, str, str, int], list[str]] = {}
    for item in raw:
        where = item.get("_origin", "flow")
        if not isinstance(item, Mapping):
            raise MatrixError(f"{where}: a flow must be a mapping, not {item!r}")
        proto = str(item.get("proto", "")).lower()
        missing = [k for k in ("from", "to", "proto", "port", "purpose") if k not in item
                   and not (k == "port" and proto in PORTLESS)]
        if missing:
            raise MatrixError(f"{where}: flow {dict(item)} lacks {', '.join(missing)}",
                              hint="a flow is {from, to, proto, port, purpose}")
        if proto not in PROTOCOLS:
            raise MatrixError(f"{where}: flow {item['from']} -> {item['to']}: protocol "
                              f"{item['proto']!r} (use tcp, udp or vrrp)")
        port = item.get("port", 0)
        if proto in PORTLESS:
            if port not in (0, None) or isinstance(port, bool):
                raise MatrixError(f"{where}: flow {item['from']} -> {item['to']}: {proto} has "
                                  f"no ports, not {port!r}", hint="leave port out (or 0)")
            port = 0
        elif isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise MatrixError(f"{where}: flow {item['from']} -> {item['to']}: port {port!r} "
                              "is not a number from 1 to 65535")
        # from == to is a flow between the hosts of one group (AV-02: a directory replica
        # and its provider); :func:`check` refuses it for a segment or an endpoint, and
        # :func:`host_rules` drops a host's own address, so a one-host group gets no rule.
        key = (str(item["from"]), str(item["to"]), proto, port)
        purposes = merged.setdefault(key, [])
        purpose = " ".join(str(item["purpose"]).split())
        if purpose and purpose not in purposes:
            purposes.append(purpose)
    return tuple(sorted(Flow(*key, purposes=tuple(p)) for key, p in merged.items()))


def raw_flows(repo: Path, stage: str) -> tuple[NetworkSpec, list[dict[str, Any]]]:
    inventory = Project(repo).inventory(stage)
    spec = read_network(inventory)
    if spec.flow_roles:
        raise MatrixError(f"inventories/{stage}/{NETWORK_FILE} sets {FLOW_ROLES_VAR}",
                          hint=f"it is role wiring, the same for every site: keep it in "
                               f"{WIRING_FILE} only")
    spec = replace(spec, flow_roles=read_flow_roles(repo))
    raw = [{**f, "_origin": f"inventories/{stage} {SITE_FLOWS_VAR}"} for f in spec.site_flows]
    raw += role_exports(repo / "roles", spec.flow_roles)
    return spec, raw


def load_matrix(repo: Path, stage: str) -> tuple[NetworkSpec, tuple[Flow, ...]]:
    """The stage's network spec and its combined flow matrix."""
    spec, raw = raw_flows(repo, stage)
    return spec, combine(raw)


def topology(spec: NetworkSpec, hosts: Iterable[Any]) -> Topology:
    """From inventory hosts (objects with .name, .groups, .vars: safemail.inventory.Host)."""
    nodes = {}
    for h in hosts:
        hv = getattr(h, "vars", {}) or {}
        nodes[h.name] = Node(h.name, tuple(h.groups), hv.get("safemail_segment"),
                             hv.get("safemail_address"), hv.get("ansible_host"))
    return Topology(spec, nodes)


def check(flows: Sequence[Flow], topo: Topology) -> None:
    """Every flow end names something known, and no host sits outside its segment."""
    for f in flows:
        topo.kind(f.src)
        topo.kind(f.dst)
        if f.src == f.dst and topo.kind(f.src) != "group":
            raise MatrixError(f"flow from {f.src} to itself",
                              hint="only the hosts of one group reach each other this way; "
                                   "traffic inside one host is loopback and needs no flow")
        if topo.kind(f.dst) == "segment" and f.dst == MGMT_SEGMENT:
            raise MatrixError(f"flow {f.src} -> {f.dst}: nothing is offered on the mgmt segment")
    for node in topo.nodes.values():
        if node.segment and node.segment not in topo.spec.segments:
            raise MatrixError(f"host {node.name}: segment {node.segment!r} is not in "
                              f"{SEGMENTS_VAR}")
        if node.segment and node.address:
            net = topo.spec.segments[node.segment]
            if ipaddress.ip_address(node.address) not in net:
                raise MatrixError(f"host {node.name}: {node.address} is not inside its "
                                  f"segment {node.segment} ({net})")


# --- per-host rules (the firewall role) -------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One accept rule: traffic of proto/port from (input) or to (output) these networks."""

    proto: str
    port: int
    networks: tuple[str, ...]
    purposes: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"proto": self.proto, "port": self.port, "networks": list(self.networks),
                "comment": "; ".join(self.purposes)}


def _rules(pairs: Iterable[tuple[Flow, list[str]]]) -> list[Rule]:
    by_service: dict[tuple[str, int], tuple[set[str], list[str]]] = {}
    for flow, nets in pairs:
        if not nets:
            # A flow that admits nobody here (AV-02: auth -> auth with one auth host, whose
            # own address is dropped) must not reach the rule's comment either, or a
            # single-host stage's ruleset changes (its text, so the firewall reloads).
            continue
        entry = by_service.setdefault((flow.proto, flow.port), (set(), []))
        entry[0].update(nets)
        for p in flow.purposes:
            if p not in entry[1]:
                entry[1].append(p)
    return [
        Rule(proto, port, tuple(sorted(nets, key=ipaddress.ip_network)), tuple(purposes))
        for (proto, port), (nets, purposes) in sorted(by_service.items())
        if nets
    ]


def host_rules(flows: Sequence[Flow], topo: Topology, host: str) -> dict[str, list[Rule]]:
    """The accept rules of one host: input from each flow's sources, output to its targets."""
    if host not in topo.nodes:
        raise MatrixError(f"host {host} is not in the inventory")
    inbound, outbound = [], []
    for f in flows:
        if topo.covers(f.dst, host):
            inbound.append((f, [n for n in topo.networks(f.src)]))
        if topo.covers(f.src, host):
            outbound.append((f, [n for n in topo.networks(f.dst)]))
    own = topo.nodes[host].address
    # A host never needs a rule for itself (loopback is always allowed).
    drop_own = {f"{own}/32"} if own else set()
    return {
        "input": _rules((f, [n for n in nets if n not in drop_own]) for f, nets in inbound),
        "output": _rules((f, [n for n in nets if n not in drop_own]) for f, nets in outbound),
    }


def uncovered(rules: Iterable[Mapping[str, Any]], sources: Iterable[str], proto: str,
              port: int) -> list[str]:
    """The `sources` (addresses) that none of the input `rules` (as dicts) accepts."""
    nets = [ipaddress.ip_network(n) for r in rules
            if r["proto"] == proto and int(r["port"]) == port for n in r["networks"]]
    out = []
    for source in sources:
        try:
            want = ipaddress.ip_network(str(source))
        except ValueError as exc:
            raise MatrixError(f"admin source {source!r} is not an address ({exc})") from exc
        if not any(want.version == n.version and want.subnet_of(n) for n in nets):
            out.append(str(source))
    return out


def allowed(flows: Sequence[Flow], topo: Topology, src: str, dst: str, proto: str,
            port: int) -> list[Flow]:
    """The flows that allow `src` to reach `dst` on proto/port (empty: forbidden)."""
    return [f for f in flows if f.proto == proto and f.port == port
            and topo.covers(f.src, src) and topo.covers(f.dst, dst)]


# --- probes (the verify suite) ----------------------------------------------------------------

# Ports every probe set adds to the matrix's own: what an attacker tries first and what a
# forgotten service would listen on.
COMMON_PORTS = (21, 22, 23, 25, 53, 80, 110, 111, 143, 389, 443, 465, 587, 636, 993, 995,
                2049, 3306, 5432, 8080, 10025)


@dataclass(frozen=True)
class Probe:
    src: str
    dst: str
    address: str
    proto: str
    port: int
    expect: bool  # True: must connect; False: must fail
    why: str

    @property
    def label(self) -> str:
        verdict = "allowed" if self.expect else "forbidden"
        return f"{self.src} -> {self.dst} ({self.address}) {self.proto}/{self.port} [{verdict}]"


def probe_ports(flows: Sequence[Flow], extra: Iterable[int] = COMMON_PORTS) -> list[int]:
    return sorted({f.port for f in flows if f.proto == "tcp"} | set(extra))


def target_address(topo: Topology, src: str, dst: str) -> str | None:
    """Where `src` reaches `dst`: the mgmt address from the mgmt segment, else its own."""
    src_segment = (topo.nodes[src].segment if src in topo.nodes
                   else topo.spec.endpoints[src].segment if src in topo.spec.endpoints
                   else None)
    if dst in topo.spec.endpoints:
        return str(topo.spec.endpoints[dst].address.network_address)
    node = topo.nodes[dst]
    if src_segment == MGMT_SEGMENT:
        return node.mgmt_address
    return node.address


def probes(flows: Sequence[Flow], topo: Topology, src: str, targets: Iterable[str],
           ports: Iterable[int]) -> list[Probe]:
    """TCP probes from `src` to every target on every port, each with its expected outcome."""
    out = []
    for dst in targets:
        if dst == src:
            continue
        address = target_address(topo, src, dst)
        if not address:
            continue
        for port in ports:
            hits = allowed(flows, topo, src, dst, "tcp", port)
            why = "; ".join(f"{f.src} -> {f.dst}: {f.purpose}" for f in hits) or "not in matrix"
            out.append(Probe(src, dst, address, "tcp", port, bool(hits), why))
    return out
