"""Subcommands for verification reports, the promotion gate and generated documentation.

safemail verify  --stage test              run the verify suite, write a sealed report directory
safemail verify  --stage production        the read-only production profile (never releases)
safemail verify  --mutate                  apply known-bad changes, expect verify to fail
safemail report  JUNIT [JUNIT ...]         re-render a run's report.json/html (cannot release)
safemail approval request [--waiver ID]    print exactly what an approver signs, and how
safemail approval status                   which approver roles the signatures fill
safemail promote --to production           check the gate, tag the release, deploy
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import sys
from pathlib import Path

from safemail.errors import SafeMailError, UsageError
from safemail.gate import approvals, promote, release, stage
from safemail.gate.catalogue import load_catalogue, relative_to
from safemail.gate.report import (
    CREATED_BY_REPORT,
    RunMetadata,
    build_report,
    load_report,
    parse_junit,
    write_report,
)
from safemail.gate.verify_run import VerifyOptions, policy_for_waivers, run_verify
from safemail.gate.waivers import DEFAULT_WAIVERS, load_waivers
from safemail.project import STAGES, Project


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "verify",
        help="run the verification suite against a stage and write a report",
        description=(
            "Run the testinfra suite (verify/) against every host of the stage's inventory, in\n"
            "parallel, and write junit.xml, verify.log, report.json and report.html into the\n"
            "report directory. Exit code 0 only if every requirement passes (or is waived).\n\n"
            "--stage test runs every test and seals the report with the stage's SSH key\n"
            "(report.json.sig): only such a report can release. --stage production runs the\n"
            "production profile: only tests marked read_only that need no lab host; it lists\n"
            "the tests it left out and why, and its report can never release."
        ),
        formatter_class=fmt,
    )
    p.add_argument("--stage", choices=STAGES, default="test", help="stage to verify")
    p.add_argument(
        "--report-dir",
        type=Path,
        help="where to write the report (default: reports/<stage>/<UTC timestamp>, "
        "with reports/<stage>/latest pointing at it)",
    )
    p.add_argument(
        "--profile",
        choices=("full", "production"),
        default=None,
        help="full: every test (test stage only); production: only read-only tests that need "
        "no lab host, the report never releases (default: full on test, production elsewhere)",
    )
    p.add_argument("--workers", type=_workers, default=4, help="parallel pytest workers")
    p.add_argument(
        "--vault-id", action="append", default=[], metavar="ID",
        help="Ansible vault id for the inventory's secrets (repeatable)",
    )
    p.add_argument(
        "--vault-password-file", metavar="FILE", help="Ansible vault password file"
    )
    p.add_argument("-k", dest="keyword", help="pytest -k expression (makes the run partial)")
    p.add_argument("-m", dest="markexpr", help="pytest -m expression (makes the run partial)")
    p.add_argument(
        "--requirements",
        type=_id_list,
        default=(),
        metavar="IDS",
        help="comma-separated requirement ids: run only their tests (partial run); "
        "'built' means every id the catalogue does not mark `built: false`",
    )
    p.add_argument("--catalogue", type=Path, help="requirement catalogue (default: verify/)")
    m = p.add_argument_group(
        "mutation run (proof that verify can fail; test stage only)",
        "--mutate applies each known-bad change of verify/mutations.yml to the test stage in\n"
        "turn, runs only the tests of its requirements (expecting failure), always restores,\n"
        "and prints the mutation score. Exit code 0 only if every mutation was caught.",
    )
    m.add_argument("--mutate", action="store_true", help="run the mutation catalogue")
    m.add_argument(
        "--mutations",
        type=_mutation_list,
        default=(),
        metavar="IDS",
        help="comma-separated mutation ids: run only these (default: all)",
    )
    m.add_argument("--list", action="store_true", help="with --mutate: list mutations, run none")
    m.add_argument(
        "--check-restore",
        action="store_true",
        help="after each restore run the same tests again; they must pass",
    )
    m.add_argument(
        "--baseline",
        action="store_true",
        help="before each mutation run its tests once; they must pass, else it is not applied",
    )
    m.add_argument(
        "--mutation-catalogue",
        type=Path,
        help="mutation catalogue (default: verify/mutations.yml)",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "report",
        help="re-render a run's report.json and report.html from its JUnit XML",
        description=(
            "Re-render the report of a verify run from its JUnit XML (e.g. after a change to\n"
            "the report layout). The run's metadata (revision, hashes, hosts, host keys,\n"
            "times) comes from the run's report.json (in --out, else beside the JUnit XML),\n"
            "which must exist: a report is never stamped with the current checkout's\n"
            "revision. A sealed report is never overwritten: use --out DIR. The result says\n"
            "'re-rendered by safemail report' and cannot release."
        ),
        formatter_class=fmt,
    )
    p.add_argument("junit", nargs="+", type=Path, help="JUnit XML file(s) from the verify run")
    p.add_argument("--out", type=Path, help="output directory (default: that of the first file)")
    p.add_argument("--stage", choices=STAGES, default="test")
    p.add_argument("--catalogue", type=Path, help="requirement catalogue (default: verify/)")
    p.add_argument("--waivers", type=Path, help="waiver file (default: verify/waivers.yml)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "promote",
        help="release the tested revision to production through the gate",
        description=(
            "Refuse unless the latest test-stage report is a sealed, passing, full run of\n"
            "this very revision and content on the stage as it is now (hosts, host keys,\n"
            "inventory), the tree is clean, the report is recent and the approver roles\n"
            "signed its digest (safemail approval request). When allowed (and neither\n"
            "--dry-run nor --preview): tag the release (release/production/<time>), record it\n"
            "in the release log, then run ansible-playbook -i inventories/production\n"
            "playbooks/site.yml. The operator is the releasing approver, from the signature.\n"
            "Exit codes: 0 released (or dry run allowed), 3 refused, 1 deploy failed,\n"
            "2 bad arguments; --preview: ansible-playbook's exit code."
        ),
        formatter_class=fmt,
    )
    p.add_argument("--to", choices=("production",), required=True, help="target stage")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="decide and explain, change nothing")
    mode.add_argument(
        "--preview",
        action="store_true",
        help="show the gate's decision, then run the production playbook with --check --diff "
        "(changes nothing, records nothing; also before the approvals are in)",
    )
    p.add_argument("--limit", help="passed to ansible-playbook --limit")
    p.add_argument(
        "--vault-id", action="append", default=[], metavar="ID", help="passed to ansible-playbook"
    )
    p.add_argument("--vault-password-file", metavar="FILE", help="passed to ansible-playbook")
    p.add_argument(
        "--ask-vault-pass", action="store_true", help="passed to ansible-playbook (prompts)"
    )
    p.add_argument(
        "--first-release",
        action="store_true",
        help="the very first release (no release tag yet): the released revision's own\n"
        "release/ approves it, and after the deployment it writes the pin\n"
        "release/first-release.yml (commit it). Refused once any release tag exists or\n"
        "any commit has the pin; otherwise the newest release tag's release/ counts\n"
        "(docs/change-manager.md)",
    )
    p.add_argument(
        "--max-age-hours",
        type=_max_age_hours,
        default=promote.DEFAULT_MAX_AGE_HOURS,
        help="oldest acceptable report age, more than 0 and at most "
        f"{promote.MAX_MAX_AGE_HOURS:g} hours (default: %(default)s)",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=promote.DEFAULT_REPORT,
        help="test-stage report (default: %(default)s)",
    )
    p.add_argument(
        "--release-log",
        type=Path,
        default=promote.DEFAULT_RELEASE_LOG,
        help="JSON-lines release log (default: %(default)s)",
    )
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "approval",
        help="what approvers sign for a release or a waiver, and which roles are filled",
        description=(
            "Approvers sign with their own SSH keys (ssh-keygen -Y sign), listed in\n"
            "release/allowed_signers; release/approvers.yml says which roles must sign.\n\n"
            "  safemail approval request                  the release text for the latest report\n"
            "                                             (refused, exit 3, unless its seal and\n"
            "                                             report.html check out; as root)\n"
            "  safemail approval request --waiver AV-02 --expires 2027-03-01 \\\n"
            "      --justification '...'                  the text of a waiver\n"
            "  safemail approval status                   which roles the signatures fill"
        ),
        formatter_class=fmt,
    )
    p.add_argument("action", choices=("request", "status"))
    p.add_argument(
        "--report",
        type=Path,
        default=promote.DEFAULT_REPORT,
        help="the test-stage report to approve (default: %(default)s)",
    )
    p.add_argument("--waiver", metavar="ID", help="request: a waiver for this requirement id")
    p.add_argument("--justification", help="request --waiver: why, and what replaces it")
    p.add_argument("--expires", type=_date, help="request --waiver: last day it holds")
    p.add_argument(
        "--granted", type=_date, help="request --waiver: first day it holds (default: today)"
    )
    p.add_argument(
        "--out",
        type=Path,
        help="request: also write the text to sign here (release default: "
        "<report dir>/approvals/request.txt; --waiver: reports/waiver-requests/ID.txt)",
    )
    p.set_defaults(func=cmd_approval)


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no parallelism) or more")
    return value


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text}") from None


def _id_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip().upper() for part in text.split(",") if part.strip())


def _expand_built(ids: tuple[str, ...], catalogue_path: Path) -> tuple[str, ...]:
    """``--requirements built`` (alone or with other ids): the catalogue's built ids."""
    if "BUILT" not in ids:
        return ids
    built = load_catalogue(catalogue_path).built
    return tuple(dict.fromkeys([i for i in ids if i != "BUILT"] + list(built)))


