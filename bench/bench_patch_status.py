"""Benchmark `safemail patch status` against the equivalent Ansible runs (ratios measured
side by side, in the same run, against the same stage: docs/architecture.md#quality-bars).

Times, alternating, `--repeat` times each:
  * ``patch_status`` — ``safemail patch status --json`` (one ``ssh`` per host with Ansible's
    own command line, reads /var/lib/safemail/patch-status.json on every service host; until
    session 9 pyinfra);
  * ``ansible_setup`` — ``ansible service -m ansible.builtin.setup`` (the fact run the issue
    names as the comparison);
  * ``ansible_slurp`` — ``ansible service -m ansible.builtin.slurp`` of the same status file
    (the closest Ansible equivalent of what patch status reads).
Each includes process start-up and inventory reading, as an operator experiences it. Writes
the medians and ratios as JSON to bench/results/patch_status-<UTC time>.json and stdout.

Run (lab up, stage converged): ``.venv/bin/python bench/bench_patch_status.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _results

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STATUS = "/var/lib/safemail/patch-status.json"

COMMANDS = {
    "patch_status": [str(BIN / "safemail"), "patch", "status", "--json"],
    "ansible_setup": [str(BIN / "ansible"), "service", "-m", "ansible.builtin.setup"],
    "ansible_slurp": [str(BIN / "ansible"), "service", "-m", "ansible.builtin.slurp",
                      "-a", f"src={STATUS}"],
}


def _time(cmd: list[str]) -> float:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): "
                         f"{(proc.stdout + proc.stderr)[-1500:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=_results.DEFAULT_DIR)
    args = parser.parse_args()
    hosts = json.loads(subprocess.run(COMMANDS["patch_status"], cwd=REPO, capture_output=True,
                                      text=True, check=False).stdout or "[]")
    timings: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeat):
        for name, cmd in COMMANDS.items():  # alternate: drift hits every command alike
            timings[name].append(_time(cmd))
    medians = {name: statistics.median(t) for name, t in timings.items()}
    result = {
        "benchmark": "patch_status",
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hosts": [h["host"] for h in hosts],
        "repeat": args.repeat,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "seconds": {name: [round(x, 3) for x in t] for name, t in timings.items()},
        "median_seconds": {name: round(m, 3) for name, m in medians.items()},
        "ratio_setup_over_patch_status": round(medians["ansible_setup"]
                                               / medians["patch_status"], 2),
        "ratio_slurp_over_patch_status": round(medians["ansible_slurp"]
                                               / medians["patch_status"], 2),
    }
    _results.write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
