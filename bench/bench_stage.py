"""How fast the test stage reruns and verifies, each against a floor measured in the same run.

Rows (each with min/median/max over its rounds; a round runs the measured command and its
floor one after the other, the order alternating from round to round):

  rerun          ``ansible-playbook playbooks/site.yml`` on the converged stage (every host);
                 floor: ``ansible all -m ansible.builtin.setup`` (a bare fact run, same hosts)
  rerun-nspawn   the same with ``--limit`` the nspawn hosts; floor: the fact run on them
  verify         ``safemail verify --stage test`` (the whole suite, or ``--requirements``);
                 floor: the same number of plain SSH round trips (``ssh HOST true``) to the same
                 hosts, with the same number of parallel workers and the same SSH options
  converge       (only with ``--fresh``) ``safemail lab down``, ``safemail lab up`` and the first
                 ``site.yml`` on the fresh lab; floor: the fact run right after lab up

``--compare-baseline`` adds, for the rerun rows, the same playbook with the configuration
levers off in the same rounds (``ANSIBLE_STRATEGY=linear``: no Mitogen; ``ANSIBLE_GATHERING=
implicit``: facts in every play): the levers' own ratio, side by side.

Where the time goes: every playbook run writes per (host, role) seconds through the
``stage_timing`` callback (bench/callback_plugins/); the verify row sums JUnit times per test
module and per host. All of it, with the machine's load average before and after each command,
goes to bench/results/stage-<UTC time>.json.

Run (lab up, stage converged): ``make bench-stage`` or
``.venv/bin/python bench/bench_stage.py [--rows rerun,rerun-nspawn] [--rounds N]``.
The verify row reboots the VMs and locks volumes (it runs the real suite): nothing else should
use the stage meanwhile.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import _results
import verify_timeline

from safemail.gate.report import parse_junit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROWS = ("rerun", "rerun-nspawn", "verify", "converge")
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.M)


class BenchError(Exception):
    pass


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.update(extra or {})
    return env


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 3600,
         ok_codes: tuple[int, ...] = (0,)) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode not in ok_codes:
        raise BenchError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n"
                         f"{(proc.stdout + proc.stderr)[-3000:]}")
    return elapsed, proc


def _inventory() -> dict:
    _, proc = _run([str(BIN / "ansible-inventory"), "--list"])
    return json.loads(proc.stdout)


def _changed_config() -> list[str]:
    """ansible-config's settings that differ from Ansible's defaults (strategy, gathering...)."""
    proc = subprocess.run([str(BIN / "ansible-config"), "dump", "--only-changed"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, check=False)
    return [line for line in proc.stdout.splitlines() if line.strip()]


def nspawn_hosts(inv: dict) -> list[str]:
    hostvars = inv["_meta"]["hostvars"]
    return sorted(h for h, v in hostvars.items() if v.get("lab_hypervisor") == "nspawn")


# The floor gathers what site.yml's plays gather (gather_subset: [min, virtual]).
FACT_SUBSET = "gather_subset=min,virtual"
BASELINE = {"ANSIBLE_STRATEGY": "linear", "ANSIBLE_GATHERING": "implicit"}


def playbook_round(label: str, args: list[str], levers_off: bool, work: Path,
                   n: int) -> dict:
    """One site.yml run with the timing callback; changed tasks are a failed round (the
    stage must be converged: a rerun that changes something measures something else)."""
    out = work / f"{label}-{n}.json"
    extra = {"ANSIBLE_CALLBACK_PLUGINS": str(REPO / "bench" / "callback_plugins"),
             "ANSIBLE_CALLBACKS_ENABLED": "stage_timing",
             "SAFEMAIL_TIMING_OUT": str(out)}
    if levers_off:
        extra.update(BASELINE)
    load = _load()
    seconds, proc = _run([str(BIN / "ansible-playbook"), "playbooks/site.yml", *args],
                         env=_env(extra))
    recap = {m[0]: [int(x) for x in m[1:]] for m in RECAP.findall(proc.stdout)}
    changed = {h: v[1] for h, v in recap.items() if v[1]}
    if changed:
        raise BenchError(f"{label}: the rerun changed tasks on {changed}: converge the stage "
                         "first (ansible-playbook playbooks/site.yml)")
    timing = json.loads(out.read_text()) if out.exists() else {}
    return {"seconds": round(seconds, 2), "load_before": load, "load_after": _load(),
            "per_host_total": timing.get("per_host_total", {}),
            "per_host_role": timing.get("per_host_role", {}),
            "tasks_run": timing.get("tasks_run", {})}


def fact_round(pattern: str) -> dict:
    load = _load()
    seconds, _ = _run([str(BIN / "ansible"), pattern, "-m", "ansible.builtin.setup",
                       "-a", FACT_SUBSET])
    return {"seconds": round(seconds, 2), "load_before": load, "load_after": _load()}


# --- verify -------------------------------------------------------------------------------

SSH_LOGGER = """#!{python}
# bench_stage: log the options and destination of every ssh call the verify suite makes (one
# JSON line, no remote command: it may carry passwords), then run the real ssh.
import json, os, shlex, sys
args = sys.argv[1:]
opts, dest, i = [], None, 0
while i < len(args):
    tokens = shlex.split(args[i]) if args[i].startswith("-") and " " in args[i] else [args[i]]
    head = tokens[0]
    if head in ("-o", "-i", "-F", "-p", "-l", "-S") and len(tokens) == 1 and i + 1 < len(args):
        opts += [head, args[i + 1]]; i += 2; continue
    if head.startswith("-"):
        opts += tokens; i += 1; continue
    dest = head.split()[0]; break