def _mutation_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in text.split(",") if part.strip())


def _repo() -> Path:
    return Project.find().root


def _rel(repo: Path, path: Path) -> Path:
    return path if path.is_absolute() else repo / path


def _max_age_hours(text: str) -> float:
    """--max-age-hours: a finite number of hours, > 0 and at most promote.MAX_MAX_AGE_HOURS."""
    try:
        hours = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours") from None
    if not math.isfinite(hours) or not 0 < hours <= promote.MAX_MAX_AGE_HOURS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a number of hours above 0 and at most "
            f"{promote.MAX_MAX_AGE_HOURS:g} (one week)"
        )
    return hours


def cmd_verify(args: argparse.Namespace) -> int:
    repo = _repo()
    mutation_flags = [
        flag
        for flag, used in (
            ("--mutations", bool(args.mutations)),
            ("--list", args.list),
            ("--check-restore", args.check_restore),
            ("--baseline", args.baseline),
            ("--mutation-catalogue", args.mutation_catalogue is not None),
        )
        if used
    ]
    if args.mutate:
        return cmd_mutate(args, repo)
    if mutation_flags:
        raise UsageError(f"{', '.join(mutation_flags)} only go with --mutate")
    opts = VerifyOptions(
        stage=args.stage,
        profile=args.profile,
        vault_ids=tuple(args.vault_id),
        vault_password_file=args.vault_password_file,
        workers=args.workers,
        keyword=args.keyword,
        markexpr=args.markexpr,
        requirements=_expand_built(args.requirements, _rel(repo, args.catalogue)
                                   if args.catalogue else repo / "verify" / "requirements.yml"),
        catalogue=_rel(repo, args.catalogue) if args.catalogue else None,
    )
    report_dir = _rel(repo, args.report_dir) if args.report_dir else None
    return run_verify(repo, opts, report_dir).exit_code


