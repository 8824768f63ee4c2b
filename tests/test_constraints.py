"""constraints.txt pins every Python package, and agrees with pyproject.toml's own pins."""

from __future__ import annotations

import importlib.util
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


def _lock_module():  # scripts/ is not a package
    spec = importlib.util.spec_from_file_location("lock", REPO / "scripts" / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_is_exactly_the_resolved_dependency_set() -> None:
    """Nothing more (a dropped dependency such as pyinfra and what it pulled in) and nothing
    less (a new transitive dependency floats) than pyproject.toml resolves to in this venv."""
    locked = constraints()
    resolved = _lock_module().resolved(REPO / "pyproject.toml")
    extra = sorted(set(locked) - set(resolved))
    missing = sorted(set(resolved) - set(locked))
    differ = {n: (locked[n], v) for n, v in resolved.items() if n in locked and locked[n] != v}
    assert (extra, missing, differ) == ([], [], {}), "run make lock (scripts/lock.py)"