with open(os.environ["SAFEMAIL_SSH_LOG"], "a") as log:
    log.write(json.dumps({{"opts": opts, "dest": dest}}) + "\\n")
os.execv({ssh!r}, ["ssh", *args])
"""


def verify_round(work: Path, n: int, requirements: str | None) -> dict:
    """One `safemail verify` run; every ssh call it makes is logged (a wrapper first on PATH)
    so that the floor can replay the same number of round trips to the same hosts."""
    shim = work / "sshlog"
    shim.mkdir(exist_ok=True)
    real = subprocess.run(["sh", "-c", "command -v ssh"], capture_output=True, text=True,
                          check=True).stdout.strip()
    (shim / "ssh").write_text(SSH_LOGGER.format(python=sys.executable, ssh=real))
    (shim / "ssh").chmod(0o755)
    log = work / f"ssh-{n}.log"
    report = work / f"verify-{n}"
    timeline = work / f"timeline-{n}.jsonl"
    env = _env({"SAFEMAIL_SSH_LOG": str(log), "SAFEMAIL_VERIFY_TIMELINE": str(timeline)})
    env["PATH"] = f"{shim}:{env['PATH']}"
    cmd = [str(BIN / "safemail"), "verify", "--stage", "test", "--report-dir", str(report)]
    if requirements:
        cmd += ["--requirements", requirements]
    load = _load()
    seconds, proc = _run(cmd, env=env, timeout=5400, ok_codes=(0, 1))
    junit = report / "junit.xml"
    modules, hosts, failed, tests, waited = _junit_breakdown(junit)
    if failed:
        # A failing suite measures something else (a test that gave up early, a timeout).
        raise BenchError(f"verify round {n + 1}: {len(failed)} test(s) failed: {failed[:5]}")
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"seconds": round(seconds, 2), "load_before": load, "load_after": _load(),
            "exit_code": proc.returncode, "tests": tests, "failed": failed,
            "ssh_calls": len(calls), "per_module": modules, "per_host": hosts,
            "lock_wait_seconds": waited,
            "timeline": _timeline(timeline),
            "_calls": calls}


def _timeline(path: Path) -> dict | None:
    """The lock timeline's analysis (bench/verify_timeline.py); a damaged file (a worker killed
    mid-line) is recorded as an error instead of losing the whole round."""
    if not path.exists():
        return None
    try:
        return verify_timeline.analyse(verify_timeline.load(path))
    except (OSError, ValueError, KeyError) as exc:
        return {"error": f"{path.name}: {exc}"}


def _lock_waits(junit: Path) -> dict[str, float]:
    """Seconds each test waited for a controller lock (verify/conftest.py's `lock_wait`)."""
    waits: dict[str, float] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314 - our own pytest output
        classname, name = case.get("classname", ""), case.get("name", "")
        for prop in case.iter("property"):
            if prop.get("name") == "lock_wait":
                waits[f"{classname}::{name}"] = float(prop.get("value") or 0)
    return waits


def _junit_breakdown(junit: Path) -> tuple[dict, dict, list[str], int, float]:
    """Seconds per test module and per host (without the waits for the controller's locks),
    the failed tests, the number of tests and the seconds spent waiting for locks."""
    if not junit.exists():
        raise BenchError(f"verify wrote no {junit}")
    modules: dict[str, float] = defaultdict(float)
    hosts: dict[str, float] = defaultdict(float)
    results = parse_junit([junit])
    waits = _lock_waits(junit)
    for r in results:
        own = max(0.0, r.duration - waits.get(r.id, 0.0))
        modules[r.id.split("::")[0].split(".")[-1]] += own
        m = re.search(r"\[(?:ansible://)?([\w.-]+)", r.id)
        hosts[r.host or (m.group(1) if m else "-")] += own
    failed = [r.id for r in results if r.outcome in ("failed", "error")]
    return ({k: round(v, 1) for k, v in sorted(modules.items())},
            {k: round(v, 1) for k, v in sorted(hosts.items())}, failed, len(results),
            round(sum(waits.values()), 1))


def ssh_floor(calls: list[dict], workers: int) -> dict:
    """Replay as many `ssh HOST true` as verify made, to the same hosts with the same options,
    `workers` at a time (verify's pytest workers)."""
    targets = [(c["opts"], c["dest"]) for c in calls if c.get("dest")]
    if not targets:
        raise BenchError("the verify run made no ssh call through the logged ssh")

    def one(target: tuple[list[str], str]) -> None:
        opts, dest = target
        proc = subprocess.run(["ssh", *opts, dest, "true"], capture_output=True, timeout=120,
                              check=False)
        if proc.returncode != 0:
            raise BenchError(f"floor: ssh {dest} true failed: {proc.stderr.strip()[-300:]}")

    load = _load()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, targets))
    return {"seconds": round(time.perf_counter() - start, 2), "round_trips": len(targets),
            "load_before": load, "load_after": _load()}


