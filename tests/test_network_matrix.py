"""The flow matrix (safemail.network): combining, checking, per-host rules, probes, the plan."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from safemail.docs.network import generate
from safemail.lab import plan as lab_plan
from safemail.network import matrix, plan

REPO = Path(__file__).resolve().parents[1]

NETWORK = {
    "safemail_network_segments": {
        "mgmt": "10.0.0.0/24", "safenet": "10.0.1.0/24", "front": "10.0.2.0/24",
        "back": "10.0.3.0/24", "core": "10.0.4.0/24",
    },
    "safemail_network_endpoints": {
        "controller": {"address": "10.0.0.1", "segment": "mgmt"},
        "mirror": {"address": "10.0.4.5", "segment": "core", "description": "mirror"},
    },
    "safemail_site_flows": [
        {"from": "controller", "to": "service", "proto": "tcp", "port": 22, "purpose": "admin"},
        {"from": "service", "to": "mirror", "proto": "tcp", "port": 80, "purpose": "apt"},
    ],
    "safemail_flow_roles": [],
}

FLOWS = [
    {"from": "participants", "to": "relay", "proto": "tcp", "port": 587, "purpose": "submit"},
    {"from": "relay", "to": "store", "proto": "tcp", "port": 24, "purpose": "LMTP"},
    {"from": "relay", "to": "store", "proto": "tcp", "port": 24, "purpose": "LMTP in"},
    {"from": "relay", "to": "auth", "proto": "tcp", "port": 389, "purpose": "lookups"},
    {"from": "store", "to": "auth", "proto": "tcp", "port": 389, "purpose": "users"},
]


def _topo() -> matrix.Topology:
    spec = matrix.parse_network(NETWORK)
    nodes = {
        "relay1": matrix.Node("relay1", ("relay", "service"), "front", "10.0.2.12", "10.0.0.16"),
        "store1": matrix.Node("store1", ("service", "store"), "back", "10.0.3.11", "10.0.0.17"),
        "auth1": matrix.Node("auth1", ("auth", "service"), "back", "10.0.3.10", "10.0.0.10"),
        "practice1": matrix.Node("practice1", ("participants",), "safenet", "10.0.1.10",
                                 "10.0.0.14"),
    }
    return matrix.Topology(spec, nodes)


def _flows() -> tuple[matrix.Flow, ...]:
    return matrix.combine([*NETWORK["safemail_site_flows"], *FLOWS])


def test_combine_merges_duplicates_and_keeps_both_purposes():
    flows = _flows()
    lmtp = [f for f in flows if f.port == 24]
    assert len(lmtp) == 1
    assert lmtp[0].purposes == ("LMTP", "LMTP in")
    assert list(flows) == sorted(flows)


@pytest.mark.parametrize(("flow", "message"), [
    ({"from": "a", "to": "b", "proto": "icmp", "port": 1, "purpose": "x"}, "protocol"),
    ({"from": "a", "to": "b", "proto": "tcp", "port": 0, "purpose": "x"}, "port 0"),
    ({"from": "a", "to": "b", "proto": "tcp", "port": "22", "purpose": "x"}, "port '22'"),
    ({"from": "a", "to": "b", "proto": "tcp", "port": 70000, "purpose": "x"}, "port 70000"),
    ({"from": "a", "to": "b", "proto": "tcp", "port": 22}, "lacks purpose"),
])
def test_combine_refuses_bad_flows(flow, message):
    with pytest.raises(matrix.MatrixError, match=message):
        matrix.combine([flow])


def test_unknown_names_and_misplaced_endpoints_are_refused():
    topo = _topo()
    with pytest.raises(matrix.MatrixError, match="no inventory group, segment or endpoint"):
        matrix.check(matrix.combine([{**FLOWS[0], "to": "relays"}]), topo)
    bad = json.loads(json.dumps(NETWORK))
    bad["safemail_network_endpoints"]["mirror"]["address"] = "10.0.9.5"
    with pytest.raises(matrix.MatrixError, match="not inside its segment"):
        matrix.parse_network(bad)
    bad["safemail_network_endpoints"]["mirror"]["address"] = "10.0.4.500"
    with pytest.raises(matrix.MatrixError, match="not an IPv4"):
        matrix.parse_network(bad)


def test_host_rules_in_and_out():
    topo, flows = _topo(), _flows()
    relay = matrix.host_rules(flows, topo, "relay1")
    assert [(r.proto, r.port, r.networks) for r in relay["input"]] == [
        ("tcp", 22, ("10.0.0.1/32",)), ("tcp", 587, ("10.0.1.10/32",))]
    assert [(r.proto, r.port, r.networks) for r in relay["output"]] == [
        ("tcp", 24, ("10.0.3.11/32",)), ("tcp", 80, ("10.0.4.5/32",)),
        ("tcp", 389, ("10.0.3.10/32",))]
    auth = matrix.host_rules(flows, topo, "auth1")
    assert [(r.port, r.networks) for r in auth["input"]] == [
        (22, ("10.0.0.1/32",)), (389, ("10.0.2.12/32", "10.0.3.11/32"))]
    assert [r.port for r in auth["output"]] == [80]


def test_a_flow_inside_a_group_connects_its_hosts_and_no_host_to_itself():
    """AV-02: auth -> auth tcp/389 (replica pulls from provider). One auth host: no rule at
    all (its ruleset stays as before); two: each accepts and reaches only the other."""
    flows = matrix.combine([*NETWORK["safemail_site_flows"], *FLOWS, {
        "from": "auth", "to": "auth", "proto": "tcp", "port": 389, "purpose": "repl"}])

    def shape(rules: dict) -> dict:
        # purposes too: they are the rule's comment in nftables.conf, so a purpose of a flow
        # that admits nobody on this host would still change a single-auth host's ruleset.
        return {k: [(r.proto, r.port, r.networks, r.purposes) for r in v]
                for k, v in rules.items()}

    assert shape(matrix.host_rules(flows, _topo(), "auth1")) == shape(
        matrix.host_rules(_flows(), _topo(), "auth1"))
    topo = _topo()
    topo.nodes["auth2"] = matrix.Node("auth2", ("auth", "service"), "back", "10.0.3.20",
                                      "10.0.0.20")
    two = matrix.host_rules(flows, topo, "auth1")
    assert [(r.port, r.networks) for r in two["input"]] == [
        (22, ("10.0.0.1/32",)), (389, ("10.0.2.12/32", "10.0.3.11/32", "10.0.3.20/32"))]
    assert [(r.port, r.networks) for r in two["output"]] == [
        (80, ("10.0.4.5/32",)), (389, ("10.0.3.20/32",))]
    assert [(p.dst, p.port) for p in matrix.probes(flows, topo, "store1", ["auth1"], [389])
            if p.expect] == [("auth1", 389)]


@pytest.mark.parametrize("name", ["back", "mirror"])
def test_a_segment_or_endpoint_to_itself_is_refused(name):
    flows = matrix.combine([{"from": name, "to": name, "proto": "tcp", "port": 22,
                             "purpose": "x"}])
    with pytest.raises(matrix.MatrixError, match="to itself"):
        matrix.check(flows, _topo())


@pytest.mark.parametrize(("flow", "message"), [
    ({"from": "relay", "to": "relay", "proto": "vrrp", "port": 112, "purpose": "x"},
     "no ports"),
    ({"from": "relay", "to": "relay", "proto": "tcp", "purpose": "x"}, "lacks port"),
])
def test_vrrp_has_no_port_and_tcp_needs_one(flow, message):
    with pytest.raises(matrix.MatrixError, match=message):
        matrix.combine([flow])


def _two_relays() -> matrix.Topology:
    topo = _topo()
    topo.nodes["relay2"] = matrix.Node("relay2", ("relay", "service"), "front", "10.0.2.13",
                                       "10.0.0.18")
    return topo


VRRP = {"from": "relay", "to": "relay", "proto": "vrrp", "purpose": "VRRP between the relays"}


def test_vrrp_between_the_relays_only(tmp_path):
    """AV-02: VRRP (IP protocol 112) in and out only to the other relay; the rendered
    nftables ruleset says so and nft accepts it (check mode: nothing is loaded)."""
    import shutil
    import subprocess

    import jinja2

    flows = matrix.combine([*NETWORK["safemail_site_flows"], *FLOWS, VRRP])
    assert [f.service for f in flows if f.proto == "vrrp"] == ["vrrp"]
    one = matrix.host_rules(flows, _topo(), "relay1")
    assert not [r for rs in one.values() for r in rs if r.proto == "vrrp"]  # one relay: none
    rules = matrix.host_rules(flows, _two_relays(), "relay1")
    assert [(r.proto, r.networks) for r in rules["input"] if r.proto == "vrrp"] == [
        ("vrrp", ("10.0.2.13/32",))]
    assert [(r.proto, r.networks) for r in rules["output"] if r.proto == "vrrp"] == [
        ("vrrp", ("10.0.2.13/32",))]
    assert not [r for r in matrix.host_rules(flows, _two_relays(), "store1")["input"]
                if r.proto == "vrrp"]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(
        str(REPO / "roles/firewall/templates")), undefined=jinja2.StrictUndefined,
        trim_blocks=True)  # as Ansible's template module
    env.filters["comment"] = lambda text: f"# {text}"
    text = env.get_template("etc/nftables.conf.j2").render(
        ansible_managed="test", inventory_hostname="relay1", firewall_table="safemail",
        firewall_admin_sources=["10.0.0.1"], firewall_admin_port=22, firewall_log_drops=False,
        firewall_log_rate="10/minute",
        __firewall_rules={k: [r.as_dict() for r in v] for k, v in rules.items()})
    assert "ip saddr { 10.0.2.13/32 } ip protocol vrrp accept" in text
    assert "ip daddr { 10.0.2.13/32 } ip protocol vrrp accept" in text
    nft = shutil.which("nft") or "/usr/sbin/nft"
    if not Path(nft).exists() or os.geteuid() != 0:
        pytest.skip("nft check needs nftables and root")
    (tmp_path / "rules.nft").write_text(text)
    # `nft -c` in a fresh network namespace: it parses and checks, and even a bug could
    # touch nothing but that throwaway namespace.
    proc = subprocess.run(["unshare", "--net", nft, "-c", "-f", str(tmp_path / "rules.nft")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_uncovered_finds_a_missing_admin_rule():
    topo = _topo()
    flows = matrix.combine(FLOWS + [NETWORK["safemail_site_flows"][1]])  # no admin SSH
    rules = [r.as_dict() for r in matrix.host_rules(flows, topo, "relay1")["input"]]
    assert matrix.uncovered(rules, ["10.0.0.1"], "tcp", 22) == ["10.0.0.1"]
    rules = [r.as_dict() for r in matrix.host_rules(_flows(), topo, "relay1")["input"]]
    assert matrix.uncovered(rules, ["10.0.0.1"], "tcp", 22) == []


def test_probes_expect_exactly_the_matrix_and_use_mgmt_from_the_controller():
    topo, flows = _topo(), _flows()
    ports = matrix.probe_ports(flows)
    assert {22, 24, 587, 389, 80, 25, 443} <= set(ports)
    from_practice = matrix.probes(flows, topo, "practice1", ["relay1", "store1", "auth1"], ports)
    allowed = {(p.dst, p.port) for p in from_practice if p.expect}
    assert allowed == {("relay1", 587)}
    assert all(p.address == topo.nodes[p.dst].address for p in from_practice)
    from_ctl = matrix.probes(flows, topo, "controller", ["relay1"], ports)
    assert {p.port for p in from_ctl if p.expect} == {22}
    assert {p.address for p in from_ctl} == {"10.0.0.16"}
    to_mirror = matrix.probes(flows, topo, "relay1", ["mirror"], [80, 443])
    assert [(p.address, p.port, p.expect) for p in to_mirror] == [
        ("10.0.4.5", 80, True), ("10.0.4.5", 443, False)]


def test_the_test_inventory_matches_the_lab_plan():
    spec = matrix.read_network(REPO / "inventories" / "test")
    for name, net in spec.segments.items():
        assert lab_plan.SEGMENTS[name] == net
    assert spec.endpoints["controller"].address == ipaddress.ip_network(lab_plan.CONTROLLER_MGMT)
    mirror = lab_plan.SEGMENTS[lab_plan.MIRROR[1]].network_address + lab_plan.MIRROR[2]
    assert spec.endpoints["mirror"].address == ipaddress.ip_network(mirror)


@pytest.mark.parametrize("stage", ["test", "production"])
def test_every_flow_role_exports_valid_flows(stage):
    spec, flows = matrix.load_matrix(REPO, stage)
    assert spec.flow_roles
    assert any(f.src == "controller" and f.port == 22 for f in flows)
    known = set(spec.segments) | set(spec.endpoints) | set(lab_plan.SERVICE_GROUPS) | {
        "service", "participants"}
    assert {f.src for f in flows} | {f.dst for f in flows} <= known


def test_ansible_combines_the_same_matrix_as_python():
    """safemail_flow_matrix (what the firewall role gets, through the safemail_role_flows
    lookup) == matrix.load_matrix."""
    ansible = Path(sys.executable).parent / "ansible"
    if not ansible.exists():
        pytest.skip("ansible is not installed in this environment")
    proc = subprocess.run(
        [str(ansible), "-i", "inventories/test", "relay1", "-m", "ansible.builtin.debug",
         "-a", "var=safemail_flow_matrix", "-o"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={"ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "PATH": str(ansible.parent)},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.split("=>", 1)[1])
    _, python_flows = matrix.load_matrix(REPO, "test")
    assert matrix.combine(data["safemail_flow_matrix"]) == python_flows
    assert [f.purposes for f in matrix.combine(data["safemail_flow_matrix"])] == [
        f.purposes for f in python_flows]


def test_ansible_refuses_a_listed_role_without_flows_as_python_does():
    """The lookup uses the same loader: a flow role that exports nothing fails in Ansible too,
    naming the role (the old Jinja expression skipped it silently)."""
    ansible = Path(sys.executable).parent / "ansible"
    if not ansible.exists():
        pytest.skip("ansible is not installed in this environment")
    proc = subprocess.run(
        [str(ansible), "-i", "inventories/test", "relay1", "-m", "ansible.builtin.debug",
         "-a", "msg={{ query('safemail_role_flows', ['auth', 'common']) }}", "-o"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={"ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "PATH": str(ansible.parent)},
    )
    assert proc.returncode != 0
    assert "role common exports no common_firewall_flows" in proc.stdout + proc.stderr
    with pytest.raises(matrix.MatrixError, match="role common exports no"):
        matrix.role_exports(REPO / "roles", ["auth", "common"])


def _filter_plugin():
    path = REPO / "roles" / "firewall" / "filter_plugins" / "safemail_firewall.py"
    spec = importlib.util.spec_from_file_location("safemail_firewall_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_filter_plugin_gives_the_role_the_same_rules():
    pytest.importorskip("ansible")
    plugin = _filter_plugin()
    topo = _topo()
    groups = {"all": sorted(topo.nodes), "relay": ["relay1"], "store": ["store1"],
              "auth": ["auth1"], "service": ["auth1", "relay1", "store1"],
              "participants": ["practice1"]}
    hostvars = {n.name: {"safemail_address": n.address, "safemail_segment": n.segment}
                for n in topo.nodes.values()}
    flows = [*NETWORK["safemail_site_flows"], *FLOWS]
    rules = plugin.safemail_firewall_rules(flows, "store1", hostvars, groups,
                                           NETWORK["safemail_network_segments"],
                                           NETWORK["safemail_network_endpoints"])
    expected = matrix.host_rules(_flows(), topo, "store1")
    assert rules == {k: [r.as_dict() for r in v] for k, v in expected.items()}
    assert plugin.safemail_firewall_uncovered(rules, ["10.0.0.1"], "tcp", 22) == []
    from ansible.errors import AnsibleFilterError
    with pytest.raises(AnsibleFilterError, match="no inventory group"):
        plugin.safemail_firewall_rules([{**FLOWS[0], "from": "nobody"}], "store1", hostvars,
                                       groups, NETWORK["safemail_network_segments"])


def test_plan_shows_every_flow_and_every_pair():
    topo, flows = _topo(), _flows()
    md = plan.render_markdown(flows, topo, "test")
    for f in flows:
        assert f"| {f.service} |" in md
    svg = plan.render_svg(flows, topo, "test")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == len({(f.src, f.dst) for f in flows})
    texts = {t.text for t in root.iter(f"{ns}text")}
    assert {"relay", "store", "auth", "participants", "controller", "mirror"} <= texts
    assert "tcp/80" in texts and "tcp/24" in texts
    assert plan.render_svg(flows, topo, "test") == svg  # deterministic


def test_committed_network_plan_matches_the_matrix(tmp_path):
    """docs/network.md and docs/network.svg are what `safemail docs network` writes now."""
    committed = REPO / "docs" / "network.md"
    if not committed.exists():
        pytest.fail("docs/network.md is missing: run `safemail docs network`")
    hosts_yml = yaml.safe_load((REPO / "inventories/test/hosts.yml").read_text())
    hosts = [_InvHost(s.name, s.groups, {"safemail_segment": s.segment})
             for s in lab_plan.hosts_from_inventory(hosts_yml)]
    generate(REPO, tmp_path, "test", hosts=hosts)
    for name in ("network.md", "network.svg"):
        fresh = (tmp_path / name).read_text(encoding="utf-8")
        assert (REPO / "docs" / name).read_text(encoding="utf-8") == fresh, (
            f"docs/{name} is stale: run `safemail docs network` and commit it")


class _InvHost:
    def __init__(self, name: str, groups: tuple[str, ...], hostvars: dict) -> None:
        self.name = name
        self.groups = groups
        self.vars = hostvars


def test_cli_docs_network_writes_the_plan(tmp_path, monkeypatch):
    from safemail.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:/usr/bin:/bin")
    assert main(["docs", "network", "--stage", "test", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "network.md").read_text().startswith(plan.HEADER)
    ET.fromstring((tmp_path / "network.svg").read_text())


def test_docs_network_documents_the_committed_inventory_not_the_running_lab(tmp_path):
    """A `lab up --redundant` stage adds relay2 and auth2 in zz_lab_generated.yml beside
    hosts.yml: the rendered plan must still equal docs/ (SYS-06 compares them on a live lab)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("inventories", ".git", ".venv", ".lab"):
            (repo / entry.name).symlink_to(entry)
    inventory = repo / "inventories" / "test"
    inventory.mkdir(parents=True)
    (inventory / "hosts.yml").symlink_to(REPO / "inventories/test/hosts.yml")
    (inventory / "group_vars").symlink_to(REPO / "inventories/test/group_vars")
    (inventory / "zz_lab_generated.yml").write_text(yaml.safe_dump({"all": {"children": {
        "relay": {"hosts": {"relay2": {"safemail_segment": "front"}}},
        "auth": {"hosts": {"auth2": {"safemail_segment": "back"}}}}}}))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-inventory"), "-i",
                           str(inventory), "--graph"], capture_output=True, text=True,
                          check=False)
    assert "relay2" in proc.stdout, proc.stderr  # the lab's extra hosts are really there
    generate(repo, tmp_path / "out", "test")
    for name in ("network.md", "network.svg"):
        assert (tmp_path / "out" / name).read_bytes() == (REPO / "docs" / name).read_bytes()
