"""bench/bench_stage.py's offline parts: the ssh call logger and the JUnit breakdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_stage  # noqa: E402


def _shim(tmp_path: Path) -> tuple[Path, Path]:
    shim = tmp_path / "ssh"
    shim.write_text(bench_stage.SSH_LOGGER.format(python=sys.executable, ssh="/bin/true"))
    shim.chmod(0o755)
    return shim, tmp_path / "calls.log"


def test_ssh_logger_records_options_and_host_but_not_the_command(tmp_path):
    shim, log = _shim(tmp_path)
    env = {**os.environ, "SAFEMAIL_SSH_LOG": str(log)}
    # As testinfra calls it (through a shell) and as a test calls it (an argv list).
    subprocess.run(["sh", "-c", f"{shim} -o ControlMaster=auto -o ControlPersist=120s "
                    "-i /k -o ControlPath=/cp/%C 198.18.0.16 'SAFEMAIL_PASSWORD=s3cret true'"],
                   env=env, check=True)
    subprocess.run([str(shim), "-o", "BatchMode=yes", "user@198.18.0.10", "sudo -n id"],
                   env=env, check=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [
        {"opts": ["-o", "ControlMaster=auto", "-o", "ControlPersist=120s", "-i", "/k",
                  "-o", "ControlPath=/cp/%C"], "dest": "198.18.0.16"},
        {"opts": ["-o", "BatchMode=yes"], "dest": "user@198.18.0.10"},
    ]
    assert "s3cret" not in log.read_text()


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3">
<testcase classname="verify.test_storage" name="test_reboot" time="130.0">
  <properties><property name="req" value="STORE-01"/>
  <property name="lock_wait" value="100.0"/></properties></testcase>
<testcase classname="verify.test_mail" name="test_a[ansible://relay1]" time="5.0"/>
<testcase classname="verify.test_mail" name="test_b[ansible://store1]" time="2.5">
  <failure message="boom">x</failure></testcase>
</testsuite></testsuites>
"""


def test_junit_breakdown_subtracts_the_lock_waits(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    modules, hosts, failed, tests, waited = bench_stage._junit_breakdown(junit)
    assert modules == {"test_mail": 7.5, "test_storage": 30.0}
    assert hosts["relay1"] == 5.0 and hosts["store1"] == 2.5
    assert failed == ["verify.test_mail::test_b[ansible://store1]"]
    assert (tests, waited) == (3, 100.0)


def test_stats_and_ratios():
    assert bench_stage.stats([3.0, 1.0, 2.0]) == {"n": 3, "min": 1.0, "median": 2.0,
                                                  "max": 3.0}
    assert bench_stage.ratio_stats([(10.0, 5.0), (9.0, 3.0)])["median"] == 2.5


def test_unknown_row_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        sys.argv = ["bench_stage.py", "--rows", "rerun,nonsense"]
        bench_stage.main()
    assert exc.value.code == 2
    assert "unknown row(s): nonsense" in capsys.readouterr().err


def test_verify_timeline_finds_the_longest_exclusive_chain(tmp_path):
    import verify_timeline

    lines = [
        {"test": "a", "worker": "gw0", "asked": 100, "got": 100, "done": 110, "exclusive": [],
         "shared": ["relay1"]},
        {"test": "b", "worker": "gw1", "asked": 101, "got": 110, "done": 140,
         "exclusive": ["relay1", "store1"], "shared": []},
        {"test": "c", "worker": "gw0", "asked": 111, "got": 140, "done": 150,
         "exclusive": ["relay1"], "shared": []},
        {"test": "d", "worker": "gw1", "asked": 140, "got": 140, "done": 145,
         "exclusive": ["store1"], "shared": []},  # overlaps nothing of store1's earlier hold
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = verify_timeline.analyse(verify_timeline.load(path))
    assert r["span_s"] == 50 and r["tests"] == 4
    assert r["exclusive_s"] == {"relay1": 40.0, "store1": 35.0}
    assert r["longest_chain"] == {"host": "relay1", "seconds": 40.0, "share_of_span": 0.8}
    assert [d["test"] for d in r["disruptive"]] == ["b", "c", "d"]
    assert r["workers"]["gw0"] == {"run": 20.0, "wait": 29.0}
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="no timeline lines"):
        verify_timeline.load(tmp_path / "empty")


def test_a_damaged_timeline_is_an_error_in_the_row_not_a_lost_round(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"test": "a", "worker": "gw0", "asked": 1, "got": 1, "done": 2, '
                    '"exclusive": [], "shared": []}\n{"test": "b", "work')
    assert "error" in bench_stage._timeline(path)
    assert bench_stage._timeline(tmp_path / "missing.jsonl") is None
