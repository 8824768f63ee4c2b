"""Filter ``safemail_firewall_rules``: one host's accept rules from the flow matrix.

The logic is ``safemail.network.matrix`` (unit-tested in tests/test_network_matrix.py), the
same code the verify suite derives its probes from and ``safemail docs network`` draws the
network plan from; this plugin only hands it Ansible's view of the inventory. It runs on
the controller, where the project venv (with the safemail package) runs Ansible.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

try:
    from safemail.errors import SafeMailError
    from safemail.network import matrix
except ImportError as exc:  # pragma: no cover - a controller without the project installed
    matrix = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def safemail_firewall_rules(
    flows: list[Mapping[str, Any]],
    host: str,
    hostvars: Mapping[str, Any],
    groups: Mapping[str, list[str]],
    segments: Mapping[str, str],
    endpoints: Mapping[str, Mapping[str, Any]] | None = None,
    address_var: str = "safemail_address",
    segment_var: str = "safemail_segment",
) -> dict[str, list[dict[str, Any]]]:
    """{"input": [...], "output": [...]}: each {proto, port, networks, comment}."""
    if matrix is None:
        raise AnsibleFilterError(
            f"safemail_firewall_rules needs the safemail package on the controller "
            f"({_IMPORT_ERROR}); run Ansible from the project venv (.venv/bin)"
        )
    try:
        spec = matrix.parse_network(
            {matrix.SEGMENTS_VAR: dict(segments), matrix.ENDPOINTS_VAR: dict(endpoints or {})},
            "firewall_segments/firewall_endpoints",
        )
        nodes = {}
        for name in groups.get("all", []):
            hv = hostvars[name]
            member_of = tuple(sorted(g for g, hosts in groups.items()
                                     if name in hosts and g not in ("all", "ungrouped")))
            nodes[name] = matrix.Node(name, member_of, hv.get(segment_var),
                                      hv.get(address_var))
        topo = matrix.Topology(spec, nodes)
        combined = matrix.combine([dict(f) for f in flows])
        matrix.check(combined, topo)
        rules = matrix.host_rules(combined, topo, host)
    except SafeMailError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        raise AnsibleFilterError(f"{exc.message}{hint}") from exc
    return {chain: [r.as_dict() for r in items] for chain, items in rules.items()}


def safemail_firewall_uncovered(
    rules: Mapping[str, list[Mapping[str, Any]]], sources: list[str], proto: str, port: int
) -> list[str]:
    """The sources that no input rule accepts on proto/port (empty: all are accepted)."""
    if matrix is None:
        raise AnsibleFilterError(f"safemail_firewall_uncovered: {_IMPORT_ERROR}")
    try:
        return matrix.uncovered(rules.get("input", []), sources, proto, int(port))
    except SafeMailError as exc:
        raise AnsibleFilterError(exc.message) from exc


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "safemail_firewall_rules": safemail_firewall_rules,
            "safemail_firewall_uncovered": safemail_firewall_uncovered,
        }
