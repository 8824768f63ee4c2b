"""The promotion gate against a temporary git repository shaped like the project."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import gatekit
import pytest

from safemail.cli import main
from safemail.gate import hashing, promote

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


_git = gatekit.git
_write = gatekit.write
ALICE, BOB = "alice@example.invalid", "bob@example.invalid"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> gatekit.Project:
    return gatekit.make_project(tmp_path).use_lab(monkeypatch)


@pytest.fixture
def repo(project: gatekit.Project) -> Path:
    return project.root


def _make_report(
    repo: Path,
    *,
    failing: tuple[str, ...] = (),
    finished: dt.datetime = NOW - dt.timedelta(hours=1),
    selection: dict[str, Any] | None = None,
    approved: bool = True,
) -> Path:
    """A sealed report as `safemail verify` writes it, signed by both approvers."""
    project = _PROJECTS[repo]
    path = gatekit.make_report(project, finished=finished, failing=failing, selection=selection)
    if approved:
        gatekit.approve(project, path, ALICE, BOB)
    return path


_PROJECTS: dict[Path, gatekit.Project] = {}


@pytest.fixture(autouse=True)
def _register(request: pytest.FixtureRequest) -> None:
    if "project" in request.fixturenames:
        project = request.getfixturevalue("project")
        _PROJECTS[project.root] = project


def _decide(repo: Path, report: Path, **kw: Any) -> promote.Decision:
    kw.setdefault("first_release", True)  # no release tag yet in these checkouts
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
        "inventories/production/hosts.yml",  # what promote deploys to
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


def test_waiver_expired_since_the_report_refused(project: gatekit.Project) -> None:
    from safemail.gate.waivers import Waiver

    repo = project.root
    why = "Second relay comes with the new cluster."
    granted, expires = dt.date(2026, 11, 1), dt.date(2026, 11, 28)
    sigs = [gatekit.sign_waiver(project, who, "AV-02", why, granted, expires)
            for who in (ALICE, BOB)]
    entry = {"id": "AV-02", "justification": why, "granted": granted.isoformat(),
             "expires": expires.isoformat(), "signatures": sigs}
    _write(repo, "verify/waivers.yml", json.dumps([entry]))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "waive AV-02")
    waiver = Waiver("AV-02", why, "alice, bob", expires, granted)
    path = gatekit.make_report(project, finished=NOW - dt.timedelta(hours=1), waivers=[waiver],
                               skip=("AV-02",), today=dt.date(2026, 11, 28))
    assert json.loads(path.read_text())["verdict"] == "pass"
    gatekit.approve(project, path, ALICE, BOB)
    assert _decide(repo, path).allowed  # still 2026-11-28
    decision = _decide(repo, path, now=NOW + dt.timedelta(hours=13))  # 2026-11-29 01:00
    assert decision.reasons == [
        "the report relies on waivers that have expired since: AV-02 (expired 2026-11-28)",
        "waivers: the report waives requirements that no signed, active waiver of this checkout "
        "covers: AV-02",
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
    assert main(["promote", "--to", "production", "--first-release", "--dry-run"]) == 3
    assert "no verification report" in capsys.readouterr().out

    report = _make_report(repo, finished=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2))
    latest = repo / "reports" / "test" / "latest"
    latest.symlink_to(report.parent.name)
    assert main(["promote", "--to", "production", "--first-release", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "operator" in out and ALICE in out
    assert not fake_ansible.exists()
    assert not (repo / "reports" / "releases.jsonl").exists()
    assert _git(repo, "tag", "--list") == ""

    with pytest.raises(SystemExit):  # the operator comes from the signature, not from a flag
        main(["promote", "--to", "production", "--operator", "u.karlins"])
    capsys.readouterr()
    assert main(["promote", "--to", "production", "--first-release", "--limit", "relay1",
                 "--vault-password-file", "/dev/null"]) == 0
    assert fake_ansible.read_text().split() == [
        "-i",
        str(repo / "inventories" / "production"),
        str(repo / "playbooks" / "site.yml"),
        "--limit", "relay1", "--vault-password-file", "/dev/null",
    ]
    entries = [
        json.loads(x) for x in (repo / "reports" / "releases.jsonl").read_text().splitlines()
    ]
    assert [e["event"] for e in entries] == ["release", "deploy-finished"]
    assert entries[0]["who"] == ALICE
    assert entries[0]["revision"] == hashing.git_revision(repo)
    assert entries[0]["report_sha256"] == promote.file_digest(report)
    assert entries[1]["exit_code"] == 0
    # The durable record: an annotated tag on the released revision.
    tag = entries[0]["tag"]
    assert tag.startswith("release/production/")
    assert _git(repo, "rev-list", "-n1", tag).strip() == hashing.git_revision(repo)
    body = _git(repo, "tag", "-l", "--format=%(contents)", tag)
    for needle in (f"revision: {hashing.git_revision(repo)}",
                   f"report-sha256: {promote.file_digest(report)}",
                   f"approved-by: head-of-it: {ALICE}", f"approved-by: it-security: {BOB}",
                   f"operator: {ALICE}", "BEGIN SSH SIGNATURE",
                   "approval-policy: first release"):
        assert needle in body, needle

    # The first release pinned itself; the operator commits the pin, then verifies again.
    pin = (repo / "release" / "first-release.yml").read_text()
    assert f"tag: {tag}\ncommit: {hashing.git_revision(repo)}\n" in pin
    assert "commit it and push it with the tag" in capsys.readouterr().out
    _git(repo, "add", "release/first-release.yml")
    _git(repo, "commit", "-qm", "pin the first release")
    _make_report(repo, finished=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    monkeypatch.setenv("FAKE_RC", "2")
    # The next release: the first release's tag (checked as a chain) names the policy.
    assert main(["promote", "--to", "production", "--first-release", "--dry-run"]) == 3
    assert "--first-release, but there are earlier releases" in capsys.readouterr().out
    assert main(["promote", "--to", "production"]) == 1
    captured = capsys.readouterr()
    assert f"approval policy: release/ of {tag}" in captured.out
    assert "ansible-playbook failed with exit code 2" in captured.err
    # Each release has its own tag, even two within one second.
    tags = _git(repo, "tag", "--list", "release/production/*").split()
    assert len(tags) == 2 and len(set(tags)) == 2, tags


def test_release_tags_are_unique_within_a_second(repo: Path) -> None:
    report = _make_report(repo)
    decision = promote.evaluate(repo, report, now=NOW, first_release=True)
    data = json.loads(report.read_text())
    names = [promote.tag_release(repo, decision, data, NOW) for _ in range(3)]
    assert names == ["release/production/20261128T120000Z",
                     "release/production/20261128T120000Z-2",
                     "release/production/20261128T120000Z-3"]


def test_cli_promote_preview_runs_check_and_diff_before_approvals(
    repo: Path, monkeypatch: pytest.MonkeyPatch, fake_ansible: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(repo)
    monkeypatch.delenv("SAFEMAIL_PROJECT", raising=False)
    _make_report(repo, finished=dt.datetime.now(dt.UTC), approved=False)
    (repo / "reports" / "test" / "latest").symlink_to("run")
    assert main(["promote", "--to", "production", "--first-release", "--preview",
                 "--vault-id", "prod@prompt"]) == 0
    out = capsys.readouterr().out
    assert "promotion refused" in out and "approval" in out  # shown, not blocking the preview
    assert fake_ansible.read_text().split()[-4:] == ["--vault-id", "prod@prompt", "--check",
                                                     "--diff"]
    assert not (repo / "reports" / "releases.jsonl").exists()
    assert _git(repo, "tag", "--list") == ""
