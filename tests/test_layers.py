"""The layers of src/safemail (docs/architecture.md, "Layers"): no upward import, no cycle.

Every import of a ``safemail`` module, at the top of a file or inside a function, is read from
the source (an AST scan; nothing is imported). A package may import its own modules and those of
a LOWER layer only; two packages of one layer do not know each other. A package missing from
LAYERS fails the test: place it before it lands.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT_PACKAGE = "safemail"

# Bottom first. A name is a module or a subpackage of safemail ("" is safemail/__init__.py).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "errors"),                     # the package's face (__version__) and its errors
    ("project", "vault", "schemacheck"),  # the checkout; the vault client; JSON Schema files
    ("ansible",),                       # finding and running ansible-* programs
    ("inventory", "rolevars"),          # hosts from ansible-inventory; role variables
    ("smime", "network", "ca"),         # libraries: S/MIME gate, flow matrix, the CA
    ("participant", "lab", "docs"),     # participant client, the lab, generated docs
    ("gate",),                          # verify, report, approvals, promotion
    ("ops", "accounting"),              # patch runs and billing use the gate's decision
    ("cli",),                           # the one `safemail` command
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, src: Path) -> str:
    """``safemail.x`` for a module or package that exists, else its parent (an attribute)."""
    parts = module.split(".")
    while len(parts) > 1:
        base = src.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return parts[0]


def imports(src: Path = SRC, package: str = ROOT_PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((src / package).rglob("*.py")):
        name = _module_name(path, src)
        is_package = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target == package or target.startswith(package + "."):
                    resolved = _resolve(target, src)
                    if resolved != name:
                        found.add(resolved)
        graph[name] = found
    return graph


def unit(module: str, package: str = ROOT_PACKAGE) -> str:
    """The layer unit of a module: safemail.gate.cli -> gate; safemail -> ""."""
    rest = module[len(package) + 1:] if module != package else ""
    return rest.split(".")[0]


def upward(graph: dict[str, set[str]], rank: dict[str, int]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = unit(module), unit(target)
            if a != b and rank[b] >= rank[a]:
                how = "upward" if rank[b] > rank[a] else "sideways"
                bad.append(f"{module} -> {target} ({how}: {a or 'safemail'} is layer "
                           f"{rank[a]}, {b or 'safemail'} is layer {rank[b]})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_layer() -> None:
    units = {unit(m) for m in imports()}
    missing = sorted(units - set(RANK))
    assert not missing, f"place {missing} in LAYERS (tests/test_layers.py, docs/architecture.md)"


def test_no_import_runs_up_or_sideways() -> None:
    assert upward(imports(), RANK) == []


def test_no_import_cycle() -> None:
    assert cycles(imports()) == []


def test_the_scan_sees_what_it_must_refuse(tmp_path: Path) -> None:
    """The checks fail on a tree that breaks them: a lazy upward import, a sideways import
    between two packages of one layer, and a cycle through relative imports."""
    pkg = tmp_path / ROOT_PACKAGE
    for rel, text in {
        "__init__.py": "",
        "errors.py": "",
        "project.py": "def f():\n    from safemail.gate import cli\n",  # lazy, upward
        "smime/__init__.py": "",
        "smime/a.py": "from safemail.network import matrix\n",           # sideways
        "network/__init__.py": "",
        "network/matrix.py": "from . import plan\n",
        "network/plan.py": "from .matrix import thing\n",               # cycle
        "gate/__init__.py": "",
        "gate/cli.py": "from safemail import errors, project\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = imports(tmp_path)
    assert graph["safemail.gate.cli"] == {"safemail.errors", "safemail.project"}
    bad = upward(graph, RANK)
    assert any(b.startswith("safemail.project -> safemail.gate.cli (upward") for b in bad), bad
    assert any(b.startswith("safemail.smime.a -> safemail.network.matrix (sideways") for b in bad)
    assert cycles(graph) == [["safemail.gate.cli", "safemail.project"],
                             ["safemail.network.matrix", "safemail.network.plan"]]


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_name_real_modules(layer: tuple[str, ...]) -> None:
    for name in layer:
        base = SRC / ROOT_PACKAGE / name if name else SRC / ROOT_PACKAGE
        assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file(), name
