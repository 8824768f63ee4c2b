"""Micro-benchmark of the S/MIME gate's classifier (ratios measured side by side;
docs/architecture.md#quality-bars).

For each message size, times in one run:
  * ``classify`` — the whole gate decision (header parse, base64, strict CMS parse);
  * ``baseline`` — only ``base64.b64decode`` of the body, the least any gate must do;
and reports the median of each and their ratio as JSON on stdout.

Run: ``.venv/bin/python bench/bench_smime_classify.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import time

from safemail.smime import samples
from safemail.smime.classify import classify

SIZES = (10_000, 100_000, 1_000_000, 10_000_000)


def _median_seconds(func: object, repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()  # type: ignore[operator]
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    results = []
    for size in SIZES:
        raw = samples.smime_message(samples.enveloped_der(content_size=size * 3 // 4))
        body = raw.split(b"\r\n\r\n", 1)[1]
        assert classify(raw).accepted
        gate = _median_seconds(lambda raw=raw: classify(raw), args.repeat)
        base = _median_seconds(
            lambda body=body: base64.b64decode(body.translate(None, b"\r\n")), args.repeat
        )
        results.append(
            {
                "message_bytes": len(raw),
                "classify_ms": round(gate * 1000, 3),
                "baseline_b64_ms": round(base * 1000, 3),
                "ratio": round(gate / base, 2) if base else None,
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "smime_classify",
                "python": platform.python_version(),
                "repeat": args.repeat,
                "results": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
