"""Report building from real JUnit XML: verdict rules, JSON schema, HTML content.

The JUnit XML comes from actually running pytest, with the real verify/conftest.py, on a tiny
verify-like suite in a temporary directory, so markers, evidence and properties are exercised
as the verify suite uses them.
"""

from __future__ import annotations

import copy
import datetime as dt
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from safemail.gate.catalogue import load_catalogue, parse_catalogue
from safemail.gate.report import (
    CREATED_BY_REPORT,
    CREATED_BY_VERIFY,
    OUTCOMES,
    PROFILES,
    SCHEMA_ID,
    STATUSES,
    RunMetadata,
    TestResult,
    build_report,
    host_of,
    load_report,
    parse_junit,
    render_html,
    report_schema,
    validate_report,
    write_report,
)
from safemail.gate.waivers import Waiver

REPO = Path(__file__).resolve().parents[1]
TODAY = dt.date(2026, 11, 28)
IDS = ["MAIL-01", "MAIL-02", "MAIL-03", "MAIL-04", "MAIL-05", "STORE-01", "NET-01"]

SUITE = """
import pytest


@pytest.mark.req("MAIL-01")
def test_known_recipient_accepted(evidence):
    evidence("RCPT TO:<p2@safenet.test> -> 250 2.1.5 Ok")


@pytest.mark.req("MAIL-01")
@pytest.mark.parametrize("host", ["ansible://relay", "ansible://ca-ra"])
def test_unknown_recipient_refused(host, evidence):
    evidence(f"{host}: 550 5.1.1 <x@elsewhere.test>: Recipient address rejected")


@pytest.mark.req("MAIL-02")
def test_no_external_transport(evidence):
    evidence("relayhost = <unset>")
    assert False, "transport_maps routes example.org to smtp:[203.0.113.5]"


@pytest.mark.req("MAIL-03")
def test_plaintext_refused():
    pytest.skip("needs the lab")


@pytest.mark.req("MAIL-04")
def test_subject_warning():
    assert False, "enrolment notice lacks the subject warning"


@pytest.mark.req("MAIL-05")
def test_tls_everywhere():
    assert False, "store accepts LMTP without TLS"


@pytest.mark.req("NET-01", "STORE-01")
def test_two_ids(evidence):
    evidence("nft list ruleset: policy drop")


@pytest.mark.req("NET-99")
def test_unknown_id():
    pass


def test_without_marker():
    pass
"""


