"""NET-01, NET-02, SYS-01: the packet filters allow exactly the flow matrix, nothing leaves
SafeNet, and front systems expose only their service ports.

Every probe is a real TCP connection attempt, derived from the flow matrix
(safemail.network.matrix: inventories/<stage>/group_vars/all/network.yml, the flow roles of
playbooks/group_vars/all.yml and their exported flows), the same data the firewall role
renders the rulesets from. Outcomes:

- ``open``: the connection was made;
- ``refused``: a RST came back - the packet filters let the SYN through and nothing listens;
- ``filtered``: no answer (the destination dropped it) or EPERM (the source's output chain
  dropped it).

An allowed flow must be ``open``; a forbidden one must be ``filtered``. ``refused`` on a
forbidden flow is a failure too: nothing listening there is luck, not a firewall.

Sources (NET-01): every service host, every lab participant (not firewalled: the
destinations' input chains decide) and the controller on mgmt (reaches hosts on their mgmt
address). Destinations: every service host; from a service host also the participants, the
controller and the mirror (its output chain decides). Ports: every TCP port of the matrix
plus a set of common ones (matrix.COMMON_PORTS). Every source has at least one allowed probe
that must connect - the "must succeed" twin of its "must fail" probes, so a dead source or
a broken probe cannot pass. UDP flows of the matrix (NTP to the mirror) are proven by a real
NTP exchange in NET-02's twin test.

NET-02 probes the lab's internet sink (reachable by route: practice1, which has no firewall,
reaches it - the control probe) from every service host, and every service host from the
sink's own namespace.

How the tests were shown to fail: docs/network.md ("Fault checks").
"""

from __future__ import annotations

import functools
import ipaddress
import json
import random
import re
import shlex
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra

from safemail.inventory import InventoryError, read_inventory
from safemail.lab.config import PREFIX, LabPaths
from safemail.network import matrix
from safemail.project import project_root

SERVICE_GROUP = "service"
PARTICIPANT_GROUP = "participants"
CONTROLLER = "controller"
INTERNET = "internet"
FRONT_SEGMENT = "front"
SAFENET_SEGMENT = "safenet"
CLOSED_SEGMENTS = ("back", "core")  # unreachable from safenet (SYS-01)
FUNCTION_GROUPS = ("relay", "store", "auth", "ca_ra", "ca_signer", "ca_dist")
SINK_TCP_PORTS = (25, 80, 443, 40000)
CONNECT_TIMEOUT = 3.0

# Runs on the probing host (python3 of the host, standard library only): argv[1] is a JSON
# list of [address, port]; prints a JSON list of [address, port, outcome, detail].
PROBE_PROGRAM = r"""
import concurrent.futures as cf, errno, json, socket, sys
todo = json.loads(sys.argv[1]); timeout = float(sys.argv[2])
def one(t):
    addr, port = t
    s = socket.socket(); s.settimeout(timeout)
    try:
        s.connect((addr, port)); return [addr, port, "open", ""]
    except socket.timeout:
        return [addr, port, "filtered", "timeout"]
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        return [addr, port, "refused" if e.errno == errno.ECONNREFUSED else "filtered", name]
    finally:
        s.close()
with cf.ThreadPoolExecutor(64) as ex:
    print(json.dumps(list(ex.map(one, todo))))
"""

# One UDP datagram; prints "sent", or "blocked <errno>" when the output chain refuses it
# (EPERM), and the first reply if any arrives within the timeout.
UDP_PROGRAM = r"""
import binascii, json, socket, sys
addr, port, payload, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
try:
    s.sendto(binascii.unhexlify(payload), (addr, port))
except OSError as e:
    print(json.dumps({"sent": False, "error": e.errno, "reply": None})); sys.exit(0)
try:
    data, _ = s.recvfrom(2048); reply = len(data)
except OSError:
    reply = None
print(json.dumps({"sent": True, "error": 0, "reply": reply}))
"""

# A DNS query for "example.com" A (id 0x5afe), and an NTP v4 client request.
DNS_QUERY = ("5afe01000001000000000000076578616d706c6503636f6d0000010001")
NTP_REQUEST = (struct.pack("!B", 0x23) + bytes(47)).hex()


# --- the matrix and the inventory -------------------------------------------------------------