# --- fresh converge -----------------------------------------------------------------------

def converge_round(work: Path, n: int) -> dict:
    _run([str(BIN / "safemail"), "lab", "down"], timeout=600)
    up, _ = _run([str(BIN / "safemail"), "lab", "up"], timeout=1800)
    floor = fact_round("all")
    out = work / f"converge-{n}.json"
    extra = {"ANSIBLE_CALLBACK_PLUGINS": str(REPO / "bench" / "callback_plugins"),
             "ANSIBLE_CALLBACKS_ENABLED": "stage_timing", "SAFEMAIL_TIMING_OUT": str(out)}
    load = _load()
    seconds, _ = _run([str(BIN / "ansible-playbook"), "playbooks/site.yml"], env=_env(extra),
                      timeout=5400)
    timing = json.loads(out.read_text()) if out.exists() else {}
    return {"lab_up_seconds": round(up, 2), "seconds": round(seconds, 2), "floor": floor,
            "load_before": load, "load_after": _load(),
            "per_host_total": timing.get("per_host_total", {}),
            "per_host_role": timing.get("per_host_role", {})}


# --- summary ------------------------------------------------------------------------------

def stats(values: list[float]) -> dict:
    return {"n": len(values), "min": round(min(values), 2),
            "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def ratio_stats(pairs: list[tuple[float, float]]) -> dict:
    ratios = [a / b for a, b in pairs if b > 0]
    return stats(ratios) if ratios else {}


def slowest_host_roles(rounds: list[dict]) -> dict:
    """Median seconds per role on each host, over the rounds."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rounds:
        for host, roles in r.get("per_host_role", {}).items():
            for role, s in roles.items():
                acc[host][role].append(s)
    return {h: {role: round(statistics.median(v), 1) for role, v in sorted(roles.items())}
            for h, roles in sorted(acc.items())}


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Time the stage's rerun and verify against floors measured in the same run "
                    "(lab up, stage converged).",
        epilog="Writes bench/results/stage-<UTC time>.json; docs/PERFORMANCE.md explains rows.")
    parser.add_argument("--rows", default="rerun,rerun-nspawn",
                        help=f"comma-separated rows of {', '.join(ROWS)} "
                             "(default: rerun,rerun-nspawn)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="paired rounds per row (default 10; verify and converge rows use "
                             "--verify-rounds)")
    parser.add_argument("--verify-rounds", type=int, default=3,
                        help="rounds of the verify and converge rows (default 3)")
    parser.add_argument("--requirements", help="verify row: only these requirement ids")
    parser.add_argument("--compare-baseline", action="store_true",
                        help="rerun rows: also run site.yml with the levers off in every round "
                             "(Ansible's linear strategy without Mitogen, facts in every play)")
    parser.add_argument("--fresh", action="store_true",
                        help="allow the converge row (takes the lab down and up each round)")
    parser.add_argument("--out", type=Path, default=_results.DEFAULT_DIR,
                        help="result directory (default: bench/results)")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown row(s): {', '.join(unknown)} (known: {', '.join(ROWS)})")
    if "converge" in rows and not args.fresh:
        parser.error("the converge row takes the lab down and up: add --fresh")
    if args.rounds < 1 or args.verify_rounds < 1:
        parser.error("--rounds and --verify-rounds must be at least 1")

    try:
        inv = _inventory()
    except BenchError as exc:
        print(f"bench_stage: cannot read the test inventory: {exc}", file=sys.stderr)
        return 2
    if not inv.get("_meta", {}).get("hostvars"):
        print("bench_stage: the inventory has no hosts: is the lab up (safemail lab up)?",
              file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    result: dict = {
        "benchmark": "stage",
        "when": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "load_at_start": _load()},
        "ansible_config": _changed_config(),
        "rows": {},
    }
    nspawn = nspawn_hosts(inv)
    work = Path(tempfile.mkdtemp(prefix="bench-stage-"))
    try:
        for row in rows:
            print(f"bench_stage: {row} ...", file=sys.stderr, flush=True)
            result["rows"][row] = run_row(row, args, nspawn, work)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"bench_stage: {exc}", file=sys.stderr)
        result["error"] = str(exc)[-2000:]
        _results.write(result, args.out)
        return 1
    finally:
        # The verify rounds' reports and logs hold mail addresses and evidence: not kept.
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    _results.write(result, args.out)
    return 0


def run_row(row: str, args: argparse.Namespace, nspawn: list[str], work: Path) -> dict:
    if row in ("rerun", "rerun-nspawn"):
        limit = ["--limit", ",".join(nspawn)] if row == "rerun-nspawn" else []
        pattern = ",".join(nspawn) if row == "rerun-nspawn" else "all"
        runs, floors, others = [], [], []
        for n in range(args.rounds):
            def measured(n=n):
                runs.append(playbook_round(row, limit, False, work, n))

            def floor():
                floors.append(fact_round(pattern))

            def other(n=n):
                if args.compare_baseline:
                    others.append(playbook_round(f"{row}-baseline", limit, True, work, n))

            steps = [measured, floor, other] if n % 2 == 0 else [other, floor, measured]
            for step in steps:
                step()
            print(f"  round {n + 1}/{args.rounds}: {runs[-1]['seconds']} s, floor "
                  f"{floors[-1]['seconds']} s"
                  + (f", levers off {others[-1]['seconds']} s" if others else ""),
                  file=sys.stderr, flush=True)
        out = {"command": "ansible-playbook playbooks/site.yml " + " ".join(limit),
               "floor_command": f"ansible {pattern} -m ansible.builtin.setup -a {FACT_SUBSET}",
               "seconds": stats([r["seconds"] for r in runs]),
               "floor_seconds": stats([f["seconds"] for f in floors]),
               "ratio_to_floor": ratio_stats([(r["seconds"], f["seconds"])
                                              for r, f in zip(runs, floors, strict=True)]),
               "per_host_role_median": slowest_host_roles(runs),
               "tasks_run": runs[-1]["tasks_run"],
               "rounds": runs, "floors": floors}
        if others:
            out["baseline_env"] = BASELINE
            out["baseline_seconds"] = stats([o["seconds"] for o in others])
            out["ratio_to_baseline"] = ratio_stats(
                [(r["seconds"], o["seconds"]) for r, o in zip(runs, others, strict=True)])
            out["baseline_ratio_to_floor"] = ratio_stats(
                [(o["seconds"], f["seconds"]) for o, f in zip(others, floors, strict=True)])
            out["baseline_per_host_role_median"] = slowest_host_roles(others)
            out["baseline_rounds"] = others
        return out
    if row == "verify":
        runs, floors = [], []
        for n in range(args.verify_rounds):
            run = verify_round(work, n, args.requirements)
            floor = ssh_floor(run.pop("_calls"), 4)
            runs.append(run)
            floors.append(floor)
            print(f"  round {n + 1}/{args.verify_rounds}: {run['seconds']} s "
                  f"({run['tests']} tests, {len(run['failed'])} failed, {run['ssh_calls']} ssh "
                  f"calls), floor {floor['seconds']} s", file=sys.stderr, flush=True)
        modules: dict[str, list[float]] = defaultdict(list)
        for r in runs:
            for m, s in r["per_module"].items():
                modules[m].append(s)
        return {"command": "safemail verify --stage test"
                + (f" --requirements {args.requirements}" if args.requirements else ""),
                "floor_command": "the same number of `ssh HOST true`, 4 at a time",
                "seconds": stats([r["seconds"] for r in runs]),
                "floor_seconds": stats([f["seconds"] for f in floors]),
                "ratio_to_floor": ratio_stats([(r["seconds"], f["seconds"])
                                               for r, f in zip(runs, floors, strict=True)]),
                "per_module_median": {m: round(statistics.median(v), 1)
                                      for m, v in sorted(modules.items())},
                "rounds": runs, "floors": floors}
    if row == "converge":
        runs = [converge_round(work, n) for n in range(args.verify_rounds)]
        return {"command": "safemail lab down; safemail lab up; ansible-playbook "
                           "playbooks/site.yml",
                "seconds": stats([r["seconds"] for r in runs]),
                "floor_seconds": stats([r["floor"]["seconds"] for r in runs]),
                "ratio_to_floor": ratio_stats([(r["seconds"], r["floor"]["seconds"])
                                               for r in runs]),
                "per_host_role_median": slowest_host_roles(runs),
                "rounds": runs}
    raise BenchError(f"unknown row {row}")


if __name__ == "__main__":
    sys.exit(main())
