"""The gate subcommands end to end: verify (real pytest + testinfra run), report, --help."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from safemail.cli import build_parser, main
from safemail.gate import promote
from safemail.gate.report import load_report
from safemail.gate.verify_run import VerifyOptions, pytest_command, run_verify

REPO = Path(__file__).resolve().parents[1]

SUITE = """
import pytest


@pytest.mark.req("SYS-01")
def test_runs_on_each_host(host, evidence):
    out = host.check_output("echo listening-only-on-25")
    evidence(f"{host.backend.get_pytest_id()}: {out}")
    assert out == "listening-only-on-25"


@pytest.mark.req("SYS-03")
def test_file_mode(evidence):
    import os, stat
    mode = stat.S_IMODE(os.stat("/etc/passwd").st_mode)
    evidence("mode of /etc/passwd: " + oct(mode))
    assert mode == 0o644
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "verify").mkdir(parents=True)
    (root / "ansible.cfg").write_text("[defaults]\n", encoding="utf-8")  # marks the checkout
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "ci@example.invalid")
    _git(root, "config", "user.name", "CI")
    shutil.copy(REPO / "verify" / "conftest.py", root / "verify" / "conftest.py")
    shutil.copy(REPO / "verify" / "waits.py", root / "verify" / "waits.py")  # conftest imports it
    shutil.copy(REPO / "verify" / "profiles.py", root / "verify" / "profiles.py")
    shutil.copy(REPO / "verify" / "stagelocks.py", root / "verify" / "stagelocks.py")
    real = yaml.safe_load((REPO / "verify" / "requirements.yml").read_text(encoding="utf-8"))
    subset = [e for e in real["requirements"] if e["id"] in ("SYS-01", "SYS-03")]
    (root / "verify" / "requirements.yml").write_text(
        yaml.safe_dump({"requirements": subset}, allow_unicode=True), encoding="utf-8"
    )
    (root / "verify" / "test_local.py").write_text(textwrap.dedent(SUITE), encoding="utf-8")
    inv = root / "inventories" / "test" / "hosts.yml"
    inv.parent.mkdir(parents=True)
    inv.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        "relay": {
                            "hosts": {
                                "relay": {
                                    "ansible_connection": "local",
                                    "ansible_python_interpreter": sys.executable,
                                }
                            }
                        }
                    }
                }
            }
        ),
        encoding="utf-8",
    )
    (root / ".gitignore").write_text("/reports/\n", encoding="utf-8")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "tiny project")
    return root


def test_pytest_command_shape(tmp_path: Path) -> None:
    opts = VerifyOptions(
        stage="test",
        workers=3,
        keyword="mail",
        markexpr="not slow",
        requirements=("MAIL-03", "NET-01"),
    )
    cmd = pytest_command(opts, tmp_path / "junit.xml", tmp_path / "req.yml", python="py")
    assert cmd[:4] == ["py", "-m", "pytest", "verify/"]
    for part in (
        "--hosts=ansible://all",
        "--ansible-inventory=inventories/test",
        f"--junitxml={tmp_path / 'junit.xml'}",
        "no:cacheprovider",
        "--req-select=MAIL-03,NET-01",
    ):
        assert part in cmd
    assert cmd[cmd.index("-n") + 1] == "3"
    assert cmd[cmd.index("-k") + 1] == "mail"
    assert cmd[cmd.index("-m", 3) + 1] == "not slow"


def test_verify_end_to_end(
    checkout: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAFEMAIL_LAB_DIR", str(checkout.parent / "no-lab"))
    out = io.StringIO()
    result = run_verify(checkout, VerifyOptions(stage="test", workers=2), out=out)
    log = out.getvalue()
    assert result.exit_code == 0, log
    assert "safemail verify: PASS" in log
    assert "2 passed" in log  # pytest's own output was streamed
    latest = checkout / "reports" / "test" / "latest"
    assert latest.is_symlink() and latest.resolve() == result.report_dir
    for name in ("junit.xml", "verify.log", "report.json", "report.html"):
        assert (result.report_dir / name).is_file(), name
    report = load_report(latest / "report.json")
    assert report["verdict"] == "pass" and report["complete"] is True
    assert report["hosts"] == ["relay"]  # the hosts the run reached
    assert report["run"]["profile"] == "full"
    assert report["run"]["junit_sha256"] == promote.file_digest(result.report_dir / "junit.xml")
    assert "not sealed" in log  # the tiny project has no stage key
    assert report["revision"]["dirty"] is False
    evidence = report["requirements"][0]["tests"][0]["evidence"]
    assert evidence == ["ansible://relay: listening-only-on-25"]
    assert report["requirements"][0]["tests"][0]["host"] == "relay"

    # `safemail report` rebuilds html/json from the junit.xml, keeping the run's metadata.
    before = json.loads((result.report_dir / "report.json").read_text())
    (result.report_dir / "report.html").unlink()
    monkeypatch.chdir(checkout)
    monkeypatch.delenv("SAFEMAIL_PROJECT", raising=False)
    assert main(["report", str(result.report_dir / "junit.xml")]) == 0
    after = json.loads((result.report_dir / "report.json").read_text())
    assert (result.report_dir / "report.html").is_file()
    for key in ("revision", "content_hash", "hosts", "started", "finished", "requirements"):
        assert before[key] == after[key], key
    assert before["run"]["created_by"] == "safemail verify"
    assert after["run"]["created_by"] == "safemail report"  # re-rendered: cannot release
    assert after["run"]["junit_sha256"] == before["run"]["junit_sha256"]
    assert "PASS" in capsys.readouterr().out
    # Into a fresh directory: the run's metadata still comes from beside the JUnit XML.
    fresh = checkout / "reports" / "rebuilt"
    assert main(["report", str(result.report_dir / "junit.xml"), "--out", str(fresh)]) == 0
    assert load_report(fresh / "report.json")["revision"] == before["revision"]
    # A JUnit XML without its run's report: refused, it would stamp the checkout's revision.
    lone = checkout / "reports" / "lone"
    lone.mkdir()
    shutil.copy(result.report_dir / "junit.xml", lone / "junit.xml")
    assert main(["report", str(lone / "junit.xml")]) == 2
    assert "never stamps JUnit XML" in capsys.readouterr().err

    # A failing requirement makes the exit code non-zero; --requirements marks the run partial.
    test_file = checkout / "verify" / "test_local.py"
    test_file.write_text(test_file.read_text().replace("0o644", "0o600"))
    result = run_verify(
        checkout, VerifyOptions(workers=0, requirements=("SYS-03",)), out=io.StringIO()
    )
    assert result.exit_code == 1
    assert result.report["failing_requirements"] == ["SYS-03"]
    assert result.report["complete"] is False
    assert result.report["revision"]["dirty"] is True


def test_verify_without_inventory_is_a_clear_error(
    checkout: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(checkout)
    monkeypatch.delenv("SAFEMAIL_PROJECT", raising=False)
    shutil.rmtree(checkout / "inventories" / "test")
    assert main(["verify", "--stage", "test"]) == 1
    err = capsys.readouterr().err
    assert "inventories/test does not exist" in err and "safemail lab up" in err
    assert main(["verify", "--requirements", "NOPE-01"]) != 0


@pytest.mark.parametrize("command", ["verify", "report", "promote", "docs", "approval"])
def test_each_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    assert "usage: safemail " + command in capsys.readouterr().out


def test_bad_arguments_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["verify", "--workers", "-1"],
        ["verify", "--stage", "dev"],
        ["promote", "--to", "test"],
        ["promote"],
    ):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(argv)
        assert info.value.code == 2, argv
    capsys.readouterr()
