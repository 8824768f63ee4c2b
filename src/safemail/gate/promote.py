"""The promotion gate: may this checkout go to production? And the release record.

:func:`decide` is pure: given the latest test-stage report (or None), the current state of
the checkout and the :class:`Evidence` gathered around the report (the stage as the
controller knows it, the report's seal, its JUnit file, the approvers' signatures, the
waivers) it returns a :class:`Decision` with every reason to refuse. :func:`evaluate` gathers
all that from git, the file system, the stage inventory and ssh-keygen.
:func:`tag_release` writes the durable record (an annotated git tag);
:func:`append_release_log` the local JSON-lines log.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safemail import vault
from safemail.errors import SafeMailError
from safemail.gate import approvals, hashing, release_chain, stage
from safemail.gate.catalogue import load_catalogue
from safemail.gate.report import (
    CREATED_BY_VERIFY,
    ReportError,
    file_digest,
    load_report,
    parse_iso,
    utc_iso,
)
from safemail.gate.waivers import DEFAULT_WAIVERS, load_waivers
from safemail.project import Project

DEFAULT_REPORT = Path("reports/test/latest/report.json")
DEFAULT_RELEASE_LOG = Path("reports/releases.jsonl")
DEFAULT_MAX_AGE_HOURS = 24.0
MAX_MAX_AGE_HOURS = 168.0  # --max-age-hours may not exceed one week (docs/change-manager.md)
TESTED_STAGE = "test"
MAX_NAMED_FILES = 15
APPROVALS_DIR = "approvals"
JUNIT_NAME = "junit.xml"
HTML_NAME = "report.html"
TAG_PREFIX = release_chain.TAG_PREFIX


@dataclass
class Decision:
    allowed: bool
    reasons: list[str] = field(default_factory=list)
    report_path: str | None = None
    report_digest: str | None = None
    revision: str | None = None
    approvers: list[approvals.Signer] = field(default_factory=list)
    operator: str | None = None
    policy_source: str = ""  # which approval policy counted (release_chain.Base.source)

    def summary(self) -> str:
        if self.allowed:
            who = ", ".join(f"{s.principal} ({s.role})" for s in self.approvers)
            return (
                f"promotion allowed: report {self.report_path} covers revision {self.revision}; "
                f"approved by {who}; approval policy: {self.policy_source}"
            )
        return "promotion refused:\n  - " + "\n  - ".join(self.reasons)


@dataclass
class Evidence:
    """What the gate checked around the report, beyond the report's own content."""

    stage: stage.StageIdentity
    junit_digest: str | None = None  # sha256 of the run's junit.xml as it is now; None: missing
    html_digest: str | None = None  # sha256 of the run's report.html as it is now; None: missing
    seal_problem: str | None = None
    approval: approvals.Approval | None = None
    approval_problem: str | None = None  # the approval policy itself is unusable
    policy: approvals.Policy | None = None  # the policy that counted
    policy_source: str = ""
    waiver_problem: str | None = None
    # The report's catalogue against the checkout's verify/requirements.yml (fail closed).
    catalogue_problem: str | None = "the report's requirement catalogue was not checked"


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
    evidence: Evidence,
    report_problem: str | None = None,
) -> Decision:
    """Every reason the report does not cover the current checkout; allowed if there is none."""
    if report is None:
        reason = report_problem or "no verification report of the test stage was found"
        return Decision(False, [reason], revision=state.revision)
    reasons: list[str] = _run_reasons(report, evidence)
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
    reasons.extend(_approval_reasons(evidence))
    decision = Decision(not reasons, reasons, revision=state.revision)
    if evidence.approval is not None:
        decision.approvers = list(evidence.approval.signers)
    return decision


