"""Turn JUnit XML from the verify suite into a release-decision report (JSON + HTML).

Inputs: one or more JUnit XML files (pytest --junitxml), the requirement catalogue, the waivers
and run metadata (revision, hashes, stage, hosts, times). Output: ``report.json`` (schema
below, checked by :func:`validate_report`) and ``report.html`` (self-contained, for change
managers).

Per requirement, in this order of precedence:

- ``fail``: at least one of its tests failed or errored.
- ``untested``: it has no test ("no test"), or some of its tests were skipped (a skipped test
  proves nothing). Counts as failing.
- ``pass``: it has tests and every one of them passed.
- ``waived``: it would be fail/untested but an active waiver covers it. An expired waiver
  covers nothing: the requirement keeps its fail/untested status and the reason says so.
- ``not-selected``: not counted. In partial runs (``--requirements``): outside the
  selection. In the production profile: none of the requirement's tests is a read-only test
  that runs without the lab, so the profile cannot check it (the report lists every test it
  left out). A requirement of which the profile ran tests is judged by those tests; the
  profile's report never releases, so its "pass" means "no drift in what it checks".

The overall verdict is ``pass`` only if no counted requirement fails, no test names an
unknown requirement (or none), and the run itself had no problems (e.g. pytest aborted).

Only ``safemail verify`` makes a report that can release. It records, under ``run``, which
tool made the report, the verify profile (``full`` on the test stage, ``production`` for the
read-only check of production: that one never releases), the sha256 of the JUnit XML the
report was built from, and every host the run reached with the fingerprints of the SSH host
keys the host presented in the run (``host_keys``; the verify plugin reads them through the
run's own connections). ``safemail report`` re-renders a report from its JUnit XML; what it
writes says ``created_by: safemail report`` and cannot release.

report.json (schema ``safemail.verify-report/2``; the exact shape is the JSON Schema
``safemail/gate/schemas/report.schema.json``, checked with ``jsonschema``)::

    schema, verdict ("pass"|"fail"), generated (ISO UTC), stage, complete (bool),
    selection {keyword, markexpr, requirements}, revision {commit, dirty},
    content_hash, content_files {path: sha256hex}, inventory_hash, hosts [names],
    started, finished, pytest_exit_code, catalogue {path, sha256},
    summary {requirements, pass, fail, waived, untested, not_selected, tests, tests_passed,
             tests_failed, tests_skipped, unmapped_tests},
    failing_requirements [ids], problems [text],
    requirements [{id, title, source, legal_basis, statement, status, counts_as_failure,
                   reason, waiver|null, tests [{id, outcome, duration, host, message,
                   evidence [text]}]}],
    unmapped_tests [{id, outcome, req [ids], reason}],
    waivers [{id, justification, approver, expires, active}],
    run {created_by, profile, junit_sha256|null, host_keys {host: [fingerprints]},
         skipped_by_profile [{id, reason}], html_sha256}

``run.html_sha256`` is the sha256 of the ``report.html`` written beside the JSON (rendered
first, from the same content): the seal over report.json therefore covers the page the
approvers read, and the gate refuses a report.html changed after the run.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
import xml.etree.ElementTree as ET  # noqa: S405 - parses our own pytest output, not foreign input
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from safemail import __version__
from safemail.errors import SafeMailError
from safemail.gate import schema
from safemail.gate.catalogue import Catalogue
from safemail.gate.waivers import Waiver

SCHEMA_ID = "safemail.verify-report/2"
CREATED_BY_VERIFY = "safemail verify"
CREATED_BY_REPORT = "safemail report"
PROFILES = ("full", "production")
MAX_TEXT = 4000  # characters of a failure message kept per test

STATUSES = ("fail", "untested", "waived", "pass", "not-selected")
FAILING = frozenset({"fail", "untested"})
OUTCOMES = ("passed", "failed", "error", "skipped")


class ReportError(SafeMailError):
    """A report or its inputs cannot be read."""


# --------------------------------------------------------------------------- JUnit parsing


@dataclass
class TestResult:
    __test__ = False  # not a pytest test class

    id: str
    outcome: str  # passed | failed | error | skipped
    duration: float = 0.0
    message: str = ""
    evidence: list[str] = field(default_factory=list)
    req_ids: list[str] = field(default_factory=list)
    req_errors: list[str] = field(default_factory=list)
    host: str | None = None
    host_keys: list[tuple[str, str]] = field(default_factory=list)  # (host, fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "outcome": self.outcome,
            "duration": round(self.duration, 3),
            "host": self.host,
            "message": self.message,
            "evidence": list(self.evidence),
        }


_HOST_RE = re.compile(r"(?:ansible|ssh|paramiko|local|docker|podman)://([^\]]*)")


def host_of(test_name: str, known_hosts: Sequence[str] = ()) -> str | None:
    """The testinfra host a parametrized test ran against, from its id (display only)."""
    match = _HOST_RE.search(test_name)
    if not match:
        return None
    rest = match.group(1)
    for name in sorted(known_hosts, key=len, reverse=True):
        if rest == name or rest.startswith(name + "-"):
            return name
    return rest.split("-", 1)[0] if known_hosts else rest


def _tail(text: str, limit: int = MAX_TEXT) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def parse_junit(paths: Iterable[Path | str], known_hosts: Sequence[str] = ()) -> list[TestResult]:
    """Read pytest JUnit XML files into one list of test results."""
    results: list[TestResult] = []
    for path in map(Path, paths):
        try:
            tree = ET.parse(path)  # noqa: S314 - our own pytest output
        except FileNotFoundError:
            raise ReportError(
                f"JUnit XML not found: {path}", "run `safemail verify` to produce it"
            ) from None
        except ET.ParseError as exc:
            raise ReportError(
                f"{path} is not valid JUnit XML: {exc}",
                "the test run was probably interrupted; run `safemail verify` again",
            ) from exc
        for case in tree.getroot().iter("testcase"):
            results.append(_parse_case(case, known_hosts))
    return results


def _parse_case(case: ET.Element, known_hosts: Sequence[str]) -> TestResult:
    classname = case.get("classname", "")
    name = case.get("name", "")
    test_id = f"{classname}::{name}" if classname else name
    outcome = "passed"
    messages: list[str] = []
    failures, errors = case.findall("failure"), case.findall("error")
    if failures or errors:
        outcome = "error" if errors else "failed"
    for node in failures + errors:
        messages.append("\n".join(filter(None, [node.get("message", ""), node.text or ""])))
    if outcome == "passed":
        skipped = case.find("skipped")
        if skipped is not None:
            outcome = "skipped"
            messages.append(skipped.get("message", "") or (skipped.text or ""))
    result = TestResult(
        id=test_id,
        outcome=outcome,
        duration=float(case.get("time", "0") or 0),
        message=_tail("\n".join(m for m in messages if m.strip())),
        host=host_of(name, known_hosts),
    )
    for prop in case.iter("property"):
        key, value = prop.get("name", ""), prop.get("value", "")
        if key == "req":
            result.req_ids.extend(v.strip() for v in value.split(",") if v.strip())
        elif key == "req_error":
            result.req_errors.append(value)
        elif key == "evidence":
            result.evidence.append(value)
        elif key == "host_key":
            host, _, fingerprint = value.partition(" ")
            if host and fingerprint:
                result.host_keys.append((host, fingerprint.strip()))
    return result


def host_keys_of(results: Sequence[TestResult]) -> dict[str, list[str]]:
    """Host -> sorted fingerprints recorded by the verify plugin's ``host_key`` properties."""
    keys: dict[str, set[str]] = {}
    for res in results:
        for host, fingerprint in res.host_keys:
            keys.setdefault(host, set()).add(fingerprint)
    return {h: sorted(f) for h, f in sorted(keys.items())}


