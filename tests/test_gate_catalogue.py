"""The requirement catalogue and the waiver file: the real files load, bad ones are refused."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from safemail.gate.catalogue import (
    BASELINE_IDS,
    CatalogueError,
    load_catalogue,
    missing_baseline,
    parse_catalogue,
)
from safemail.gate.waivers import WaiverError, load_waivers, parse_waivers

REPO = Path(__file__).resolve().parents[1]
CATALOGUE = REPO / "verify" / "requirements.yml"

# Laws the audit report cites; a legal basis must name one of them.
REPORT_LAWS = ("LDSG", "DSVO", "TKG", "StGB", "SGB V", "Signaturgesetz")


def test_real_catalogue_has_every_design_id() -> None:
    catalogue = load_catalogue(CATALOGUE)
    assert missing_baseline(catalogue) == []
    assert len(BASELINE_IDS) == 27
    assert len(catalogue.sha256) == 64


@pytest.mark.parametrize("req", load_catalogue(CATALOGUE).requirements, ids=lambda r: r.id)
def test_real_catalogue_entries_are_complete(req) -> None:  # noqa: ANN001
    assert req.title and req.statement.endswith(".")
    assert req.source
    for basis in req.legal_basis:
        assert any(law in basis for law in REPORT_LAWS), basis


def test_catalogue_paragraphs_are_ones_the_report_cites() -> None:
    report = Path("/work/shared/seed/audit-report.txt")
    if not report.exists():
        pytest.skip("audit report not available on this machine")
    text = " ".join(report.read_text(encoding="utf-8").split())
    for req in load_catalogue(CATALOGUE):
        for basis in req.legal_basis:
            if not basis.startswith("§"):
                assert basis in text, basis
                continue
            number = basis.split()[1]
            assert f"§ {number}" in text or f"§{number}" in text, basis


def _entry(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "MAIL-01",
        "title": "t",
        "source": ["2.6"],
        "legal_basis": ["§ 5 Abs. 1 LDSG"],
        "statement": "s.",
    }
    base.update(over)
    return base


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected a mapping"),
        ({"requirements": []}, "non-empty list"),
        ({"requirements": [_entry(), _entry()]}, "duplicate id"),
        ({"requirements": [_entry(id="mail-1")]}, "not of the form AREA-NN"),
        ({"requirements": [_entry(legal_basis=[])]}, "missing field(s): legal_basis"),
        ({"requirements": [_entry(titel="x")]}, "unknown field(s): titel"),
        ({"requirements": [_entry()], "extra": 1}, "unknown top-level key"),
        ({"requirements": [_entry(built="yes")]}, "'built' must be true or false"),
        ({"requirements": [_entry(waivable="no")]}, "'waivable' must be true or false"),
        ({"requirements": ["MAIL-01"]}, "entry 1: must be a mapping, got str"),
        ({"requirements": [_entry(id=12)]}, "entry 1: id 12 is not of the form AREA-NN"),
        ({"requirements": [_entry(title=None)]}, "missing field(s): title"),
        ({"requirements": [_entry(statement=["s"])]}, "'statement' must be text"),
        ({"requirements": [_entry(source=[""])]}, "'source' must be a non-empty list of strings"),
        ({"requirements": "MAIL-01"}, "'requirements' must be a non-empty list"),
    ],
)
def test_bad_catalogue_refused(data: object, message: str) -> None:
    with pytest.raises(CatalogueError) as info:
        parse_catalogue(data, origin="cat.yml")
    assert message in info.value.message
    assert info.value.hint


def test_catalogue_reads_sections_yaml_made_numbers_and_single_texts() -> None:
    (req,) = parse_catalogue({"requirements": [_entry(source=[2.6, "3.4(4)"],
                                                       legal_basis="§ 5 Abs. 1 LDSG")]})
    assert req.source == ("2.6", "3.4(4)") and req.legal_basis == ("§ 5 Abs. 1 LDSG",)


def test_missing_and_broken_catalogue_files(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match="not found"):
        load_catalogue(tmp_path / "nope.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("requirements: [\n", encoding="utf-8")
    with pytest.raises(CatalogueError, match="not valid YAML"):
        load_catalogue(bad)


# ---------------------------------------------------------------- waivers


def test_real_waiver_file_is_an_empty_list() -> None:
    assert load_waivers(REPO / "verify" / "waivers.yml", load_catalogue(CATALOGUE).ids) == []


def test_waiver_parsed_and_expiry_inclusive(tmp_path: Path) -> None:
    path = tmp_path / "waivers.yml"
    path.write_text(
        yaml.safe_dump(
            [
                {
                    "id": "AV-02",
                    "justification": "Second relay arrives with the new cluster in Q1.",
                    "granted": "2026-11-01",
                    "expires": "2026-12-31",
                    "signatures": ["checked by check_signatures, not by the parser"],
                }
            ]
        ),
        encoding="utf-8",
    )
    (waiver,) = load_waivers(path, known_ids=["AV-02"])
    assert waiver.expires == dt.date(2026, 12, 31)
    assert waiver.is_active(dt.date(2026, 12, 31))
    assert not waiver.is_active(dt.date(2027, 1, 1))


def _w(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": "AV-02",
        "justification": "A long enough written justification.",
        "granted": dt.date(2026, 11, 1),
        "expires": dt.date(2027, 1, 1),
        "signatures": ["-----BEGIN SSH SIGNATURE-----"],
    }
    base.update(over)
    return base


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"id": "AV-02"}, "expected a YAML list"),
        (["AV-02"], "must be a mapping"),
        ([_w(expires="next year")], "is not a date"),
        ([_w(signatures=[])], "missing field(s): signatures"),
        ([_w(justification="tbd")], "justification too short"),
        ([_w(id="AV-99")], "not in the requirement catalogue"),
        ([_w(), _w()], "a second waiver"),
        ([_w(reason="x")], "unknown field(s): reason"),
        ([_w(approver="me")], "who approved is read from the signatures"),
        ([_w(signatures="sig")], "signatures must be a list of armored SSH signatures"),
        ([_w(signatures=[1])], "signatures must be a list of armored SSH signatures"),
        ([_w(justification=12345678901234567890)], "justification must be text"),
        ([_w(granted="2026-02-30")], "granted '2026-02-30' is not a date"),
        ([_w(expires=dt.date(2026, 10, 1))], "expires 2026-10-01 lies before granted"),
    ],
)
def test_malformed_waivers_refused(data: object, message: str) -> None:
    with pytest.raises(WaiverError) as info:
        parse_waivers(data, origin="waivers.yml", known_ids=["AV-02"])
    assert message in info.value.message
    assert "waivers.yml" in info.value.message


def test_waiver_file_yaml_error(tmp_path: Path) -> None:
    path = tmp_path / "waivers.yml"
    path.write_text("- id: [\n", encoding="utf-8")
    with pytest.raises(WaiverError, match="not valid YAML"):
        load_waivers(path)
    assert load_waivers(tmp_path / "absent.yml") == []


def test_built_lists_every_requirement_not_marked_unbuilt() -> None:
    cat = parse_catalogue({"requirements": [_entry(), _entry(id="AV-02", built=False)]},
                          origin="cat.yml")
    assert cat.built == ("MAIL-01",)
    real = load_catalogue(REPO / "verify" / "requirements.yml")
    assert "AV-02" in real.ids and "AV-02" not in real.built
    assert "MAIL-03" in real.built


def test_a_redundant_lab_requirement_is_built_there_and_not_on_the_default_lab() -> None:
    cat = parse_catalogue({"requirements": [_entry(), _entry(id="AV-02", lab="redundant"),
                                            _entry(id="AV-01", built=False)]}, origin="cat.yml")
    assert cat.built == cat.built_on("default") == ("MAIL-01",)
    assert cat.built_on("redundant") == ("MAIL-01", "AV-02")
    real = load_catalogue(REPO / "verify" / "requirements.yml")
    assert "AV-02" in real.built_on("redundant") and "AV-02" not in real.built_on("default")
    with pytest.raises(CatalogueError, match="lab"):
        parse_catalogue({"requirements": [_entry(lab="cluster")]}, origin="cat.yml")


def test_only_the_redundancy_requirement_leaves_the_default_labs_scope() -> None:
    """`lab: redundant` takes a requirement out of CI's scope (`built`): an edit of the
    catalogue alone must not do that to another one quietly. The report still judges every
    requirement, so the gate is not weakened, but CI would stop proving it on every change."""
    real = load_catalogue(REPO / "verify" / "requirements.yml")
    assert sorted(set(real.ids) - set(real.built_on("default"))
                  - {r.id for r in real if not r.built}) == ["AV-02"]


def test_requirements_built_expands_to_the_catalogues_list(tmp_path: Path) -> None:
    from safemail.gate.cli import _expand_built

    path = tmp_path / "cat.yml"
    path.write_text(yaml.safe_dump({"requirements": [
        _entry(), _entry(id="NET-01"), _entry(id="AV-02", built=False)]}))
    assert _expand_built(("BUILT",), path) == ("MAIL-01", "NET-01")
    assert _expand_built(("AV-02", "BUILT"), path) == ("AV-02", "MAIL-01", "NET-01")
    assert _expand_built(("NET-01",), path) == ("NET-01",)
