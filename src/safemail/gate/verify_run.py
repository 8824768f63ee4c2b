"""Run the verify suite against a stage and write its report directory.

The report directory holds junit.xml, verify.log (pytest's output, also streamed to the
terminal), report.json and report.html. ``reports/<stage>/latest`` points at the newest one.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from safemail.errors import SafeMailError
from safemail.gate import hashing
from safemail.gate.catalogue import Catalogue, load_catalogue, relative_to
from safemail.gate.inventory import InventoryError, read_inventory
from safemail.gate.report import (
    RunMetadata,
    build_report,
    host_of,
    parse_junit,
    utc_iso,
    write_report,
)
from safemail.gate.waivers import DEFAULT_WAIVERS, load_waivers

# pytest exit codes: 0 all passed, 1 some failed, 5 none collected. The others mean the run
# itself broke (2 interrupted, 3 internal error, 4 usage error).
_RUN_BROKEN = {2: "interrupted", 3: "internal error", 4: "usage error"}


@dataclass(frozen=True)
class VerifyOptions:
    stage: str = "test"
    workers: int = 4
    keyword: str | None = None
    markexpr: str | None = None
    requirements: tuple[str, ...] = ()
    catalogue: Path | None = None
    waivers: Path | None = None


@dataclass(frozen=True)
class VerifyResult:
    report_dir: Path
    report: dict[str, Any]
    digest: str
    exit_code: int


def timestamp_dir(root: Path, stage: str, now: dt.datetime) -> Path:
    stamp = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = root / stage / stamp
    n = 1
    while path.exists():
        n += 1
        path = root / stage / f"{stamp}-{n}"
    return path


def update_latest(report_dir: Path) -> Path:
    """Point <report_dir>/../latest at report_dir (relative symlink, replaced atomically)."""
    link = report_dir.parent / "latest"
    tmp = report_dir.parent / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(report_dir.name)
    os.replace(tmp, link)
    return link


def pytest_command(
    opts: VerifyOptions, junit: Path, catalogue_path: Path, python: str | None = None
) -> list[str]:
    cmd = [
        python or sys.executable,
        "-m",
        "pytest",
        "verify/",
        "--hosts=ansible://all",
        f"--ansible-inventory=inventories/{opts.stage}",
        "-n",
        str(opts.workers),
        f"--junitxml={junit}",
        "-p",
        "no:cacheprovider",
        "-o",
        "junit_family=xunit1",
        f"--req-catalogue={catalogue_path}",
    ]
    if opts.keyword:
        cmd += ["-k", opts.keyword]
    if opts.markexpr:
        cmd += ["-m", opts.markexpr]
    if opts.requirements:
        cmd += [f"--req-select={','.join(opts.requirements)}"]
    return cmd


def stream(cmd: Sequence[str], cwd: Path, log: Path, out: IO[str] | None = None) -> int:
    """Run cmd, copying its output to ``out`` (default stdout) and to ``log`` as it comes."""
    out = out or sys.stdout
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # testinfra's ansible backend calls ansible-inventory: prefer the one beside this Python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PY_COLORS", "1" if out.isatty() else "0")
    with log.open("wb") as sink:
        try:
            proc = subprocess.Popen(
                list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
            )
        except OSError as exc:
            raise SafeMailError(f"cannot start pytest: {exc}") from exc
        assert proc.stdout is not None
        try:
            while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
                sink.write(chunk)
                out.write(chunk.decode("utf-8", errors="replace"))
                out.flush()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        return proc.wait()


def _hosts(repo: Path, stage: str, junit_hosts: Sequence[str]) -> list[str]:
    try:
        return [h.name for h in read_inventory(repo / "inventories" / stage)]
    except InventoryError as exc:
        print(f"safemail verify: hosts taken from test ids ({exc.message})", file=sys.stderr)
        return sorted(set(junit_hosts))


def collect_metadata(
    repo: Path,
    opts: VerifyOptions,
    started: dt.datetime,
    finished: dt.datetime,
    hosts: Sequence[str],
    exit_code: int | None,
) -> RunMetadata:
    content = hashing.content_hash(repo, opts.stage)
    problems = []
    if exit_code in _RUN_BROKEN:
        problems.append(f"pytest stopped early: exit code {exit_code} ({_RUN_BROKEN[exit_code]})")
    return RunMetadata(
        stage=opts.stage,
        revision=hashing.git_revision(repo),
        dirty=hashing.git_dirty(repo),
        content_hash=content.digest,
        content_files=content.files,
        inventory_hash=hashing.inventory_hash(repo, opts.stage),
        hosts=list(hosts),
        started=utc_iso(started),
        finished=utc_iso(finished),
        selection={
            "keyword": opts.keyword,
            "markexpr": opts.markexpr,
            "requirements": list(opts.requirements) or None,
        },
        pytest_exit_code=exit_code,
        problems=problems,
    )


def run_verify(
    repo: Path,
    opts: VerifyOptions,
    report_dir: Path | None = None,
    out: IO[str] | None = None,
) -> VerifyResult:
    """Run pytest on verify/ against the stage, then build and write the report."""
    out = out or sys.stdout
    inventory = repo / "inventories" / opts.stage
    if not inventory.is_dir():
        raise SafeMailError(
            f"inventory {inventory} does not exist",
            "start the test stage with `safemail lab up`" if opts.stage == "test" else None,
        )
    if not (repo / "verify").is_dir():
        raise SafeMailError(f"no verify/ directory in {repo}", "run from the SafeMail checkout")
    catalogue_path = (opts.catalogue or repo / "verify" / "requirements.yml").resolve()
    catalogue: Catalogue = relative_to(load_catalogue(catalogue_path), repo)
    unknown = [r for r in opts.requirements if r not in catalogue]
    if unknown:
        raise SafeMailError(
            f"unknown requirement id(s): {', '.join(unknown)}",
            f"ids are listed in {catalogue_path}",
        )
    waivers = load_waivers(opts.waivers or repo / DEFAULT_WAIVERS, known_ids=catalogue.ids)

    started = dt.datetime.now(dt.UTC)
    report_dir = (report_dir or timestamp_dir(repo / "reports", opts.stage, started)).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    junit = report_dir / "junit.xml"
    cmd = pytest_command(opts, junit, catalogue_path)
    print(f"safemail verify: stage {opts.stage}, report in {report_dir}", file=out, flush=True)
    print("safemail verify: " + " ".join(cmd[1:]), file=out, flush=True)
    exit_code = stream(cmd, repo, report_dir / "verify.log", out)
    finished = dt.datetime.now(dt.UTC)

    if junit.exists():
        results = parse_junit([junit])
    else:
        results = []
    hosts = _hosts(repo, opts.stage, [h for t in results if (h := host_of(t.id))])
    results = parse_junit([junit], known_hosts=hosts) if junit.exists() else []
    meta = collect_metadata(repo, opts, started, finished, hosts, exit_code)
    if not junit.exists():
        meta.problems.append("pytest wrote no JUnit XML")
    report = build_report(results, catalogue, waivers, meta, generated=finished)
    json_path, html_path, digest = write_report(report, report_dir)
    if report_dir.parent.name == opts.stage and report_dir.parent.parent.name == "reports":
        update_latest(report_dir)
    _print_summary(report, json_path, html_path, out)
    return VerifyResult(report_dir, report, digest, 0 if report["verdict"] == "pass" else 1)


def _print_summary(report: dict[str, Any], json_path: Path, html_path: Path, out: IO[str]) -> None:
    s = report["summary"]
    print("", file=out)
    print(
        f"safemail verify: {report['verdict'].upper()}: {s['pass']} pass, {s['fail']} fail, "
        f"{s['untested']} untested, {s['waived']} waived of {s['requirements']} requirements "
        f"({s['tests']} tests)",
        file=out,
    )
    if report["failing_requirements"]:
        print("  failing: " + ", ".join(report["failing_requirements"]), file=out)
    if report["unmapped_tests"]:
        print(f"  tests without a known requirement: {len(report['unmapped_tests'])}", file=out)
    for problem in report["problems"]:
        print(f"  problem: {problem}", file=out)
    if not report["complete"]:
        print("  partial run: this report cannot be used to promote", file=out)
    print(f"  report: {html_path}\n  json:   {json_path}", file=out, flush=True)
