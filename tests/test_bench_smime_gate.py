"""bench/bench_smime_gate.py's offline parts: the confidence interval and the summary."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_smime_gate  # noqa: E402


@pytest.mark.parametrize(("n", "low_rank"), [(5, 1), (6, 1), (9, 2), (10, 2), (12, 3), (20, 6)])
def test_median_ci_uses_the_order_statistics_of_the_binomial_tail(n: int, low_rank: int) -> None:
    values = random.Random(n).sample(range(1000), n)
    med, low, high = bench_smime_gate.median_ci(values)
    xs = sorted(values)
    assert (low, high) == (xs[low_rank - 1], xs[n - low_rank])
    assert low <= med <= high
    tail = sum(math.comb(n, i) for i in range(low_rank)) / 2**n
    assert low_rank == 1 or tail <= 0.025  # at least 95 % coverage
    assert sum(math.comb(n, i) for i in range(low_rank + 1)) / 2**n > 0.025 or n < 6


def test_summary_pairs_rounds_and_reports_cpu_per_message() -> None:
    ns = {"postfix": 2_000_000_000, "gate": 1_000_000_000, "null_gate": 0}
    raw = {"results": [{
        "message_bytes": 10_000, "count": 20,
        "seconds": {"with_gate": [2.0, 4.0], "null_gate": [1.5, 3.0],
                    "without_gate": [1.0, 2.0]},
        "cpu_ns": {arm: [ns, ns] for arm in ("with_gate", "null_gate", "without_gate")},
    }]}
    (row,) = bench_smime_gate._summary(raw, 2)
    assert row["paired_ratios"]["with_gate/without_gate"]["per_round"] == [0.5, 0.5]
    assert row["paired_ratios"]["null_gate/without_gate"]["median"] == pytest.approx(0.667, 1e-3)
    assert row["cpu_median"]["with_gate"] == {"postfix_s_per_msg": 0.1, "milter_s_per_msg": 0.05}
    assert row["cpu_median"]["without_gate"]["milter_s_per_msg"] == 0.0
