"""SYS-05 and SYS-06 on the controller: the release gate and the generated documentation.

These run where the change manager works (the controller), against this checkout and the
real `safemail` commands, not against lab hosts:

- SYS-05: `safemail promote --to production --dry-run` allows only a passing, complete,
  sealed test-stage report of this very revision and deployable content on the stage as it
  is (hosts, host keys, inventory), signed by both approver roles; it refuses a missing
  report, a failing one (naming the requirement), one whose role content differs (naming
  the file) and one without both approvals. The reports are built with the same code
  `safemail verify` uses and sealed with the stage's key (the controller runs the lab).
- SYS-06: the documentation is generated from the code: the committed network plan equals a
  fresh render of the flow matrix; the generated host list names every inventory host and
  the role reference every role with an argument spec.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from safemail.gate import approvals, hashing, signing, stage
from safemail.gate.catalogue import load_catalogue
from safemail.gate.report import (
    CREATED_BY_VERIFY,
    RunMetadata,
    TestResult,
    build_report,
    utc_iso,
    write_report,
)
from safemail.project import project_root

ROOT = project_root()
SAFEMAIL = str(Path(sys.executable).parent / "safemail")


def _safemail(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([SAFEMAIL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False, env=_env())


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.pop("SAFEMAIL_PROJECT", None)  # the checkout is the working directory
    return env


def _report(out: Path, *, repo: Path = ROOT, failing: tuple[str, ...] = (),
            tamper: str | None = None) -> Path:
    """A full, sealed test-stage report as `safemail verify` writes it: every host of the
    stage with the host keys of the stage's known_hosts, the JUnit digest, the stage key's
    seal. What it claims about the tests is made up: SYS-05 tests the gate, not the run."""
    identity = stage.read_stage(repo, "test")
    assert not identity.problems, identity.problems
    catalogue = load_catalogue(repo / "verify" / "requirements.yml")
    results = [TestResult(f"verify.release::test_{r.id}",
                          "failed" if r.id in failing else "passed", req_ids=[r.id])
               for r in catalogue]
    content = hashing.content_hash(repo, "test")
    files = dict(content.files)
    digest = content.digest
    if tamper is not None:
        # What was tested differs from the checkout in one role file.
        files[tamper] = "0" * 64
        digest = "sha256:" + "0" * 64
    out.mkdir(parents=True, exist_ok=True)
    junit = out / "junit.xml"
    junit.write_text("<testsuites/>\n")
    finished = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    meta = RunMetadata(
        stage="test", revision=hashing.git_revision(repo), dirty=False, content_hash=digest,
        content_files=files, inventory_hash=identity.inventory_hash,
        hosts=list(identity.hosts), started=utc_iso(finished - dt.timedelta(minutes=5)),
        finished=utc_iso(finished), created_by=CREATED_BY_VERIFY, profile="full",
        junit_sha256=hashlib.sha256(junit.read_bytes()).hexdigest(),
        host_keys={h: sorted(identity.host_keys.get(h, ())) for h in identity.hosts})
    report = build_report(results, catalogue, [], meta, generated=finished)
    json_path, _html, _digest = write_report(report, out)
    assert identity.run_key_private is not None
    stage.seal(json_path, identity.run_key_private)
    return json_path


def _promote(report: Path, log: Path, cwd: Path = ROOT,
             vault_pass: Path | None = None) -> subprocess.CompletedProcess:
    # --first-release: the throwaway clones below have no release tag (their own release/
    # approves); the checkout's tags, if any, are deleted in the clone.
    vault_args = ["--vault-id", f"production@{vault_pass}"] if vault_pass else []
    return _safemail("promote", "--to", "production", "--dry-run", "--first-release",
                     "--report", str(report), "--release-log", str(log), *vault_args, cwd=cwd)


def _site_production_vault(clone: Path, password_file: Path) -> None:
    """The committed example vault opens with the published password and holds published
    values, both of which the gate refuses (a site makes its own): the clone's copy gets new
    values and a password only this run knows, in ``password_file``."""
    import secrets

    from ansible.parsing.vault import VaultLib, VaultSecret

    from safemail import vault

    path = clone / "inventories" / "production" / vault.VAULT_FILE
    old = VaultLib([("production", VaultSecret(vault.EXAMPLE_PASSWORD.encode()))])
    text = path.read_bytes()
    if not vault.opens_with(path, vault.EXAMPLE_PASSWORD):
        # A site's checkout holds its own vault (whose password this test does not get): the
        # throw-away clone starts from the example as first committed, which the site's
        # history still has, and gets its own values below as at any site.
        rel = path.relative_to(clone).as_posix()
        first = subprocess.run(["git", "-C", str(clone), "log", "--diff-filter=A",
                                "--format=%H", "--", rel], capture_output=True, text=True,
                               check=True).stdout.split()
        assert first, f"{rel} is not the example and git has no first version of it"
        text = subprocess.run(["git", "-C", str(clone), "show", f"{first[-1]}:{rel}"],
                              capture_output=True, check=True).stdout
    data = yaml.safe_load(old.decrypt(text))

    def fresh(value):
        if isinstance(value, dict):
            return {k: fresh(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fresh(v) for v in value]
        return secrets.token_urlsafe(24)

    password = secrets.token_urlsafe(24)
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    new = VaultSecret(password.encode())
    path.write_bytes(VaultLib([("production", new)]).encrypt(
        yaml.safe_dump(fresh(data)).encode(), secret=new, vault_id="production"))


def _checkout_with_approvers(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A clone of this checkout's HEAD with the lab's generated inventory and two throwaway
    approvers (one per role) committed in release/: the real approvers' keys stay theirs."""
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    tags = subprocess.run(["git", "-C", str(clone), "tag", "--list", "release/production/*"],
                          capture_output=True, text=True, check=True).stdout.split()
    if tags:  # a first release of the throwaway approvers, not the site's next one
        subprocess.run(["git", "-C", str(clone), "tag", "-d", *tags], check=True,
                       capture_output=True)
    generated = ROOT / "inventories" / "test" / "zz_lab_generated.yml"
    shutil.copy(generated, clone / generated.relative_to(ROOT))
    keys: dict[str, Path] = {}
    lines = []
    for who in ("head", "security"):
        key = tmp_path / f"{who}-key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        keys[who] = key
        lines.append(f"{who}@verify.invalid {key.with_suffix('.pub').read_text().strip()}")
    # Added beside the site's own approvers, not instead of them: the signatures of the
    # site's committed waivers must still verify in the clone.
    signers = clone / "release" / "allowed_signers"
    before = signers.read_text()
    signers.write_text(before + ("" if before.endswith("\n") or not before else "\n")
                       + "\n".join(lines) + "\n")
    policy = yaml.safe_load((clone / "release" / "approvers.yml").read_text())
    roles = policy["release_roles"]
    for role, who in zip(roles, ("head", "security"), strict=True):
        policy["roles"][role]["principals"] = [
            *(policy["roles"][role].get("principals") or []), f"{who}@verify.invalid"]
    (clone / "release" / "approvers.yml").write_text(yaml.safe_dump(policy))
    _site_production_vault(clone, tmp_path / "vault-pass")
    git = ["git", "-C", str(clone), "-c", "user.name=verify", "-c", "user.email=v@invalid"]
    subprocess.run([*git, "commit", "-qam", "throwaway approvers"], check=True)
    return clone, keys


