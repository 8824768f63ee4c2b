"""constraints.txt pins every Python package, and agrees with pyproject.toml's own pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def constraints(path: Path = REPO / "constraints.txt") -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt:{number}: {line!r} is not NAME==VERSION"
        assert _name(match[1]) not in pins, f"constraints.txt:{number}: {match[1]} twice"
        pins[_name(match[1])] = match[2]
    return pins


def project_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    pins = {}
    for requirement in requirements:
        match = PIN.match(requirement.strip())
        assert match, f"pyproject.toml: {requirement!r} is not pinned with =="
        pins[_name(match[1])] = match[2]
    return pins


def test_every_direct_dependency_is_constrained_at_its_pin() -> None:
    locked = constraints()
    differ = {n: (v, locked.get(n)) for n, v in project_pins().items() if locked.get(n) != v}
    assert differ == {}, "pyproject.toml pin vs constraints.txt (edit both, then make lock)"


def test_the_lock_holds_the_tools_and_no_editable_install() -> None:
    locked = constraints()
    for tool in ("pip", "setuptools", "wheel", "ruff", "pre-commit", "ansible-core"):
        assert tool in locked, tool
    assert "safemail" not in locked  # the project itself is installed editable, not pinned
