"""The requirement catalogue (verify/requirements.yml): load it and check its shape.

The shape is the JSON Schema ``safemail/gate/schemas/catalogue.schema.json``.

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
from safemail.gate import schema

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
_OPTIONAL = ("waivable", "built", "lab")


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
    # "redundant": its tests need `safemail lab up --redundant` (a second relay and directory)
    # and deselect themselves elsewhere; `built` (the default lab's scope) leaves it out.
    lab: str = "default"

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
        """Ids whose roles and tests exist (``built: false`` marks the others) and that the
        default lab can prove (``lab: redundant`` marks those only the redundant lab can)."""
        return self.built_on("default")

    def built_on(self, lab: str) -> tuple[str, ...]:
        """The built ids a lab can prove: the default lab's, or every built id on the redundant
        lab (a superset of the default lab's hosts)."""
        return tuple(r.id for r in self.requirements
                     if r.built and (lab == "redundant" or r.lab == "default"))

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


def _texts(value: str | list[str | float]) -> tuple[str, ...]:
    return tuple(str(item).strip() for item in ([value] if isinstance(value, str) else value))


def _entry_problems(where: str, entry: Any, found: list[schema.Violation]) -> list[str]:
    """An entry's violations of the schema, worded per entry as the catalogue's reader needs."""
    out: list[str] = []
    missing = [v.key for v in found if v.kind == "required"]
    for v in found:
        field = v.path[2] if len(v.path) > 2 else None
        if field is None and v.kind not in ("required", "additionalProperties"):
            out.append(f"{where}: {v.what}, got {type(entry).__name__}")
        elif field == "id":
            out.append(f"{where}: id {entry['id']!r} is not of the form AREA-NN (e.g. MAIL-03)")
        elif field is not None and entry.get(field) in (None, "", []):
            missing.append(field)  # present but empty says the same as absent
        elif field is not None and f"{where}: '{field}' {v.what}" not in out:
            out.append(f"{where}: '{field}' {v.what}")
    if missing:
        named = [f for f in (*_FIELDS, *_OPTIONAL) if f in missing]
        out.insert(0, f"{where}: missing field(s): {', '.join(dict.fromkeys(named))}")
    unknown = sorted(str(v.key) for v in found if v.kind == "additionalProperties")
    if unknown:
        out.append(f"{where}: unknown field(s): {', '.join(unknown)}")
    return out


def parse_catalogue(data: Any, origin: str = "<memory>", sha256: str = "") -> Catalogue:
    """Validate parsed YAML and return the catalogue; raise CatalogueError listing every problem.

    The shape is ``schemas/catalogue.schema.json``; this adds what a schema cannot say (every
    id once) and words each problem by the entry's id.
    """
    found = schema.violations("catalogue", data)
    if any(v.path == () and v.kind in ("type", "required") for v in found):
        raise CatalogueError(
            f"{origin}: expected a mapping with a 'requirements' list",
            "see the header of verify/requirements.yml for the expected shape",
        )
    if any(v.path == ("requirements",) for v in found):
        raise CatalogueError(
            f"{origin}: 'requirements' must be a non-empty list",
            "the catalogue keeps every id of the starting set (docs/architecture.md); restore it "
            "from git",
        )
    problems: list[str] = []
    extra = sorted(str(v.key) for v in found if v.path == ())
    if extra:
        problems.append(f"{origin}: unknown top-level key(s): {', '.join(extra)}")
    by_entry: dict[int, list[schema.Violation]] = {}
    for v in found:
        if len(v.path) > 1 and isinstance(v.path[1], int):
            by_entry.setdefault(v.path[1], []).append(v)
    seen: set[str] = set()
    reqs: list[Requirement] = []
    for index, entry in enumerate(data["requirements"]):
        bad = by_entry.get(index, [])
        req_id = entry.get("id") if isinstance(entry, Mapping) else None
        named = isinstance(req_id, str) and ID_PATTERN.match(req_id)
        where = f"{origin}: {req_id}" if isinstance(req_id, str) else f"{origin}: entry {index + 1}"
        problems.extend(_entry_problems(where, entry, bad))
        if named and req_id in seen:
            problems.append(f"{where}: duplicate id")
        elif named:
            seen.add(req_id)
        if bad or not named:
            continue
        reqs.append(
            Requirement(
                id=req_id,
                title=entry["title"].strip(),
                source=_texts(entry["source"]),
                legal_basis=_texts(entry["legal_basis"]),
                statement=" ".join(entry["statement"].split()),
                waivable=entry.get("waivable", True),
                built=entry.get("built", True),
                lab=entry.get("lab", "default"),
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
