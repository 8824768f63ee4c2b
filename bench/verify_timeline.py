"""Where a verify run's wall time goes: read the lock timeline the suite writes.

``SAFEMAIL_VERIFY_TIMELINE=FILE safemail verify --stage test`` makes every test append one JSON
line to FILE (verify/stagelocks.py): when it asked for its stage locks, got them and let them
go, and which hosts it held exclusively or shared. This prints, from that file:

- the run's span, and per xdist worker how long it ran tests and how long it waited for locks;
- per host, how long some test held it exclusively (a disruptive test: nothing else on it);
- the disruptive tests in the order they ran (start, wait, run, seconds from the first test);
- the host whose exclusive time is longest: the suite cannot end sooner than that chain.

Run: ``.venv/bin/python bench/verify_timeline.py FILE [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no timeline lines (was SAFEMAIL_VERIFY_TIMELINE set?)")
    return lines


def analyse(lines: list[dict]) -> dict:
    t0 = min(x["asked"] for x in lines)
    span = max(x["done"] for x in lines) - t0
    workers: dict[str, dict[str, float]] = defaultdict(lambda: {"run": 0.0, "wait": 0.0})
    held: dict[str, list[tuple[float, float]]] = defaultdict(list)
    disruptive = []
    for x in lines:
        w = workers[x["worker"]]
        w["run"] += x["done"] - x["got"]
        w["wait"] += x["got"] - x["asked"]
        for host in x["exclusive"]:
            held[host].append((x["got"], x["done"]))
        if x["exclusive"]:
            disruptive.append({"test": x["test"], "start": round(x["got"] - t0, 1),
                               "wait": round(x["got"] - x["asked"], 1),
                               "run": round(x["done"] - x["got"], 1),
                               "exclusive": x["exclusive"]})
    # Exclusive holds of one host never overlap (that is what the lock is for): their sum.
    exclusive = {h: round(sum(b - a for a, b in iv), 1) for h, iv in held.items()}
    longest = max(exclusive.items(), key=lambda kv: kv[1]) if exclusive else (None, 0.0)
    return {
        "tests": len(lines), "span_s": round(span, 1),
        "workers": {k: {n: round(v, 1) for n, v in w.items()} for k, w in sorted(workers.items())},
        "exclusive_s": dict(sorted(exclusive.items(), key=lambda kv: -kv[1])),
        "longest_chain": {"host": longest[0], "seconds": longest[1],
                          "share_of_span": round(longest[1] / span, 2) if span else None},
        "disruptive": sorted(disruptive, key=lambda d: d["start"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("timeline", type=Path, help="the file SAFEMAIL_VERIFY_TIMELINE named")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    args = p.parse_args(argv)
    try:
        result = analyse(load(args.timeline))
    except (OSError, ValueError, KeyError) as exc:
        print(f"verify_timeline: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['tests']} tests in {result['span_s']} s")
    for name, w in result["workers"].items():
        print(f"  worker {name}: ran tests {w['run']} s, waited for locks {w['wait']} s")
    print("exclusive (disruptive) time per host:")
    for host, seconds in result["exclusive_s"].items():
        print(f"  {host}: {seconds} s")
    c = result["longest_chain"]
    print(f"longest chain: {c['host']} {c['seconds']} s = {c['share_of_span']} of the span")
    print("disruptive tests (start, waited, ran; seconds):")
    for d in result["disruptive"]:
        print(f"  {d['start']:7.1f} {d['wait']:6.1f} {d['run']:6.1f}  {d['test']}  "
              f"[{', '.join(d['exclusive'])}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