@pytest.mark.req("SYS-05")
@pytest.mark.read_only
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
def test_promotion_needs_both_approvals_and_is_allowed_with_them(tmp_path, evidence):
    """The same gate refuses a passing, sealed report of this revision without the approver
    roles' signatures, with one only, and allows it (dry run) with both: the refusals above
    are about the report, not a gate that refuses everything."""
    clone, keys = _checkout_with_approvers(tmp_path)
    report = _report(clone / "reports" / "test" / "run", repo=clone)
    log = tmp_path / "releases.jsonl"
    message = approvals.release_message(
        json.loads(report.read_text()), hashlib.sha256(report.read_bytes()).hexdigest())
    signed = report.parent / "approvals"
    signed.mkdir()
    outcomes = []
    for who in (None, "head", "security"):
        if who is not None:
            (signed / f"{who}.sig").write_text(
                signing.sign(keys[who], approvals.RELEASE_NAMESPACE, message))
        proc = _promote(report, log, cwd=clone, vault_pass=tmp_path / "vault-pass")
        outcomes.append((who, proc.returncode, (proc.stdout + proc.stderr).strip()[-300:]))
    evidence(f"signatures added one by one: {outcomes}")
    assert [rc for _who, rc, _out in outcomes] == [3, 3, 0], outcomes
    assert "approval: no valid signature" in outcomes[0][2]
    assert "head@verify.invalid" in outcomes[2][2]
    assert not log.exists(), "a dry run recorded a release"


@pytest.mark.req("SYS-06")
@pytest.mark.read_only
def test_network_plan_in_docs_is_the_render_of_the_flow_matrix(tmp_path, evidence):
    proc = _safemail("docs", "network", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    different = [name for name in ("network.md", "network.svg")
                 if (tmp_path / name).read_bytes() != (ROOT / "docs" / name).read_bytes()]
    evidence(f"fresh render vs docs/: differing files {different or 'none'}")
    assert different == [], "docs/ network plan is stale: run `safemail docs network`"


@pytest.mark.req("SYS-06")
@pytest.mark.read_only
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
