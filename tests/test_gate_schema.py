"""The gate's JSON Schema files: each is valid draft 2020-12 and is what the loaders use."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from safemail.gate import schema

SCHEMAS = sorted((Path(schema.__file__).parent / schema.SCHEMA_DIR).glob("*.schema.json"))


def test_there_are_schema_files() -> None:
    assert {p.name for p in SCHEMAS} >= {
        "report.schema.json", "catalogue.schema.json", "waivers.schema.json",
        "mutations.schema.json"}


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_schema_file_is_valid_json_schema(path: Path) -> None:
    loaded = schema.load(path.name.removesuffix(".schema.json"))
    assert loaded["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(loaded)


def test_violations_name_the_place_and_each_key_once() -> None:
    found = schema.problems("report", {"schema": "safemail.verify-report/2", "x": 1}, "report")
    assert "report: unexpected key 'x'" in found
    assert "report: missing key 'verdict'" in found
    assert len(found) == len(set(found))