def _inventory_option(config) -> str:
    return config.getoption("ansible_inventory") or "inventories/test"


@functools.lru_cache(maxsize=4)
def _context(inventory: str):
    root = project_root()
    inv = Path(inventory)
    inv = inv if inv.is_absolute() else root / inv
    hosts = read_inventory(inv)
    spec, flows = matrix.load_matrix(root, inv.name)
    topo = matrix.topology(spec, hosts)
    matrix.check(flows, topo)
    hostvars = {h.name: h.vars for h in hosts}
    return topo, flows, hostvars


def _names(topo: matrix.Topology, group: str) -> list[str]:
    return sorted(n for n, node in topo.nodes.items() if group in node.groups)


def _sources(config) -> list[str]:
    try:
        topo, _, _ = _context(_inventory_option(config))
    except (InventoryError, matrix.MatrixError) as exc:
        return [f"<inventory or flow matrix unreadable: {exc}>"]
    return [*_names(topo, SERVICE_GROUP), *_names(topo, PARTICIPANT_GROUP), CONTROLLER]


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "net_source" in metafunc.fixturenames:
        metafunc.parametrize("net_source", _sources(config))
    for name, group in (("svc_name", SERVICE_GROUP), ("participant", PARTICIPANT_GROUP)):
        if name in metafunc.fixturenames:
            try:
                topo, _, _ = _context(_inventory_option(config))
                values = _names(topo, group)
            except (InventoryError, matrix.MatrixError) as exc:
                values = [f"<inventory unreadable: {exc}>"]
            metafunc.parametrize(name, values)
    if "front_host" in metafunc.fixturenames:
        topo, _, _ = _context(_inventory_option(config))
        metafunc.parametrize("front_host", sorted(
            n for n in _names(topo, SERVICE_GROUP) if topo.nodes[n].segment == FRONT_SEGMENT))


@pytest.fixture(scope="module")
def net(request):
    return _context(_inventory_option(request.config))


@functools.lru_cache(maxsize=32)
def _host(name: str, inventory: str):
    return testinfra.get_host(f"ansible://{name}", ansible_inventory=inventory)


def _sink_address(hostvars) -> str:
    for hv in hostvars.values():
        if hv.get("lab_internet_sink_address"):
            return str(hv["lab_internet_sink_address"])
    pytest.fail("the inventory has no lab_internet_sink_address: is the lab up "
                "(inventories/test/zz_lab_generated.yml)?")


# --- running probes ---------------------------------------------------------------------------


def _run_program(source: str, inventory: str, program: str, *args: str,
                 timeout: float = 600) -> str:
    """Run a Python program on a lab host, on the controller, or in the sink's namespace."""
    if source == CONTROLLER:
        cmd = [sys.executable, "-c", program, *args]
    elif source == INTERNET:
        cmd = ["ip", "netns", "exec", f"{PREFIX}-internet", sys.executable, "-c", program, *args]
    else:
        host = _host(source, inventory)
        res = host.run("python3 -c " + " ".join(shlex.quote(a) for a in (program, *args)))
        assert res.rc == 0, f"probe program failed on {source}: {res.stderr[-500:]}"
        return res.stdout
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"probe program failed from {source}: {proc.stderr[-500:]}"
    return proc.stdout


def run_probes(source: str, inventory: str, targets: list[tuple[str, int]]) -> dict:
    """{(address, port): (outcome, detail)} for TCP connection attempts from `source`."""
    if not targets:
        return {}
    out = _run_program(source, inventory, PROBE_PROGRAM,
                       json.dumps(sorted(set(targets))), str(CONNECT_TIMEOUT))
    return {(a, int(p)): (o, d) for a, p, o, d in json.loads(out)}


def udp_exchange(source: str, inventory: str, address: str, port: int, payload: str) -> dict:
    return json.loads(_run_program(source, inventory, UDP_PROGRAM, address, str(port), payload,
                                   str(CONNECT_TIMEOUT)))


def mismatches(probes: list[matrix.Probe], results: dict) -> list[str]:
    bad = []
    for p in probes:
        outcome, detail = results[(p.address, p.port)]
        if p.expect and outcome != "open":
            bad.append(f"{p.label}: {outcome} ({detail}), but the matrix allows it: {p.why}")
        if not p.expect and outcome != "filtered":
            what = "connected" if outcome == "open" else "refused by the host, not filtered"
            bad.append(f"{p.label}: {what}, but the matrix has no such flow")
    return bad


