"""bench/bench_ca_cycle.py (issue 14): its command line, and one small run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_ca_cycle  # noqa: E402


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "5,10"], "include 0"),
        (["--sizes", "0,x"], "numbers separated by commas"),
        (["--sizes", "0,-1"], "non-negative"),
        (["--rounds", "0"], "at least 1"),
    ],
)
def test_bad_arguments_are_refused(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench_ca_cycle.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_one_round_reports_every_part_and_the_ratio(tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert (
        bench_ca_cycle.main(
            ["--sizes", "0,2", "--rounds", "1", "--dir", str(tmp_path), "--out", str(out)]
        )
        == 0
    )
    [path] = out.glob("ca_cycle-*.json")
    result = json.loads(path.read_text())
    assert set(result["sizes"]) == {"0", "2"}
    two = result["sizes"]["2"]
    assert set(two["parts_seconds"]) == set(bench_ca_cycle.PARTS)
    assert result["sizes"]["0"]["ratio_to_n0"]["median"] == 1.0
    assert two["cycle_seconds"]["median"] > 0 and two["profile_top_tottime"]
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # the work directory is gone
