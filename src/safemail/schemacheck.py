"""JSON Schema files shipped in the package, checked with ``jsonschema``, in the project's words.

Used by the gate (``gate/schema.py``: report.json and the YAML files it loads; a controller
dependency, jsonschema 4.26) and by the CA (``ca/policy.py``: the CA policy, also read ON
HOSTS, which use Debian bookworm's python3-jsonschema 4.10). A schema meant for both may use
only what 4.10 knows: draft 2020-12 with the validation keywords (type, enum, const, pattern,
minimum/maximum, items, minItems, uniqueItems, required, properties, additionalProperties,
propertyNames, anyOf/oneOf), no ``$dynamicRef``, no remote ``$ref``, no ``format`` checks.

Each violation is worded ``where: what``, ``where`` a path like ``report.run.profile`` or
``report.requirements[3]``. What a schema cannot say (consistency between fields) stays with
the code that loads the document.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from safemail.errors import SafeMailError


def load(package: str, path: str) -> dict[str, Any]:
    """The schema file ``path`` (relative to ``package``) as a fresh dictionary."""
    return json.loads(_text(package, path))


@functools.cache
def _text(package: str, path: str) -> str:
    return resources.files(package).joinpath(path).read_text(encoding="utf-8")


@functools.cache
def validator(package: str, path: str) -> Any:
    """A checker for the schema file (its own draft); a broken schema file fails loudly."""
    try:
        import jsonschema  # imported here: `safemail --help` on a host must not need it
    except ImportError as exc:
        raise SafeMailError(
            "the Python package jsonschema is not installed",
            "hosts: Debian's python3-jsonschema (roles/safemail_runtime installs it); "
            "controller: make setup",
        ) from exc
    schema = load(package, path)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@dataclass(frozen=True)
class Violation:
    """One way a document breaks its schema, in the project's words."""

    path: tuple[str | int, ...]  # where in the document (keys and list indexes)
    kind: str  # the JSON Schema keyword that failed: required, type, pattern, ...
    what: str  # e.g. "missing key 'verdict'", "expected boolean, got str"
    key: str | None = None  # the key a required/additionalProperties violation is about

    def where(self, root: str) -> str:
        return root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path)


def describe(error: Any) -> list[Violation]:
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
    elif kind == "maximum":
        what = f"{value} is above {rule}"
    elif kind in ("anyOf", "oneOf"):
        what = "matches none of the allowed shapes"
    else:
        what = error.message
    return [Violation(path, kind, what)]


def violations(package: str, path: str, data: Any) -> list[Violation]:
    """Every violation of the schema by ``data`` (empty: it conforms), without repeats."""
    found: list[Violation] = []
    for error in validator(package, path).iter_errors(data):
        found.extend(v for v in describe(error) if v not in found)
    return found