def _summary(probes: list[matrix.Probe], results: dict) -> str:
    counts: dict[str, int] = {}
    for p in probes:
        key = f"{'allowed' if p.expect else 'forbidden'}:{results[(p.address, p.port)][0]}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))


def _net01_targets(topo: matrix.Topology, source: str) -> list[str]:
    service = _names(topo, SERVICE_GROUP)
    if source in service:
        # Its own output chain decides: participants, the controller and the mirror too.
        return [*service, *_names(topo, PARTICIPANT_GROUP), *topo.spec.endpoints]
    return service


# --- NET-01 -----------------------------------------------------------------------------------


@pytest.mark.req("NET-01")
@pytest.mark.lab_participants
def test_connections_succeed_exactly_where_the_matrix_allows(net, net_source, request,
                                                            evidence):
    topo, flows, _ = net
    inventory = _inventory_option(request.config)
    ports = matrix.probe_ports(flows)
    probes = matrix.probes(flows, topo, net_source, _net01_targets(topo, net_source), ports)
    twins = [p for p in probes if p.expect]
    assert twins, (f"{net_source} has no allowed flow to probe: its 'must fail' probes would "
                   "pass on a dead host")
    results = run_probes(net_source, inventory, [(p.address, p.port) for p in probes])
    bad = mismatches(probes, results)
    evidence(f"{net_source}: {len(probes)} probes over {len(ports)} ports "
             f"({_summary(probes, results)}); mismatches: {len(bad)}")
    for line in bad[:40]:
        evidence(line)
    assert not bad, f"{len(bad)} probe(s) from {net_source} disagree with the flow matrix:\n" \
        + "\n".join(bad)


def _chains(listing: str) -> dict[str, str]:
    """The body of each chain of an `nft list table` listing."""
    out, name = {}, None
    for line in listing.splitlines():
        m = re.match(r"\s*chain (\S+) \{", line)
        if m:
            name = m.group(1)
            out[name] = ""
        elif name:
            out[name] += line + "\n"
    return out


@pytest.mark.req("NET-01")
@pytest.mark.read_only
def test_loaded_ruleset_drops_by_default_and_opens_only_matrix_ports(net, svc_name, request,
                                                                      evidence):
    """Inside view beside the probes: the loaded table drops by default on all three hooks,
    loads at boot, and accepts no port the matrix does not give this host (a port opened by
    hand outside the probe set shows here)."""
    topo, flows, _ = net
    host = _host(svc_name, _inventory_option(request.config))
    chains = _chains(host.check_output("nft list table inet safemail"))
    rules = matrix.host_rules(flows, topo, svc_name)
    expected = {
        "input": {(r.proto, r.port) for r in rules["input"]},
        "output": {(r.proto, r.port) for r in rules["output"]},
    }
    extra = {}
    for chain in ("input", "output"):
        found = set(re.findall(r"\b(tcp|udp) dport (\d+)", chains.get(chain, "")))
        extra[chain] = sorted(f"{p}/{n}" for p, n in found
                              if (p, int(n)) not in expected[chain])
    policies = {c: "policy drop;" in chains.get(c, "") for c in ("input", "output", "forward")}
    enabled = host.service("nftables").is_enabled
    evidence(f"{svc_name}: policy drop {policies}; ports beyond the matrix {extra}; "
             f"nftables.service enabled: {enabled}")
    assert all(policies.values()), f"a chain is missing or does not drop by default: {policies}"
    assert not extra["input"] and not extra["output"], (
        f"{svc_name} accepts ports the flow matrix does not give it: {extra}")
    assert enabled, "nftables.service is not enabled: the ruleset would not survive a reboot"
    assert host.run("nft -c -f /etc/nftables.conf").rc == 0


# --- NET-02 -----------------------------------------------------------------------------------


def _sink_records(since: float, peer: str) -> list[dict]:
    log = LabPaths.default().logs / "internet-sink.jsonl"
    out = []
    for line in log.read_text(encoding="utf-8").splitlines() if log.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("time", 0) >= since and rec.get("peer") == peer:
            out.append(rec)
    return out


