"""The promotion gate: may this checkout go to production? And the release log.

:func:`decide` is pure: given the latest test-stage report (or None) and the current state of
the checkout it returns a :class:`Decision` with every reason to refuse. :func:`evaluate`
gathers that state from git and the file system. :func:`append_release_log` records a release
as one JSON line.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safemail.gate import hashing
from safemail.gate.report import ReportError, file_digest, load_report, parse_iso, utc_iso

DEFAULT_REPORT = Path("reports/test/latest/report.json")
DEFAULT_RELEASE_LOG = Path("reports/releases.jsonl")
DEFAULT_MAX_AGE_HOURS = 24.0
TESTED_STAGE = "test"
MAX_NAMED_FILES = 15


@dataclass
class Decision:
    allowed: bool
    reasons: list[str] = field(default_factory=list)
    report_path: str | None = None
    report_digest: str | None = None
    revision: str | None = None

    def summary(self) -> str:
        if self.allowed:
            return f"promotion allowed: report {self.report_path} covers revision {self.revision}"
        return "promotion refused:\n  - " + "\n  - ".join(self.reasons)


@dataclass(frozen=True)
class CheckoutState:
    revision: str
    dirty: bool
    content_hash: str
    content_files: Mapping[str, str]
    dirty_files: tuple[str, ...] = ()


def _name_files(paths: list[str]) -> str:
    shown = ", ".join(paths[:MAX_NAMED_FILES])
    more = len(paths) - MAX_NAMED_FILES
    return shown + (f" and {more} more" if more > 0 else "")


def decide(
    report: Mapping[str, Any] | None,
    state: CheckoutState,
    *,
    now: dt.datetime,
    max_age: dt.timedelta,
    report_problem: str | None = None,
) -> Decision:
    """Every reason the report does not cover the current checkout; allowed if there is none."""
    if report is None:
        reason = report_problem or "no verification report of the test stage was found"
        return Decision(False, [reason], revision=state.revision)
    reasons: list[str] = []
    if report.get("stage") != TESTED_STAGE:
        reasons.append(
            f"the report is from stage {report.get('stage')!r}, not from the {TESTED_STAGE} stage"
        )
    if report.get("verdict") != "pass":
        failing = list(report.get("failing_requirements", []))
        parts = []
        if failing:
            parts.append(f"failing requirements: {', '.join(failing)}")
        unmapped = report.get("unmapped_tests", [])
        if unmapped:
            parts.append(f"{len(unmapped)} test(s) without a known requirement id")
        parts.extend(report.get("problems", []))
        reasons.append("the verification failed (" + "; ".join(parts or ["no detail"]) + ")")
    lapsed = [
        f"{row['id']} (expired {row['waiver']['expires']})"
        for row in report.get("requirements", [])
        if row.get("status") == "waived"
        and row.get("waiver")
        and dt.date.fromisoformat(row["waiver"]["expires"]) < now.date()
    ]
    if lapsed:
        reasons.append(f"the report relies on waivers that have expired since: {', '.join(lapsed)}")
    if not report.get("complete", False):
        reasons.append("the report covers a partial run (-k/-m/--requirements); run the full suite")
    tested = report.get("revision", {})
    if tested.get("dirty"):
        reasons.append("the report was made from a checkout with uncommitted changes")
    if tested.get("commit") != state.revision:
        reasons.append(
            f"the report is for revision {str(tested.get('commit'))[:12]}, "
            f"the checkout is at {state.revision[:12]}: verify this revision on the test stage"
        )
    if state.dirty:
        detail = f": {_name_files(list(state.dirty_files))}" if state.dirty_files else ""
        reasons.append(f"the working tree has uncommitted changes{detail}")
    if report.get("content_hash") != state.content_hash:
        diff = hashing.diff_files(report.get("content_files", {}), state.content_files)
        parts = [f"{kind} {_name_files(paths)}" for kind, paths in diff.items() if paths]
        reasons.append(
            "the deployable content differs from what was tested"
            + (f" ({'; '.join(parts)})" if parts else "")
        )
    try:
        finished = parse_iso(str(report.get("finished")))
    except ValueError:
        reasons.append(f"the report's finish time {report.get('finished')!r} is unreadable")
    else:
        age = now - finished
        if age > max_age:
            hours = age.total_seconds() / 3600
            reasons.append(
                f"the report is {hours:.1f} h old (finished {utc_iso(finished)}), "
                f"older than the allowed {max_age.total_seconds() / 3600:g} h"
            )
        elif age < -dt.timedelta(minutes=5):
            reasons.append(f"the report's finish time {utc_iso(finished)} lies in the future")
    return Decision(not reasons, reasons, revision=state.revision)


def current_state(repo: Path, stage: str = TESTED_STAGE) -> CheckoutState:
    content = hashing.content_hash(repo, stage)
    dirty_files = tuple(hashing.git_dirty_files(repo))
    return CheckoutState(
        revision=hashing.git_revision(repo),
        dirty=bool(dirty_files),
        content_hash=content.digest,
        content_files=content.files,
        dirty_files=dirty_files,
    )


def evaluate(
    repo: Path,
    report_path: Path,
    *,
    max_age_hours: float = DEFAULT_MAX_AGE_HOURS,
    now: dt.datetime | None = None,
) -> Decision:
    """Read the report and the checkout, then decide."""
    now = now or dt.datetime.now(dt.UTC)
    state = current_state(repo, TESTED_STAGE)
    report: dict[str, Any] | None = None
    problem: str | None = None
    if not report_path.exists():
        problem = (
            f"no verification report at {report_path}: run `safemail verify --stage test` first"
        )
    else:
        try:
            report = load_report(report_path)
        except ReportError as exc:
            problem = exc.message
    decision = decide(
        report,
        state,
        now=now,
        max_age=dt.timedelta(hours=max_age_hours),
        report_problem=problem,
    )
    decision.report_path = str(report_path)
    if report is not None:
        decision.report_digest = file_digest(report_path)
    return decision


def default_operator() -> str:
    """Who is releasing: the sudo caller if any, else the login user."""
    for var in ("SUDO_USER", "USER", "LOGNAME"):
        value = os.environ.get(var)
        if value:
            return value
    return getpass.getuser()


def append_release_log(
    log_path: Path,
    *,
    operator: str,
    revision: str,
    report_digest: str,
    stage: str,
    report_path: str,
    content_hash: str | None = None,
    event: str = "release",
    extra: Mapping[str, Any] | None = None,
    when: dt.datetime | None = None,
) -> dict[str, Any]:
    """Append one JSON line to the release log and return it."""
    entry: dict[str, Any] = {
        "event": event,
        "when": utc_iso(when or dt.datetime.now(dt.UTC)),
        "who": operator,
        "stage": stage,
        "revision": revision,
        "report_sha256": report_digest,
        "report": report_path,
    }
    if content_hash:
        entry["content_hash"] = content_hash
    if extra:
        entry.update(extra)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return entry