def cmd_mutate(args: argparse.Namespace, repo: Path) -> int:
    from safemail.gate import mutate

    partial = [
        flag
        for flag, used in (
            ("-k", args.keyword),
            ("-m", args.markexpr),
            ("--requirements", args.requirements),
        )
        if used
    ]
    if partial:
        raise UsageError(
            f"--mutate chooses the tests per mutation; drop {', '.join(partial)}",
            "select mutations with --mutations ID,ID",
        )
    catalogue = relative_to(
        load_catalogue(
            _rel(repo, args.catalogue) if args.catalogue else repo / "verify" / "requirements.yml"
        ),
        repo,
    )
    path = _rel(repo, args.mutation_catalogue or mutate.DEFAULT_CATALOGUE)
    chosen = mutate.select(mutate.load_mutations(path, catalogue), args.mutations)
    tested = mutate.tested_requirements(repo / "verify")
    if args.list:
        print(mutate.format_list(chosen, tested))
        return 0
    if args.stage != "test":
        raise UsageError(
            "--mutate changes the stage it runs against: only --stage test is allowed"
        )
    root = _rel(repo, args.report_dir) if args.report_dir else mutate.default_report_root(repo)
    opts = mutate.MutateOptions(
        stage=args.stage,
        workers=args.workers,
        check_restore=args.check_restore,
        baseline=args.baseline,
    )
    print(f"safemail verify --mutate: {len(chosen)} mutation(s), reports in {root}", flush=True)
    run = mutate.run_mutations(repo, chosen, opts, root, tested=tested)
    print(mutate.format_summary(run))
    print(f"details: {root / 'mutate.json'}")
    if run.interrupted:
        return 130
    return 0 if run.all_caught else 1


