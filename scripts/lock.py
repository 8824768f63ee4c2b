"""The project's resolved Python dependency set, from pyproject.toml and the venv's metadata.

Every requirement of pyproject.toml (dependencies and every optional group), followed through
the installed distributions' own requirements (their markers evaluated for this interpreter
and the extras asked for), plus pip itself: one ``name==version`` line each, sorted. A
package left in the venv that nothing requires (an old dependency) is not part of it.

    python scripts/lock.py            print the set (make lock writes it to constraints.txt)

tests/test_constraints.py checks that constraints.txt is exactly this set.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("pip",)  # installs everything else; nothing requires it


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return [*project["dependencies"],
            *(r for group in project["optional-dependencies"].values() for r in group)]


def resolved(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """normalized name -> installed version, for the whole dependency set."""
    versions: dict[str, str] = {}
    done: set[tuple[str, tuple[str, ...]]] = set()
    missing: list[str] = []
    todo: list[tuple[Requirement, tuple[str, ...]]] = [
        (Requirement(r), ()) for r in [*direct_requirements(pyproject), *TOOLS]]
    while todo:
        req, parent_extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e})
                                  for e in (parent_extras or ("",))):
            continue
        key = (normalize(req.name), tuple(sorted(req.extras)))
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        versions[key[0]] = dist.version
        todo += [(Requirement(r), tuple(req.extras)) for r in dist.requires or []]
    if missing:
        raise SystemExit(f"not installed in this environment: {', '.join(sorted(missing))} "
                         "(run make setup first)")
    return dict(sorted(versions.items()))


if __name__ == "__main__":
    sys.stdout.write("".join(f"{n}=={v}\n" for n, v in resolved().items()))
