"""Streaming vs whole-message S/MIME classification, side by side (issue 17).

For each message size (10 KB, 1 MB, 10 MB; a synthetic enveloped-data message), runs paired
rounds in alternating order (odd rounds: classify first; even rounds: streaming first):

  * ``classify`` — :func:`safemail.smime.classify.classify` on the whole message;
  * ``stream`` — :class:`safemail.smime.stream.StreamClassifier`: header fields one by one,
    then the body in chunks of 64 KiB, then ``finish()``;

and reports per size the median seconds of each, the median of the per-round ratios
stream/classify with their min and max, and the median time of one plain base64 decode of the
body (``binascii.a2b_base64``), the least any gate must do. Small messages are timed over
several calls per round (``calls_per_round``; seconds are per call). Unless ``--no-memory``,
the peak traced memory (tracemalloc) of one call of each is measured too, outside the timing.

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_smime_stream.py [--rounds N] [--out FILE]``.
JSON goes to stdout (and to FILE).
"""

from __future__ import annotations

import argparse
import binascii
import datetime
import gc
import json
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from safemail.smime import samples
from safemail.smime.classify import Verdict, classify
from safemail.smime.stream import StreamClassifier

SIZES = (10_000, 1_000_000, 10_000_000)
CHUNK = 64 * 1024


def _message(size: int) -> tuple[bytes, list[tuple[str, str]], bytes]:
    raw = samples.smime_message(samples.enveloped_der(content_size=size * 3 // 4))
    head, body = raw.split(b"\r\n\r\n", 1)
    fields = []
    for line in head.decode().split("\r\n"):
        name, _, value = line.partition(": ")
        fields.append((name, value))
    return raw, fields, body


def _streamer(fields: list[tuple[str, str]], body: bytes) -> Callable[[], Verdict]:
    view = memoryview(body)

    def run() -> Verdict:
        gate = StreamClassifier()
        for name, value in fields:
            gate.add_header(name, value)
        gate.end_of_headers()
        for start in range(0, len(view), CHUNK):
            gate.add_body(view[start : start + CHUNK])
        return gate.finish()

    return run


def _seconds(func: Callable[[], object], calls: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(calls):
        func()
    return (time.perf_counter() - start) / calls


def _peak(func: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        func()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(size: int, rounds: int, memory: bool) -> dict[str, object]:
    raw, fields, body = _message(size)
    whole: Callable[[], Verdict] = lambda: classify(raw)  # noqa: E731
    stream = _streamer(fields, body)
    assert whole().accepted and stream().accepted
    calls = max(1, 2_000_000 // len(raw))
    pairs = []
    floors = []
    for index in range(rounds):
        if index % 2 == 0:
            a = _seconds(whole, calls)
            b = _seconds(stream, calls)
        else:
            b = _seconds(stream, calls)
            a = _seconds(whole, calls)
        pairs.append((a, b))
        floors.append(_seconds(lambda: binascii.a2b_base64(body), calls))
    ratios = [b / a for a, b in pairs]
    result: dict[str, object] = {
        "message_bytes": len(raw),
        "rounds": rounds,
        "calls_per_round": calls,
        "classify_s": round(statistics.median(a for a, _ in pairs), 6),
        "stream_s": round(statistics.median(b for _, b in pairs), 6),
        "ratio_stream_to_classify_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "base64_decode_floor_s": round(statistics.median(floors), 6),
    }
    if memory:
        result["classify_peak_bytes"] = _peak(whole)
        result["stream_peak_bytes"] = _peak(stream)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=12, help="paired rounds per size (>= 10)")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc peaks")
    args = parser.parse_args()
    if args.rounds < 10:
        parser.error("--rounds must be at least 10")
    result = {
        "benchmark": "smime_stream",
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "chunk_bytes": CHUNK,
        "results": [measure(size, args.rounds, not args.no_memory) for size in SIZES],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
