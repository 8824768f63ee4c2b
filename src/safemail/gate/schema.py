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
from collections.abc import Iterable
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


def _where(root: str, path: Iterable[str | int]) -> str:
    return root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _describe(error: Any, root: str) -> list[str]:
    """One violation in the gate's words; jsonschema's own message for the rare rest."""
    where, kind, rule, value = (
        _where(root, error.absolute_path), error.validator, error.validator_value, error.instance)
    if kind == "required":  # jsonschema reports each missing key: name them all, once
        return [f"{where}: missing key '{k}'" for k in rule if k not in value]
    if kind == "additionalProperties" and rule is False:
        known = error.schema.get("properties", {})
        return [f"{where}: unexpected key '{k}'" for k in value if k not in known]
    if kind == "type":
        names = rule if isinstance(rule, list) else [rule]
        return [f"{where}: expected {' or '.join(names)}, got {type(value).__name__}"]
    if kind == "enum":
        return [f"{where}: {value!r} is not one of {rule}"]
    if kind == "pattern":
        return [f"{where}: {value!r} does not match {rule}"]
    if kind == "minimum":
        return [f"{where}: {value} is below {rule}"]
    if kind in ("anyOf", "oneOf"):
        return [f"{where}: matches none of the allowed shapes"]
    return [f"{where}: {error.message}"]


def problems(name: str, data: Any, root: str) -> list[str]:
    """Every violation of schema ``name`` by ``data`` (empty: it conforms), without repeats."""
    found: list[str] = []
    for error in _validator(name).iter_errors(data):
        found.extend(p for p in _describe(error, root) if p not in found)
    return found
