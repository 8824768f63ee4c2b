"""The host list (docs/generated/hosts.md) from the inventory."""

from __future__ import annotations

from collections.abc import Sequence

from safemail.docs.markdown import HEADER, cell
from safemail.inventory import Host


def render_hosts(hosts: Sequence[Host], inventory: str) -> str:
    lines = [HEADER, "# Hosts", "", f"From inventory `{inventory}`.", ""]
    if not hosts:
        lines += ["The inventory has no hosts.", ""]
        return "\n".join(lines)
    lines.append("| Host | Groups | Segment | Hypervisor | Location | Address |")
    lines.append("|---|---|---|---|---|---|")
    for host in hosts:
        lines.append(
            f"| `{host.name}` | {cell(', '.join(host.groups))} | {cell(host.segment)} | "
            f"{cell(host.hypervisor)} | {cell(host.location)} | {cell(host.address)} |"
        )
    lines += ["", "## Network segments", ""]
    segments: dict[str, list[str]] = {}
    for host in hosts:
        segments.setdefault(host.segment or "(not set)", []).append(host.name)
    for segment in sorted(segments):
        lines.append(f"- **{segment}**: {', '.join(f'`{h}`' for h in segments[segment])}")
    lines.append("")
    return "\n".join(lines)
