"""The sending half of bench_smime_gate.py; runs ON the relay (piped over SSH to its runtime
Python, /opt/safemail/venv/bin/python), so emulated networking never enters the figures.

Sends synthetic S/MIME enveloped messages (safemail.smime.samples, the same catalogue the gate's
tests use) to two loopback listeners that differ only in the milter: ``with`` (the gate) and
``without`` (``smtpd_milters=``). Rounds alternate the order of the two; each round is one SMTP
session per listener with ``count`` messages, timed from the first MAIL FROM to the last DATA
reply. Every message must get 250, or the run stops (a refusal would make the rate
meaningless). Prints one JSON object on stdout.

Usage: python - SENDER RECIPIENT WITH_PORT WITHOUT_PORT ROUNDS SIZE:COUNT [SIZE:COUNT ...]
"""

from __future__ import annotations

import json
import os
import platform
import smtplib
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


def main(argv: list[str]) -> int:
    sender, recipient = argv[0], argv[1]
    ports = {"with_gate": int(argv[2]), "without_gate": int(argv[3])}
    rounds = int(argv[4])
    plan = [tuple(int(x) for x in item.split(":")) for item in argv[5:]]
    results = []
    for size, count in plan:
        message = samples.smime_message(
            samples.enveloped_der(content_size=size * 3 // 4), subject="Benchmark"
        )
        seconds: dict[str, list[float]] = {arm: [] for arm in ports}
        for port in ports.values():  # warm-up: connections, lookups, the gate's start
            _batch(port, sender, recipient, message, 1)
        for r in range(rounds):
            order = list(ports.items()) if r % 2 == 0 else list(reversed(ports.items()))
            for arm, port in order:
                try:
                    seconds[arm].append(_batch(port, sender, recipient, message, count))
                except smtplib.SMTPException as exc:
                    raise SystemExit(
                        f"{arm} (port {port}) did not take a {len(message)} byte message: "
                        f"{exc}"
                    ) from exc
        results.append({"message_bytes": len(message), "count": count, "seconds": seconds})
    print(json.dumps({"python": platform.python_version(), "cpus": os.cpu_count(),
                      "machine": platform.machine(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