# --------------------------------------------------------------------------- building


@dataclass
class RunMetadata:
    stage: str
    revision: str
    dirty: bool
    content_hash: str
    content_files: dict[str, str]
    inventory_hash: str
    hosts: list[str]
    started: str
    finished: str
    selection: dict[str, Any] = field(
        default_factory=lambda: {"keyword": None, "markexpr": None, "requirements": None}
    )
    pytest_exit_code: int | None = None
    problems: list[str] = field(default_factory=list)
    # Evidence of a real run (see the module docstring). The defaults describe a report that
    # cannot release: only safemail verify sets created_by to CREATED_BY_VERIFY.
    created_by: str = CREATED_BY_REPORT
    profile: str = "full"
    junit_sha256: str | None = None
    host_keys: dict[str, list[str]] = field(default_factory=dict)
    skipped_by_profile: list[dict[str, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not any(self.selection.get(k) for k in ("keyword", "markexpr", "requirements"))


def utc_iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _status_for(tests: Sequence[TestResult]) -> tuple[str, str]:
    if not tests:
        return "untested", "no test"
    bad = [t for t in tests if t.outcome in ("failed", "error")]
    if bad:
        return "fail", f"{len(bad)} of {len(tests)} test(s) failed"
    skipped = [t for t in tests if t.outcome == "skipped"]
    if skipped:
        return "untested", f"{len(skipped)} of {len(tests)} test(s) skipped: not proven"
    return "pass", f"{len(tests)} test(s) passed"


def build_report(
    results: Sequence[TestResult],
    catalogue: Catalogue,
    waivers: Sequence[Waiver],
    meta: RunMetadata,
    today: dt.date | None = None,
    generated: dt.datetime | None = None,
) -> dict[str, Any]:
    """Assemble the report dictionary (see the module docstring for the rules)."""
    generated = generated or dt.datetime.now(dt.UTC)
    today = today or generated.date()
    waiver_map = {w.id: w for w in waivers}
    known = set(catalogue.ids)
    selected = meta.selection.get("requirements")
    selected_ids = set(selected) if selected else None

    by_req: dict[str, list[TestResult]] = {rid: [] for rid in catalogue.ids}
    unmapped: list[dict[str, Any]] = []
    for res in results:
        unknown = [rid for rid in res.req_ids if rid not in known]
        for rid in res.req_ids:
            if rid in known:
                by_req[rid].append(res)
        if not res.req_ids or unknown:
            if res.req_errors:
                reason = "; ".join(res.req_errors)
            elif unknown:
                reason = f"unknown requirement id(s): {', '.join(unknown)}"
            else:
                reason = "no @pytest.mark.req(...) marker"
            unmapped.append(
                {"id": res.id, "outcome": res.outcome, "req": list(res.req_ids), "reason": reason}
            )

    rows: list[dict[str, Any]] = []
    for req in catalogue:
        tests = by_req[req.id]
        waiver = waiver_map.get(req.id)
        if selected_ids is not None and req.id not in selected_ids:
            status, reason = "not-selected", "outside this run's --requirements selection"
        elif meta.profile == "production" and not tests:
            status, reason = "not-selected", (
                "not checked by the production profile: none of its tests is read-only and "
                "free of lab hosts")
        else:
            status, reason = _status_for(tests)
            if waiver is not None:
                if status in FAILING and waiver.is_active(today):
                    reason = f"{reason}; waived until {waiver.expires.isoformat()}"
                    status = "waived"
                elif status in FAILING:
                    reason = f"{reason}; waiver expired on {waiver.expires.isoformat()}"
                elif waiver.is_active(today):
                    reason = f"{reason}; waiver no longer needed: remove it"
                else:
                    reason = f"{reason}; expired waiver left in the waiver file: remove it"
        rows.append(
            {
                **req.to_dict(),
                "status": status,
                "counts_as_failure": status in FAILING,
                "reason": reason,
                "waiver": waiver.to_dict(today) if waiver else None,
                "tests": [t.to_dict() for t in tests],
            }
        )

    failing = [r["id"] for r in rows if r["counts_as_failure"]]
    problems = list(meta.problems)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES}
    verdict = "pass" if not failing and not unmapped and not problems else "fail"
    return {
        "schema": SCHEMA_ID,
        "verdict": verdict,
        "generated": utc_iso(generated),
        "generator": f"safemail {__version__}",
        "stage": meta.stage,
        "complete": meta.complete,
        "selection": {
            "keyword": meta.selection.get("keyword"),
            "markexpr": meta.selection.get("markexpr"),
            "requirements": list(selected) if selected else None,
        },
        "revision": {"commit": meta.revision, "dirty": meta.dirty},
        "content_hash": meta.content_hash,
        "content_files": dict(sorted(meta.content_files.items())),
        "inventory_hash": meta.inventory_hash,
        "hosts": sorted(meta.hosts),
        "started": meta.started,
        "finished": meta.finished,
        "pytest_exit_code": meta.pytest_exit_code,
        "catalogue": {"path": catalogue.origin, "sha256": catalogue.sha256},
        "summary": {
            "requirements": len(rows),
            "pass": counts["pass"],
            "fail": counts["fail"],
            "waived": counts["waived"],
            "untested": counts["untested"],
            "not_selected": counts["not-selected"],
            "tests": len(results),
            "tests_passed": sum(1 for t in results if t.outcome == "passed"),
            "tests_failed": sum(1 for t in results if t.outcome in ("failed", "error")),
            "tests_skipped": sum(1 for t in results if t.outcome == "skipped"),
            "unmapped_tests": len(unmapped),
        },
        "failing_requirements": failing,
        "problems": problems,
        "requirements": rows,
        "unmapped_tests": unmapped,
        "waivers": [w.to_dict(today) for w in waivers],
        "run": {
            "created_by": meta.created_by,
            "profile": meta.profile,
            "junit_sha256": meta.junit_sha256,
            "host_keys": {h: sorted(f) for h, f in sorted(meta.host_keys.items())},
            "skipped_by_profile": list(meta.skipped_by_profile),
        },
    }


# --------------------------------------------------------------------------- schema

def report_schema() -> dict[str, Any]:
    """The JSON Schema of report.json (``safemail/gate/schemas/report.schema.json``)."""
    return schema.load("report")


def validate_report(data: Any) -> list[str]:
    """Problems with a report.json document; an empty list means it is well formed.

    Beyond the schema it checks consistency: the verdict and failing ids follow from the rows.
    """
    errors = schema.problems("report", data, "report")
    if errors:
        return errors
    failing = [r["id"] for r in data["requirements"] if r["counts_as_failure"]]
    if failing != data["failing_requirements"]:
        errors.append("report: failing_requirements does not match the requirement rows")
    for row in data["requirements"]:
        if row["counts_as_failure"] != (row["status"] in FAILING):
            errors.append(f"report: {row['id']}: counts_as_failure contradicts its status")
    expected = (
        "pass" if not failing and not data["unmapped_tests"] and not data["problems"] else "fail"
    )
    if data["verdict"] != expected:
        errors.append(f"report: verdict {data['verdict']!r} contradicts the rows ({expected!r})")
    return errors


# --------------------------------------------------------------------------- HTML

_ORDER = {s: i for i, s in enumerate(STATUSES)}
TEMPLATE = "report.html.j2"  # in safemail/gate/templates (package data)


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader(__package__, "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained HTML page: verdict first, failing requirements first."""
    rows = sorted(
        report["requirements"], key=lambda q: _ORDER.get(q["status"], len(_ORDER))
    )  # stable: catalogue order within a status
    return _environment().get_template(TEMPLATE).render(r=report, rows=rows)


# --------------------------------------------------------------------------- files


def write_report(report: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path, str]:
    """Write report.json and report.html; return their paths and the JSON's sha256 digest.

    The HTML is rendered first (without its own digest) and its sha256 goes into
    ``run.html_sha256`` of the JSON, so whatever seals or signs report.json covers the page.
    """
    html = render_html(report).encode("utf-8")
    report = dict(report)
    report["run"] = {**report["run"], "html_sha256": hashlib.sha256(html).hexdigest()}
    problems = validate_report(report)
    if problems:
        raise ReportError(
            "refusing to write a malformed report:\n  " + "\n  ".join(problems),
            "this is a bug in safemail.gate.report",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    json_path = out_dir / "report.json"
    html_path = out_dir / "report.html"
    json_path.write_bytes(data)
    html_path.write_bytes(html)
    return json_path, html_path, hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_report(path: Path) -> dict[str, Any]:
    """Read and validate a report.json; raise ReportError naming every problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(
            f"report not found: {path}", "run `safemail verify --stage test` first"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"cannot read report {path}: {exc}") from exc
    problems = validate_report(data)
    if problems:
        raise ReportError(
            f"{path} is not a valid SafeMail report:\n  " + "\n  ".join(problems[:20]),
            "produce a fresh one with `safemail verify --stage test`",
        )
    return data
