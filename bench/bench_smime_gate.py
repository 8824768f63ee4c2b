"""Benchmark the S/MIME gate inside Postfix: messages/s and CPU per message with the gate, with
the same milter doing no classification, and without a milter (ratios measured side by side,
same machine, same run: docs/architecture.md#quality-bars).

On the relay (default: the first host of the inventory's ``relay`` group) it adds, for the
length of the run only, three loopback listeners to master.cf that are the same smtpd except
for the milter:

  * ``127.0.0.1:10587`` (``with_gate``)    — main.cf's ``smtpd_milters`` (the S/MIME gate);
  * ``127.0.0.1:10589`` (``null_gate``)    — the gate's own milter code with a message gate
    that accepts without looking (bench/null_gate.py, a transient unit under the gate's
    account on a socket beside the gate's): the milter protocol's cost alone;
  * ``127.0.0.1:10588`` (``without_gate``) — ``-o smtpd_milters=``.

All three skip TLS and SASL (loopback, no credentials on the relay), name themselves to the
gate as local mail (``milter_macro_daemon_name=safemail-local``: the gate defers submission
without a login) and hand every message to ``content_filter=discard:``, so the queue manager
throws it away instead of filling the store's mailboxes; everything else (cleanup,
mime_header_checks, the directory lookup of the recipient at RCPT, the queue file) is the
same on all. The sender (bench/gate_sender.py) runs on the relay itself and sends synthetic
enveloped messages of 10 KB, 1 MB and 10 MB; each round sends one batch per arm, the order
alternating (A B C, C B A). Around every batch it reads the CPU time systemd accounts to
Postfix, the gate and the null gate. Afterwards (also after a failure or Ctrl-C) the
original master.cf is put back, Postfix reloaded and the null gate stopped.

Per size: the median rate per arm; the paired ratios (with / without, null / without, with /
null, one per round) as median and a distribution-free ~95 % confidence interval of the
median (order statistics); CPU seconds per message of Postfix and of the milter, per arm.
JSON to bench/results/smime_gate-<UTC time>.json and stdout.

Run (lab up, relay converged; it disturbs the relay for several minutes):
``.venv/bin/python bench/bench_smime_gate.py [--rounds N] [--host relay1]``.
``--restore`` only puts master.cf back (after an interrupted run that could not clean up).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import _results
import native_relay

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SENDER = Path(__file__).with_name("gate_sender.py")
NULL_GATE = Path(__file__).with_name("null_gate.py")
RUNTIME_PYTHON = "/opt/safemail/venv/bin/python"
MASTER = "/etc/postfix/master.cf"
BACKUP = "/etc/postfix/master.cf.bench-orig"
ARMS = {"with_gate": 10587, "null_gate": 10589, "without_gate": 10588}
NULL_UNIT = "safemail-bench-null-gate.service"
NULL_SOCKET = "/run/safemail-gate/bench-null.sock"
NULL_SCRIPT = "/run/safemail-bench-null-gate.py"
UNITS = {"postfix": "postfix@-.service", "gate": "safemail-smime-gate.service",
         "null_gate": NULL_UNIT}
# message size -> messages per round (bounded: the 10 MB rounds dominate the run time)
# Messages per batch (size: count), per relay: each batch lasts about a second on the native
# relay and several on the emulated one, so a batch is long against the clock's and the
# scheduler's noise.
PLANS = {
    "vm": {10_000: 20, 1_000_000: 5, 10_000_000: 2},
    "native": {10_000: 300, 1_000_000: 40, 10_000_000: 6},
}
# (numerator arm, denominator arm) of the paired ratios
RATIOS = (("with_gate", "without_gate"), ("null_gate", "without_gate"),
          ("with_gate", "null_gate"))

_COMMON = ["smtpd_tls_security_level=none", "smtpd_sasl_auth_enable=no",
           "smtpd_client_restrictions=permit_mynetworks,reject", "content_filter=discard:",
           "milter_macro_daemon_name=safemail-local"]


def _listener(arm: str, extra: list[str]) -> str:
    options = [f"syslog_name=postfix/bench-{arm.replace('_', '-')}", *_COMMON, *extra]
    return (f"127.0.0.1:{ARMS[arm]} inet n - n - - smtpd\n"
            + "".join(f"  -o {option}\n" for option in options))


LISTENERS = ("# bench_smime_gate.py: temporary loopback listeners, removed when it ends\n"
             + _listener("with_gate", [])
             + _listener("null_gate", [f"smtpd_milters=unix:{NULL_SOCKET}"])
             + _listener("without_gate", ["smtpd_milters="]))

# A crashed earlier run left a backup or the null gate: clean up before anything else.
_RESTORE = (f"systemctl stop {NULL_UNIT} 2>/dev/null; systemctl reset-failed {NULL_UNIT} "
            f"2>/dev/null; rm -f {NULL_SOCKET} {NULL_SCRIPT}; "

            f"if [ -f {BACKUP} ]; then mv -f {BACKUP} {MASTER} && postfix check && "
            "postfix reload; fi")
_ADD = (f"{_RESTORE}; set -e; install -m 0644 /dev/stdin {NULL_SCRIPT}; "
        f"systemd-run --quiet --unit={NULL_UNIT} -p User=safemail-gate -p Group=safemail-gate "
        f"-p UMask=0117 {RUNTIME_PYTHON} {NULL_SCRIPT} unix:{NULL_SOCKET}; "
        f"cp -p {MASTER} {BACKUP}; "
        f"printf '%s' {shlex.quote(LISTENERS)} >> {MASTER}; postfix check; postfix reload; "
        f"for i in $(seq 30); do ss -ltn | grep -q '127.0.0.1:{ARMS['without_gate']} ' "
        f"&& test -S {NULL_SOCKET} && exit 0; sleep 1; done; "
        "echo 'bench listeners or the null gate did not come up' >&2; exit 1")


def _env() -> dict[str, str]:
    return {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def _inventory(host: str | None) -> tuple[str, dict]:
    out = subprocess.run([str(BIN / "ansible-inventory"), "--list"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, check=True).stdout
    inv = json.loads(out)
    host = host or inv["relay"]["hosts"][0]
    return host, inv["_meta"]["hostvars"][host]


def _ssh_argv(hv: dict) -> list[str]:
    argv = ["ssh", "-o", "BatchMode=yes", *shlex.split(hv.get("ansible_ssh_common_args", ""))]
    if hv.get("ansible_ssh_private_key_file"):
        argv += ["-i", hv["ansible_ssh_private_key_file"]]
    return [*argv, f"{hv.get('ansible_user', 'root')}@{hv.get('ansible_host')}"]


def _remote(ssh: list[str], command: str, stdin: bytes | None = None,
            progress: bool = False) -> str:
    """stdout of `command` on the relay; with `progress` its stderr goes to ours as it comes."""
    proc = subprocess.run([*ssh, command], input=stdin, stdout=subprocess.PIPE,
                          stderr=None if progress else subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"on the relay: {command[:80]}... failed ({proc.returncode}): "
                         f"{(proc.stdout + (proc.stderr or b'')).decode(errors='replace')[-1500:]}")
    return proc.stdout.decode()


def median_ci(values: list[float]) -> tuple[float, float, float]:
    """Median and a distribution-free confidence interval of the median: the order statistics
    x(k), x(n-k+1) with k the largest rank whose binomial tail P(B(n, 1/2) < k) stays <= 2.5 %
    (for n = 10: x(2)..x(9), 97.9 % coverage; n < 6 gives the whole range)."""
    xs = sorted(values)
    n = len(xs)

    def below(j: int) -> float:  # P(B(n, 1/2) < j)
        return sum(math.comb(n, i) for i in range(j)) / 2**n

    k = 0
    while k + 1 <= n - k and below(k + 1) <= 0.025:
        k += 1
    k = max(k, 1)
    return statistics.median(xs), xs[k - 1], xs[n - k]


def _summary(raw: dict, rounds: int) -> list[dict]:
    out = []
    for item in raw["results"]:
        count = item["count"]
        rate = {arm: [count / s for s in secs] for arm, secs in item["seconds"].items()}
        ratios = {}
        for top, bottom in RATIOS:
            paired = [a / b for a, b in zip(rate[top], rate[bottom], strict=True)]
            med, low, high = median_ci(paired)
            ratios[f"{top}/{bottom}"] = {"median": round(med, 3), "ci95": [round(low, 3),
                                         round(high, 3)], "per_round": [round(x, 3)
                                                                         for x in paired]}
        cpu = {}
        for arm, batches in item["cpu_ns"].items():
            milter_unit = {"with_gate": "gate", "null_gate": "null_gate"}.get(arm)
            cpu[arm] = {
                "postfix_s_per_msg": round(statistics.median(
                    b["postfix"] for b in batches) / count / 1e9, 4),
                "milter_s_per_msg": round(statistics.median(
                    b[milter_unit] for b in batches) / count / 1e9, 4) if milter_unit else 0.0,
            }
        out.append({
            "message_bytes": item["message_bytes"],
            "messages_per_round": count,
            "rounds": rounds,
            "seconds": {arm: [round(s, 3) for s in secs] for arm, secs in item["seconds"].items()},
            "median_messages_per_s": {arm: round(statistics.median(r), 2)
                                      for arm, r in rate.items()},
            "paired_ratios": ratios,
            "cpu_median": cpu,
        })
    return out


def _run_on(
    name: str, remote, sender: str, recipient: str, rounds: int, plan: dict[int, int]
) -> dict:
    """The three arms on one relay; `remote(command, stdin=None)` runs a shell command there."""
    print(f"{name}: adding bench listeners {sorted(ARMS.values())} and the null gate",
          file=sys.stderr)
    config = {"sender": sender, "recipient": recipient, "arms": ARMS, "rounds": rounds,
              "plan": [[size, count] for size, count in plan.items()], "units": UNITS}
    try:
        remote(_ADD, stdin=NULL_GATE.read_bytes())
        started = dt.datetime.now(dt.UTC)
        load_before = remote("cat /proc/loadavg").split()[:3]
        raw = json.loads(remote(shlex.join([RUNTIME_PYTHON, "-", json.dumps(config)]),
                                stdin=SENDER.read_bytes(), progress=True))
        elapsed = (dt.datetime.now(dt.UTC) - started).total_seconds()
    finally:
        remote(_RESTORE)
        print(f"{name}: bench listeners removed, master.cf restored, postfix reloaded, "
              "null gate stopped", file=sys.stderr)
    return {
        "relay": name,
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": raw["python"],
        "cpus": raw["cpus"],
        "machine": raw["machine"],
        "wall_seconds": round(elapsed, 1),
        "load_before": load_before,
        "load_after": raw["load"],
        "controller_load_after": list(os.getloadavg()),
        "results": _summary(raw, rounds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--host", help="relay host (default: first of the relay group)")
    parser.add_argument("--relays", default="vm,native",
                        help="where to run, in this order: vm (the lab's relay, emulated), "
                             "native (a throwaway nspawn relay on the host CPU, "
                             "bench/native_relay.py); default vm,native")
    parser.add_argument("--out", type=Path, default=_results.DEFAULT_DIR)
    parser.add_argument("--restore", action="store_true",
                        help="only put the relay's original master.cf back and reload")
    args = parser.parse_args()
    relays = [r.strip() for r in args.relays.split(",") if r.strip()]
    if not relays or set(relays) - {"vm", "native"}:
        parser.error(f"--relays takes vm and/or native, got {args.relays!r}")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the order alternates between rounds)")
    host = hv = ssh = None
    if "vm" in relays or args.restore:
        host, hv = _inventory(args.host)
        ssh = _ssh_argv(hv)
    if args.restore:
        _remote(ssh, _RESTORE)
        print(f"{host}: master.cf restored (if a benchmark backup was there)", file=sys.stderr)
        return 0
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    runs = []
    for relay in relays:
        if relay == "vm":
            participants = hv["safemail_participants"]
            runs.append(_run_on(
                host, lambda command, stdin=None, progress=False: _remote(
                    ssh, command, stdin, progress),
                participants[0]["mailbox"], participants[-1]["mailbox"], args.rounds,
                PLANS["vm"]))
            runs[-1]["lab_machine"] = hv.get("lab_machine")
        else:
            native = native_relay.NativeRelay()
            try:
                print("native: starting a throwaway nspawn relay", file=sys.stderr)
                native.start()
                runs.append(_run_on("native", native.run, "praxis1@safenet.test",
                                    "praxis2@safenet.test", args.rounds, PLANS["native"]))
            finally:
                native.stop()
    _results.write({"benchmark": "smime_gate", "when": when, "runs": runs}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