def cmd_report(args: argparse.Namespace) -> int:
    repo = _repo()
    out = args.out or args.junit[0].parent
    catalogue = relative_to(
        load_catalogue(
            _rel(repo, args.catalogue) if args.catalogue else repo / "verify" / "requirements.yml"
        ),
        repo,
    )
    waiver_file = _rel(repo, args.waivers) if args.waivers else repo / DEFAULT_WAIVERS
    waivers = load_waivers(
        waiver_file,
        known_ids=catalogue.ids,
        never_waivable=catalogue.never_waivable,
        policy=policy_for_waivers(repo, waiver_file),
    )
    run_dir = args.junit[0].parent
    meta = _existing_metadata(out / "report.json") or _existing_metadata(run_dir / "report.json")
    if meta is None:
        raise UsageError(
            f"no report.json of a verify run in {' or '.join(sorted({str(out), str(run_dir)}))}: "
            "`safemail report` only "
            "re-renders a run's report, it never stamps JUnit XML with the checkout's revision",
            "run `safemail verify --stage test`",
        )
    if stage.seal_path(out / "report.json").exists():
        raise UsageError(
            f"{out / 'report.json'} is the sealed report of a verify run: re-rendering it in "
            "place would destroy the evidence (and any approvals of it)",
            "re-render into another directory: safemail report JUNIT --out DIR",
        )
    results = parse_junit(args.junit, known_hosts=meta.hosts)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in args.junit)).hexdigest()
    if digest != meta.junit_sha256:
        print("note: this JUnit XML is not the run's own (digest differs from the report's)")
    report = build_report(results, catalogue, waivers, meta)
    json_path, html_path, _digest = write_report(report, out)
    print(f"{report['verdict'].upper()}: {html_path}")
    print("re-rendered by safemail report: this report cannot be used to promote")
    if report["failing_requirements"]:
        print("failing: " + ", ".join(report["failing_requirements"]))
    return 0 if report["verdict"] == "pass" else 1


