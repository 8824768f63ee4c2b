"""verify/profiles.py: the production profile runs only read-only tests needing no lab host and
says which it left out; the host keys a run sees land in the report. Real pytest runs of a tiny
suite with the real verify plugins."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from safemail.errors import SafeMailError
from safemail.gate.verify_run import VerifyOptions, pytest_command, run_verify

REPO = Path(__file__).resolve().parents[1]

SUITE = """
import pytest


@pytest.mark.req("SYS-01")
@pytest.mark.read_only
def test_reads(host, evidence):
    evidence(host.check_output("echo read"))


@pytest.mark.req("SYS-01")
@pytest.mark.disruptive
def test_reboots():
    pass


@pytest.mark.req("SYS-03")
@pytest.mark.read_only
@pytest.mark.lab_participants
def test_needs_practice1():
    pass


@pytest.mark.req("SYS-03")
def test_sends_mail():
    pass
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    verify = root / "verify"
    verify.mkdir(parents=True)
    for name in ("conftest.py", "waits.py", "profiles.py", "stagelocks.py"):
        shutil.copy(REPO / "verify" / name, verify / name)
    # The local host has no SSH host keys: let the plugin read throwaway ones instead.
    keys = tmp_path / "hostkeys"
    keys.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(keys / "ssh_host_ed25519_key")], check=True)
    plugin = verify / "profiles.py"
    plugin.write_text(plugin.read_text().replace(
        'HOST_KEY_COMMAND = "cat /etc/ssh/ssh_host_*_key.pub"',
        f'HOST_KEY_COMMAND = "cat {keys}/ssh_host_*_key.pub"'))
    real = yaml.safe_load((REPO / "verify" / "requirements.yml").read_text(encoding="utf-8"))
    subset = [e for e in real["requirements"] if e["id"] in ("SYS-01", "SYS-03")]
    (verify / "requirements.yml").write_text(yaml.safe_dump({"requirements": subset}))
    (verify / "test_local.py").write_text(textwrap.dedent(SUITE))
    for stage in ("test", "production"):
        inv = root / "inventories" / stage / "hosts.yml"
        inv.parent.mkdir(parents=True)
        inv.write_text(yaml.safe_dump({"all": {"children": {"service": {"hosts": {"relay": {
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}}}))
    (root / ".gitignore").write_text("/reports/\n")
    _git(root, "init", "-q", "-b", "main")
    _git(root, "-c", "user.name=CI", "-c", "user.email=ci@example.invalid", "add", "-A")
    _git(root, "-c", "user.name=CI", "-c", "user.email=ci@example.invalid", "commit", "-qm", "x")
    return root


@pytest.mark.parametrize("workers", [0, 2])  # xdist: only its workers collect
def test_production_profile_runs_only_read_only_tests_and_says_why_not(
    checkout: Path, workers: int
) -> None:
    out = io.StringIO()
    result = run_verify(checkout, VerifyOptions(stage="production", workers=workers), out=out)
    log = out.getvalue()
    report = result.report
    assert report["run"]["profile"] == "production"
    ran = [t["id"] for r in report["requirements"] for t in r["tests"]]
    assert ran == ["verify.test_local::test_reads[ansible://relay]"], ran
    skipped = {s["id"].split("::")[1]: s["reason"] for s in report["run"]["skipped_by_profile"]}
    assert skipped == {
        "test_reboots": "disruptive: stops, locks, reboots or reconverges a host",
        "test_needs_practice1": "needs the lab's participant hosts or lab-only machinery",
        "test_sends_mail": "not marked read_only: it may change a host (send, write, restart)",
    }
    assert "SafeMail production profile: 3 test(s) not run" in log
    assert "test_sends_mail: not marked read_only" in log
    assert not (result.report_dir / "report.json.sig").exists()  # never sealed
    assert not (result.report_dir / "profile-skipped.jsonl").exists()


def test_full_profile_runs_everything_and_records_the_host_keys(checkout: Path) -> None:
    result = run_verify(checkout, VerifyOptions(stage="test", workers=2), out=io.StringIO())
    report = result.report
    assert report["run"]["profile"] == "full" and report["run"]["skipped_by_profile"] == []
    assert report["summary"]["tests"] == 4
    pub = next((checkout.parent / "hostkeys").glob("*.pub")).read_text()
    from safemail.gate.signing import fingerprint_of_public_key

    assert report["run"]["host_keys"] == {"relay": [fingerprint_of_public_key(pub)]}
    assert report["hosts"] == ["relay"]
    junit = (result.report_dir / "junit.xml").read_text()
    assert 'name="host_key"' in junit


def test_contradictory_markers_stop_the_run(checkout: Path) -> None:
    test = checkout / "verify" / "test_local.py"
    test.write_text(test.read_text().replace("@pytest.mark.disruptive",
                                             "@pytest.mark.disruptive\n@pytest.mark.read_only"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "verify/", "-p", "no:cacheprovider",
         "--collect-only", "-q"],
        cwd=checkout, capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ,
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert proc.returncode != 0
    assert "marked both read_only and disruptive" in proc.stdout + proc.stderr


def test_pytest_command_carries_the_profile(tmp_path: Path) -> None:
    cmd = pytest_command(VerifyOptions(stage="production"), tmp_path / "j.xml", tmp_path / "r",
                         skipped=tmp_path / "s.jsonl")
    assert VerifyOptions(stage="test", profile="production").profile == "production"
    with pytest.raises(SafeMailError, match="runs on the test stage only"):
        VerifyOptions(stage="production", profile="full")
    assert "--safemail-profile=production" in cmd
    assert f"--safemail-profile-skipped={tmp_path / 's.jsonl'}" in cmd
    assert "--safemail-profile=full" in pytest_command(VerifyOptions(), tmp_path / "j", tmp_path)
    assert VerifyOptions().ansible_env() == {}
    assert VerifyOptions(stage="production", vault_ids=("prod@/etc/v", "x@prompt"),
                         vault_password_file="/etc/vault-pass").ansible_env() == {
        "ANSIBLE_VAULT_IDENTITY_LIST": "prod@/etc/v,x@prompt",
        "ANSIBLE_VAULT_PASSWORD_FILE": "/etc/vault-pass",
    }


def test_production_verify_opens_the_encrypted_vault_with_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The production inventory's vault.yml is ciphertext: without a vault source the run's
    Ansible cannot read it, so verify names the checkout's client as promote does."""
    for name in ("ANSIBLE_VAULT_IDENTITY_LIST", "ANSIBLE_VAULT_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    env = VerifyOptions(stage="production").ansible_env(REPO)
    assert env == {"ANSIBLE_VAULT_IDENTITY_LIST":
                   f"production@{REPO / 'scripts' / 'vault-pass-client'}"}
    assert VerifyOptions(stage="test").ansible_env(REPO) == {}  # the lab's vault is clear text
    given = VerifyOptions(stage="production", vault_password_file="/etc/v").ansible_env(REPO)
    assert given == {"ANSIBLE_VAULT_PASSWORD_FILE": "/etc/v"}
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", "/etc/other")
    assert VerifyOptions(stage="production").ansible_env(REPO) == {}  # the operator's choice


@pytest.mark.parametrize("name, value", [("PYTEST_ADDOPTS", "-k test_reads"),
                                         ("PYTEST_PLUGINS", "no_such_plugin_module")])
def test_pytest_settings_from_the_environment_do_not_change_the_run(
    checkout: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """PYTEST_ADDOPTS (-k ...) or PYTEST_PLUGINS would drop tests from a "complete" run."""
    monkeypatch.setenv(name, value)
    result = run_verify(checkout, VerifyOptions(stage="test", workers=0), out=io.StringIO())
    assert result.report["summary"]["tests"] == 4
    assert result.report["run"]["profile"] == "full" and result.report["complete"]


def test_a_conftest_at_the_checkout_root_is_not_loaded(checkout: Path) -> None:
    """An untracked, git-ignored conftest.py at the root would rewrite the run's outcomes."""
    (checkout / "conftest.py").write_text(
        "def pytest_collection_modifyitems(items):\n    items[:] = items[:1]\n")
    with (checkout / ".git" / "info" / "exclude").open("a") as handle:
        handle.write("/conftest.py\n")
    result = run_verify(checkout, VerifyOptions(stage="test", workers=0), out=io.StringIO())
    assert result.report["summary"]["tests"] == 4
    assert result.report["revision"]["dirty"] is True  # and it makes the checkout dirty
