"""Role settings from ``roles/*/meta/argument_specs.yml``: read them, render them as Markdown.

One reader for every rendering: the settings page (docs/generated/roles.md) and each role's
README.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from safemail.docs.markdown import HEADER, cell, default
from safemail.errors import SafeMailError


@dataclass(frozen=True)
class RoleOption:
    name: str
    type: str
    required: bool
    default: Any
    description: str
    choices: tuple[Any, ...] = ()
    elements: str | None = None


@dataclass(frozen=True)
class RoleEntry:
    role: str
    entry_point: str
    short_description: str
    options: tuple[RoleOption, ...]
    description: str = ""


@dataclass(frozen=True)
class RoleDoc:
    name: str
    spec_path: Path | None
    entries: tuple[RoleEntry, ...]


def _options(raw: Any, where: str) -> tuple[RoleOption, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise SafeMailError(f"{where}: 'options' must be a mapping of option names")
    out = []
    for name, spec in sorted(raw.items()):
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise SafeMailError(f"{where}: option {name} must be a mapping")
        description = spec.get("description", "")
        out.append(
            RoleOption(
                name=str(name),
                type=str(spec.get("type", "str")),
                required=bool(spec.get("required", False)),
                default=spec.get("default"),
                description=cell(description),
                choices=tuple(spec.get("choices") or ()),
                elements=spec.get("elements"),
            )
        )
    return tuple(out)


def read_role(role_dir: Path) -> RoleDoc:
    """One role's argument specs; a role without meta/argument_specs.yml has no entries."""
    spec_path = role_dir / "meta" / "argument_specs.yml"
    if not spec_path.exists():
        alt = role_dir / "meta" / "argument_specs.yaml"
        spec_path = alt if alt.exists() else spec_path
    if not spec_path.exists():
        return RoleDoc(role_dir.name, None, ())
    try:
        data = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SafeMailError(
            f"{spec_path} is not valid YAML: {exc}", "fix the role's argument specs"
        ) from exc
    specs = data.get("argument_specs") if isinstance(data, Mapping) else None
    if not isinstance(specs, Mapping):
        raise SafeMailError(
            f"{spec_path}: expected a top-level 'argument_specs' mapping",
            "see https://docs.ansible.com role argument validation for the format",
        )
    entries = []
    for entry_point, body in sorted(specs.items()):
        body = body or {}
        where = f"{spec_path} ({entry_point})"
        if not isinstance(body, Mapping):
            raise SafeMailError(f"{where}: entry point must be a mapping")
        entries.append(
            RoleEntry(
                role=role_dir.name,
                entry_point=str(entry_point),
                short_description=cell(body.get("short_description", "")),
                options=_options(body.get("options"), where),
                description=cell(body.get("description", "")),
            )
        )
    return RoleDoc(role_dir.name, spec_path, tuple(entries))


def read_roles(roles_dir: Path) -> list[RoleDoc]:
    if not roles_dir.is_dir():
        return []
    return [read_role(d) for d in sorted(roles_dir.iterdir()) if d.is_dir()]


def render_roles(roles: Sequence[RoleDoc], base: Path | None = None) -> str:
    lines = [HEADER, "# Role settings", ""]
    if not roles:
        lines += ["No roles exist yet (roles/ is empty).", ""]
        return "\n".join(lines)
    lines += [
        "Every public setting of every role, from `roles/*/meta/argument_specs.yml`. "
        "Required settings have no default: a site must supply them.",
        "",
    ]
    for role in roles:
        lines.append(f"## {role.name}")
        lines.append("")
        if role.spec_path is None:
            lines += ["_No `meta/argument_specs.yml`: this role documents no settings._", ""]
            continue
        if base is not None:
            try:
                rel = role.spec_path.relative_to(base).as_posix()
            except ValueError:
                rel = role.spec_path.as_posix()
            lines += [f"Source: `{rel}`", ""]
        lines += render_entries(role, level=3)
    return "\n".join(lines)


def render_entries(role: RoleDoc, level: int) -> list[str]:
    """Markdown lines of a role's entry points and their options (headings at ``level``)."""
    lines: list[str] = []
    for entry in role.entries:
        lines += [f"{'#' * level} Entry point `{entry.entry_point}`", ""]
        if entry.short_description:
            lines += [entry.short_description, ""]
        if not entry.options:
            lines += ["_No options._", ""]
            continue
        lines.append("| Option | Type | Required | Default | Description |")
        lines.append("|---|---|---|---|---|")
        for opt in entry.options:
            kind = opt.type + (f" of {opt.elements}" if opt.elements else "")
            desc = opt.description
            if opt.choices:
                desc += (" " if desc else "") + "Choices: " + ", ".join(
                    f"`{c}`" for c in opt.choices)
            lines.append(
                f"| `{opt.name}` | {cell(kind)} | {'yes' if opt.required else 'no'} | "
                f"{default(opt.default)} | {desc} |"
            )
        lines.append("")
    return lines