def _existing_metadata(path: Path) -> RunMetadata | None:
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        return RunMetadata(
            stage=old["stage"],
            revision=old["revision"]["commit"],
            dirty=old["revision"]["dirty"],
            content_hash=old["content_hash"],
            content_files=old["content_files"],
            inventory_hash=old["inventory_hash"],
            hosts=old["hosts"],
            started=old["started"],
            finished=old["finished"],
            selection=old["selection"],
            pytest_exit_code=old.get("pytest_exit_code"),
            problems=[p for p in old.get("problems", []) if p.startswith("pytest")],
            created_by=CREATED_BY_REPORT,
            profile=old["run"]["profile"],
            junit_sha256=old["run"]["junit_sha256"],
            host_keys=old["run"]["host_keys"],
            skipped_by_profile=old["run"]["skipped_by_profile"],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SafeMailError(
            f"cannot reuse metadata from {path}: {exc}",
            "remove it, or write the new report elsewhere with --out",
        ) from exc


def cmd_promote(args: argparse.Namespace) -> int:
    opts = release.ReleaseOptions(
        target=args.to,
        report=args.report,
        release_log=args.release_log,
        max_age_hours=args.max_age_hours,
        first_release=args.first_release,
        dry_run=args.dry_run,
        preview=args.preview,
        limit=args.limit,
        vault_ids=tuple(args.vault_id),
        vault_password_file=args.vault_password_file,
        ask_vault_pass=args.ask_vault_pass,
    )
    return release.promote_release(_repo(), opts, say=_say)


def _say(line: str) -> None:
    print(line, flush=True)  # before ansible-playbook's own output


def cmd_approval(args: argparse.Namespace) -> int:
    repo = _repo()
    policy = promote.counting_policy(repo)
    roles = ", ".join(f"{policy.roles[r].title} ({r})" for r in policy.release_roles)
    if args.waiver:
        return _waiver_request(args, repo, policy)
    if args.action == "status" and args.out is not None:
        raise UsageError("--out only goes with `approval request`")
    for flag in ("justification", "expires", "granted"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} only goes with --waiver")
    report_path = _rel(repo, args.report)
    report = load_report(report_path)
    digest = promote.file_digest(report_path)
    message = approvals.release_message(report, digest)
    sig_dir = report_path.parent / promote.APPROVALS_DIR
    if args.action == "status":
        result = approvals.check(
            policy, approvals.read_signature_dir(sig_dir), message,
            approvals.RELEASE_NAMESPACE, policy.release_roles,
        )
        for signer in result.signers:
            print(f"signed: {signer.role}: {signer.principal} ({signer.key_fingerprint})")
        for problem in result.problems:
            print(f"missing: {problem}")
        return 0 if result.complete else 3
    # Approvers are sent to report.html: it must be the page the sealed run wrote.
    html = report_path.with_name(promote.HTML_NAME)
    html_digest = promote.file_digest(html) if html.is_file() else None
    problems = [p for p in (stage.lab_seal_problem(report_path),
                            promote.html_problem(report, html_digest)) if p]
    if problems:
        print("no approval request: the approvers would read a report that is not the sealed "
              "run's:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 3
    sig_dir.mkdir(parents=True, exist_ok=True)
    request = _rel(repo, args.out) if args.out else sig_dir / "request.txt"
    request.write_bytes(message)
    print(f"Text to sign ({request}):\n")
    print(message.decode(), end="")
    print(
        f"\n{html.name} sha256: {html_digest} (recorded in the sealed report.json; "
        f"`sha256sum {html}` shows the same)\n"
        f"Read {html} first.\n"
        f"Each of {roles}\nsigns this text with their own SSH key (release/allowed_signers) "
        "and drops the\nsignature in the approvals directory, one file per person:\n\n"
        f"  ssh-keygen -Y sign -f ~/.ssh/id_ed25519 -n {approvals.RELEASE_NAMESPACE} \\\n"
        f"    < {request} > {sig_dir}/$USER.sig\n\n"
        "Check with `safemail approval status`; a changed report needs new signatures."
    )
    return 0


def _waiver_request(args: argparse.Namespace, repo: Path, policy: approvals.Policy) -> int:
    if args.action != "request":
        raise UsageError("--waiver goes with `approval request`")
    missing = [f"--{f}" for f in ("justification", "expires") if getattr(args, f) is None]
    if missing:
        raise UsageError(f"--waiver needs {' and '.join(missing)}")
    catalogue = load_catalogue(repo / "verify" / "requirements.yml")
    req_id = args.waiver.strip().upper()
    if req_id not in catalogue:
        raise UsageError(f"{req_id} is not in the requirement catalogue")
    if req_id in catalogue.never_waivable:
        raise UsageError(f"{req_id} can never be waived (waivable: false in the catalogue)")
    granted = args.granted or dt.date.today()
    days = (args.expires - granted).days
    if not 0 <= days <= policy.waiver_max_days:
        raise UsageError(
            f"the waiver would last {days} days ({granted} to {args.expires}); allowed: 0 to "
            f"{policy.waiver_max_days} days (waiver_max_days in {approvals.APPROVERS})"
        )
    justification = " ".join(args.justification.split())
    message = approvals.waiver_message(req_id, justification, granted, args.expires)
    roles = ", ".join(f"{policy.roles[r].title} ({r})" for r in policy.waiver_roles)
    # reports/ is ignored by git: the request file does not make the tree dirty.
    request = _rel(repo, args.out or Path("reports") / "waiver-requests" / f"{req_id}.txt")
    request.parent.mkdir(parents=True, exist_ok=True)
    request.write_bytes(message)
    print(f"Text to sign ({request}):\n")
    print(message.decode(), end="")
    print(
        f"\nEach of {roles}\nsigns it with their own key:\n\n"
        f"  ssh-keygen -Y sign -f ~/.ssh/id_ed25519 -n {approvals.WAIVER_NAMESPACE} \\\n"
        f"    < {request} > $USER.sig\n\n"
        f"and the entry in {DEFAULT_WAIVERS} is:\n\n"
        f"- id: {req_id}\n"
        f"  justification: {json.dumps(justification, ensure_ascii=False)}\n"
        f"  granted: {granted.isoformat()}\n"
        f"  expires: {args.expires.isoformat()}\n"
        "  signatures:\n"
        "    - |\n"
        "      <contents of the first .sig file, indented>\n"
        "    - |\n"
        "      <contents of the second .sig file, indented>"
    )
    return 0