def _run_reasons(report: Mapping[str, Any], ev: Evidence) -> list[str]:
    """Is the report the evidence of a real, full run on the stage as it is now?"""
    reasons: list[str] = []
    run = report.get("run", {})
    if run.get("created_by") != CREATED_BY_VERIFY:
        reasons.append(
            f"the report was made by `{run.get('created_by')}`, not by a `safemail verify` run: "
            "re-rendered or hand-made reports cannot release"
        )
    if run.get("profile") != "full":
        reasons.append(
            f"the report is from the {run.get('profile')} profile (a read-only check, not a "
            "proof): it can never release"
        )
    recorded = run.get("junit_sha256")
    if not recorded:
        reasons.append("the report records no digest of its JUnit XML")
    elif ev.junit_digest is None:
        reasons.append(f"the run's {JUNIT_NAME} is missing beside the report")
    elif ev.junit_digest != recorded:
        reasons.append(
            f"{JUNIT_NAME} does not match the digest the report recorded "
            "(the JUnit file was replaced or edited after the run)"
        )
    html = html_problem(report, ev.html_digest)
    if html:
        reasons.append(html)
    if ev.seal_problem:
        reasons.append(ev.seal_problem)
    if ev.catalogue_problem:
        reasons.append(ev.catalogue_problem)
    reasons.extend(ev.stage.problems)
    if ev.stage.inventory_hash and report.get("inventory_hash") != ev.stage.inventory_hash:
        reasons.append(
            f"the report's inventory hash differs from the {TESTED_STAGE} stage's now (the "
            "stage was rebuilt, or its inventory changed, since the run)"
        )
    reached = set(report.get("hosts", []))
    if ev.stage.hosts:
        foreign = sorted(reached - set(ev.stage.hosts))
        if foreign:
            reasons.append(
                f"the report names hosts that are not in the {TESTED_STAGE} stage: "
                f"{', '.join(foreign)}"
            )
    missing = sorted(set(ev.stage.service_hosts) - reached)
    if missing:
        reasons.append(
            f"the run did not reach these service hosts of the {TESTED_STAGE} stage: "
            f"{', '.join(missing)}"
        )
    seen_keys: Mapping[str, list[str]] = run.get("host_keys", {})
    if ev.stage.host_keys:
        for host in sorted(reached & set(ev.stage.hosts)):
            seen = set(seen_keys.get(host, []))
            known = set(ev.stage.host_keys.get(host, frozenset()))
            if not seen:
                reasons.append(f"the run recorded no SSH host key for {host}")
            elif not known:
                reasons.append(f"the stage's known_hosts has no key for {host}")
            elif not known <= seen:
                reasons.append(
                    f"the SSH host key of {host} differs: the run saw {', '.join(sorted(seen))}, "
                    f"the stage's known_hosts has {', '.join(sorted(known))} (the host was "
                    "re-created, or the report is not from this stage)"
                )
    return reasons


def html_problem(report: Mapping[str, Any], html_digest: str | None) -> str | None:
    """Why the run's report.html (sha256 ``html_digest``, None: missing) is not the page the
    sealed report recorded (None if it is)."""
    recorded = report.get("run", {}).get("html_sha256")
    if not recorded:
        return (
            f"the report records no digest of its {HTML_NAME} (made by an older safemail "
            "verify): the page the approvers read is not covered by the seal; verify again"
        )
    if html_digest is None:
        return f"the run's {HTML_NAME} is missing beside the report"
    if html_digest != recorded:
        return (
            f"{HTML_NAME} does not match the digest the sealed report recorded (the page the "
            "approvers read was edited or replaced after the run)"
        )
    return None


def _approval_reasons(ev: Evidence) -> list[str]:
    reasons: list[str] = []
    if ev.approval_problem:
        reasons.append(f"approvals cannot be checked: {ev.approval_problem}")
    elif ev.approval is None:
        reasons.append("the release approvals were not checked")
    else:
        reasons.extend(f"approval: {p}" for p in ev.approval.problems)
    if ev.waiver_problem:
        reasons.append(f"waivers: {ev.waiver_problem}")
    return reasons


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
    first_release: bool = False,
    vault_env: Mapping[str, str] | None = None,
) -> Decision:
    """Read the report and the checkout, then decide.

    The approval policy that counts is the newest release tag's (:mod:`release_chain`);
    ``first_release`` allows the released revision's own policy when there is no release tag
    yet, and only then. ``vault_env``: the vault password source the command was given
    (ANSIBLE_VAULT_* settings), for opening the production vault."""
    now = now or dt.datetime.now(dt.UTC)
    state = current_state(repo, TESTED_STAGE)
    report: dict[str, Any] | None = None
    evidence = Evidence(stage.StageIdentity(TESTED_STAGE, "", (), ()))
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
    digest = file_digest(report_path) if report is not None else None
    if report is not None and digest is not None:
        evidence = gather_evidence(repo, report_path, report, digest, now.date(),
                                   first_release=first_release)
    decision = decide(
        report,
        state,
        now=now,
        max_age=dt.timedelta(hours=max_age_hours),
        evidence=evidence,
        report_problem=problem,
    )
    # The target: a production vault that opens with the published example password is the
    # project's example, not a site's secrets.
    vault_problem = vault.example_password_problem(Project(repo).inventory("production"),
                                                   vault_env)
    if vault_problem:
        decision.reasons.append(vault_problem)
        decision.allowed = False
    decision.report_path = str(report_path)
    decision.report_digest = digest
    decision.policy_source = evidence.policy_source
    if decision.allowed and evidence.policy is not None:
        decision.operator = next(
            (s.principal for s in decision.approvers
             if s.role == evidence.policy.releasing_role), None
        )
    return decision


