"""Benchmark the S/MIME gate inside Postfix: messages/s with and without the milter (DESIGN §7:
ratios measured side by side, same machine, same run).

On the relay (default: the first host of the inventory's ``relay`` group) it adds, for the
length of the run only, two loopback listeners to master.cf that are the same smtpd except for
the gate:

  * ``127.0.0.1:10587`` (``with_gate``)    — main.cf's ``smtpd_milters`` (the S/MIME gate);
  * ``127.0.0.1:10588`` (``without_gate``) — ``-o smtpd_milters=``.

Both skip TLS and SASL (loopback, no credentials on the relay) and hand every message to
``content_filter=discard:``, so the queue manager throws it away instead of filling the
store's mailboxes; everything else (cleanup, mime_header_checks, the directory lookup of the
recipient at RCPT, the queue file) is the same on both. The sender (bench/gate_sender.py) runs
on the relay itself and sends synthetic enveloped messages of 10 KB, 1 MB and 10 MB, rounds
alternating the order of the listeners. Afterwards — also after a failure or Ctrl-C — the
original master.cf is put back and Postfix reloaded.

Writes medians and the ratio (throughput with the gate / without) as JSON to
bench/results/smime_gate-<UTC time>.json and stdout.

Run (lab up, relay converged; it disturbs the relay for about a minute):
``.venv/bin/python bench/bench_smime_gate.py [--rounds N] [--host relay1]``.
``--restore`` only puts master.cf back (after an interrupted run that could not clean up).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import _results

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SENDER = Path(__file__).with_name("gate_sender.py")
RUNTIME_PYTHON = "/opt/safemail/venv/bin/python"
MASTER = "/etc/postfix/master.cf"
BACKUP = "/etc/postfix/master.cf.bench-orig"
PORTS = {"with_gate": 10587, "without_gate": 10588}
# message size -> messages per round (bounded: the 10 MB rounds dominate the run time)
PLAN = {10_000: 20, 1_000_000: 5, 10_000_000: 2}

_COMMON = ["smtpd_tls_security_level=none", "smtpd_sasl_auth_enable=no",
           "smtpd_client_restrictions=permit_mynetworks,reject", "content_filter=discard:"]


def _listener(arm: str, extra: list[str]) -> str:
    options = [f"syslog_name=postfix/bench-{arm.replace('_', '-')}", *_COMMON, *extra]
    return (f"127.0.0.1:{PORTS[arm]} inet n - n - - smtpd\n"
            + "".join(f"  -o {option}\n" for option in options))


LISTENERS = ("# bench_smime_gate.py: temporary loopback listeners, removed when it ends\n"
             + _listener("with_gate", []) + _listener("without_gate", ["smtpd_milters="]))

# A crashed earlier run left a backup: restore it before anything else.
_RESTORE = (f"if [ -f {BACKUP} ]; then mv -f {BACKUP} {MASTER} && postfix check && "
            "postfix reload; fi")
_ADD = (f"{_RESTORE}; set -e; cp -p {MASTER} {BACKUP}; "
        f"printf '%s' {shlex.quote(LISTENERS)} >> {MASTER}; postfix check; postfix reload; "
        f"for i in $(seq 30); do ss -ltn | grep -q '127.0.0.1:{PORTS['without_gate']} ' "
        "&& exit 0; sleep 1; done; echo 'bench listeners did not come up' >&2; exit 1")


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


def _remote(ssh: list[str], command: str, stdin: bytes | None = None) -> str:
    proc = subprocess.run([*ssh, command], input=stdin, capture_output=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"on the relay: {command[:80]}... failed ({proc.returncode}): "
                         f"{(proc.stdout + proc.stderr).decode(errors='replace')[-1500:]}")
    return proc.stdout.decode()


def _summary(raw: dict, rounds: int) -> list[dict]:
    out = []
    for item in raw["results"]:
        rate = {arm: [item["count"] / s for s in secs] for arm, secs in item["seconds"].items()}
        median = {arm: statistics.median(r) for arm, r in rate.items()}
        out.append({
            "message_bytes": item["message_bytes"],
            "messages_per_round": item["count"],
            "rounds": rounds,
            "seconds": {arm: [round(s, 3) for s in secs] for arm, secs in item["seconds"].items()},
            "median_messages_per_s": {arm: round(m, 2) for arm, m in median.items()},
            # throughput with the gate as a share of throughput without it
            "ratio_with_over_without": round(median["with_gate"] / median["without_gate"], 3),
        })
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--host", help="relay host (default: first of the relay group)")
    parser.add_argument("--out", type=Path, default=_results.DEFAULT_DIR)
    parser.add_argument("--restore", action="store_true",
                        help="only put the relay's original master.cf back and reload")
    args = parser.parse_args()
    host, hv = _inventory(args.host)
    ssh = _ssh_argv(hv)
    if args.restore:
        _remote(ssh, _RESTORE)
        print(f"{host}: master.cf restored (if a benchmark backup was there)", file=sys.stderr)
        return 0
    participants = hv["safemail_participants"]
    sender, recipient = participants[0]["mailbox"], participants[-1]["mailbox"]
    plan = [f"{size}:{count}" for size, count in PLAN.items()]
    print(f"{host}: adding bench listeners {sorted(PORTS.values())}", file=sys.stderr)
    try:
        _remote(ssh, _ADD)
        started = dt.datetime.now(dt.UTC)
        raw = json.loads(_remote(
            ssh,
            shlex.join([RUNTIME_PYTHON, "-", sender, recipient, str(PORTS["with_gate"]),
                        str(PORTS["without_gate"]), str(args.rounds), *plan]),
            stdin=SENDER.read_bytes()))
        elapsed = (dt.datetime.now(dt.UTC) - started).total_seconds()
    finally:
        _remote(ssh, _RESTORE)
        print(f"{host}: bench listeners removed, master.cf restored, postfix reloaded",
              file=sys.stderr)
    result = {
        "benchmark": "smime_gate",
        "when": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": host,
        "host_python": raw["python"],
        "host_cpus": raw["cpus"],
        "host_machine": raw["machine"],
        "lab_machine": hv.get("lab_machine"),
        "wall_seconds": round(elapsed, 1),
        "results": _summary(raw, args.rounds),
    }
    _results.write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
