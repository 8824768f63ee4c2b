"""The requirement catalogue (verify/requirements.yml): load it and check its shape.

The catalogue is the list of audited properties the verification suite proves. Every verify
test names one or more of its ids; the report groups results by id; the promotion gate names
failing ids. This module only reads and validates the file: it does no I/O besides that.

File shape::

    requirements:
      - id: MAIL-03                       # AREA-NN, unique
        title: one line
        source: ["2.6", "3.4(4)"]         # audit report sections
        legal_basis: ["§ 5 Abs. 1 LDSG"]  # as cited by the report
        statement: what must hold and how it is proven (plain English)
        waivable: false                   # optional (default true): no waiver may cover it
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from safemail.errors import SafeMailError

DEFAULT_CATALOGUE = Path("verify/requirements.yml")

ID_PATTERN = re.compile(r"^[A-Z]{2,8}-[0-9]{2,3}$")

# The starting set (docs/architecture.md#the-requirement-catalogue-tests-report-gate). The
# catalogue may grow; it must never lose one of these.
BASELINE_IDS: tuple[str, ...] = (
    *(f"MAIL-0{n}" for n in range(1, 6)),
    "STORE-01",
    "STORE-02",
    *(f"CA-0{n}" for n in range(1, 7)),
    "NET-01",
    "NET-02",
    *(f"SYS-0{n}" for n in range(1, 7)),
    *(f"ACC-0{n}" for n in range(1, 5)),
    "AV-01",
    "AV-02",
)

# Requirements that no waiver may ever cover, whatever the catalogue file says (issue 16):
# the S/MIME-only gate, the network closure, encrypted storage and the CA's key protection.
NEVER_WAIVABLE: tuple[str, ...] = ("MAIL-03", "NET-01", "NET-02", "STORE-01", "CA-02", "CA-06")

_FIELDS = ("id", "title", "source", "legal_basis", "statement")
_OPTIONAL = ("waivable", "built")


class CatalogueError(SafeMailError):
    """The requirement catalogue is missing or malformed."""


@dataclass(frozen=True)
class Requirement:
    id: str
    title: str
    source: tuple[str, ...]
    legal_basis: tuple[str, ...]
    statement: str
    waivable: bool = True
    # False while its roles or verify tests are still missing: the report still judges it
    # ("no test" fails the gate); Molecule's stage and the integration test run only built ids.
    built: bool = True

    @property
    def area(self) -> str:
        return self.id.split("-", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "source": list(self.source),
            "legal_basis": list(self.legal_basis),
            "statement": self.statement,
        }


@dataclass(frozen=True)
class Catalogue:
    requirements: tuple[Requirement, ...]
    origin: str = "<memory>"
    sha256: str = ""

    def __iter__(self) -> Iterator[Requirement]:
        return iter(self.requirements)

    def __len__(self) -> int:
        return len(self.requirements)

    def __contains__(self, req_id: object) -> bool:
        return any(r.id == req_id for r in self.requirements)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.requirements)

    @property
    def built(self) -> tuple[str, ...]:
        """Ids whose roles and tests exist (``built: false`` marks the others)."""
        return tuple(r.id for r in self.requirements if r.built)

    @property
    def never_waivable(self) -> tuple[str, ...]:
        """Ids no waiver may cover: marked ``waivable: false``, plus :data:`NEVER_WAIVABLE`."""
        marked = {r.id for r in self.requirements if not r.waivable}
        return tuple(sorted(marked | set(NEVER_WAIVABLE)))

    def get(self, req_id: str) -> Requirement | None:
        for req in self.requirements:
            if req.id == req_id:
                return req
        return None


def _str_list(value: Any, where: str, field: str, problems: list[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: '{field}' must be a non-empty list of strings")
        return ()
    out: list[str] = []
    for item in value:
        if not isinstance(item, str | int | float) or not str(item).strip():
            problems.append(f"{where}: '{field}' has an empty or non-text entry: {item!r}")
            continue
        out.append(str(item).strip())
    return tuple(out)


def parse_catalogue(data: Any, origin: str = "<memory>", sha256: str = "") -> Catalogue:
    """Validate parsed YAML and return the catalogue; raise CatalogueError listing every problem."""
    problems: list[str] = []
    if not isinstance(data, Mapping) or "requirements" not in data:
        raise CatalogueError(
            f"{origin}: expected a mapping with a 'requirements' list",
            "see the header of verify/requirements.yml for the expected shape",
        )
    extra = sorted(set(data) - {"requirements"})
    if extra:
        problems.append(f"{origin}: unknown top-level key(s): {', '.join(map(str, extra))}")
    entries = data["requirements"]
    if not isinstance(entries, list) or not entries:
        raise CatalogueError(
            f"{origin}: 'requirements' must be a non-empty list",
            "the catalogue keeps every id of the starting set (docs/architecture.md); restore it "
            "from git",
        )
    seen: set[str] = set()
    reqs: list[Requirement] = []
    for index, entry in enumerate(entries, start=1):
        where = f"{origin}: entry {index}"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: must be a mapping, got {type(entry).__name__}")
            continue
        req_id = entry.get("id")
        if isinstance(req_id, str):
            where = f"{origin}: {req_id}"
        missing = [f for f in _FIELDS if entry.get(f) in (None, "", [])]
        if missing:
            problems.append(f"{where}: missing field(s): {', '.join(missing)}")
        unknown = sorted(set(map(str, entry)) - set(_FIELDS) - set(_OPTIONAL))
        if unknown:
            problems.append(f"{where}: unknown field(s): {', '.join(unknown)}")
        if not isinstance(req_id, str) or not ID_PATTERN.match(req_id):
            problems.append(f"{where}: id {req_id!r} is not of the form AREA-NN (e.g. MAIL-03)")
            continue
        if req_id in seen:
            problems.append(f"{where}: duplicate id")
            continue
        seen.add(req_id)
        waivable = entry.get("waivable", True)
        if not isinstance(waivable, bool):
            problems.append(f"{where}: 'waivable' must be true or false")
            waivable = False
        built = entry.get("built", True)
        if not isinstance(built, bool):
            problems.append(f"{where}: 'built' must be true or false")
            built = False
        for field in ("title", "statement"):
            value = entry.get(field)
            if value is not None and not isinstance(value, str):
                problems.append(f"{where}: '{field}' must be text")
        reqs.append(
            Requirement(
                id=req_id,
                title=str(entry.get("title") or "").strip(),
                source=_str_list(entry.get("source"), where, "source", problems),
                legal_basis=_str_list(entry.get("legal_basis"), where, "legal_basis", problems),
                statement=" ".join(str(entry.get("statement") or "").split()),
                waivable=waivable,
                built=built,
            )
        )
    if problems:
        raise CatalogueError(
            f"requirement catalogue is invalid ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems),
            f"fix {origin}; every entry needs {', '.join(_FIELDS)}",
        )
    return Catalogue(tuple(reqs), origin=origin, sha256=sha256)


def load_catalogue(path: Path | str = DEFAULT_CATALOGUE) -> Catalogue:
    """Read and validate the catalogue file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CatalogueError(
            f"requirement catalogue not found: {path}",
            "run from the repository root or pass the catalogue path explicitly",
        ) from None
    except OSError as exc:
        raise CatalogueError(f"cannot read requirement catalogue {path}: {exc}") from exc
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{path} is not valid YAML: {exc}") from exc
    return parse_catalogue(data, origin=str(path), sha256=hashlib.sha256(raw).hexdigest())


def relative_to(catalogue: Catalogue, base: Path) -> Catalogue:
    """The same catalogue with its origin shown relative to ``base`` where possible."""
    try:
        origin = Path(catalogue.origin).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return catalogue
    return replace(catalogue, origin=origin)


def missing_baseline(catalogue: Catalogue) -> list[str]:
    """Ids of the starting set that the catalogue lacks (it may extend the set, never drop)."""
    return [i for i in BASELINE_IDS if i not in catalogue]
