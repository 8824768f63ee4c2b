"""The gate's JSON Schemas (``safemail/gate/schemas/<name>.schema.json``) and their checker.

Each document the gate reads or writes (report.json, and the YAML files it loads) has a
schema file, shipped as package data. :func:`problems` checks a document with ``jsonschema``
(through :mod:`safemail.schemacheck`, shared with the CA policy; hosts never load these
documents) and words each violation the way the gate prints it, ``where: what`` with
``where`` a path like ``report.run.profile`` or ``report.requirements[3]``. What a schema
cannot say (consistency between fields) stays with the code that loads the document.
"""

from __future__ import annotations

from typing import Any

from safemail import schemacheck
from safemail.schemacheck import Violation

__all__ = ["SCHEMA_DIR", "Violation", "load", "path_of", "problems", "violations"]

SCHEMA_DIR = "schemas"


def path_of(name: str) -> str:
    """The schema file of ``name``, relative to the safemail.gate package."""
    return f"{SCHEMA_DIR}/{name}.schema.json"


def load(name: str) -> dict[str, Any]:
    """The schema ``name`` as a fresh dictionary (draft 2020-12)."""
    return schemacheck.load(__package__, path_of(name))


def violations(name: str, data: Any) -> list[Violation]:
    """Every violation of schema ``name`` by ``data`` (empty: it conforms), without repeats."""
    return schemacheck.violations(__package__, path_of(name), data)


def problems(name: str, data: Any, root: str) -> list[str]:
    """:func:`violations` as lines ``where: what``, ``where`` a path from ``root``."""
    return [f"{v.where(root)}: {v.what}" for v in violations(name, data)]
