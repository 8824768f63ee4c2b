"""Subcommands for verification reports, the promotion gate and generated documentation.

safemail verify  --stage test              run the verify suite, write a report directory
safemail verify  --mutate                  apply known-bad changes, expect verify to fail
safemail report  JUNIT [JUNIT ...]         rebuild report.json/html from JUnit XML
safemail promote --to production           check the gate, record the release, deploy
safemail docs                              write docs/generated/ from inventory and roles
safemail docs network                      write docs/network.md and .svg from the flow matrix
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

from safemail import vault
from safemail.errors import SafeMailError, UsageError
from safemail.gate import hashing, promote
from safemail.gate.catalogue import load_catalogue, relative_to
from safemail.gate.report import (
    RunMetadata,
    build_report,
    parse_iso,
    parse_junit,
    utc_iso,
    write_report,
)
from safemail.gate.verify_run import VerifyOptions, run_verify
from safemail.gate.waivers import DEFAULT_WAIVERS, load_waivers

STAGES = ("test", "production")


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "verify",
        help="run the verification suite against a stage and write a report",
        description=(
            "Run the testinfra suite (verify/) against every host of the stage's inventory, in\n"
            "parallel, and write junit.xml, verify.log, report.json and report.html into the\n"
            "report directory. Exit code 0 only if every requirement passes (or is waived)."
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
    p.add_argument("--workers", type=_workers, default=4, help="parallel pytest workers")
    p.add_argument("-k", dest="keyword", help="pytest -k expression (makes the run partial)")
    p.add_argument("-m", dest="markexpr", help="pytest -m expression (makes the run partial)")
    p.add_argument(
        "--requirements",
        type=_id_list,
        default=(),
        metavar="IDS",
        help="comma-separated requirement ids: run only their tests (partial run)",
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
        help="rebuild report.json and report.html from JUnit XML",
        description=(
            "Rebuild the report from existing JUnit XML. Run metadata (revision, hashes,\n"
            "hosts, times) comes from report.json in the output directory if there is one,\n"
            "else from the current checkout."
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
            "Refuse unless the latest test-stage report passed, covers the full suite, is\n"
            "for this very revision and content, the tree is clean and the report is recent.\n"
            "When allowed (and not --dry-run): record the release in the release log, then\n"
            "run ansible-playbook -i inventories/production playbooks/site.yml.\n"
            "Exit codes: 0 released (or dry run allowed), 3 refused, other: deploy failed."
        ),
        formatter_class=fmt,
    )
    p.add_argument("--to", choices=("production",), required=True, help="target stage")
    p.add_argument("--dry-run", action="store_true", help="decide and explain, change nothing")
    p.add_argument(
        "--max-age-hours",
        type=float,
        default=promote.DEFAULT_MAX_AGE_HOURS,
        help="oldest acceptable report age (default: %(default)s)",
    )
    p.add_argument("--operator", help="who releases (default: $SUDO_USER or $USER)")
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
        "docs",
        help="generate host list and role settings documentation",
        description=(
            "Write hosts.md (from ansible-inventory --list), roles.md (from\n"
            "roles/*/meta/argument_specs.yml) and index.md into the output directory."
        ),
        formatter_class=fmt,
    )
    p.add_argument(
        "part",
        nargs="?",
        choices=("all", "network"),
        default="all",
        help="all: hosts.md, roles.md, index.md; network: the network plan (network.md and "
        "network.svg) from the flow matrix (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: docs/generated; docs for network)")
    p.add_argument("--stage", choices=STAGES, default=None,
                   help="inventory to document (default: production; test for network, the "
                   "stage whose inventory has hosts)")
    p.set_defaults(func=cmd_docs)


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no parallelism) or more")
    return value


def _id_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip().upper() for part in text.split(",") if part.strip())


def _mutation_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in text.split(",") if part.strip())


def _repo() -> Path:
    return hashing.find_repo_root()


def _rel(repo: Path, path: Path) -> Path:
    return path if path.is_absolute() else repo / path


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
        workers=args.workers,
        keyword=args.keyword,
        markexpr=args.markexpr,
        requirements=args.requirements,
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
    waivers = load_waivers(
        _rel(repo, args.waivers) if args.waivers else repo / DEFAULT_WAIVERS,
        known_ids=catalogue.ids,
    )
    meta = _existing_metadata(out / "report.json") or _fresh_metadata(repo, args.stage, args.junit)
    results = parse_junit(args.junit, known_hosts=meta.hosts)
    report = build_report(results, catalogue, waivers, meta)
    json_path, html_path, _digest = write_report(report, out)
    print(f"{report['verdict'].upper()}: {html_path}")
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
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SafeMailError(
            f"cannot reuse metadata from {path}: {exc}",
            "remove it, or write the new report elsewhere with --out",
        ) from exc


def _fresh_metadata(repo: Path, stage: str, junit: list[Path]) -> RunMetadata:
    import xml.etree.ElementTree as ET  # noqa: S405 - our own pytest output, times only

    started = finished = dt.datetime.now(dt.UTC)
    for path in junit:
        try:
            for suite in ET.parse(path).getroot().iter("testsuite"):  # noqa: S314
                stamp = suite.get("timestamp")
                if stamp:
                    begin = parse_iso(stamp)
                    started = min(started, begin)
                    finished = begin + dt.timedelta(seconds=float(suite.get("time", "0")))
        except (OSError, ET.ParseError, ValueError):
            continue  # parse_junit reports unreadable files with a proper message
    content = hashing.content_hash(repo, stage)
    inv = repo / "inventories" / stage
    return RunMetadata(
        stage=stage,
        revision=hashing.git_revision(repo),
        dirty=hashing.git_dirty(repo),
        content_hash=content.digest,
        content_files=content.files,
        inventory_hash=hashing.inventory_hash(repo, stage) if inv.is_dir() else hashing.combine({}),
        hosts=[],
        started=utc_iso(started),
        finished=utc_iso(max(started, finished)),
    )


def cmd_promote(args: argparse.Namespace) -> int:
    repo = _repo()
    report_path = _rel(repo, args.report)
    decision = promote.evaluate(repo, report_path, max_age_hours=args.max_age_hours)
    print(decision.summary())
    if not decision.allowed:
        return 3
    if args.dry_run:
        print("dry run: nothing recorded, nothing deployed")
        return 0
    inventory = repo / "inventories" / args.to
    playbook = repo / "playbooks" / "site.yml"
    for needed in (inventory, playbook):
        if not needed.exists():
            raise SafeMailError(f"{needed} does not exist", "nothing to deploy yet")
    operator = args.operator or promote.default_operator()
    if not operator.strip():
        raise UsageError("--operator must name the person releasing")
    log = _rel(repo, args.release_log)
    state = promote.current_state(repo)
    common = {
        "operator": operator,
        "revision": decision.revision or state.revision,
        "report_digest": decision.report_digest or "",
        "stage": args.to,
        "report_path": str(report_path),
        "content_hash": state.content_hash,
    }
    promote.append_release_log(log, **common, extra={"tested_on": promote.TESTED_STAGE})
    print(f"release recorded in {log} (operator {operator})")
    cmd = [_ansible_playbook(), "-i", str(inventory), *vault.vault_args(repo, inventory),
           str(playbook)]
    print("running: " + " ".join(cmd), flush=True)
    try:
        rc = subprocess.run(cmd, cwd=repo, check=False).returncode
    except OSError as exc:
        raise SafeMailError(f"cannot run ansible-playbook: {exc}") from exc
    promote.append_release_log(log, **common, event="deploy-finished", extra={"exit_code": rc})
    if rc != 0:
        raise SafeMailError(
            f"ansible-playbook failed with exit code {rc}; the release is recorded as failed",
            "fix the cause, verify again on the test stage, then promote again",
        )
    print("deployed to production")
    return 0


def _ansible_playbook() -> str:
    import shutil

    found = shutil.which("ansible-playbook")
    if found:
        return found
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.exists():
        return str(beside)
    raise SafeMailError(
        "ansible-playbook not found", "install the project: .venv/bin/pip install -e ."
    )


def cmd_docs(args: argparse.Namespace) -> int:
    from safemail import docs

    repo = _repo()
    if args.part == "network":
        from safemail.network import docs as network_docs

        out = _rel(repo, args.out or Path("docs"))
        for path in network_docs.generate(repo, out, args.stage or "test"):
            print(f"wrote {path}")
        return 0
    args.stage = args.stage or "production"
    out = _rel(repo, args.out or Path("docs/generated"))
    try:
        revision: str | None = hashing.git_revision(repo)
    except SafeMailError:
        revision = None
    for path in docs.generate(repo, out, stage=args.stage, revision=revision):
        print(f"wrote {path}")
    return 0
