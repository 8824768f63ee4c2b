"""What the verify suite collects on a stage: the first_of_group marker (verify/conftest.py).

On a redundant stage test_directory's probes run on the directory provider only; the replica's
parameters are deselected at collection (not skipped: the report counts a skip as "not passed",
so MAIL-01 and MAIL-05 would read "untested"). The provider is the group's first host in
inventory order, as the playbooks' ``groups['auth'] | first``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, auth_hosts: list[str], *args: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    inventory = tmp_path / "inventory"
    inventory.mkdir(parents=True)
    hosts = "".join(f"            {name}: {{}}\n" for name in auth_hosts)
    (inventory / "hosts.yml").write_text(
        "all:\n  children:\n    service:\n      children:\n        auth:\n          hosts:\n"
        + hosts)
    bin_dir = str(Path(sys.executable).parent)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "verify/test_directory.py",
         "--collect-only", "-q", f"--ansible-inventory={inventory}", *args],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
             **(env or {})})


def _collect(tmp_path: Path, auth_hosts: list[str], **kwargs) -> list[str]:
    proc = _run(tmp_path, auth_hosts, **kwargs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # ids: test[ansible://auth1] or, with a further parameter, test[ansible://auth1-store]
    return re.findall(r"^verify/test_directory\.py::\S+\[ansible://([A-Za-z0-9.]+)[\]-]",
                      proc.stdout, re.MULTILINE)


@pytest.mark.parametrize("order", [["auth1", "auth2"], ["auth2", "auth1"]])
def test_directory_probes_are_collected_for_the_provider_only(tmp_path, order):
    collected = _collect(tmp_path, order)
    assert collected, "test_directory collected nothing"
    assert set(collected) == {order[0]}


def test_a_single_directory_host_keeps_every_probe(tmp_path):
    single = _collect(tmp_path / "single", ["auth1"])
    pair = _collect(tmp_path / "pair", ["auth1", "auth2"])
    assert single and set(single) == {"auth1"}
    assert len(pair) == len(single)


def test_ansible_verbosity_does_not_change_the_provider(tmp_path):
    """With ANSIBLE_VERBOSITY=1 Ansible prints "Using ... as config file" before the host
    list; a parser that skipped one line took the header for the first host and deselected
    every probe."""
    collected = _collect(tmp_path, ["auth2", "auth1"], env={"ANSIBLE_VERBOSITY": "1"})
    assert collected and set(collected) == {"auth2"}


def test_no_probe_on_the_provider_stops_the_run(tmp_path):
    """--hosts naming only the replica: the provider's probes cannot run; the run stops with
    the reason instead of deselecting all of them and reporting green."""
    proc = _run(tmp_path, ["auth1", "auth2"], "--hosts=ansible://auth2")
    assert proc.returncode != 0
    assert "no collected test runs on the first host of auth (auth1)" in proc.stdout + proc.stderr
