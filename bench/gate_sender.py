"""The sending half of bench_smime_gate.py; runs ON the relay (piped over SSH to its runtime
Python, /opt/safemail/venv/bin/python), so emulated networking never enters the figures.

Sends synthetic S/MIME enveloped messages (safemail.smime.samples, the same catalogue the gate's
tests use) to loopback listeners that differ only in the milter (``arms``: the gate, the same
milter doing no classification, no milter). Each round is one SMTP session per arm with
``count`` messages, timed from the first MAIL FROM to the last DATA reply; the order of the arms
alternates (A B C, then C B A), so drift and position favour none. Around every batch it reads
the CPU time the kernel counted in each unit's cgroup (Postfix, the gate, the null gate), so
CPU seconds per message come from the same batches as the rates. Every message must get 250, or
the run stops (a refusal would make the rate meaningless). Prints one JSON object on stdout.

Usage: python - CONFIG_JSON
  CONFIG_JSON: {"sender", "recipient", "arms": {arm: port}, "rounds",
                "plan": [[size, count], ...], "units": {name: systemd unit}}
"""

from __future__ import annotations

import json
import os
import platform
import smtplib
import subprocess
import sys
import time

from safemail.smime import samples


def _batch(port: int, sender: str, recipient: str, message: bytes, count: int) -> float:
    with smtplib.SMTP("127.0.0.1", port, timeout=600) as smtp:
        smtp.ehlo("bench.safemail.invalid")
        start = time.perf_counter()
        for _ in range(count):
            refused = smtp.sendmail(sender, [recipient], message)
            if refused:
                raise SystemExit(f"port {port} refused the recipient: {refused}")
        return time.perf_counter() - start


def _cpu_ns(units: dict[str, str]) -> dict[str, int]:
    """CPU nanoseconds the kernel has counted in each unit's cgroup (all its processes; the
    cgroup v2 file cpu.stat, there whether or not the unit has CPUAccounting)."""
    values = {}
    for name, unit in units.items():
        group = subprocess.run(["systemctl", "show", "-p", "ControlGroup", "--value", unit],
                               capture_output=True, text=True, check=True).stdout.strip()
        # cgroup v2 at /sys/fs/cgroup; under a hybrid layout (an nspawn machine on such a
        # host) the v2 tree is /sys/fs/cgroup/unified.
        for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
            if os.path.exists(f"{root}{group}/cpu.stat"):
                with open(f"{root}{group}/cpu.stat") as handle:
                    stat = handle.read().split()
                break
        else:
            raise SystemExit(f"no cgroup v2 cpu.stat for {units[name]} ({group!r})")
        values[name] = int(stat[stat.index("usage_usec") + 1]) * 1000
    return values


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    sender, recipient, arms = config["sender"], config["recipient"], config["arms"]
    units = config["units"]
    results = []
    for size, count in config["plan"]:
        message = samples.smime_message(
            samples.enveloped_der(content_size=size * 3 // 4), subject="Benchmark"
        )
        seconds: dict[str, list[float]] = {arm: [] for arm in arms}
        cpu: dict[str, list[dict[str, int]]] = {arm: [] for arm in arms}
        for port in arms.values():  # warm-up: connections, lookups, the milters' threads
            _batch(port, sender, recipient, message, 1)
        for r in range(config["rounds"]):
            order = list(arms.items()) if r % 2 == 0 else list(reversed(arms.items()))
            for arm, port in order:
                before = _cpu_ns(units)
                try:
                    seconds[arm].append(_batch(port, sender, recipient, message, count))
                except smtplib.SMTPException as exc:
                    raise SystemExit(
                        f"{arm} (port {port}) did not take a {len(message)} byte message: "
                        f"{exc}"
                    ) from exc
                after = _cpu_ns(units)
                cpu[arm].append({u: after[u] - before[u] for u in units})
            print(f"{len(message)} bytes: round {r + 1}/{config['rounds']}", file=sys.stderr,
                  flush=True)
        results.append({"message_bytes": len(message), "count": count, "seconds": seconds,
                        "cpu_ns": cpu})
    print(json.dumps({"python": platform.python_version(), "cpus": os.cpu_count(),
                      "machine": platform.machine(), "load": os.getloadavg(),
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
