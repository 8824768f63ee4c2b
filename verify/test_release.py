"""SYS-05 and SYS-06 on the controller: the release gate and the generated documentation.

These run where the change manager works (the controller), against this checkout and the
real `safemail` commands, not against lab hosts:

- SYS-05: `safemail promote --to production --dry-run` allows only a passing, complete
  test-stage report of this very revision and deployable content; it refuses a missing
  report, a failing one (naming the requirement) and one whose role content differs (naming
  the file). The reports are built with the same code `safemail verify` uses.
- SYS-06: the documentation is generated from the code: the committed network plan equals a
  fresh render of the flow matrix; the generated host list names every inventory host and
  the role reference every role with an argument spec.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from safemail.gate import hashing
from safemail.gate.catalogue import load_catalogue
from safemail.gate.report import RunMetadata, TestResult, build_report, utc_iso, write_report
from safemail.project import project_root

ROOT = project_root()
SAFEMAIL = str(Path(sys.executable).parent / "safemail")


def _safemail(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SAFEMAIL, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


def _report(out: Path, *, failing: tuple[str, ...] = (), tamper: str | None = None) -> Path:
    """A full test-stage report for this checkout as `safemail verify` would write it."""
    catalogue = load_catalogue(ROOT / "verify" / "requirements.yml")
    results = [TestResult(f"verify.release::test_{r.id}",
                          "failed" if r.id in failing else "passed", req_ids=[r.id])
               for r in catalogue]
    content = hashing.content_hash(ROOT, "test")
    files = dict(content.files)
    digest = content.digest
    if tamper is not None:
        # What was tested differs from the checkout in one role file.
        files[tamper] = "0" * 64
        digest = "sha256:" + "0" * 64
    finished = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    meta = RunMetadata(
        stage="test", revision=hashing.git_revision(ROOT), dirty=False, content_hash=digest,
        content_files=files, inventory_hash=hashing.inventory_hash(ROOT, "test"),
        hosts=["relay1"], started=utc_iso(finished - dt.timedelta(minutes=5)),
        finished=utc_iso(finished))
    report = build_report(results, catalogue, [], meta, generated=finished)
    json_path, _html, _digest = write_report(report, out)
    return json_path


def _promote(report: Path, log: Path) -> subprocess.CompletedProcess:
    return _safemail("promote", "--to", "production", "--dry-run", "--operator", "verify",
                     "--report", str(report), "--release-log", str(log))


@pytest.mark.req("SYS-05")
def test_promotion_refused_without_a_test_report(tmp_path, evidence):
    proc = _promote(tmp_path / "none" / "report.json", tmp_path / "releases.jsonl")
    out = proc.stdout + proc.stderr
    evidence(f"rc={proc.returncode}: {out.strip()[-300:]}")
    assert proc.returncode == 3
    assert "no verification report" in out
    assert not (tmp_path / "releases.jsonl").exists()


@pytest.mark.req("SYS-05")
def test_promotion_refused_on_a_failing_report_naming_the_requirement(tmp_path, evidence):
    proc = _promote(_report(tmp_path / "r", failing=("MAIL-03",)), tmp_path / "releases.jsonl")
    out = proc.stdout + proc.stderr
    evidence(f"rc={proc.returncode}: {out.strip()[-400:]}")
    assert proc.returncode == 3
    assert "failing requirements: MAIL-03" in out


@pytest.mark.req("SYS-05")
def test_promotion_refused_when_role_content_differs_naming_the_file(tmp_path, evidence):
    role_file = next(f for f in sorted(hashing.content_hash(ROOT, "test").files)
                     if f.startswith("roles/mailrelay/"))
    proc = _promote(_report(tmp_path / "r", tamper=role_file), tmp_path / "releases.jsonl")
    out = proc.stdout + proc.stderr
    evidence(f"tampered {role_file}; rc={proc.returncode}: {out.strip()[-400:]}")
    assert proc.returncode == 3
    assert "deployable content differs" in out and role_file in out


@pytest.mark.req("SYS-05")
def test_promotion_allowed_only_for_a_passing_report_of_this_revision(tmp_path, evidence):
    """The same gate lets a passing report of this revision through (dry run): the refusals
    above are about the report, not a gate that refuses everything. On a checkout with
    uncommitted changes the only remaining reason is that."""
    proc = _promote(_report(tmp_path / "r"), tmp_path / "releases.jsonl")
    out = proc.stdout + proc.stderr
    evidence(f"rc={proc.returncode}: {out.strip()[-400:]}")
    if hashing.git_dirty(ROOT):
        reasons = [line for line in out.splitlines() if line.strip().startswith("- ")]
        assert proc.returncode == 3
        assert reasons and all("uncommitted changes" in r for r in reasons), reasons
    else:
        assert proc.returncode == 0, out
    assert not (tmp_path / "releases.jsonl").exists(), "a dry run recorded a release"


@pytest.mark.req("SYS-06")
def test_network_plan_in_docs_is_the_render_of_the_flow_matrix(tmp_path, evidence):
    proc = _safemail("docs", "network", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    different = [name for name in ("network.md", "network.svg")
                 if (tmp_path / name).read_bytes() != (ROOT / "docs" / name).read_bytes()]
    evidence(f"fresh render vs docs/: differing files {different or 'none'}")
    assert different == [], "docs/ network plan is stale: run `safemail docs network`"


@pytest.mark.req("SYS-06")
def test_host_list_and_role_settings_are_generated_from_the_code(tmp_path, evidence):
    proc = _safemail("docs", "all", "--stage", "test", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    hosts_md = (tmp_path / "hosts.md").read_text()
    roles_md = (tmp_path / "roles.md").read_text()
    inventory = yaml.safe_load((ROOT / "inventories" / "test" / "hosts.yml").read_text())
    names: set[str] = set()

    def walk(group: dict) -> None:
        names.update((group.get("hosts") or {}).keys())
        for child in (group.get("children") or {}).values():
            walk(child or {})

    walk(inventory["all"])
    roles = sorted(p.parent.parent.name
                   for p in (ROOT / "roles").glob("*/meta/argument_specs.yml"))
    missing_hosts = sorted(n for n in names if n not in hosts_md)
    missing_roles = [r for r in roles if r not in roles_md]
    evidence(f"{len(names)} hosts, {len(roles)} roles; missing hosts {missing_hosts}, "
             f"missing roles {missing_roles}")
    assert names and roles
    assert missing_hosts == [] and missing_roles == []