@pytest.mark.req("NET-02")
@pytest.mark.lab_participants
def test_control_probe_sink_is_reachable_from_an_unfirewalled_host(net, request, evidence):
    """The sink answers by route (practice1 has no firewall): NET-02's failures mean the
    firewall, not a missing route."""
    topo, _, hostvars = net
    sink = _sink_address(hostvars)
    participant = _names(topo, PARTICIPANT_GROUP)[0]
    results = run_probes(participant, _inventory_option(request.config), [(sink, 25)])
    evidence(f"{participant} -> internet sink {sink}:25: {results[(sink, 25)]}")
    assert results[(sink, 25)][0] == "open"


@pytest.mark.req("NET-02")
@pytest.mark.lab_participants
def test_no_service_host_reaches_the_internet(net, svc_name, request, evidence):
    topo, flows, hostvars = net
    inventory = _inventory_option(request.config)
    sink = _sink_address(hostvars)
    high = random.randint(41000, 60999)
    targets = [(sink, p) for p in (*SINK_TCP_PORTS, 53, high)]
    # The twin: an allowed flow from the same host connects (the mirror's HTTP).
    allowed = [p for p in matrix.probes(flows, topo, svc_name, list(topo.spec.endpoints),
                                        [80]) if p.expect]
    assert allowed, f"{svc_name} has no allowed flow to the mirror to prove the probe works"
    since = time.time() - 1
    results = run_probes(svc_name, inventory, targets + [(allowed[0].address, 80)])
    dns = udp_exchange(svc_name, inventory, sink, 53, DNS_QUERY)
    lines = [f"{svc_name} -> {a}:{p}: {results[(a, p)][0]} ({results[(a, p)][1]})"
             for a, p in targets]
    lines.append(f"{svc_name} -> {sink} udp/53 (DNS): {dns}")
    lines.append(f"twin {svc_name} -> mirror {allowed[0].address}:80: "
                 f"{results[(allowed[0].address, 80)][0]}")
    evidence("; ".join(lines))
    assert results[(allowed[0].address, 80)][0] == "open", "the twin (allowed) probe failed"
    reached = [f"tcp/{p}: {results[(a, p)][0]}" for a, p in targets
               if results[(a, p)][0] != "filtered"]
    assert not reached, f"{svc_name} reaches the internet sink {sink}: {reached}"
    assert dns["reply"] is None
    time.sleep(1)
    seen = _sink_records(since, topo.nodes[svc_name].address)
    assert not seen, f"the sink recorded {svc_name}: {seen}"


@pytest.mark.req("NET-02")
def test_ntp_to_the_internal_time_server_works(net, svc_name, request, evidence):
    """The UDP flow of the matrix (NTP to the mirror) gets an answer: the same UDP probe that
    finds the internet's DNS blocked is shown to work where the matrix allows."""
    topo, flows, _ = net
    mirror = [e for e in topo.spec.endpoints.values()
              if matrix.allowed(flows, topo, svc_name, e.name, "udp", 123)]
    assert mirror, f"the matrix allows {svc_name} no NTP"
    address = str(mirror[0].address.network_address)
    res = udp_exchange(svc_name, _inventory_option(request.config), address, 123, NTP_REQUEST)
    evidence(f"{svc_name} -> {address} udp/123: {res}")
    assert res["reply"], f"no NTP answer from {address}"


@pytest.mark.req("NET-02")
@pytest.mark.lab_participants
def test_nothing_on_a_service_host_is_reachable_from_the_internet(net, request, evidence):
    topo, flows, _ = net
    service = _names(topo, SERVICE_GROUP)
    ports = matrix.probe_ports(flows)
    targets = [(topo.nodes[h].address, p) for h in service for p in ports]
    twin = (topo.nodes[_names(topo, PARTICIPANT_GROUP)[0]].address, 22)
    results = run_probes(INTERNET, _inventory_option(request.config), [*targets, twin])
    evidence(f"internet -> {len(service)} service hosts x {len(ports)} ports: "
             f"{sorted({o for o, _ in (results[t] for t in targets)})}; twin internet -> "
             f"participant {twin[0]}:22 (no firewall): {results[twin][0]}")
    assert results[twin][0] == "open", "the sink's namespace reaches nothing: probe broken"
    reached = [f"{a}:{p} {results[(a, p)][0]}" for a, p in targets
               if results[(a, p)][0] != "filtered"]
    assert not reached, f"reachable from the internet: {reached}"