def _catalogue_yaml(ids: list[str]) -> str:
    real = yaml.safe_load((REPO / "verify" / "requirements.yml").read_text(encoding="utf-8"))
    entries = [e for e in real["requirements"] if e["id"] in ids]
    return yaml.safe_dump({"requirements": entries}, sort_keys=False, allow_unicode=True)


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run pytest once on the tiny suite; return paths and the process result."""
    root = tmp_path_factory.mktemp("suite")
    verify = root / "verify"
    verify.mkdir()
    shutil.copy(REPO / "verify" / "conftest.py", verify / "conftest.py")
    shutil.copy(REPO / "verify" / "waits.py", verify / "waits.py")  # conftest imports it
    shutil.copy(REPO / "verify" / "profiles.py", verify / "profiles.py")  # its plugins
    shutil.copy(REPO / "verify" / "stagelocks.py", verify / "stagelocks.py")
    (verify / "requirements.yml").write_text(_catalogue_yaml(IDS), encoding="utf-8")
    (verify / "test_tiny.py").write_text(textwrap.dedent(SUITE), encoding="utf-8")
    junit = root / "junit.xml"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "verify",
            "-p",
            "no:cacheprovider",
            "-o",
            "junit_family=xunit1",
            f"--junitxml={junit}",
            "-q",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return {"root": root, "junit": junit, "proc": proc, "catalogue": verify / "requirements.yml"}


def _meta(**over: Any) -> RunMetadata:
    base = RunMetadata(
        stage="test",
        revision="a" * 40,
        dirty=False,
        content_hash="sha256:" + "1" * 64,
        content_files={"roles/common/tasks/main.yml": "2" * 64},
        inventory_hash="sha256:" + "3" * 64,
        hosts=["relay", "ca-ra", "store"],
        started="2026-11-28T10:00:00Z",
        finished="2026-11-28T10:05:00Z",
    )
    for key, value in over.items():
        setattr(base, key, value)
    return base


WAIVERS = [
    Waiver(
        "MAIL-04",
        "Enrolment notice is being rewritten by the legal team.",
        "U. Karlins",
        dt.date(2026, 12, 31),
    ),
    Waiver(
        "MAIL-05",
        "LMTP TLS waits for the store certificate rollout.",
        "U. Karlins",
        dt.date(2026, 11, 1),
    ),
]


@pytest.fixture(scope="module")
def report(suite_run: dict[str, Any]) -> dict[str, Any]:
    catalogue = load_catalogue(suite_run["catalogue"])
    results = parse_junit([suite_run["junit"]], known_hosts=["relay", "ca-ra", "store"])
    return build_report(
        results,
        catalogue,
        WAIVERS,
        _meta(),
        today=TODAY,
        generated=dt.datetime(2026, 11, 28, 10, 6, tzinfo=dt.UTC),
    )


def _row(report: dict[str, Any], rid: str) -> dict[str, Any]:
    return next(r for r in report["requirements"] if r["id"] == rid)


def test_suite_ran_with_real_plugin(suite_run: dict[str, Any]) -> None:
    proc = suite_run["proc"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SafeMail requirement markers" in proc.stdout
    assert "unknown requirement id(s) NET-99" in proc.stdout
    assert "test_without_marker: no requirement marker" in proc.stdout


def test_junit_carries_req_and_evidence(suite_run: dict[str, Any]) -> None:
    results = {r.id.split("::")[-1]: r for r in parse_junit([suite_run["junit"]])}
    ok = results["test_known_recipient_accepted"]
    assert ok.outcome == "passed"
    assert ok.req_ids == ["MAIL-01"]
    assert ok.evidence == ["RCPT TO:<p2@safenet.test> -> 250 2.1.5 Ok"]
    bad = results["test_no_external_transport"]
    assert bad.outcome == "failed"
    assert "203.0.113.5" in bad.message
    assert bad.evidence == ["relayhost = <unset>"]
    assert results["test_plaintext_refused"].outcome == "skipped"
    assert results["test_two_ids"].req_ids == ["NET-01", "STORE-01"]
    assert results["test_unknown_id"].outcome == "error"
    assert results["test_without_marker"].req_errors


def test_host_from_test_id() -> None:
    hosts = ["ca-ra", "ca-signer", "relay"]
    assert host_of("test_x[ansible://ca-signer]", hosts) == "ca-signer"
    assert host_of("test_x[ansible://ca-ra-case1]", hosts) == "ca-ra"
    assert host_of("test_x[ansible://relay]") == "relay"
    assert host_of("test_x[plain]", hosts) is None


def test_verdict_rules(report: dict[str, Any]) -> None:
    status = {r["id"]: r["status"] for r in report["requirements"]}
    assert status == {
        "MAIL-01": "pass",
        "MAIL-02": "fail",
        "MAIL-03": "untested",  # only a skipped test: not proven
        "MAIL-04": "waived",  # failing, active waiver
        "MAIL-05": "fail",  # failing, expired waiver
        "STORE-01": "pass",  # proven by the two-id test
        "NET-01": "pass",
    }
    assert report["verdict"] == "fail"
    assert report["failing_requirements"] == ["MAIL-02", "MAIL-03", "MAIL-05"]
    assert "waiver expired on 2026-11-01" in _row(report, "MAIL-05")["reason"]
    assert "waived until 2026-12-31" in _row(report, "MAIL-04")["reason"]
    assert len(_row(report, "MAIL-01")["tests"]) == 3
    hosts = {t["host"] for t in _row(report, "MAIL-01")["tests"]}
    assert hosts == {None, "relay", "ca-ra"}


def test_unknown_and_unmarked_tests_listed(report: dict[str, Any]) -> None:
    unmapped = {t["id"].split("::")[-1]: t for t in report["unmapped_tests"]}
    assert set(unmapped) == {"test_unknown_id", "test_without_marker"}
    assert "NET-99" in unmapped["test_unknown_id"]["reason"]
    assert unmapped["test_unknown_id"]["req"] == ["NET-99"]
    assert "no requirement marker" in unmapped["test_without_marker"]["reason"]
    assert report["summary"]["unmapped_tests"] == 2


def test_id_without_test_is_no_test_and_fails(suite_run: dict[str, Any]) -> None:
    catalogue = parse_catalogue(
        yaml.safe_load(_catalogue_yaml(["MAIL-01", "AV-02"])), origin="mini"
    )
    results = [TestResult("t::a", "passed", req_ids=["MAIL-01"])]
    rep = build_report(results, catalogue, [], _meta(), today=TODAY)
    row = _row(rep, "AV-02")
    assert (row["status"], row["reason"], row["counts_as_failure"]) == ("untested", "no test", True)
    assert rep["verdict"] == "fail"
    assert rep["failing_requirements"] == ["AV-02"]
    assert "no test" in render_html(rep)


def test_all_pass_and_only_unmapped_test_fails_the_verdict() -> None:
    catalogue = parse_catalogue(yaml.safe_load(_catalogue_yaml(["MAIL-01"])), origin="mini")
    good = [TestResult("t::a", "passed", req_ids=["MAIL-01"])]
    assert build_report(good, catalogue, [], _meta(), today=TODAY)["verdict"] == "pass"
    stray = good + [TestResult("t::b", "passed", req_ids=[])]
    rep = build_report(stray, catalogue, [], _meta(), today=TODAY)
    assert rep["verdict"] == "fail"
    assert rep["failing_requirements"] == []


def test_waiver_on_passing_requirement_is_flagged() -> None:
    catalogue = parse_catalogue(yaml.safe_load(_catalogue_yaml(["MAIL-01"])), origin="mini")
    good = [TestResult("t::a", "passed", req_ids=["MAIL-01"])]
    waiver = Waiver("MAIL-01", "x" * 30, "head of IT", dt.date(2027, 1, 1))
    rep = build_report(good, catalogue, [waiver], _meta(), today=TODAY)
    assert rep["requirements"][0]["status"] == "pass"
    assert "remove it" in rep["requirements"][0]["reason"]


def test_partial_run_by_requirements() -> None:
    catalogue = parse_catalogue(
        yaml.safe_load(_catalogue_yaml(["MAIL-01", "MAIL-02"])), origin="mini"
    )
    meta = _meta(selection={"keyword": None, "markexpr": None, "requirements": ["MAIL-01"]})
    results = [TestResult("t::a", "passed", req_ids=["MAIL-01"])]
    rep = build_report(results, catalogue, [], meta, today=TODAY)
    assert rep["complete"] is False
    assert _row(rep, "MAIL-02")["status"] == "not-selected"
    assert rep["verdict"] == "pass"
    assert validate_report(rep) == []


def test_production_profile_counts_only_what_it_could_check() -> None:
    """The regular production check must be able to pass: a requirement none of whose tests
    the profile may run is not-selected (named), one it ran is judged by those tests, and a
    failure among them still fails the verdict."""
    catalogue = parse_catalogue(
        yaml.safe_load(_catalogue_yaml(["MAIL-01", "MAIL-02"])), origin="mini"
    )
    results = [TestResult("t::a", "passed", req_ids=["MAIL-01"])]
    rep = build_report(results, catalogue, [], _meta(profile="production"), today=TODAY)
    assert _row(rep, "MAIL-02")["status"] == "not-selected"
    assert "production profile" in _row(rep, "MAIL-02")["reason"]
    assert _row(rep, "MAIL-01")["status"] == "pass"
    assert rep["verdict"] == "pass"
    assert validate_report(rep) == []
    broken = [TestResult("t::a", "failed", req_ids=["MAIL-01"])]
    rep = build_report(broken, catalogue, [], _meta(profile="production"), today=TODAY)
    assert rep["verdict"] == "fail" and rep["failing_requirements"] == ["MAIL-01"]
    # the full profile still counts a requirement without tests as failing
    rep = build_report(results, catalogue, [], _meta(), today=TODAY)
    assert _row(rep, "MAIL-02")["status"] == "untested" and rep["verdict"] == "fail"


def test_run_problem_fails_verdict() -> None:
    catalogue = parse_catalogue(yaml.safe_load(_catalogue_yaml(["MAIL-01"])), origin="mini")
    results = [TestResult("t::a", "passed", req_ids=["MAIL-01"])]
    meta = _meta(problems=["pytest stopped early: exit code 2 (interrupted)"])
    rep = build_report(results, catalogue, [], meta, today=TODAY)
    assert rep["verdict"] == "fail"
    assert "interrupted" in render_html(rep)


def test_report_matches_schema(report: dict[str, Any]) -> None:
    assert validate_report(report) == []
    jsonschema.validate(report, report_schema())  # the file is plain JSON Schema for any tool


def test_schema_file_is_valid_and_agrees_with_the_code() -> None:
    schema = report_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    props, defs = schema["properties"], schema["$defs"]
    assert props["schema"]["enum"] == [SCHEMA_ID]
    assert defs["requirement"]["properties"]["status"]["enum"] == list(STATUSES)
    assert defs["outcome"]["enum"] == list(OUTCOMES)
    assert props["run"]["properties"]["profile"]["enum"] == list(PROFILES)
    assert props["run"]["properties"]["created_by"]["enum"] == [
        CREATED_BY_VERIFY, CREATED_BY_REPORT]


def test_package_data_ships_every_schema_and_template() -> None:
    """The wheel the roles install on hosts carries the files report.py reads."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"]["package-data"]
    src = REPO / "src"
    shipped = {
        path
        for package, patterns in globs.items()
        for pattern in patterns
        for path in (src / package.replace(".", "/")).glob(pattern)
    }
    data = {p for p in (src / "safemail").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert data, "no data files found: the layout changed"
    assert data <= shipped, sorted(map(str, data - shipped))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.pop("verdict"), "missing key 'verdict'"),
        (lambda r: r.update(verdict="maybe"), "is not one of"),
        (lambda r: r.update(content_hash="md5:1"), "does not match"),
        (lambda r: r["requirements"][0].update(status="ok"), "is not one of"),
        (lambda r: r["revision"].update(dirty="no"), "expected boolean"),
        (lambda r: r.update(extra=1), "unexpected key 'extra'"),
        (lambda r: r.update(verdict="pass"), "contradicts"),
        (lambda r: r.update(failing_requirements=[]), "does not match the requirement rows"),
        (lambda r: r["run"].pop("profile"), "report.run: missing key 'profile'"),
        (lambda r: r["summary"].update(tests=True), "report.summary.tests: expected integer"),
        (lambda r: r["requirements"][0].update(waiver={"id": 1}), "none of the allowed shapes"),
        (lambda r: r["requirements"][0]["tests"][0].update(duration=-1), "-1 is below 0"),
        (lambda r: r["run"].update(junit_sha256="x"), "report.run.junit_sha256: 'x' does not"),
        (lambda r: r["requirements"].append([]), "report.requirements[7]: expected object"),
    ],
)
def test_schema_rejects_damage(report: dict[str, Any], mutate: Any, expected: str) -> None:
    damaged = copy.deepcopy(report)
    mutate(damaged)
    problems = validate_report(damaged)
    assert any(expected in p for p in problems), problems


