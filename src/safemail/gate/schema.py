"""The gate's JSON Schemas (``safemail/gate/schemas/<name>.schema.json``) and their checker.

Each document the gate reads or writes (report.json, and the YAML files it loads) has a
schema file, shipped as package data. :func:`problems` checks a document with ``jsonschema``
(a controller dependency: hosts never load these documents) and words each violation the way
the gate prints it, ``where: what`` with ``where`` a path like ``report.run.profile`` or
``report.requirements[3]``. What a schema cannot say (consistency between fields) stays with
the code that loads the document.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

SCHEMA_DIR = "schemas"


def path_of(name: str) -> str:
    """The schema file of ``name``, relative to the safemail.gate package."""
    return f"{SCHEMA_DIR}/{name}.schema.json"


@functools.cache
def _text(name: str) -> str:
    return resources.files(__package__).joinpath(path_of(name)).read_text(encoding="utf-8")


def load(name: str) -> dict[str, Any]:
    """The schema ``name`` as a fresh dictionary (draft 2020-12)."""
    return json.loads(_text(name))


@functools.cache
def _validator(name: str) -> Any:
    import jsonschema  # imported here: `safemail --help` on a host must not need it

    schema = load(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)  # a broken schema file is a bug: fail loudly
    return cls(schema)


@dataclass(frozen=True)
class Violation:
    """One way a document breaks its schema, in the gate's words."""

    path: tuple[str | int, ...]  # where in the document (keys and list indexes)
    kind: str  # the JSON Schema keyword that failed: required, type, pattern, ...
    what: str  # e.g. "missing key 'verdict'", "expected boolean, got str"
    key: str | None = None  # the key a required/additionalProperties violation is about

    def where(self, root: str) -> str:
        return root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path)


def _describe(error: Any) -> list[Violation]:
    """A jsonschema error as violations. A schema may word its own rule with the annotation
    ``x-must-be`` ("must be <x-must-be>"); jsonschema's message is the last resort."""
    path, kind, rule, value = (
        tuple(error.absolute_path), error.validator, error.validator_value, error.instance)
    if kind == "required":  # jsonschema reports each missing key: name them all (deduplicated)
        return [Violation(path, kind, f"missing key '{k}'", k) for k in rule if k not in value]
    if kind == "additionalProperties" and rule is False:
        known = error.schema.get("properties", {})
        return [Violation(path, kind, f"unexpected key '{k}'", str(k))
                for k in value if k not in known]
    if "x-must-be" in error.schema:
        what = f"must be {error.schema['x-must-be']}"
    elif kind == "type":
        names = rule if isinstance(rule, list) else [rule]
        what = f"expected {' or '.join(names)}, got {type(value).__name__}"
    elif kind == "enum":
        what = f"{value!r} is not one of {rule}"
    elif kind == "pattern":
        what = f"{value!r} does not match {rule}"
    elif kind == "minimum":
        what = f"{value} is below {rule}"
    elif kind in ("anyOf", "oneOf"):
        what = "matches none of the allowed shapes"
    else:
        what = error.message
    return [Violation(path, kind, what)]


def violations(name: str, data: Any) -> list[Violation]:
    """Every violation of schema ``name`` by ``data`` (empty: it conforms), without repeats."""
    found: list[Violation] = []
    for error in _validator(name).iter_errors(data):
        found.extend(v for v in _describe(error) if v not in found)
    return found


def problems(name: str, data: Any, root: str) -> list[str]:
    """:func:`violations` as lines ``where: what``, ``where`` a path from ``root``."""
    return [f"{v.where(root)}: {v.what}" for v in violations(name, data)]
