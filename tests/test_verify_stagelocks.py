"""verify/stagelocks.py: per-host stage locks, the checked ``stage_hosts`` promise and the
order that lets host-limited tests run beside the disruptive ones.

Runs a copy of verify/'s plugins on a throw-away suite whose "hosts" are local connections.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PLUGINS = ("conftest.py", "waits.py", "profiles.py", "stagelocks.py", "requirements.yml")


def _suite(tmp_path: Path, tests: str) -> Path:
    verify = tmp_path / "verify"
    verify.mkdir()
    for name in PLUGINS:
        shutil.copy(REPO / "verify" / name, verify / name)
    (verify / "test_suite.py").write_text(textwrap.dedent(tests))
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inv = tmp_path / "hosts.yml"
    inv.write_text(yaml.safe_dump({"all": {"children": {
        "relay": {"hosts": {"relay1": local}},
        "auth": {"hosts": {"auth1": local}},
        "ca_signer": {"hosts": {"ca-signer": local}}}}}))
    return inv


def _pytest(tmp_path: Path, inv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "verify/", "--confcutdir=verify",
         f"--ansible-inventory={inv}", "-p", "no:cacheprovider", *(args or ["-v"])],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300,
        env={**os.environ,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )


GET = '''
    import time
    from pathlib import Path

    import pytest
    import testinfra


    def on(name):
        return testinfra.get_host(f"ansible://{name}", ansible_inventory="hosts.yml")
'''


def test_a_host_outside_the_marker_fails_the_test_naming_it(tmp_path: Path) -> None:
    inv = _suite(tmp_path, GET + '''
    @pytest.mark.req("CA-01")
    @pytest.mark.stage_hosts("ca_signer")
    def test_keeps_its_promise():
        assert on("ca-signer").run("true").rc == 0


    @pytest.mark.req("CA-01")
    @pytest.mark.stage_hosts("ca_signer")
    def test_breaks_its_promise():
        on("relay1").run("true")


    @pytest.mark.req("CA-01")
    def test_without_marker_may_touch_all():
        assert on("relay1").run("true").rc == 0
    ''')
    proc = _pytest(tmp_path, inv)
    out = proc.stdout
    assert "test_keeps_its_promise PASSED" in out, out[-3000:]
    assert "test_without_marker_may_touch_all PASSED" in out, out[-3000:]
    assert "test_breaks_its_promise FAILED" in out, out[-3000:]
    assert "sent a command to relay1, which its stage_hosts marker does not name" in out


def test_disruptive_tests_go_last_with_host_limited_work_beside_them(tmp_path: Path) -> None:
    inv = _suite(tmp_path, GET + '''
    @pytest.mark.req("CA-01")
    @pytest.mark.disruptive
    @pytest.mark.stage_hosts("relay")
    def test_d1():
        pass


    @pytest.mark.req("CA-01")
    @pytest.mark.stage_hosts("ca_signer")
    @pytest.mark.parametrize("n", range(4))
    def test_beside(n):
        pass


    @pytest.mark.req("CA-01")
    def test_plain():
        pass


    @pytest.mark.req("CA-01")
    @pytest.mark.stage_hosts("auth")
    def test_not_beside_d2():
        pass


    @pytest.mark.req("CA-01")
    @pytest.mark.stage_hosts("relay")
    def test_on_the_relay():
        pass


    @pytest.mark.req("CA-01")
    @pytest.mark.disruptive
    @pytest.mark.stage_hosts("relay", "auth")
    def test_d2():
        pass
    ''')
    proc = _pytest(tmp_path, inv, "--collect-only", "-q")
    order = [line.split("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line]
    # Without a marker a disruptive test would hold every host and nothing could run beside.
    assert order == ["test_plain", "test_on_the_relay",
                     "test_d1", "test_beside[0]", "test_beside[2]", "test_not_beside_d2",
                     "test_d2", "test_beside[1]", "test_beside[3]"], proc.stdout[-3000:]


def test_work_on_other_hosts_runs_while_a_disruptive_test_holds_the_relay(tmp_path: Path) -> None:
    """Three workers, one test each: the ca-signer test overlaps the disruptive test that holds
    relay1; the test without a marker (every host) never does. Proven by the intervals the
    tests write down, not by a time limit."""
    inv = _suite(tmp_path, GET + '''
    LOG = Path("events.log")


    def span(what, seconds):
        start = time.monotonic()
        time.sleep(seconds)
        with LOG.open("a") as f:
            f.write(f"{what} {start:.3f} {time.monotonic():.3f}\\n")


    @pytest.mark.req("CA-01")
    @pytest.mark.disruptive
    @pytest.mark.stage_hosts("relay")
    def test_d_holds_the_relay():
        span("d", 3)


    @pytest.mark.req("CA-01")
    @pytest.mark.stage_hosts("ca_signer")
    def test_x_on_the_signer():
        span("signer", 6)


    @pytest.mark.req("CA-01")
    def test_y_anywhere():
        span("anywhere", 1)
    ''')
    proc = _pytest(tmp_path, inv, "-v", "-n", "3")
    assert proc.returncode == 0, proc.stdout[-3000:]
    spans = {}
    for line in (tmp_path / "events.log").read_text().splitlines():
        what, start, end = line.split()
        spans[what] = (float(start), float(end))

    def overlap(a, b):
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]

    assert overlap("signer", "d"), spans
    assert not overlap("anywhere", "d"), spans
