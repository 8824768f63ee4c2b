"""Run the verify suite against a stage and write its report directory.

The report directory holds junit.xml, verify.log (pytest's output, also streamed to the
terminal), report.json and report.html. ``reports/<stage>/latest`` points at the newest one.

The test stage runs the ``full`` profile; its report records the evidence of the run (JUnit
digest, hosts reached with the host keys seen, inventory hash) and is sealed with the stage's
SSH key (``report.json.sig``, :mod:`safemail.gate.stage`). Production runs the ``production``
profile (read-only tests only, verify/profiles.py): a check that never releases, unsealed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from safemail import vault
from safemail.errors import SafeMailError
from safemail.gate import approvals, hashing, release_chain, stage
from safemail.gate.catalogue import Catalogue, load_catalogue, relative_to
from safemail.gate.report import (
    CREATED_BY_VERIFY,
    PROFILES,
    RunMetadata,
    build_report,
    host_keys_of,
    parse_junit,
    utc_iso,
    write_report,
)
from safemail.gate.waivers import DEFAULT_WAIVERS, load_waivers
from safemail.inventory import InventoryError, read_inventory
from safemail.project import Project

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
    # full: every test (test stage only); production: read-only tests needing no lab host.
    # Default: full on the test stage, production anywhere else.
    profile: str | None = None
    # Vault secrets for the inventory (production's are vaulted), passed to Ansible as its
    # own environment settings: testinfra's ansible backend reads the inventory through it.
    vault_ids: tuple[str, ...] = ()
    vault_password_file: str | None = None

    def ansible_env(self, repo: Path | None = None) -> dict[str, str]:
        """The vault source for the run's Ansible (testinfra reads the inventory through it):
        the options given, else, for an inventory whose vault.yml is ciphertext, the
        checkout's vault client (as promote and patch add it), unless the environment
        already names a source."""
        env: dict[str, str] = {}
        if self.vault_ids:
            env["ANSIBLE_VAULT_IDENTITY_LIST"] = ",".join(self.vault_ids)
        if self.vault_password_file:
            env["ANSIBLE_VAULT_PASSWORD_FILE"] = self.vault_password_file
        if not env and repo is not None:
            found = vault.vault_args(repo, Project(repo).inventory(self.stage))
            if found:
                env["ANSIBLE_VAULT_IDENTITY_LIST"] = found[1]
        return env

    def __post_init__(self) -> None:
        if self.profile is None:
            object.__setattr__(self, "profile", "full" if self.stage == "test" else "production")
        if self.profile not in PROFILES:
            raise SafeMailError(f"unknown verify profile {self.profile!r}")
        if self.profile == "full" and self.stage != "test":
            raise SafeMailError(
                f"the full suite reboots hosts, locks volumes, stops the S/MIME gate and needs "
                f"the lab participants: it runs on the test stage only, not on {self.stage}",
                f"run `safemail verify --stage {self.stage}` (the read-only production profile)",
            )


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
    opts: VerifyOptions,
    junit: Path,
    catalogue_path: Path,
    python: str | None = None,
    skipped: Path | None = None,
) -> list[str]:
    cmd = [
        python or sys.executable,
        "-m",
        "pytest",
        "verify/",
        # Only verify/'s own conftest.py: none from the checkout's root (or above), where an
        # untracked, git-ignored one could rewrite outcomes.
        "--confcutdir=verify",
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
        f"--safemail-profile={opts.profile}",
    ]
    if skipped is not None:
        cmd += [f"--safemail-profile-skipped={skipped}"]
    if opts.keyword:
        cmd += ["-k", opts.keyword]
    if opts.markexpr:
        cmd += ["-m", opts.markexpr]
    if opts.requirements:
        cmd += [f"--req-select={','.join(opts.requirements)}"]
    return cmd


# Environment variables by which the caller could change how the run connects to the hosts
# (another ssh, ssh options, a master connection, another ansible.cfg, another connection
# plugin): removed from a full run's environment, whose report is sealed as the stage's
# evidence; ANSIBLE_CONFIG is set to the checkout's own ansible.cfg (committed, hashed).
CONNECTION_ENV_PREFIXES = ("ANSIBLE_SSH_", "ANSIBLE_SCP_", "ANSIBLE_SFTP_", "ANSIBLE_PARAMIKO_",
                           "ANSIBLE_LIBSSH_", "MITOGEN_")
CONNECTION_ENV_NAMES = frozenset({
    "ANSIBLE_CONFIG", "ANSIBLE_PRIVATE_KEY_FILE", "ANSIBLE_HOST_KEY_CHECKING",
    "ANSIBLE_TRANSPORT", "ANSIBLE_REMOTE_PORT", "ANSIBLE_REMOTE_USER", "ANSIBLE_PIPELINING",
})


def _connection_setting(name: str) -> bool:
    upper = name.upper()
    return (upper.startswith(CONNECTION_ENV_PREFIXES) or upper in CONNECTION_ENV_NAMES
            or (upper.startswith("ANSIBLE_") and "CONNECT" in upper))


def pytest_environment(environ: Mapping[str, str], *, strip_connection: bool = False
                       ) -> dict[str, str]:
    """The caller's environment without pytest's own settings: PYTEST_ADDOPTS (-k, -m,
    --deselect ...) or PYTEST_PLUGINS would change what runs while the report still says
    "complete". The run's selection comes from safemail verify's own options only.
    ``strip_connection``: also without the Ansible/SSH connection settings above."""
    return {k: v for k, v in environ.items() if not k.upper().startswith("PYTEST_")
            and not (strip_connection and _connection_setting(k))}


def stream(
    cmd: Sequence[str],
    cwd: Path,
    log: Path,
    out: IO[str] | None = None,
    extra_env: dict[str, str] | None = None,
    strip_connection: bool = False,
) -> int:
    """Run cmd, copying its output to ``out`` (default stdout) and to ``log`` as it comes."""
    out = out or sys.stdout
    env = dict(pytest_environment(os.environ, strip_connection=strip_connection),
               PYTHONUNBUFFERED="1", **(extra_env or {}))
    if strip_connection:  # the checkout's own, committed ansible.cfg (cwd is the checkout)
        env["ANSIBLE_CONFIG"] = str(Path(cwd) / "ansible.cfg")
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


def _inventory_hosts(repo: Path, stage_name: str) -> list[str]:
    try:
        return [h.name for h in read_inventory(Project(repo).inventory(stage_name))]
    except InventoryError as exc:
        print(f"safemail verify: cannot read the inventory ({exc.message})", file=sys.stderr)
        return []


def _read_skipped(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            out.append({"id": str(entry["id"]), "reason": str(entry["reason"])})
    path.unlink()
    return out


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
    inventory = Project(repo).inventory(opts.stage)
    if not inventory.is_dir():
        raise SafeMailError(
            f"inventory {inventory} does not exist",
            "start the test stage with `safemail lab up`" if opts.stage == "test" else None,
        )
    if not (repo / "verify").is_dir():
        raise SafeMailError(f"no verify/ directory in {repo}", "run from the SafeMail checkout")
    if opts.stage == "production":
        problem = vault.example_password_problem(inventory, opts.ansible_env(repo))
        if problem:
            raise SafeMailError(problem)
    catalogue_path = (opts.catalogue or repo / "verify" / "requirements.yml").resolve()
    catalogue: Catalogue = relative_to(load_catalogue(catalogue_path), repo)
    unknown = [r for r in opts.requirements if r not in catalogue]
    if unknown:
        raise SafeMailError(
            f"unknown requirement id(s): {', '.join(unknown)}",
            f"ids are listed in {catalogue_path}",
        )
    waivers = load_waivers(
        opts.waivers or repo / DEFAULT_WAIVERS,
        known_ids=catalogue.ids,
        never_waivable=catalogue.never_waivable,
        policy=policy_for_waivers(repo, opts.waivers or repo / DEFAULT_WAIVERS),
    )

    started = dt.datetime.now(dt.UTC)
    report_dir = (report_dir or timestamp_dir(repo / "reports", opts.stage, started)).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    junit = report_dir / "junit.xml"
    skipped_file = report_dir / "profile-skipped.jsonl"
    cmd = pytest_command(opts, junit, catalogue_path, skipped=skipped_file)
    print(
        f"safemail verify: stage {opts.stage}, profile {opts.profile}, report in {report_dir}",
        file=out,
        flush=True,
    )
    print("safemail verify: " + " ".join(cmd[1:]), file=out, flush=True)
    exit_code = stream(cmd, repo, report_dir / "verify.log", out, opts.ansible_env(repo),
                       strip_connection=opts.profile == "full")
    finished = dt.datetime.now(dt.UTC)

    inventory_hosts = _inventory_hosts(repo, opts.stage)
    results = parse_junit([junit], known_hosts=inventory_hosts) if junit.exists() else []
    host_keys = host_keys_of(results)
    # The hosts the run reached: those a test ran against, and those whose keys it read.
    reached = sorted({t.host for t in results if t.host} | set(host_keys))
    meta = collect_metadata(repo, opts, started, finished, reached, exit_code)
    meta.created_by = CREATED_BY_VERIFY
    meta.profile = opts.profile
    meta.host_keys = host_keys
    meta.skipped_by_profile = _read_skipped(skipped_file)
    if junit.exists():
        meta.junit_sha256 = hashlib.sha256(junit.read_bytes()).hexdigest()
    else:
        meta.problems.append("pytest wrote no JUnit XML")
    report = build_report(results, catalogue, waivers, meta, generated=finished)
    json_path, html_path, digest = write_report(report, report_dir)
    sealed = _seal(repo, opts, json_path, out)
    if report_dir.parent.name == opts.stage and report_dir.parent.parent.name == "reports":
        update_latest(report_dir)
    _print_summary(report, json_path, html_path, out)
    if report["complete"] and opts.profile == "full" and not sealed:
        print("  not sealed: this report cannot be used to promote", file=out, flush=True)
    return VerifyResult(report_dir, report, digest, 0 if report["verdict"] == "pass" else 1)


def policy_for_waivers(repo: Path, waiver_file: Path) -> approvals.Policy | None:
    """The approval policy, needed (and required to exist) only when there are waivers."""
    try:
        if not yaml.safe_load(waiver_file.read_text(encoding="utf-8")):
            return None
    except (OSError, yaml.YAMLError):
        return None  # no file, or load_waivers reports it with its own message
    return release_chain.counting_policy(repo)


def _seal(repo: Path, opts: VerifyOptions, json_path: Path, out: IO[str]) -> bool:
    """Seal a full-profile report with the stage's SSH key; False if it cannot be sealed."""
    if opts.profile != "full" or opts.keyword or opts.markexpr or opts.requirements:
        return False  # a partial run or the production profile can never release anyway
    default = (repo / "verify" / "requirements.yml").resolve()
    if opts.catalogue is not None and opts.catalogue.resolve() != default:
        print(f"safemail verify: not sealed: --catalogue {opts.catalogue} is not the "
              "checkout's verify/requirements.yml", file=out)
        return False
    identity = stage.read_stage(repo, opts.stage)
    if identity.problems:
        # The run did not (provably) use the lab's own key and known_hosts: no seal.
        print("safemail verify: not sealed: the stage is not the lab as the gate knows it:\n  "
              + "\n  ".join(identity.problems), file=out)
        return False
    key = identity.run_key_private
    if key is None or not key.is_file():
        print(f"safemail verify: no readable stage SSH key ({key}) to seal the report",
              file=out)
        return False
    try:
        stage.seal(json_path, key)
    except SafeMailError as exc:
        print(f"safemail verify: cannot seal the report: {exc.message}", file=out)
        return False
    return True


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