# --- SYS-01 -----------------------------------------------------------------------------------


def _listeners(host) -> set[tuple[str, int]]:
    out = set()
    for line in host.check_output("ss -Htln").splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local = fields[3]
        addr, _, port = local.rpartition(":")
        addr = addr.strip("[]").split("%")[0]
        out.add((addr, int(port)))
    return out


@pytest.mark.req("SYS-01")
@pytest.mark.read_only
def test_front_host_listens_only_on_its_service_ports(net, front_host, request, evidence):
    topo, flows, _ = net
    host = _host(front_host, _inventory_option(request.config))
    offered = {f.port for f in flows if f.proto == "tcp" and topo.covers(f.dst, front_host)}
    listening = _listeners(host)
    exposed = sorted({p for a, p in listening
                      if a in ("*", "0.0.0.0", "::") or not ipaddress.ip_address(a).is_loopback})
    extra = [p for p in exposed if p not in offered]
    evidence(f"{front_host}: listens (not loopback) on {exposed}; matrix offers {sorted(offered)}")
    assert not extra, f"{front_host} listens on tcp {extra}, which the flow matrix does not offer"
    assert exposed, f"{front_host} listens on nothing: is it up?"


@pytest.mark.req("SYS-01")
@pytest.mark.read_only
def test_matrix_opens_no_back_or_core_host_to_safenet(net, evidence):
    topo, flows, _ = net
    bad = []
    for f in flows:
        src_safenet = [n for n in topo.members(f.src) if n.segment == SAFENET_SEGMENT] \
            or f.src == SAFENET_SEGMENT
        closed = [n.name for n in topo.members(f.dst) if n.segment in CLOSED_SEGMENTS]
        if src_safenet and closed:
            bad.append(f"{f.src} -> {f.dst} ({', '.join(closed)}) {f.service}: {f.purpose}")
    evidence(f"flows from safenet into back/core: {bad or 'none'}")
    assert not bad, "the flow matrix opens back/core hosts to safenet: " + "; ".join(bad)


@pytest.mark.req("SYS-01")
@pytest.mark.lab_participants
def test_back_and_core_hosts_are_unreachable_from_safenet(net, participant, request, evidence):
    topo, flows, _ = net
    closed = [n for n in _names(topo, SERVICE_GROUP) if topo.nodes[n].segment in CLOSED_SEGMENTS]
    ports = matrix.probe_ports(flows)
    targets = [(topo.nodes[h].address, p) for h in closed for p in ports]
    twins = [p for p in matrix.probes(flows, topo, participant, _names(topo, SERVICE_GROUP),
                                      ports) if p.expect]
    assert twins, f"{participant} has no allowed flow: the test could not tell a dead host"
    results = run_probes(participant, _inventory_option(request.config),
                         [*targets, *((p.address, p.port) for p in twins)])
    dead_twins = [p.label for p in twins if results[(p.address, p.port)][0] != "open"]
    reached = [f"{a}:{p} {results[(a, p)][0]}" for a, p in targets
               if results[(a, p)][0] != "filtered"]
    evidence(f"{participant} -> back/core {closed} x {len(ports)} ports: reached {reached}; "
             f"twins open: {len(twins) - len(dead_twins)}/{len(twins)}")
    assert not dead_twins, f"allowed probes failed (host or probe dead): {dead_twins}"
    assert not reached, f"{participant} reaches back/core hosts: {reached}"


@pytest.mark.req("SYS-01")
@pytest.mark.read_only
def test_functions_run_on_separate_hosts(net, evidence):
    topo, _, _ = net
    holders = {g: _names(topo, g) for g in FUNCTION_GROUPS}
    evidence(f"function groups: {holders}")
    shared = {}
    for host in topo.nodes:
        functions = [g for g, hosts in holders.items() if host in hosts]
        if len(functions) > 1:
            shared[host] = functions
    assert all(holders.values()), f"a function has no host: {holders}"
    assert not shared, f"hosts carrying more than one function: {shared}"
