"""Proof that verify can fail: apply known-bad changes to the test stage, one at a time.

``safemail verify --mutate`` reads the mutation catalogue (verify/mutations.yml). Each entry
names what it breaks, the host, an apply and a restore command (run over SSH as the
inventory says) and the requirement ids whose tests must fail while the change is in place.
For every selected mutation:

1. skip it as ``untestable`` when no test in verify/ names one of its requirement ids (a
   mutation nothing can catch is not applied to a shared stage for nothing);
2. apply it; a failing apply is an ``error`` (restore still runs);
3. run only the relevant tests (the normal verify run with ``--requirements`` and the entry's
   pytest ``-k`` expression), into its own report directory;
4. ALWAYS restore (``finally``; Ctrl-C and SIGTERM are held off while restoring), and stop
   the whole run if the restore fails: the stage is then in an unknown state;
5. optionally (``--check-restore``) run the same tests again: they must pass now.

With ``--baseline`` the same tests run first, before applying: a mutation whose tests already
fail is not applied (``error``): its failure would prove nothing.

A mutation is ``caught`` when every one of its requirement ids has status ``fail`` in the
mutated run's report; ``missed`` when the tests ran and some id did not fail. The score is
caught / applied; the exit code is 0 only when every selected mutation was caught.

The commands run under ``sh -eu`` with ``$M`` set to a private per-mutation directory on the
host (/run/safemail-mutate/<id>): apply keeps what restore needs there (a copy of a file, a
mode, a rule handle). A successful restore removes it (and the parent, once empty).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from safemail.errors import SafeMailError
from safemail.gate import schema
from safemail.gate.catalogue import Catalogue
from safemail.gate.verify_run import VerifyOptions, VerifyResult, run_verify, timestamp_dir
from safemail.inventory import Host, read_inventory
from safemail.project import Project

DEFAULT_CATALOGUE = Path("verify/mutations.yml")
STATE_ROOT = "/run/safemail-mutate"
_MARK_RE = re.compile(r"mark\.req\(([^)]*)\)")

# Outcomes of one mutation.
CAUGHT, MISSED, ERROR, UNTESTABLE = "caught", "missed", "error", "untestable"


class MutationError(SafeMailError):
    """The mutation catalogue is malformed or a mutation could not be run safely."""


@dataclass(frozen=True)
class Mutation:
    id: str
    title: str
    host: str
    apply: str
    restore: str
    requirements: tuple[str, ...]
    keyword: str | None = None
    notes: str | None = None
    redundant: bool = False

    @property
    def state_dir(self) -> str:
        return f"{STATE_ROOT}/{self.id}"


@dataclass
class Outcome:
    mutation: Mutation
    status: str
    detail: str
    statuses: dict[str, str] = field(default_factory=dict)
    report_dir: str | None = None
    restore_report_dir: str | None = None
    restored: bool | None = None
    restore_checked: bool | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.mutation.id,
            "title": self.mutation.title,
            "host": self.mutation.host,
            "requirements": list(self.mutation.requirements),
            "keyword": self.mutation.keyword,
            "status": self.status,
            "detail": self.detail,
            "requirement_status": self.statuses,
            "report_dir": self.report_dir,
            "restore_report_dir": self.restore_report_dir,
            "restored": self.restored,
            "restore_checked": self.restore_checked,
            "seconds": round(self.seconds, 1),
        }


@dataclass
class MutationRun:
    outcomes: list[Outcome]
    started: str
    finished: str = ""
    interrupted: bool = False
    # Ids of the redundant lab's mutations that this stage has no host for (not run).
    left_out: list[str] = field(default_factory=list)

    @property
    def applied(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in (CAUGHT, MISSED, ERROR)]

    @property
    def caught(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == CAUGHT]

    @property
    def all_caught(self) -> bool:
        return (
            bool(self.outcomes)
            and not self.interrupted
            and all(o.status == CAUGHT for o in self.outcomes)
        )

    def score(self) -> str:
        applied = len(self.applied)
        pct = f" ({100 * len(self.caught) / applied:.0f} %)" if applied else ""
        return f"{len(self.caught)}/{applied} caught{pct}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "finished": self.finished,
            "interrupted": self.interrupted,
            "score": {"caught": len(self.caught), "applied": len(self.applied)},
            "all_caught": self.all_caught,
            "mutations": [o.to_dict() for o in self.outcomes],
            "left_out_no_host": list(self.left_out),
        }


# --------------------------------------------------------------------------- catalogue


def _entry_problems(where: str, entry: Any, found: list[schema.Violation]) -> list[str]:
    """A mutation's violations of the schema, in the words its author needs."""
    out: list[str] = []
    unknown = sorted(str(v.key) for v in found if v.kind == "additionalProperties")
    if unknown:
        out.append(f"{where}: unknown field(s) {', '.join(unknown)}")
    malformed = [entry["requirements"][v.path[3]] for v in found
                 if v.path[2:3] == ("requirements",) and len(v.path) > 3 and v.kind == "pattern"]
    if malformed:
        out.append(f"{where}: malformed requirement id(s) {', '.join(malformed)}")
    for v in found:
        name = v.path[2] if len(v.path) > 2 else (v.key if v.kind == "required" else None)
        if v.kind == "additionalProperties" or (name == "requirements" and v.kind == "pattern"):
            continue
        if name is None:
            line = f"{where}: expected a mapping"
        elif name == "id" and isinstance(entry.get("id"), str) and entry["id"].strip():
            line = f"{where}: id must be lower-case letters, digits and '-'"
        elif name == "requirements":
            line = f"{where}: 'requirements' must be a non-empty list of ids"
        elif name == "keyword":
            line = f"{where}: 'keyword' must be a pytest -k expression"
        elif name == "notes":
            line = f"{where}: 'notes' must be text"
        else:
            line = f"{where}: '{name}' must be a non-empty string"
        if line not in out:
            out.append(line)
    return out