def counting_policy(repo: Path) -> approvals.Policy:
    """The policy approvers sign for now (``safemail approval``): see release_chain."""
    return release_chain.counting_policy(repo)


def approval_policy(repo: Path, first_release: bool) -> tuple[approvals.Policy, str]:
    """The policy that approves this release and where it comes from; SafeMailError if none
    may (docs/change-manager.md, "Which approval policy counts")."""
    policy, source, _base = _approval_base(repo, first_release)
    return policy, source


def _approval_base(
    repo: Path, first_release: bool
) -> tuple[approvals.Policy, str, release_chain.Base]:
    base = release_chain.base_policy(repo)
    if base.problem:
        raise SafeMailError(base.problem)
    if base.policy is not None:
        if first_release:
            raise SafeMailError(
                f"--first-release, but there are earlier releases (newest {base.source}): the "
                "newest release's approval policy counts"
            )
        return base.policy, f"release/ of {base.source}", base
    if not first_release:
        raise SafeMailError(
            f"there is no release tag ({TAG_PREFIX}*) whose approval policy could approve "
            "this release: fetch the tags of the shared repository (git fetch --tags); only "
            "for the very first release, pass --first-release (docs/change-manager.md, "
            "'Which approval policy counts')"
        )
    return approvals.load_policy(repo), release_chain.FIRST_RELEASE, base


def gather_evidence(
    repo: Path, report_path: Path, report: Mapping[str, Any], digest: str, today: dt.date,
    *, first_release: bool = False,
) -> Evidence:
    """Read the stage, the seal, the JUnit file, the signatures and the waivers."""
    identity = stage.read_stage(repo, TESTED_STAGE)
    junit = report_path.parent / JUNIT_NAME
    html = report_path.parent / HTML_NAME
    ev = Evidence(
        stage=identity,
        junit_digest=file_digest(junit) if junit.is_file() else None,
        html_digest=file_digest(html) if html.is_file() else None,
        seal_problem=stage.seal_problem(report_path, identity),
        catalogue_problem=catalogue_problem(repo, report),
    )
    try:
        policy, ev.policy_source, base = _approval_base(repo, first_release)
    except SafeMailError as exc:
        ev.approval_problem = exc.message
        return ev
    message = approvals.release_message(report, digest)
    revision = str(report.get("revision", {}).get("commit"))
    # This release will be the chain's next tag: it must follow the newest one (else its tag
    # would break the chain for every later release), and the first one must be pinned.
    chain_problem = release_chain.pin_problem(repo, base, revision)
    if base.newest is not None and not chain_problem:
        chain_problem = release_chain.follows(
            repo, base.newest, release_chain.Link("this release", revision, message))
    if chain_problem:
        ev.approval_problem = chain_problem
        return ev
    ev.policy = policy
    ev.approval = approvals.check(
        policy,
        approvals.read_signature_dir(report_path.parent / APPROVALS_DIR),
        message,
        approvals.RELEASE_NAMESPACE,
        policy.release_roles,
    )
    ev.waiver_problem = _waiver_problem(repo, report, policy, today)
    return ev


def catalogue_problem(repo: Path, report: Mapping[str, Any]) -> str | None:
    """The report must be judged against the checkout's own catalogue: same file (sha256) and
    exactly its requirement ids (a run with a smaller catalogue leaves requirements out)."""
    path = repo / "verify" / "requirements.yml"
    try:
        catalogue = load_catalogue(path)
    except SafeMailError as exc:
        return f"the checkout's requirement catalogue cannot be read: {exc.message}"
    recorded = report.get("catalogue") or {}
    if not isinstance(recorded, Mapping) or recorded.get("sha256") != catalogue.sha256:
        return (
            "the report was judged against another requirement catalogue than the checkout's "
            "verify/requirements.yml (sha256 differs)"
        )
    ids = [str(r.get("id")) for r in report.get("requirements", []) if isinstance(r, Mapping)]
    if sorted(ids) != sorted(catalogue.ids):
        missing = sorted(set(catalogue.ids) - set(ids))
        extra = sorted(set(ids) - set(catalogue.ids))
        detail = "; ".join(
            part for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"not in the catalogue {', '.join(extra)}" if extra else "",
                "duplicated ids" if not missing and not extra else "",
            ) if part
        )
        return f"the report's requirements are not the catalogue's ({detail})"
    return None


