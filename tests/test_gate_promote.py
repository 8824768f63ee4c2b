"""The promotion gate against a temporary git repository shaped like the project."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from safemail.cli import main
from safemail.gate import hashing, promote
from safemail.gate.catalogue import load_catalogue
from safemail.gate.report import RunMetadata, TestResult, build_report, utc_iso, write_report

REPO = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def _write(repo: Path, rel: str, text: str) -> None:
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    root.mkdir()
    _git(root, "init", "-q", "-b", "main")
    _git(root, "config", "user.email", "ci@example.invalid")
    _git(root, "config", "user.name", "CI")
    _write(root, ".gitignore", "/reports/\n/inventories/test/zz_lab_generated.yml\n")
    _write(root, "ansible.cfg", "[defaults]\nroles_path = roles\n")
    _write(root, "requirements.yml", "collections: []\n")
    _write(root, "roles/mailrelay/tasks/main.yml", "- name: Install postfix\n")
    _write(root, "roles/common/tasks/main.yml", "- name: Baseline\n")
    _write(root, "playbooks/site.yml", "- hosts: all\n")
    _write(root, "inventories/test/hosts.yml", "all:\n  children:\n    relay: {}\n")
    _write(root, "inventories/production/hosts.yml", "all: {}\n")
    _write(root, "docs/readme.md", "docs are not deployed\n")
    (root / "verify").mkdir()
    shutil.copy(REPO / "verify" / "requirements.yml", root / "verify" / "requirements.yml")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "initial")
    _write(root, "inventories/test/zz_lab_generated.yml", "relay: {ansible_host: 198.18.0.2}\n")
    return root


def _make_report(
    repo: Path,
    *,
    failing: tuple[str, ...] = (),
    finished: dt.datetime = NOW - dt.timedelta(hours=1),
    selection: dict[str, Any] | None = None,
) -> Path:
    catalogue = load_catalogue(repo / "verify" / "requirements.yml")
    results = [
        TestResult(
            f"verify.t::test_{r.id}", "failed" if r.id in failing else "passed", req_ids=[r.id]
        )
        for r in catalogue
    ]
    content = hashing.content_hash(repo, "test")
    meta = RunMetadata(
        stage="test",
        revision=hashing.git_revision(repo),
        dirty=hashing.git_dirty(repo),
        content_hash=content.digest,
        content_files=content.files,
        inventory_hash=hashing.inventory_hash(repo, "test"),
        hosts=["relay"],
        started=utc_iso(finished - dt.timedelta(minutes=5)),
        finished=utc_iso(finished),
    )
    if selection:
        meta.selection = selection
    report = build_report(results, catalogue, [], meta, generated=finished)
    out = repo / "reports" / "test" / "run"
    json_path, _html, _digest = write_report(report, out)
    return json_path


def _decide(repo: Path, report: Path, **kw: Any) -> promote.Decision:
    return promote.evaluate(repo, report, now=kw.pop("now", NOW), **kw)


def test_hashes_cover_deployable_files_only(repo: Path) -> None:
    content = hashing.content_hash(repo, "test")
    assert set(content.files) == {
        "ansible.cfg",
        "requirements.yml",
        "roles/common/tasks/main.yml",
        "roles/mailrelay/tasks/main.yml",
        "playbooks/site.yml",
        "inventories/test/hosts.yml",
        "verify/requirements.yml",
    }
    assert content.digest == hashing.content_hash(repo, "test").digest  # deterministic
    assert content.digest == hashing.combine(dict(reversed(list(content.files.items()))))
    before = hashing.inventory_hash(repo, "test")
    _write(repo, "inventories/test/zz_lab_generated.yml", "relay: {ansible_host: 198.18.0.9}\n")
    assert hashing.inventory_hash(repo, "test") != before  # generated addresses count here
    assert hashing.content_hash(repo, "test").digest == content.digest  # but not here
    assert not hashing.git_dirty(repo)  # ignored files do not make the tree dirty


def test_same_revision_passes(repo: Path) -> None:
    decision = _decide(repo, _make_report(repo))
    assert decision.allowed, decision.reasons
    assert decision.reasons == []
    assert decision.report_digest and len(decision.report_digest) == 64
    assert "allowed" in decision.summary()


def test_missing_report_refused(repo: Path) -> None:
    decision = _decide(repo, repo / "reports" / "test" / "latest" / "report.json")
    assert not decision.allowed
    assert "no verification report" in decision.reasons[0]
    assert "safemail verify --stage test" in decision.reasons[0]


def test_corrupt_report_refused(repo: Path) -> None:
    path = _make_report(repo)
    data = json.loads(path.read_text())
    data["verdict"] = "pass"
    data["failing_requirements"] = ["MAIL-03"]
    path.write_text(json.dumps(data))
    decision = _decide(repo, path)
    assert not decision.allowed
    assert "not a valid SafeMail report" in decision.reasons[0]


def test_failing_report_names_requirements(repo: Path) -> None:
    decision = _decide(repo, _make_report(repo, failing=("MAIL-03", "NET-02")))
    assert not decision.allowed
    assert decision.reasons == ["the verification failed (failing requirements: MAIL-03, NET-02)"]


def test_changed_role_file_refused_and_named(repo: Path) -> None:
    report = _make_report(repo)
    _write(repo, "roles/mailrelay/tasks/main.yml", "- name: Install postfix and relay\n")
    _write(repo, "roles/mailrelay/handlers/main.yml", "- name: Reload postfix\n")
    _write(repo, "docs/readme.md", "docs changed too\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "change relay")
    decision = _decide(repo, report)
    assert not decision.allowed
    text = "\n".join(decision.reasons)
    assert "the report is for revision" in text
    assert "changed roles/mailrelay/tasks/main.yml" in text
    assert "added roles/mailrelay/handlers/main.yml" in text
    assert "docs/readme.md" not in text  # not deployable content
    assert len(decision.reasons) == 2


def test_docs_only_commit_still_needs_new_verification(repo: Path) -> None:
    report = _make_report(repo)
    _write(repo, "docs/readme.md", "typo fixed\n")
    _git(repo, "commit", "-q", "-am", "docs")
    decision = _decide(repo, report)
    assert not decision.allowed
    assert len(decision.reasons) == 1 and "revision" in decision.reasons[0]


def test_dirty_tree_refused(repo: Path) -> None:
    report = _make_report(repo)
    _write(repo, "playbooks/site.yml", "- hosts: relay\n")
    _write(repo, "roles/auth/tasks/main.yml", "- name: new untracked role\n")
    decision = _decide(repo, report)
    assert not decision.allowed
    text = "\n".join(decision.reasons)
    assert "uncommitted changes: playbooks/site.yml, roles/auth/tasks/main.yml" in text
    assert "changed playbooks/site.yml" in text


def test_report_from_dirty_tree_refused(repo: Path) -> None:
    _write(repo, "scratch.txt", "work in progress\n")
    report = _make_report(repo)
    (repo / "scratch.txt").unlink()
    decision = _decide(repo, report)
    assert decision.reasons == ["the report was made from a checkout with uncommitted changes"]


def test_stale_report_refused(repo: Path) -> None:
    report = _make_report(repo, finished=NOW - dt.timedelta(hours=30))
    decision = _decide(repo, report, max_age_hours=24)
    assert not decision.allowed
    assert decision.reasons == [
        "the report is 30.0 h old (finished 2026-11-27T06:00:00Z), older than the allowed 24 h"
    ]
    assert _decide(repo, report, max_age_hours=48).allowed


def test_waiver_expired_since_the_report_refused(repo: Path) -> None:
    from safemail.gate.waivers import Waiver

    catalogue = load_catalogue(repo / "verify" / "requirements.yml")
    waiver = Waiver(
        "AV-02", "Second relay comes with the new cluster.", "Head of IT", dt.date(2026, 11, 28)
    )
    results = [
        TestResult(f"t::{r.id}", "passed", req_ids=[r.id]) for r in catalogue if r.id != "AV-02"
    ]
    path = _make_report(repo)
    data = json.loads(path.read_text())
    content = hashing.content_hash(repo, "test")
    meta = RunMetadata(
        stage="test",
        revision=hashing.git_revision(repo),
        dirty=False,
        content_hash=content.digest,
        content_files=content.files,
        inventory_hash=data["inventory_hash"],
        hosts=["relay"],
        started=data["started"],
        finished=data["finished"],
    )
    report = build_report(results, catalogue, [waiver], meta, today=dt.date(2026, 11, 28))
    assert report["verdict"] == "pass"
    write_report(report, path.parent)
    assert _decide(repo, path).allowed  # still 2026-11-28
    decision = _decide(repo, path, now=NOW + dt.timedelta(hours=13))  # 2026-11-29 01:00
    assert decision.reasons == [
        "the report relies on waivers that have expired since: AV-02 (expired 2026-11-28)"
    ]


def test_partial_report_refused(repo: Path) -> None:
    sel = {"keyword": "mail", "markexpr": None, "requirements": None}
    decision = _decide(repo, _make_report(repo, selection=sel))
    assert not decision.allowed
    assert "partial run" in decision.reasons[0]


def test_release_log_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "karlins")
    assert promote.default_operator() == "karlins"
    monkeypatch.delenv("SUDO_USER")
    monkeypatch.setenv("USER", "admin1")
    assert promote.default_operator() == "admin1"
    log = tmp_path / "logs" / "releases.jsonl"
    for n in range(2):
        promote.append_release_log(
            log,
            operator="admin1",
            revision="f" * 40,
            report_digest="d" * 64,
            stage="production",
            report_path="reports/test/latest/report.json",
            when=NOW + dt.timedelta(minutes=n),
        )
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0] == {
        "event": "release",
        "when": "2026-11-28T12:00:00Z",
        "who": "admin1",
        "stage": "production",
        "revision": "f" * 40,
        "report_sha256": "d" * 64,
        "report": "reports/test/latest/report.json",
    }


# ---------------------------------------------------------------- through the CLI


@pytest.fixture
def fake_ansible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "ansible-calls.txt"
    script = bin_dir / "ansible-playbook"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit "${{FAKE_RC:-0}}"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_cli_promote_dry_run_and_release(
    repo: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake_ansible: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(repo)
    monkeypatch.delenv("SAFEMAIL_PROJECT", raising=False)
    assert main(["promote", "--to", "production", "--dry-run"]) == 3
    assert "no verification report" in capsys.readouterr().out

    report = _make_report(repo, finished=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2))
    latest = repo / "reports" / "test" / "latest"
    latest.symlink_to(report.parent.name)
    assert main(["promote", "--to", "production", "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert not fake_ansible.exists()
    assert not (repo / "reports" / "releases.jsonl").exists()

    assert main(["promote", "--to", "production", "--operator", "u.karlins"]) == 0
    assert fake_ansible.read_text().split() == [
        "-i",
        str(repo / "inventories" / "production"),
        str(repo / "playbooks" / "site.yml"),
    ]
    entries = [
        json.loads(x) for x in (repo / "reports" / "releases.jsonl").read_text().splitlines()
    ]
    assert [e["event"] for e in entries] == ["release", "deploy-finished"]
    assert entries[0]["who"] == "u.karlins"
    assert entries[0]["revision"] == hashing.git_revision(repo)
    assert entries[0]["report_sha256"] == promote.file_digest(report)
    assert entries[1]["exit_code"] == 0

    monkeypatch.setenv("FAKE_RC", "2")
    assert main(["promote", "--to", "production"]) == 1
    assert "ansible-playbook failed with exit code 2" in capsys.readouterr().err
