"""verify/conftest.py keeps a module's tests on the hosts its ``testinfra_hosts`` declares,
also when ``safemail verify`` passes ``--hosts=ansible://all`` (testinfra lets --hosts win)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_declared_hosts_win_over_hosts_all(tmp_path: Path) -> None:
    verify = tmp_path / "verify"
    verify.mkdir()
    shutil.copy(REPO / "verify" / "conftest.py", verify / "conftest.py")
    shutil.copy(REPO / "verify" / "waits.py", verify / "waits.py")  # conftest imports it
    shutil.copy(REPO / "verify" / "profiles.py", verify / "profiles.py")  # its plugins
    shutil.copy(REPO / "verify" / "stagelocks.py", verify / "stagelocks.py")
    shutil.copy(REPO / "verify" / "requirements.yml", verify / "requirements.yml")
    (verify / "test_relay_only.py").write_text(textwrap.dedent("""
        import pytest

        testinfra_hosts = ["ansible://relay"]


        @pytest.mark.req("MAIL-01")
        def test_on_the_relay(host):
            assert host.backend.host == "relay1"
    """))
    (verify / "test_everywhere.py").write_text(textwrap.dedent("""
        import pytest


        @pytest.mark.req("SYS-03")
        def test_on_every_host(host):
            assert host.backend.host in ("relay1", "auth1")
    """))
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inv = tmp_path / "hosts.yml"
    inv.write_text(yaml.safe_dump({"all": {"children": {
        "relay": {"hosts": {"relay1": local}}, "auth": {"hosts": {"auth1": local}}}}}))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "verify/", "--hosts=ansible://all",
         f"--ansible-inventory={inv}", "-p", "no:cacheprovider", "-v"],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300,
        # testinfra calls ansible-inventory by name: the venv's, also outside `make`.
        env={**os.environ,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    assert "test_on_the_relay[ansible://relay1] PASSED" in out
    assert "test_on_the_relay[ansible://auth1]" not in out
    assert "test_on_every_host[ansible://auth1] PASSED" in out
    assert "test_on_every_host[ansible://relay1] PASSED" in out
    assert "1 deselected" in out
