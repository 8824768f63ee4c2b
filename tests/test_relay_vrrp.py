"""roles/relay_vrrp's keepalived.conf (AV-02): what it accepts adverts from.

Rendered with plain Jinja2 as Ansible's template module would (trim_blocks). keepalived 2.2.7
itself (Debian's binary, two network namespaces) was run on these lines by hand: with every
advert at TTL 255 one relay holds the address; a peer sending at TTL 254 is ignored, so both
hold it (docs/availability.md, "What a host on the front segment can still do").
"""

from __future__ import annotations

import re
from pathlib import Path

import jinja2

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "roles/relay_vrrp/templates"


def _render(peers: list[str]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True)
    env.filters["comment"] = lambda text: f"# {text}"
    return env.get_template("etc/keepalived/keepalived.conf.j2").render(
        ansible_managed="test", inventory_hostname="relay1", relay_vrrp_address="198.18.2.100",
        relay_vrrp_prefix=24, relay_vrrp_own_address="198.18.2.10", relay_vrrp_peers=peers,
        relay_vrrp_router_id=51, relay_vrrp_priority=100, relay_vrrp_check_weight=50,
        __relay_vrrp_interface="eth1")


def _peer_block(text: str) -> list[str]:
    block = re.search(r"unicast_peer \{\n(.*?)\n\s*\}", text, re.S)
    assert block, text
    return [line.split() for line in block.group(1).splitlines()]


def test_adverts_only_from_the_peers_and_only_unrouted():
    """Each peer with min_ttl/max_ttl 255 (a routed packet, whatever source it claims, has
    254 or less) and check_unicast_src (no advert from an address that is not a peer)."""
    text = _render(["198.18.2.11", "198.18.2.12"])
    assert re.search(r"^\s*check_unicast_src\s*$", text, re.M), text
    assert _peer_block(text) == [
        ["198.18.2.11", "min_ttl", "255", "max_ttl", "255"],
        ["198.18.2.12", "min_ttl", "255", "max_ttl", "255"]]
    assert re.search(r"^\s*unicast_src_ip 198\.18\.2\.10\s*$", text, re.M)
    # No unicast_ttl: keepalived's default (255) is what the peers' min_ttl expects.
    assert "unicast_ttl" not in text