def _waiver_problem(
    repo: Path, report: Mapping[str, Any], policy: approvals.Policy, today: dt.date
) -> str | None:
    """Each waived requirement of the report needs a valid, signed, active waiver now."""
    waived = [r["id"] for r in report.get("requirements", []) if r.get("status") == "waived"]
    try:
        catalogue = load_catalogue(repo / "verify" / "requirements.yml")
        valid = load_waivers(
            repo / DEFAULT_WAIVERS,
            known_ids=catalogue.ids,
            never_waivable=catalogue.never_waivable,
            policy=policy,
        )
    except SafeMailError as exc:
        return exc.message
    active = {w.id for w in valid if w.is_active(today)}
    unbacked = [rid for rid in waived if rid not in active]
    if unbacked:
        return (
            "the report waives requirements that no signed, active waiver of this checkout "
            f"covers: {', '.join(unbacked)}"
        )
    return None


def _tag_exists(repo: Path, name: str) -> bool:
    probe = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "-q", "--verify", f"refs/tags/{name}"],
        capture_output=True, check=False,
    )
    return probe.returncode == 0


def default_operator() -> str:
    """Who runs a command (patch runs, billing): the sudo caller if any, else the login user.

    Not used for releases: a release's operator is the releasing approver, from the signature.
    """
    for var in ("SUDO_USER", "USER", "LOGNAME"):
        value = os.environ.get(var)
        if value:
            return value
    return getpass.getuser()


def tag_release(
    repo: Path, decision: Decision, report: Mapping[str, Any], when: dt.datetime
) -> str:
    """Create the annotated tag ``release/production/<UTC time>`` on the released revision.

    Its message names the revision, the report digest, the approvers (role, principal, key)
    and the time, and carries the approvers' signatures, so the tag alone lets anyone check
    the release again (docs/change-manager.md, "The release record").
    """
    if not decision.allowed or not decision.revision or not decision.report_digest:
        raise SafeMailError("refusing to tag a release the gate did not allow")
    stamp = when.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{TAG_PREFIX}{stamp}"
    n = 1
    while _tag_exists(repo, name):  # a second release within the same second
        n += 1
        name = f"{TAG_PREFIX}{stamp}-{n}"
    lines = [
        f"SafeMail release to production {stamp}",
        "",
        f"revision: {decision.revision}",
        f"report-sha256: {decision.report_digest}",
        f"report: {decision.report_path}",
        f"tested-on: {report.get('stage')} ({report.get('started')} to {report.get('finished')})",
        f"inventory-hash: {report.get('inventory_hash')}",
        f"operator: {decision.operator}",
        f"time: {utc_iso(when)}",
        f"approval-policy: {decision.policy_source}",
    ]
    lines += [f"approved-by: {s.role}: {s.principal} {s.key_fingerprint}"
              for s in decision.approvers]
    lines += ["", "The approvers signed (ssh-keygen -Y sign -n safemail-release):", ""]
    lines += approvals.release_message(report, decision.report_digest).decode().splitlines()
    for signer in decision.approvers:
        lines += ["", f"signature of {signer.principal} ({signer.role}):",
                  *signer.signature.strip().splitlines()]
    message = "\n".join(lines) + "\n"
    ident: list[str] = []
    for key, fallback in (("user.name", "safemail promote"),
                          ("user.email", "promote@safemail.invalid")):
        probe = subprocess.run(["git", "-C", str(repo), "config", key], capture_output=True,
                               text=True, check=False)
        if not probe.stdout.strip():
            ident += ["-c", f"{key}={fallback}"]
    proc = subprocess.run(
        ["git", *ident, "-C", str(repo), "tag", "-a", name, decision.revision, "-F", "-"],
        input=message, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SafeMailError(
            f"cannot create the release tag {name}: {proc.stderr.strip()}",
            "nothing was deployed; fix the cause and run promote again",
        )
    return name


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