def parse_mutations(
    data: Any, origin: str = "<memory>", known_ids: Sequence[str] | None = None
) -> list[Mutation]:
    """Validate the catalogue's content (a list under ``mutations:``) and return it.

    The shape is ``schemas/mutations.schema.json``; unique ids and requirement ids that the
    requirement catalogue knows are checked here. Raise MutationError naming every problem.
    """
    found = schema.violations("mutations", data)
    if any(len(v.path) == 0 and v.kind != "additionalProperties" for v in found) or any(
        v.path == ("mutations",) and v.kind == "type" for v in found
    ):
        raise MutationError(f"{origin}: expected a mapping with a 'mutations:' list")
    if any(v.path == ("mutations",) for v in found):
        raise MutationError(f"{origin}: the catalogue lists no mutation")
    problems: list[str] = []
    extra = sorted(str(v.key) for v in found if not v.path)
    if extra:
        problems.append(f"{origin}: unknown top-level key(s) {', '.join(extra)}")
    by_entry: dict[int, list[schema.Violation]] = {}
    for v in found:
        if len(v.path) > 1:
            by_entry.setdefault(int(v.path[1]), []).append(v)
    out: list[Mutation] = []
    seen: set[str] = set()
    for n, entry in enumerate(data["mutations"], 1):
        where = f"{origin}: mutation #{n}"
        mid = entry.get("id") if isinstance(entry, Mapping) else None
        if isinstance(mid, str) and mid.strip():
            where = f"{origin}: mutation {mid.strip()}"
        bad = by_entry.get(n - 1, [])
        problems.extend(_entry_problems(where, entry, bad))
        if bad:
            continue
        if mid in seen:
            problems.append(f"{where}: duplicate id")
        seen.add(mid)
        reqs = entry["requirements"]
        if known_ids is not None:
            missing = [r for r in reqs if r not in known_ids]
            if missing:
                problems.append(
                    f"{where}: requirement id(s) {', '.join(missing)} not in the catalogue"
                )
        keyword, notes = entry.get("keyword"), entry.get("notes")
        out.append(
            Mutation(
                id=mid,
                title=entry["title"].strip(),
                host=entry["host"].strip(),
                apply=entry["apply"].strip(),
                restore=entry["restore"].strip(),
                requirements=tuple(reqs),
                keyword=keyword.strip() if keyword else None,
                notes=notes.strip() if notes else None,
                redundant=bool(entry.get("redundant", False)),
            )
        )
    if len(problems) == 1:
        raise MutationError(problems[0])
    if problems:
        raise MutationError(
            f"the mutation catalogue is invalid ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )
    return out


def load_mutations(path: Path, catalogue: Catalogue | None = None) -> list[Mutation]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MutationError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise MutationError(f"{path} is not valid YAML: {exc}") from exc
    return parse_mutations(data, str(path), catalogue.ids if catalogue is not None else None)


def select(mutations: Sequence[Mutation], ids: Sequence[str]) -> list[Mutation]:
    """The mutations named in ``ids`` (catalogue order), all of them when ``ids`` is empty."""
    if not ids:
        return list(mutations)
    known = {m.id for m in mutations}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise MutationError(
            f"unknown mutation id(s): {', '.join(unknown)}",
            "list them with `safemail verify --mutate --list`",
        )
    wanted = set(ids)
    return [m for m in mutations if m.id in wanted]


def tested_requirements(verify_dir: Path) -> set[str]:
    """Requirement ids that some test module in verify/ names in a ``req`` marker."""
    found: set[str] = set()
    for path in sorted(verify_dir.glob("test_*.py")):
        for args in _MARK_RE.findall(path.read_text(encoding="utf-8")):
            found.update(re.findall(r"[A-Z]+-\d{2}", args))
    return found


# --------------------------------------------------------------------------- remote commands


@dataclass(frozen=True)
class CommandResult:
    rc: int
    output: str


Runner = Callable[[Host, str, float], CommandResult]


def ssh_command(host: Host, script: str) -> list[str]:
    """The ssh command line that runs ``script`` on ``host`` the way Ansible would connect."""
    hv = host.vars
    address = hv.get("ansible_host") or host.name
    user = hv.get("ansible_user") or "root"
    cmd = ["ssh", "-o", "BatchMode=yes"]
    for key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        if hv.get(key):
            cmd += shlex.split(str(hv[key]))
    if hv.get("ansible_ssh_private_key_file"):
        cmd += ["-i", str(hv["ansible_ssh_private_key_file"])]
    if hv.get("ansible_port"):
        cmd += ["-p", str(hv["ansible_port"])]
    remote = f"sh -c {shlex.quote(script)}"
    if user != "root":
        remote = f"sudo -n {remote}"
    return [*cmd, f"{user}@{address}", remote]


def ssh_runner(host: Host, script: str, timeout: float) -> CommandResult:
    try:
        proc = subprocess.run(
            ssh_command(host, script),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C in the terminal must not kill a restore in flight
            # (the run defers the signal and restores first).
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return CommandResult(124, f"timed out after {timeout:.0f} s")
    except OSError as exc:
        return CommandResult(127, f"cannot run ssh: {exc}")
    return CommandResult(proc.returncode, (proc.stdout + proc.stderr).strip())


def remote_script(mutation: Mutation, body: str, *, cleanup: bool = False) -> str:
    lines = [
        "set -eu",
        f"M={shlex.quote(mutation.state_dir)}",
        'mkdir -p -m 0700 "$M"',
        body.rstrip(),
    ]
    if cleanup:
        lines.append('rm -rf "$M"')
        lines.append(f"rmdir {STATE_ROOT} 2>/dev/null || true")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class MutateOptions:
    stage: str = "test"
    workers: int = 2
    check_restore: bool = False
    baseline: bool = False
    timeout: float = 180.0


Verifier = Callable[[VerifyOptions, Path], VerifyResult]


def requirement_statuses(report: Mapping[str, Any], ids: Sequence[str]) -> dict[str, str]:
    rows = {r["id"]: r for r in report.get("requirements", [])}
    return {rid: rows[rid]["status"] if rid in rows else "missing" for rid in ids}


def judge(mutation: Mutation, report: Mapping[str, Any]) -> tuple[str, str, dict[str, str]]:
    """caught / missed / error for the report of the run with the mutation in place."""
    statuses = requirement_statuses(report, mutation.requirements)
    problems = list(report.get("problems", []))
    if problems:
        return ERROR, "the verify run broke: " + "; ".join(problems), statuses
    not_failing = [f"{rid} {st}" for rid, st in statuses.items() if st != "fail"]
    if not_failing:
        return MISSED, "did not fail: " + ", ".join(not_failing), statuses
    failed = sum(
        1
        for r in report.get("requirements", [])
        if r["id"] in mutation.requirements
        for t in r.get("tests", [])
        if t.get("outcome") in ("failed", "error")
    )
    return CAUGHT, f"{failed} test(s) failed: " + ", ".join(statuses), statuses


def tests_pass(mutation: Mutation, report: Mapping[str, Any]) -> tuple[bool, str]:
    statuses = requirement_statuses(report, mutation.requirements)
    bad = [f"{rid} {st}" for rid, st in statuses.items() if st != "pass"]
    if report.get("problems"):
        bad.append("problems: " + "; ".join(report["problems"]))
    return (not bad, "tests pass" if not bad else "failing: " + ", ".join(bad))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Hold off SIGINT/SIGTERM (recorded, not lost) while a restore runs."""
    received: list[int] = []

    def note(signum: int, _frame: object) -> None:
        received.append(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def raise_interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _default_verifier(repo: Path) -> Verifier:
    def verify(opts: VerifyOptions, report_dir: Path) -> VerifyResult:
        # pytest's stream goes to verify.log in the report directory, not the terminal.
        return run_verify(repo, opts, report_dir, out=io.StringIO())

    return verify


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def run_mutations(
    repo: Path,
    mutations: Sequence[Mutation],
    opts: MutateOptions,
    report_root: Path,
    *,
    hosts: Mapping[str, Host] | None = None,
    runner: Runner = ssh_runner,
    verifier: Verifier | None = None,
    tested: set[str] | None = None,
    out: IO[str] | None = None,
) -> MutationRun:
    """Apply, verify and restore each mutation in turn; write mutate.json into report_root."""
    out = out or sys.stdout
    if opts.stage != "test":
        raise MutationError(
            "mutations are applied to the test stage only",
            "run `safemail verify --mutate --stage test`",
        )
    if hosts is None:
        hosts = {h.name: h for h in read_inventory(Project(repo).inventory(opts.stage))}
    missing = sorted({m.host for m in mutations if not m.redundant} - set(hosts))
    if missing:
        raise MutationError(
            f"host(s) {', '.join(missing)} of the mutation catalogue are not in the "
            f"{opts.stage} inventory",
            "start the lab (`safemail lab up`) or fix the catalogue",
        )
    # Mutations of the redundant lab's hosts (relay2, auth2): left out of a default lab's run,
    # and said so; a run of nothing but those needs the redundant lab.
    absent = [m for m in mutations if m.host not in hosts]
    if absent and len(absent) == len(mutations):
        raise MutationError(
            f"mutation(s) {', '.join(m.id for m in absent)} need host(s) "
            f"{', '.join(sorted({m.host for m in absent}))}, which the {opts.stage} inventory "
            "does not have",
            "start the redundant lab (`safemail lab down && safemail lab up --redundant`)",
        )
    mutations = [m for m in mutations if m.host in hosts]
    verifier = verifier or _default_verifier(repo)
    tested = tested_requirements(repo / "verify") if tested is None else tested
    report_root.mkdir(parents=True, exist_ok=True)
    run = MutationRun(outcomes=[], started=_now().isoformat(timespec="seconds"))

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    run.left_out = [m.id for m in absent]
    for m in absent:
        say(f"left out: {m.id} (its host {m.host} is only on the redundant lab, "
            "`safemail lab up --redundant`)")
    total = len(mutations)
    current: Mutation | None = None
    try:
        with _sigterm_as_interrupt():
            for n, m in enumerate(mutations, 1):
                current = m
                say(f"[{n}/{total}] {m.id} on {m.host}: {m.title}")
                outcome = _run_one(m, hosts[m.host], opts, report_root, runner, verifier,
                                   tested, say)
                current = None
                run.outcomes.append(outcome)
                say(f"[{n}/{total}] {m.id}: {outcome.status.upper()} - {outcome.detail}")
    except KeyboardInterrupt:
        run.interrupted = True
        if current is not None:
            run.outcomes.append(Outcome(current, ERROR, "interrupted (its restore ran first)"))
        say("interrupted: the mutation in progress was restored; later ones were not run")
    finally:
        run.finished = _now().isoformat(timespec="seconds")
        (report_root / "mutate.json").write_text(
            json.dumps(run.to_dict(), indent=2) + "\n", encoding="utf-8"
        )
    return run


def _run_one(
    m: Mutation,
    host: Host,
    opts: MutateOptions,
    report_root: Path,
    runner: Runner,
    verifier: Verifier,
    tested: set[str],
    say: Callable[[str], None],
) -> Outcome:
    untested = [r for r in m.requirements if r not in tested]
    if untested:
        return Outcome(
            m, UNTESTABLE,
            f"not applied: no test in verify/ names {', '.join(untested)} yet",
        )
    started = _now()
    vopts = VerifyOptions(
        stage=opts.stage, workers=opts.workers, keyword=m.keyword, requirements=m.requirements
    )
    outcome = Outcome(m, ERROR, "not run")
    if opts.baseline:
        # A test that fails without the mutation would "catch" it for nothing.
        say("    baseline: the same tests before applying (expecting success)")
        try:
            before = verifier(vopts, report_root / m.id / "baseline")
        except SafeMailError as exc:
            outcome.detail = f"not applied: the baseline verify could not run: {exc.message}"
            return outcome
        ok, why = tests_pass(m, before.report)
        if not ok:
            outcome.detail = (f"not applied: the tests fail before the mutation ({why}); "
                              f"see {before.report_dir}")
            return outcome
    try:
        say(f"    apply: {m.apply.splitlines()[0][:100]}")
        applied = runner(host, remote_script(m, m.apply), opts.timeout)
        if applied.rc != 0:
            outcome.detail = f"apply failed (rc={applied.rc}): {applied.output[-400:]}"
        else:
            say(f"    verify {','.join(m.requirements)}"
                + (f" -k {m.keyword!r}" if m.keyword else "") + " (expecting failure)")
            try:
                result = verifier(vopts, report_root / m.id / "mutated")
            except SafeMailError as exc:
                outcome.detail = f"verify could not run: {exc.message}"
            else:
                outcome.report_dir = str(result.report_dir)
                outcome.status, outcome.detail, outcome.statuses = judge(m, result.report)
    finally:
        # Always restore: also after a failed apply (it may have half-applied) and on Ctrl-C.
        with _signals_deferred() as held:
            say("    restore")
            restored = runner(host, remote_script(m, m.restore, cleanup=True), opts.timeout)
        outcome.restored = restored.rc == 0
        outcome.seconds = (_now() - started).total_seconds()
        if not outcome.restored:
            raise MutationError(
                f"RESTORE FAILED for mutation {m.id} on {m.host} (rc={restored.rc}): "
                f"{restored.output[-600:]}",
                f"the stage is changed: repair {m.host} by hand (restore command in the "
                f"mutation catalogue, saved state in {m.state_dir}) or re-converge it; "
                "no further mutation was run",
            )
        if held:
            raise KeyboardInterrupt
    if opts.check_restore:
        say("    check restore: the same tests again (expecting success)")
        result = verifier(vopts, report_root / m.id / "restored")
        outcome.restore_report_dir = str(result.report_dir)
        ok, why = tests_pass(m, result.report)
        why = "tests pass again" if ok else f"still {why}"
        outcome.restore_checked = ok
        if not ok:
            outcome.status = ERROR
            outcome.detail = f"{outcome.detail}; after restore: {why}"
            raise MutationError(
                f"mutation {m.id}: after restore the tests do not pass ({why})",
                f"inspect {outcome.restore_report_dir}; no further mutation was run",
            )
        outcome.detail = f"{outcome.detail}; after restore: {why}"
    return outcome


def default_report_root(repo: Path) -> Path:
    return timestamp_dir(repo / "reports", "mutate", _now())


def format_list(mutations: Sequence[Mutation], tested: set[str]) -> str:
    lines = []
    for m in mutations:
        untested = [r for r in m.requirements if r not in tested]
        state = "ready" if not untested else f"no test yet for {', '.join(untested)}"
        if m.redundant:
            state += " (redundant lab only)"
        lines.append(f"{m.id:<27} {m.host:<10} {','.join(m.requirements):<16} {state}")
        lines.append(f"    {m.title}")
    return "\n".join(lines)


def format_summary(run: MutationRun) -> str:
    lines = ["", "mutation run:"]
    for o in run.outcomes:
        lines.append(f"  {o.status.upper():<10} {o.mutation.id:<27} {o.detail}")
    skipped = [o for o in run.outcomes if o.status == UNTESTABLE]
    lines.append(f"mutation score: {run.score()}"
                 + (f"; {len(skipped)} not applied (no test)" if skipped else "")
                 + (f"; {len(run.left_out)} left out (redundant lab only: "
                    f"{', '.join(run.left_out)})" if run.left_out else ""))
    if run.interrupted:
        lines.append("the run was interrupted")
    lines.append("every mutation was caught" if run.all_caught
                 else "NOT every mutation was caught")
    return "\n".join(lines)