def test_schema_rejects_a_document_that_is_no_object() -> None:
    assert validate_report([]) == ["report: expected object, got list"]


def test_html_is_the_same_bytes_for_the_same_report(report: dict[str, Any],
                                                    tmp_path: Path) -> None:
    """run.html_sha256 seals the page: rendering must not depend on time, order or memory."""
    first, second = tmp_path / "a", tmp_path / "b"
    json_a, html_a, _ = write_report(report, first)
    json_b, html_b, _ = write_report(copy.deepcopy(report), second)
    assert html_a.read_bytes() == html_b.read_bytes()
    assert json_a.read_bytes() == json_b.read_bytes()
    assert html_a.read_bytes().startswith(b"<!DOCTYPE html>")  # the template's comment is not


def test_html_self_contained_with_every_id(report: dict[str, Any], tmp_path: Path) -> None:
    json_path, html_path, digest = write_report(report, tmp_path)
    html = html_path.read_text(encoding="utf-8")
    assert len(digest) == 64
    for rid in IDS:
        assert f'id="{rid}"' in html
    head = html[: html.index("<h1>")]
    assert ">FAIL<" in head  # verdict before anything else
    assert "MAIL-02, MAIL-03, MAIL-05" in head
    # failures first: the first row is a failing requirement, passing ones come last
    assert html.index('id="MAIL-02"') < html.index('id="MAIL-04"') < html.index('id="MAIL-01"')
    assert "transport_maps routes example.org" in html  # evidence of the failure
    assert "RCPT TO:&lt;p2@safenet.test&gt;" in html  # evidence escaped
    assert "U. Karlins" in html and "2026-12-31" in html and "expired" in html
    assert "NET-99" in html and "test_without_marker" in html
    for external in ("<link", "<script", "src=", "http://", "url("):
        assert external not in html
    assert load_report(json_path)["verdict"] == "fail"


def test_parse_junit_errors_are_clear(tmp_path: Path) -> None:
    from safemail.gate.report import ReportError

    with pytest.raises(ReportError, match="not found"):
        parse_junit([tmp_path / "none.xml"])
    broken = tmp_path / "broken.xml"
    broken.write_text("<testsuite><testcase", encoding="utf-8")
    with pytest.raises(ReportError, match="not valid JUnit XML"):
        parse_junit([broken])
