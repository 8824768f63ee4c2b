"""Issue 16: every way around the release gate that the issue names, each refused with a reason.

A report must be the sealed evidence of a real run on the stage as it is now; a release needs
the signatures of the approver roles with distinct people and keys; waivers are bounded and
signed. Keys are throwaway ed25519 keys made in tmp directories (tests/gatekit.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gatekit
import pytest
import yaml

from safemail.cli import main
from safemail.errors import SafeMailError
from safemail.gate import approvals, promote, release_chain, signing
from safemail.gate.catalogue import NEVER_WAIVABLE, load_catalogue
from safemail.gate.waivers import WaiverError, load_waivers

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
ALICE, BOB, CAROL = "alice@example.invalid", "bob@example.invalid", "carol@example.invalid"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> gatekit.Project:
    return gatekit.make_project(tmp_path).use_lab(monkeypatch)


def _report(project: gatekit.Project, *, approve: bool = True, **kw) -> Path:
    path = gatekit.make_report(project, finished=NOW - dt.timedelta(hours=1), **kw)
    if approve:
        gatekit.approve(project, path, ALICE, BOB)
    return path


def _reasons(project: gatekit.Project, report: Path) -> list[str]:
    decision = promote.evaluate(project.root, report, now=NOW, first_release=True)
    assert not decision.allowed
    return decision.reasons


def _only(reasons: list[str], needle: str) -> None:
    assert len(reasons) == 1 and needle in reasons[0], reasons


def test_the_honest_release_is_allowed_and_the_operator_comes_from_the_signature(
    project: gatekit.Project,
) -> None:
    decision = promote.evaluate(project.root, _report(project), now=NOW, first_release=True)
    assert decision.allowed, decision.reasons
    assert decision.operator == ALICE
    assert {(s.role, s.principal) for s in decision.approvers} == {
        ("head-of-it", ALICE), ("it-security", BOB)}


# ------------------------------------------------------------------ the report is a real run


def test_forged_junit_through_safemail_report_is_refused(
    project: gatekit.Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's walk: a hand-written JUnit with one passing test per requirement."""
    monkeypatch.chdir(project.root)
    monkeypatch.delenv("SAFEMAIL_PROJECT", raising=False)
    ids = load_catalogue(project.root / "verify" / "requirements.yml").ids
    forged = project.root / "reports" / "test" / "forged"
    forged.mkdir(parents=True)
    (forged / "junit.xml").write_text(gatekit.junit_text(list(ids), {}))
    # 1. No run behind it: `safemail report` does not stamp it with the checkout's revision.
    assert main(["report", str(forged / "junit.xml")]) == 2
    assert "never stamps JUnit XML with the checkout's revision" in capsys.readouterr().err
    assert not (forged / "report.json").exists()
    # 2. Slipped into a real (sealed, approved) run's directory instead of its own JUnit.
    run = _report(project, failing=("MAIL-03",)).parent
    shutil.copy(forged / "junit.xml", run / "junit.xml")
    assert main(["report", str(run / "junit.xml")]) == 2  # a sealed report is not overwritten
    assert "would destroy the evidence" in capsys.readouterr().err
    (run / "report.json.sig").unlink()
    assert main(["report", str(run / "junit.xml")]) == 0  # re-rendered: now it "passes"
    capsys.readouterr()
    assert json.loads((run / "report.json").read_text())["verdict"] == "pass"
    (project.root / "reports" / "test" / "latest").symlink_to("run")
    assert main(["promote", "--to", "production", "--first-release", "--dry-run"]) == 3
    out = capsys.readouterr().out
    for needle in ("made by `safemail report`", "junit.xml does not match",
                   "not sealed", "does not match the text to approve"):
        assert needle in out, (needle, out)


def test_report_edited_after_the_run_is_refused(project: gatekit.Project) -> None:
    path = _report(project, failing=("MAIL-03",), approve=False)
    data = json.loads(path.read_text())
    for row in data["requirements"]:  # flip the failing row to pass, consistently
        if row["id"] == "MAIL-03":
            row.update(status="pass", counts_as_failure=False, reason="1 test(s) passed")
            row["tests"][0]["outcome"] = "passed"
    data.update(verdict="pass", failing_requirements=[])
    path.write_text(json.dumps(data))
    gatekit.approve(project, path, ALICE, BOB)  # even approved as it now is
    _only(_reasons(project, path), "report.json was changed after `safemail verify` wrote it")


def test_report_html_edited_after_sealing_is_refused(project: gatekit.Project) -> None:
    """report.html is what the approvers read: its sha256 is inside the sealed report.json."""
    path = _report(project, failing=("MAIL-03",))
    html = path.parent / "report.html"
    assert json.loads(path.read_text())["run"]["html_sha256"] == hashlib.sha256(
        html.read_bytes()).hexdigest()
    # The walk-around: the JSON (sealed, signed) stays, the page says PASS.
    html.write_text(html.read_text().replace("FAIL", "PASS"))
    reasons = _reasons(project, path)
    assert any("report.html does not match the digest the sealed report recorded" in r
               for r in reasons), reasons
    html.unlink()
    assert any("report.html is missing beside the report" in r
               for r in _reasons(project, path)), reasons


def test_report_resealed_with_another_key_is_refused(project: gatekit.Project) -> None:
    path = _report(project, approve=False)
    other, _pub = gatekit.keygen(project.keys, "not-the-stage")
    from safemail.gate import stage

    stage.seal(path, other)
    gatekit.approve(project, path, ALICE, BOB)
    _only(_reasons(project, path), "sealed with another key than the stage's")


def _edit_generated(project: gatekit.Project, **changes: str) -> None:
    path = project.root / "inventories" / "test" / "zz_lab_generated.yml"
    data = yaml.safe_load(path.read_text())
    data["all"]["vars"].update(changes)
    path.write_text(yaml.safe_dump(data))


def test_seal_key_swapped_in_the_inventory_is_refused(project: gatekit.Project) -> None:
    """Who can edit the git-ignored inventory names their own key as the stage's and seals a
    report with it: the seal is checked with the lab's own key, and the inventory may not
    name another key."""
    own, own_pub = gatekit.keygen(project.keys, "intruder")
    _edit_generated(project, ansible_ssh_private_key_file=str(own), lab_ssh_public_key=own_pub)
    path = _report(project, approve=False)
    from safemail.gate import stage

    stage.seal(path, own)
    gatekit.approve(project, path, ALICE, BOB)
    reasons = _reasons(project, path)
    assert any(f"SSH key {own} is not the lab's own key" in r for r in reasons), reasons
    assert any("sealed with another key than the stage's" in r for r in reasons), reasons


def test_public_key_beside_the_lab_key_is_not_trusted(project: gatekit.Project) -> None:
    """The verifying key is derived from the lab's private key (ssh-keygen -y), not read from
    lab_ssh_public_key or the .pub file beside the key."""
    own, own_pub = gatekit.keygen(project.keys, "intruder")
    _edit_generated(project, lab_ssh_public_key=own_pub)
    path = _report(project, approve=False)
    project.stage_key.with_suffix(".pub").write_text(own_pub + "\n")
    from safemail.gate import stage

    stage.seal(path, own)
    gatekit.approve(project, path, ALICE, BOB)
    _only(_reasons(project, path), "sealed with another key than the stage's")


@pytest.mark.parametrize("args,needle", [
    ("-o UserKnownHostsFile={other} -o StrictHostKeyChecking=yes",
     "name the known_hosts file {other}, not the lab's own"),
    ("-o UserKnownHostsFile={lab} -o UserKnownHostsFile={other} -o StrictHostKeyChecking=yes",
     "name the known_hosts file {other}, not the lab's own"),
    ("-o UserKnownHostsFile={lab} -o StrictHostKeyChecking=no",
     "must say -o StrictHostKeyChecking=yes (found no)"),
    ("-o UserKnownHostsFile={lab}", "must say -o StrictHostKeyChecking=yes (found none)"),
    ("-o StrictHostKeyChecking=yes", "no -o UserKnownHostsFile"),
    ("-o UserKnownHostsFile={lab} -o StrictHostKeyChecking=yes -F {other}",
     "other than -o options are not allowed"),
    ("-oUserKnownHostsFile={lab} -oStrictHostKeyChecking=yes -oGlobalKnownHostsFile={other}",
     "globalknownhostsfile={other} is not allowed"),
])
def test_known_hosts_redirected_by_the_inventory_is_refused(
    project: gatekit.Project, args: str, needle: str
) -> None:
    """The run's host keys are only evidence if ssh checked them against the lab's own
    known_hosts: an inventory that points the run at a copy (holding a stand-in host's key)
    or turns the check off refuses the release, for every host."""
    other = project.keys / "known_hosts.copy"
    shutil.copy(project.known_hosts, other)
    _edit_generated(project, ansible_ssh_common_args=args.format(lab=project.known_hosts,
                                                                 other=other))
    path = _report(project)  # the report matches the edited inventory (same hash)
    reasons = _reasons(project, path)
    expected = needle.format(other=other)
    assert all(any(f"host {h}: " in r and expected in r for r in reasons)
               for h in project.host_keys), reasons


@pytest.mark.parametrize("setting,needle", [
    ({"ansible_ssh_executable": "/tmp/fake-ssh"},
     "the variable ansible_ssh_executable is not allowed"),
    ({"ansible_control_path": "/tmp/x"}, "the variable ansible_control_path is not allowed"),
    ({"mitogen_via": "jump1"}, "the variable mitogen_via is not allowed"),
    ({"ansible_ssh_common_args": "{lab} -o ControlMaster=auto -o ControlPath=/tmp/x"},
     "SSH option controlmaster=auto is not allowed"),
    ({"ansible_ssh_common_args": "{lab} -o ControlPath=/tmp/x"},
     "SSH option controlpath=/tmp/x is not allowed"),
    ({"ansible_ssh_extra_args": "-o ProxyCommand=/tmp/x"},
     "SSH option proxycommand=/tmp/x is not allowed"),
])
def test_connection_settings_the_lab_does_not_write_are_refused(
    project: gatekit.Project, setting: dict[str, str], needle: str
) -> None:
    """Review walks: another ssh binary in the git-ignored inventory, or a master connection
    someone else opened (its host key never checked). The pinning is an allowlist."""
    lab = f"-o UserKnownHostsFile={project.known_hosts} -o StrictHostKeyChecking=yes"
    _edit_generated(project, **{k: v.format(lab=lab) for k, v in setting.items()})
    reasons = _reasons(project, _report(project))
    assert all("is not allowed for the test stage" in r for r in reasons), reasons
    assert all(any(f"host {h}: " in r and needle in r for r in reasons)
               for h in project.host_keys), reasons


def test_what_the_lab_writes_passes_the_pinning(project: gatekit.Project) -> None:
    """The allowlist's positive twin: the lab's own generated inventory (lab/plan.py)."""
    from safemail.lab.plan import generated_inventory

    lab_vars = generated_inventory(_EmptyPlan(), str(project.stage_key),
                                   str(project.known_hosts), "ssh-ed25519 AAAA")["all"]["vars"]
    _edit_generated(project, **{k: v for k, v in lab_vars.items() if k.startswith("ansible_")})
    decision = promote.evaluate(project.root, _report(project), now=NOW, first_release=True)
    assert decision.allowed, decision.reasons


class _EmptyPlan:
    hosts: tuple[()] = ()
    mirror = internet_sink = "198.18.0.1"


def test_a_full_run_does_not_take_connection_settings_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from safemail.gate import verify_run

    for name in ("ANSIBLE_SSH_EXECUTABLE", "ANSIBLE_SSH_ARGS", "ANSIBLE_SSH_CONTROL_PATH",
                 "ANSIBLE_CONNECTION_PLUGINS", "ANSIBLE_PRIVATE_KEY_FILE", "MITOGEN_X",
                 "ANSIBLE_HOST_KEY_CHECKING", "ANSIBLE_STRATEGY", "ANSIBLE_CONFIG"):
        monkeypatch.setenv(name, "/tmp/x")
    show = [sys.executable, "-c", "import os; print(sorted((k, v) for k, v in os.environ.items()"
            " if k.startswith(('ANSIBLE_', 'MITOGEN_'))))"]
    for strip in (True, False):
        out = io.StringIO()
        assert verify_run.stream(show, tmp_path, tmp_path / "log", out,
                                 strip_connection=strip) == 0
        seen = dict(eval(out.getvalue()))  # noqa: S307 - our own print of a list
        if strip:
            assert seen == {"ANSIBLE_STRATEGY": "/tmp/x",
                            "ANSIBLE_CONFIG": str(tmp_path / "ansible.cfg")}, seen
        else:
            assert "ANSIBLE_SSH_EXECUTABLE" in seen and seen["ANSIBLE_CONFIG"] == "/tmp/x"


def test_local_connection_is_refused(project: gatekit.Project) -> None:
    _edit_generated(project, ansible_connection="local")
    reasons = _reasons(project, _report(project))
    assert len(reasons) == len(project.host_keys), reasons
    assert all("ansible_connection 'local'" in r for r in reasons), reasons


def test_unsealed_report_is_refused(project: gatekit.Project) -> None:
    _only(_reasons(project, _report(project, seal=False)), "the report is not sealed")


def test_junit_replaced_or_missing_is_refused(project: gatekit.Project) -> None:
    path = _report(project)
    junit = path.parent / "junit.xml"
    junit.write_text(junit.read_text().replace('time="0.1"', 'time="0.2"', 1))
    _only(_reasons(project, path), "junit.xml does not match the digest the report recorded")
    junit.unlink()
    _only(_reasons(project, path), "junit.xml is missing beside the report")


def test_foreign_host_is_refused(project: gatekit.Project) -> None:
    hosts = {h: [project.fingerprint(h)] for h in project.host_keys}
    hosts["evil1"] = ["SHA256:" + "A" * 43]
    _only(_reasons(project, _report(project, hosts=hosts)),
          "hosts that are not in the test stage: evil1")


def test_missing_service_host_is_refused(project: gatekit.Project) -> None:
    hosts = {h: [project.fingerprint(h)] for h in ("relay1", "practice1")}
    _only(_reasons(project, _report(project, hosts=hosts)),
          "did not reach these service hosts of the test stage: store1")


def test_empty_host_list_is_refused(project: gatekit.Project) -> None:
    reasons = _reasons(project, _report(project, hosts={}))
    assert any("did not reach these service hosts of the test stage: relay1, store1" in r
               for r in reasons), reasons


def test_changed_host_key_is_refused(project: gatekit.Project) -> None:
    path = _report(project)
    project.recreate_host("relay1")
    _only(_reasons(project, path), "the SSH host key of relay1 differs")


def test_host_without_recorded_key_is_refused(project: gatekit.Project) -> None:
    hosts = {h: [project.fingerprint(h)] for h in project.host_keys}
    hosts["store1"] = []
    _only(_reasons(project, _report(project, hosts=hosts)),
          "the run recorded no SSH host key for store1")


def test_inventory_changed_since_the_run_is_refused(project: gatekit.Project) -> None:
    path = _report(project)
    generated = project.root / "inventories" / "test" / "zz_lab_generated.yml"
    generated.write_text(generated.read_text() + "# rebuilt\n")
    _only(_reasons(project, path), "inventory hash differs")


def test_production_profile_report_never_releases(project: gatekit.Project) -> None:
    _only(_reasons(project, _report(project, profile="production")),
          "production profile (a read-only check, not a proof): it can never release")


def test_report_from_another_revision_is_refused(project: gatekit.Project) -> None:
    path = _report(project)
    gatekit.write(project.root, "docs/readme.md", "changed\n")
    gatekit.git(project.root, "commit", "-qam", "docs")
    _only(_reasons(project, path), "the report is for revision")


def test_re_rendering_keeps_the_run_revision(
    project: gatekit.Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _report(project)
    tested = json.loads(path.read_text())["revision"]["commit"]
    gatekit.write(project.root, "docs/readme.md", "changed\n")
    gatekit.git(project.root, "commit", "-qam", "docs")
    monkeypatch.chdir(project.root)
    other = project.root / "reports" / "rerendered"
    assert main(["report", str(path.parent / "junit.xml"), "--out", str(other)]) == 0
    data = json.loads((other / "report.json").read_text())
    assert data["revision"]["commit"] == tested
    assert data["run"]["created_by"] == "safemail report"
    assert not (other / "report.json.sig").exists()
    # the original: other revision
    assert promote.evaluate(project.root, path, now=NOW, first_release=True).reasons
    reasons = _reasons(project, other / "report.json")
    assert any("made by `safemail report`" in r for r in reasons), reasons


# ------------------------------------------------------------------ approvals


def test_one_signature_only_is_refused(project: gatekit.Project) -> None:
    path = _report(project, approve=False)
    gatekit.approve(project, path, ALICE)
    _only(_reasons(project, path), "no valid signature for the role(s) it security (it-security)")


def test_same_person_twice_is_refused(project: gatekit.Project) -> None:
    path = _report(project, approve=False)
    gatekit.approve(project, path, ALICE)
    sig = (path.parent / "approvals" / "alice.sig").read_text()
    (path.parent / "approvals" / "alice-again.sig").write_text(sig)
    _only(_reasons(project, path), "no valid signature for the role(s) it security")


def test_one_person_holding_both_roles_fills_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = gatekit.make_project(
        tmp_path, roles={"head-of-it": [ALICE], "it-security": [ALICE, BOB]}).use_lab(monkeypatch)
    path = _report(project, approve=False)
    gatekit.approve(project, path, ALICE)
    _only(_reasons(project, path), "no valid signature for the role(s)")
    gatekit.approve(project, path, BOB)
    assert promote.evaluate(project.root, path, now=NOW, first_release=True).allowed


def test_one_person_with_two_keys_fills_one_role(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice holds both roles (a deputy arrangement) and has two keys: still one person."""
    project = gatekit.make_project(
        tmp_path, roles={"head-of-it": [ALICE, BOB], "it-security": [ALICE, BOB]}
    ).use_lab(monkeypatch)
    second, second_pub = gatekit.keygen(project.keys, "alice-second")
    signers = project.root / "release" / "allowed_signers"
    signers.write_text(signers.read_text()
                       + f'{ALICE} namespaces="safemail-release" {second_pub}\n')
    gatekit.git(project.root, "commit", "-qam", "alice's second key")
    project.approvers["alice-second"] = second
    path = _report(project, approve=False)
    gatekit.approve(project, path, ALICE)
    gatekit.approve(project, path, "alice-second")
    _only(_reasons(project, path), "one person, one key, one role")
    gatekit.approve(project, path, BOB)
    assert promote.evaluate(project.root, path, now=NOW, first_release=True).allowed


def test_one_key_under_two_names_fills_one_role(project: gatekit.Project) -> None:
    """Another copy of a key: bob's principal listed with alice's key as well."""
    signers = project.root / "release" / "allowed_signers"
    alice_pub = (project.keys / "alice.pub").read_text().strip()
    signers.write_text(signers.read_text()
                       + f'{BOB} namespaces="safemail-release" {alice_pub}\n')
    gatekit.git(project.root, "commit", "-qam", "bob's second key")
    path = _report(project, approve=False)
    gatekit.approve(project, path, ALICE)
    gatekit.approve(project, path, BOB, key_of=ALICE)  # "bob" signs with alice's key
    _only(_reasons(project, path), "one person, one key, one role")


def test_unknown_signer_is_refused(project: gatekit.Project) -> None:
    path = _report(project, approve=False)
    gatekit.approve(project, path, ALICE, CAROL)  # carol has a key but no role
    reasons = _reasons(project, path)
    assert any("carol@example.invalid holds none of the roles" in r for r in reasons), reasons
    stranger, _pub = gatekit.keygen(project.keys, "stranger")
    project.approvers["stranger"] = stranger
    gatekit.approve(project, path, "stranger")
    reasons = _reasons(project, path)
    assert any("is not in release/allowed_signers (unknown signer)" in r for r in reasons)


def test_signature_of_another_text_or_namespace_is_refused(project: gatekit.Project) -> None:
    old = gatekit.make_report(project, finished=NOW - dt.timedelta(hours=2),
                              out=project.root / "reports" / "test" / "old")
    gatekit.approve(project, old, ALICE, BOB)  # approvals of an earlier run
    path = _report(project, approve=False)
    shutil.copytree(old.parent / "approvals", path.parent / "approvals")
    reasons = _reasons(project, path)
    assert sum("does not match the text to approve" in r for r in reasons) == 2, reasons
    shutil.rmtree(path.parent / "approvals")
    message = approvals.release_message(json.loads(path.read_text()),
                                        promote.file_digest(path))
    (path.parent / "approvals").mkdir()
    for who in (ALICE, BOB):
        (path.parent / "approvals" / f"{who}.sig").write_text(
            signing.sign(project.approvers[who], approvals.WAIVER_NAMESPACE, message))
    reasons = _reasons(project, path)
    assert sum("made for namespace 'safemail-waiver'" in r for r in reasons) == 2, reasons


def test_missing_approval_policy_is_refused(project: gatekit.Project) -> None:
    path = _report(project)
    (project.root / "release" / "approvers.yml").unlink()
    reasons = _reasons(project, path)
    assert any(r.startswith("approvals cannot be checked: approval policy") for r in reasons)


def test_approval_request_and_status(
    project: gatekit.Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(project.root)
    path = _report(project, approve=False)
    args = ["approval", "request", "--report", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    request = path.parent / "approvals" / "request.txt"
    assert request.read_bytes() == approvals.release_message(
        json.loads(path.read_text()), promote.file_digest(path))
    assert f"report-sha256: {promote.file_digest(path)}" in out
    assert "ssh-keygen -Y sign -f ~/.ssh/id_ed25519 -n safemail-release" in out
    html = path.with_name("report.html")
    assert f"report.html sha256: {promote.file_digest(html)}" in out
    assert main(["approval", "status", "--report", str(path)]) == 3
    gatekit.approve(project, path, ALICE, BOB)
    assert main(["approval", "status", "--report", str(path)]) == 0
    assert "signed: it-security: bob@example.invalid" in capsys.readouterr().out
    assert main(["approval", "request", "--expires", "2027-01-01"]) == 2


@pytest.mark.parametrize("walk", ["html-edited", "html-missing", "json-edited", "unsealed"])
def test_approval_request_refuses_a_report_that_is_not_the_sealed_runs(
    project: gatekit.Project, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], walk: str,
) -> None:
    """Review walk: the request sends the approvers to report.html; an edited page (or an
    edited, unsealed report) would be what they read and sign for."""
    monkeypatch.chdir(project.root)
    path = _report(project, approve=False)
    html = path.with_name("report.html")
    if walk == "html-edited":
        html.write_text(html.read_text().replace("</body>", "<p>all green</p></body>"))
    elif walk == "html-missing":
        html.unlink()
    elif walk == "json-edited":
        path.write_text(path.read_text().replace('"verdict"', '"verdict" ', 1))
    else:
        path.with_name("report.json.sig").unlink()
    assert main(["approval", "request", "--report", str(path)]) == 3
    captured = capsys.readouterr()
    expected = {"html-edited": "report.html does not match the digest the sealed report",
                "html-missing": "the run's report.html is missing",
                "json-edited": "the report's seal does not match",
                "unsealed": "the report is not sealed"}[walk]
    assert expected in captured.err and "Text to sign" not in captured.out
    assert not (path.parent / "approvals" / "request.txt").exists()


# ------------------------------------------------------------------ waivers


def _waiver(project: gatekit.Project, req_id: str = "AV-02", days: int = 60,
            signers: tuple[str, ...] = (ALICE, BOB)) -> dict:
    why = "The second relay arrives with the new cluster in Q1."
    granted = dt.date(2026, 11, 20)
    expires = granted + dt.timedelta(days=days)
    return {"id": req_id, "justification": why, "granted": granted.isoformat(),
            "expires": expires.isoformat(),
            "signatures": [gatekit.sign_waiver(project, s, req_id, why, granted, expires)
                           for s in signers]}


def _load(project: gatekit.Project, entries: list[dict]):
    path = project.root / "verify" / "waivers.yml"
    path.write_text(yaml.safe_dump(entries))
    catalogue = load_catalogue(project.root / "verify" / "requirements.yml")
    return load_waivers(path, catalogue.ids, never_waivable=catalogue.never_waivable,
                        policy=approvals.load_policy(project.root))


def test_signed_bounded_waiver_is_accepted_with_approvers_from_the_signatures(
    project: gatekit.Project,
) -> None:
    [waiver] = _load(project, [_waiver(project)])
    assert ALICE in waiver.approver and BOB in waiver.approver
    assert waiver.is_active(dt.date(2026, 12, 1)) and not waiver.is_active(dt.date(2026, 11, 19))


def test_over_long_waiver_is_refused(project: gatekit.Project) -> None:
    with pytest.raises(WaiverError, match="lasts 120 days .* the most allowed is 90"):
        _load(project, [_waiver(project, days=120)])


def test_unsigned_waiver_is_refused(project: gatekit.Project) -> None:
    entry = _waiver(project)
    entry["signatures"] = []
    with pytest.raises(WaiverError, match="missing field.*signatures.*unsigned waiver"):
        _load(project, [entry])
    entry = _waiver(project, signers=(ALICE,))
    with pytest.raises(WaiverError, match="no valid signature for the role"):
        _load(project, [entry])
    entry = _waiver(project)
    entry["expires"] = "2027-01-10"  # changed after signing
    with pytest.raises(WaiverError, match="does not match the text to approve"):
        _load(project, [entry])


def test_gate_refuses_while_the_waiver_file_is_invalid(project: gatekit.Project) -> None:
    path = project.root / "verify" / "waivers.yml"
    path.write_text(yaml.safe_dump([_waiver(project, days=120)]))  # over-long
    gatekit.git(project.root, "add", "-A")
    gatekit.git(project.root, "commit", "-qm", "an over-long waiver")
    reasons = _reasons(project, _report(project))
    assert len(reasons) == 1 and reasons[0].startswith("waivers: waiver file is invalid"), reasons
    assert "lasts 120 days" in reasons[0]


def test_free_text_approver_field_is_refused(project: gatekit.Project) -> None:
    entry = _waiver(project)
    entry["approver"] = "Head of IT"
    with pytest.raises(WaiverError, match="unknown field.*approver.*read from the signatures"):
        _load(project, [entry])


@pytest.mark.parametrize("req_id", NEVER_WAIVABLE)
def test_never_waivable_ids_are_refused(project: gatekit.Project, req_id: str) -> None:
    with pytest.raises(WaiverError, match=f"{req_id} can never be waived"):
        _load(project, [_waiver(project, req_id=req_id)])


def test_catalogue_marks_the_never_waivable_ids(tmp_path: Path) -> None:
    catalogue = load_catalogue(gatekit.REPO / "verify" / "requirements.yml")
    marked = {r.id for r in catalogue if not r.waivable}
    assert set(NEVER_WAIVABLE) <= marked
    # A catalogue that stops marking one does not make it waivable.
    data = yaml.safe_load((gatekit.REPO / "verify" / "requirements.yml").read_text())
    for entry in data["requirements"]:
        entry.pop("waivable", None)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(data))
    assert set(NEVER_WAIVABLE) <= set(load_catalogue(tmp_path / "r.yml").never_waivable)


def test_waiver_request_prints_the_text_and_refuses_bad_input(
    project: gatekit.Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(project.root)
    base = ["approval", "request", "--waiver", "AV-02", "--justification",
            "The second relay arrives with the new cluster in Q1.", "--granted", "2026-11-20"]
    assert main([*base, "--expires", "2027-01-19", "--out", "w.txt"]) == 0
    out = capsys.readouterr().out
    expected = approvals.waiver_message(
        "AV-02", "The second relay arrives with the new cluster in Q1.",
        dt.date(2026, 11, 20), dt.date(2027, 1, 19))
    assert expected.decode() in out
    assert (project.root / "w.txt").read_bytes() == expected
    assert "-n safemail-waiver" in out
    assert main([*base, "--expires", "2027-06-01"]) == 2
    assert "allowed: 0 to 90 days" in capsys.readouterr().err
    assert main([*base[:3], "MAIL-03", *base[4:], "--expires", "2027-01-01"]) == 2
    assert "can never be waived" in capsys.readouterr().err


# ------------------------------------------------- issue 16 review: holes around the gate


def _subset_catalogue(tmp_path: Path, drop: str) -> Path:
    data = yaml.safe_load((gatekit.REPO / "verify" / "requirements.yml").read_text())
    data["requirements"] = [r for r in data["requirements"] if r["id"] != drop]
    path = tmp_path / "other-requirements.yml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def test_report_judged_against_another_catalogue_is_refused(
    project: gatekit.Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`safemail verify --catalogue OTHER.yml` without MAIL-03: the report passes what it
    lists. Promote compares its catalogue with the checkout's verify/requirements.yml."""
    other = _subset_catalogue(tmp_path, "MAIL-03")
    monkeypatch.setattr(gatekit, "load_catalogue", lambda _path: load_catalogue(other))
    path = _report(project)
    _only(_reasons(project, path), "another requirement catalogue than the checkout's")


def test_report_with_requirements_left_out_is_refused(project: gatekit.Project) -> None:
    """The catalogue digest is right, but the requirement rows are not the catalogue's."""
    path = _report(project, approve=False)
    data = json.loads(path.read_text())
    data["requirements"] = [r for r in data["requirements"] if r["id"] != "MAIL-03"]
    path.write_text(json.dumps(data))
    from safemail.gate import stage

    stage.seal(path, project.stage_key)  # whoever holds the stage key (docs: Known limits)
    gatekit.approve(project, path, ALICE, BOB)
    _only(_reasons(project, path), "not the catalogue's (missing MAIL-03)")


def test_verify_does_not_seal_with_another_catalogue(
    project: gatekit.Project, tmp_path: Path
) -> None:
    from safemail.gate import verify_run

    path = gatekit.make_report(project, finished=NOW, seal=False)
    out = io.StringIO()
    opts = verify_run.VerifyOptions(catalogue=_subset_catalogue(tmp_path, "MAIL-03"))
    assert verify_run._seal(project.root, opts, path, out) is False
    assert "not sealed: --catalogue" in out.getvalue()
    assert not path.with_name("report.json.sig").exists()
    default = verify_run.VerifyOptions(catalogue=project.root / "verify" / "requirements.yml")
    assert verify_run._seal(project.root, default, path, out) is True


@pytest.mark.parametrize("flag", ["--skip-worktree", "--assume-unchanged"])
def test_edits_hidden_from_git_status_make_the_checkout_dirty(
    project: gatekit.Project, flag: str
) -> None:
    """Mallory adds two keys of hers to the policy in the working tree only and hides the edit
    from `git status`; the report is made and approved after it."""
    root = project.root
    policy = yaml.safe_load((root / "release" / "approvers.yml").read_text())
    with (root / "release" / "allowed_signers").open("a") as handle:
        for name, role in (("mallory", "head-of-it"), ("mallory-sec", "it-security")):
            key, public = gatekit.keygen(project.keys, name)
            project.approvers[f"{name}@x"] = key
            handle.write(f'{name}@x namespaces="safemail-release" {public}\n')
            policy["roles"][role]["principals"].append(f"{name}@x")
    (root / "release" / "approvers.yml").write_text(yaml.safe_dump(policy))
    gatekit.write(root, "roles/common/tasks/main.yml", "- name: not what was reviewed\n")
    hidden = ["release/allowed_signers", "release/approvers.yml", "roles/common/tasks/main.yml"]
    gatekit.git(root, "update-index", flag, *hidden)
    assert gatekit.git(root, "status", "--porcelain") == ""
    path = _report(project, approve=False)
    gatekit.approve(project, path, "mallory@x", "mallory-sec@x")
    decision = promote.evaluate(root, path, now=NOW, first_release=True)
    assert not decision.allowed
    text = "\n".join(decision.reasons)
    assert "the report was made from a checkout with uncommitted changes" in text
    for rel in hidden:
        assert f"{rel} (hidden from git status by skip-worktree or assume-unchanged)" in text


def test_approval_policy_is_used_only_as_committed(project: gatekit.Project) -> None:
    signers = project.root / "release" / "allowed_signers"
    signers.write_text(signers.read_text() + "# an edit nobody reviewed\n")
    gatekit.git(project.root, "update-index", "--assume-unchanged", "release/allowed_signers")
    with pytest.raises(approvals.ApprovalError, match="differs from the committed revision"):
        approvals.load_policy(project.root)


@pytest.mark.parametrize(
    "rel",
    [
        "playbooks/group_vars/all/zz.yml",
        "roles/common/defaults/main.yml",
        "inventories/production/group_vars/all.yml",
        "verify/waivers.yml",
        "src/safemail/extra.py",
        "conftest.py",
    ],
)
def test_git_ignored_files_where_they_change_the_deployment_are_refused(
    project: gatekit.Project, rel: str
) -> None:
    path = _report(project)
    gatekit.write(project.root, rel, "[]\n")
    with (project.root / ".git" / "info" / "exclude").open("a") as handle:
        handle.write(f"/{rel}\n")
    assert gatekit.git(project.root, "status", "--porcelain") == ""
    _only(_reasons(project, path), f"uncommitted changes: {rel} (git-ignored)")


def test_ignored_caches_are_allowed(project: gatekit.Project) -> None:
    path = _report(project)
    gatekit.write(project.root, ".gitignore",
                  (project.root / ".gitignore").read_text() + "__pycache__/\n*.pyc\n")
    gatekit.git(project.root, "commit", "-qam", "ignore caches")
    path = _report(project)
    gatekit.write(project.root, "verify/__pycache__/conftest.cpython-312.pyc", "x")
    gatekit.write(project.root, "roles/common/library/mod.pyc", "x")
    decision = promote.evaluate(project.root, path, now=NOW, first_release=True)
    assert decision.allowed, decision.reasons


def test_cert_authority_signers_are_refused(project: gatekit.Project) -> None:
    """One key with two certificates (one per principal) from a CA the allowed_signers trusts
    would fill both roles: cert-authority lines are not accepted."""
    keys = project.keys
    ca, ca_public = gatekit.keygen(keys, "ca")
    key, _public = gatekit.keygen(keys, "alicekey")
    for n, principal in ((1, ALICE), (2, BOB)):
        shutil.copy(key, keys / f"a{n}")
        shutil.copy(key.with_suffix(".pub"), keys / f"a{n}.pub")
        subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", f"cert{n}", "-n", principal,
                        str(keys / f"a{n}.pub")], check=True)
        project.approvers[principal] = keys / f"a{n}-cert.pub"
    (project.root / "release" / "allowed_signers").write_text(
        f'{ALICE},{BOB} cert-authority,namespaces="safemail-release,safemail-waiver" '
        f"{ca_public}\n")
    gatekit.git(project.root, "commit", "-qam", "use the org SSH CA")
    _only(_reasons(project, _report(project)),
          "approvals cannot be checked: release/allowed_signers line 1: cert-authority lines "
          "are not accepted")


@pytest.mark.parametrize("value", ["1e6", "169", "inf", "nan", "-1", "0", "soon"])
def test_max_age_hours_is_bounded(
    project: gatekit.Project, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], value: str,
) -> None:
    monkeypatch.chdir(project.root)
    monkeypatch.delenv("SAFEMAIL_PROJECT", raising=False)
    path = _report(project)
    with pytest.raises(SystemExit) as stop:
        main(["promote", "--to", "production", "--first-release", "--dry-run",
              "--max-age-hours", value, "--report", str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--max-age-hours" in err and "Traceback" not in err
    # the largest bound is accepted (the report made "an hour before NOW" is older than that now)
    main(["promote", "--to", "production", "--first-release", "--dry-run", "--max-age-hours", "168",
          "--report", str(path)])
    assert "promotion" in capsys.readouterr().out


# ------------------------------------------------ which approval policy counts (release_chain)

MALLORY, MALLET = "mallory@example.invalid", "mallet@example.invalid"
LATER = NOW - dt.timedelta(minutes=30)  # a report after the first release's


def _refused(project: gatekit.Project, report: Path) -> list[str]:
    """The reasons of a normal (not first) release."""
    decision = promote.evaluate(project.root, report, now=NOW)
    assert not decision.allowed
    return decision.reasons


def _first_release(project: gatekit.Project, pin: bool = True) -> str:
    path = _report(project)
    decision = promote.evaluate(project.root, path, now=NOW, first_release=True)
    assert decision.allowed, decision.reasons
    tag = promote.tag_release(project.root, decision, json.loads(path.read_text()), NOW)
    if pin:  # what the operator does after the first deployment (the CLI writes the file)
        release_chain.write_pin(project.root, tag, decision.revision or "")
        gatekit.git(project.root, "add", str(release_chain.PIN))
        gatekit.git(project.root, "commit", "-qm", "pin the first release")
    return tag


def _take_over_release_policy(project: gatekit.Project) -> None:
    """One commit adds two keys of the same outsider to allowed_signers and names them as
    both roles: the change that should need the real approvers' signatures."""
    signers = project.root / "release" / "allowed_signers"
    lines = []
    for who in (MALLORY, MALLET):
        key, public = gatekit.keygen(project.keys, who.split("@")[0])
        project.approvers[who] = key
        lines.append(f'{who} namespaces="safemail-release,safemail-waiver" {public}')
    signers.write_text(signers.read_text() + "\n".join(lines) + "\n")
    policy_file = project.root / "release" / "approvers.yml"
    policy = yaml.safe_load(policy_file.read_text())
    policy["roles"]["head-of-it"]["principals"] = [MALLORY]
    policy["roles"]["it-security"]["principals"] = [MALLET]
    policy_file.write_text(yaml.safe_dump(policy))
    gatekit.write(project.root, "roles/common/tasks/main.yml", "- name: Baseline v2\n")
    gatekit.git(project.root, "commit", "-qam", "new approvers (and a role change)")


def test_first_release_needs_the_flag_and_only_once(project: gatekit.Project) -> None:
    path = _report(project)
    _only(_refused(project, path), "there is no release tag (release/production/*)")
    tag = _first_release(project, pin=False)  # the same revision again needs no pin yet
    assert "approval-policy: first release" in gatekit.git(
        project.root, "tag", "-l", "--format=%(contents)", tag)
    decision = promote.evaluate(project.root, path, now=NOW, first_release=True)
    _only(decision.reasons, f"--first-release, but there are earlier releases (newest {tag}")
    decision = promote.evaluate(project.root, path, now=NOW)  # the tag's policy: same people
    assert decision.allowed and tag in decision.policy_source, decision.reasons


def test_a_change_to_release_does_not_approve_itself(project: gatekit.Project) -> None:
    """The walk: add your own keys to allowed_signers and approvers.yml in the change, then
    sign its release with them. The previous release's policy counts: refused; the
    approvers of that release can approve the change."""
    tag = _first_release(project)
    _take_over_release_policy(project)
    out = project.root / "reports" / "test" / "run2"
    path = gatekit.make_report(project, finished=LATER, out=out)
    gatekit.approve(project, path, MALLORY, MALLET)
    reasons = _refused(project, path)
    assert any("is not in release/allowed_signers (unknown signer)" in r for r in reasons)
    assert any("no valid signature for the role(s) head of it (head-of-it), it security"
               in r for r in reasons), reasons
    # Even as the first release, the new policy does not count once a release exists.
    assert any("--first-release, but there are earlier releases" in r for r in
               promote.evaluate(project.root, path, now=NOW, first_release=True).reasons)
    (path.parent / "approvals" / "mallory.sig").unlink()
    (path.parent / "approvals" / "mallet.sig").unlink()
    gatekit.approve(project, path, ALICE, BOB)
    decision = promote.evaluate(project.root, path, now=NOW)
    assert decision.allowed, decision.reasons
    assert decision.policy_source.startswith(f"release/ of {tag}")
    # Released: from now on the new policy counts (mallory and mallet approve the next one).
    second = promote.tag_release(project.root, decision, json.loads(path.read_text()),
                                 NOW + dt.timedelta(seconds=1))
    assert approvals.load_policy(project.root).roles["head-of-it"].principals == (MALLORY,)
    assert promote.counting_policy(project.root).roles["head-of-it"].principals == (MALLORY,)
    assert second in promote.evaluate(project.root, path, now=NOW).policy_source


def _second_release(project: gatekit.Project, *, finished: dt.datetime = LATER) -> str:
    """Release 2 removes carol from head-of-it (she left), approved by alice and bob."""
    policy_file = project.root / "release" / "approvers.yml"
    policy = yaml.safe_load(policy_file.read_text())
    policy["roles"]["head-of-it"]["principals"] = [ALICE]
    policy_file.write_text(yaml.safe_dump(policy))
    gatekit.write(project.root, "roles/common/tasks/main.yml", "- name: Baseline v2\n")
    gatekit.git(project.root, "commit", "-qam", "carol leaves")
    out = project.root / "reports" / "test" / "run2"
    path = gatekit.make_report(project, finished=finished, out=out)
    gatekit.approve(project, path, ALICE, BOB)
    decision = promote.evaluate(project.root, path, now=NOW)
    assert decision.allowed, decision.reasons
    return promote.tag_release(project.root, decision, json.loads(path.read_text()),
                               NOW + dt.timedelta(seconds=1))


def _tag_by_hand(project: gatekit.Project, name: str, commit: str, message: str) -> None:
    subprocess.run(["git", "-C", str(project.root), "tag", "-a", name, commit, "-F", "-"],
                   input=message, text=True, check=True)


@pytest.fixture
def carol_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> gatekit.Project:
    return gatekit.make_project(
        tmp_path, roles={"head-of-it": [ALICE, CAROL], "it-security": [BOB]}
    ).use_lab(monkeypatch)


def test_an_old_release_copied_under_a_newer_tag_does_not_roll_the_policy_back(
    carol_project: gatekit.Project,
) -> None:
    """Review walk: copy the first tag's message onto the first release's revision under a
    newer name; its tree (with carol) would count again."""
    project = carol_project
    first = _first_release(project)
    _second_release(project)
    assert promote.counting_policy(project.root).roles["head-of-it"].principals == (ALICE,)
    message = gatekit.git(project.root, "tag", "-l", "--format=%(contents)", first)
    old = gatekit.git(project.root, "rev-parse", f"{first}^{{commit}}").strip()
    _tag_by_hand(project, "release/production/99991231T000000Z", old, message)
    with pytest.raises(SafeMailError, match="which does not descend from .* of the release "
                       r"before it \(release/production/20261128T120001Z\)"):
        promote.counting_policy(project.root)


def test_an_older_approval_cannot_follow_a_newer_release(carol_project: gatekit.Project) -> None:
    """A release on a later revision, approved for a report older than the newest
    release's: as the next tag it would break the chain, so the gate refuses it up front; a
    tag made by hand with such a text breaks the chain."""
    project = carol_project
    _first_release(project)
    reasons = "\n".join(_refused_second(project, finished=NOW - dt.timedelta(hours=2)))
    assert "not later than the report of the release before it" in reasons, reasons


def _refused_second(project: gatekit.Project, *, finished: dt.datetime) -> list[str]:
    with pytest.raises(AssertionError):
        _second_release(project, finished=finished)
    path = project.root / "reports" / "test" / "run2" / "report.json"
    return _refused(project, path)


def test_without_tags_the_pin_refuses_a_new_first_release(project: gatekit.Project) -> None:
    """Review walk: `git clone --no-tags` (or the tags deleted on the remote), then
    --first-release with a release/ of one's own. The committed pin says a release exists."""
    tag = _first_release(project)
    _take_over_release_policy(project)
    gatekit.git(project.root, "tag", "-d", tag)
    out = project.root / "reports" / "test" / "run2"
    path = gatekit.make_report(project, finished=LATER, out=out)
    gatekit.approve(project, path, MALLORY, MALLET)
    decision = promote.evaluate(project.root, path, now=NOW, first_release=True)
    assert not decision.allowed
    _only(decision.reasons, f"release/first-release.yml pins the first release {tag}")
    assert "--first-release is not possible again" in decision.reasons[0]
    with pytest.raises(SafeMailError, match="pins the first release"):
        promote.counting_policy(project.root)


@pytest.mark.parametrize("edit", ["delete", "change"])
def test_the_pin_may_not_be_deleted_or_changed(project: gatekit.Project, edit: str) -> None:
    tag = _first_release(project)
    gatekit.git(project.root, "tag", "-d", tag)
    pin = project.root / release_chain.PIN
    if edit == "delete":
        gatekit.git(project.root, "rm", "-q", str(release_chain.PIN))
    else:
        pin.write_text(pin.read_text().replace(tag, "release/production/20300101T000000Z"))
    gatekit.git(project.root, "commit", "-qam", "no first release yet, honest")
    path = gatekit.make_report(project, finished=LATER, out=project.root / "reports/test/r2")
    gatekit.approve(project, path, ALICE, BOB)
    reasons = promote.evaluate(project.root, path, now=NOW, first_release=True).reasons
    expected = {"delete": "deletes release/first-release.yml", "change": "differs between"}
    _only(reasons, expected[edit])


def test_a_tag_older_than_the_pinned_first_release_is_refused(project: gatekit.Project) -> None:
    """A self-approved 'first release' named before the real one would become the root."""
    tag = _first_release(project)
    message = gatekit.git(project.root, "tag", "-l", "--format=%(contents)", tag)
    commit = gatekit.git(project.root, "rev-parse", f"{tag}^{{commit}}").strip()
    _tag_by_hand(project, "release/production/20000101T000000Z", commit, message)
    with pytest.raises(SafeMailError, match="is not the first release release/first-release"):
        promote.counting_policy(project.root)


def test_release_tags_without_a_pin_refuse_a_later_revision(project: gatekit.Project) -> None:
    tag = _first_release(project, pin=False)
    gatekit.write(project.root, "roles/common/tasks/main.yml", "- name: Baseline v2\n")
    gatekit.git(project.root, "commit", "-qam", "v2")
    path = gatekit.make_report(project, finished=LATER, out=project.root / "reports/test/r2")
    gatekit.approve(project, path, ALICE, BOB)
    reasons = _refused(project, path)
    _only(reasons, f"no commit pins the first release in release/first-release.yml: check "
          f"that {tag} is this repository's first release")


@pytest.mark.parametrize("forgery", ["copied-message", "self-signed", "lightweight"])
def test_hand_made_release_tag_breaks_the_chain(project: gatekit.Project, forgery: str) -> None:
    """The walk around the previous paragraph: make a newer 'release' tag by hand on the
    change that names the new approvers, so its policy would count."""
    tag = _first_release(project)
    _take_over_release_policy(project)
    head = gatekit.git(project.root, "rev-parse", "HEAD").strip()
    fake = "release/production/99991231T000000Z"
    message = gatekit.git(project.root, "tag", "-l", "--format=%(contents)", tag)
    if forgery == "self-signed":
        text = f"SafeMail release approval\nstage: test\nrevision: {head}\n" \
               f"report-sha256: {'0' * 64}\nverdict: pass\nfinished: 2026-11-28T11:00:00Z\n"
        sigs = [signing.sign(project.approvers[w], approvals.RELEASE_NAMESPACE, text.encode())
                for w in (MALLORY, MALLET)]
        message = f"fake release\n\n{text}\n" + "\n".join(sigs)
    if forgery == "lightweight":
        gatekit.git(project.root, "tag", fake, head)
    else:
        subprocess.run(["git", "-C", str(project.root), "tag", "-a", fake, head, "-F", "-"],
                       input=message, text=True, check=True)
    out = project.root / "reports" / "test" / "run2"
    path = gatekit.make_report(project, finished=LATER, out=out)
    gatekit.approve(project, path, MALLORY, MALLET)
    reasons = _refused(project, path)
    expected = {
        "copied-message": f"release tag {fake} is on {head[:12]}, but its signed text is for",
        "self-signed": f"release tag {fake} is not approved by the policy that counted for it",
        "lightweight": f"release tag {fake} is not an annotated tag",
    }[forgery]
    assert any(expected in r for r in reasons), reasons


# ------------------------------------------------------ the production vault is the site's own


def _vault(project: gatekit.Project, password: str) -> Path:
    from ansible.parsing.vault import VaultLib, VaultSecret

    lib = VaultLib([("production", VaultSecret(password.encode()))])
    data = lib.encrypt(b"encrypted_storage_passphrase: example\n",
                       secret=VaultSecret(password.encode()), vault_id="production")
    path = project.root / "inventories" / "production" / "group_vars" / "all" / "vault.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    gatekit.git(project.root, "add", "-A")
    gatekit.git(project.root, "commit", "-qm", "production vault")
    return path


def test_production_vault_with_the_example_password_is_refused(
    project: gatekit.Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hurried operator releases with the committed example vault: its password is
    published in docs/production.md, so its secrets are anyone's."""
    from safemail import vault
    from safemail.errors import SafeMailError
    from safemail.gate.verify_run import VerifyOptions, run_verify

    _vault(project, vault.EXAMPLE_PASSWORD)
    _only(_reasons(project, _report(project)),
          "still opens with the published example password 'safemail-example-vault'")
    monkeypatch.delenv("ANSIBLE_VAULT_IDENTITY_LIST", raising=False)
    with pytest.raises(SafeMailError, match="published example password"):
        run_verify(project.root, VerifyOptions(stage="production"), out=io.StringIO())
    _vault(project, "the site's own, long and random")
    password_file = project.keys / "site.pass"
    password_file.write_text("the site's own, long and random\n")
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(password_file))
    decision = promote.evaluate(project.root, _report(project), now=NOW, first_release=True)
    assert decision.allowed, decision.reasons
    monkeypatch.delenv("ANSIBLE_VAULT_PASSWORD_FILE")  # without its password: not compared
    monkeypatch.setenv("SAFEMAIL_VAULT_PASSWORD_FILE", str(project.keys / "none.pass"))
    _only(_reasons(project, _report(project)), "cannot open")
    given = {"ANSIBLE_VAULT_PASSWORD_FILE": str(password_file)}  # promote --vault-password-file
    decision = promote.evaluate(project.root, _report(project), now=NOW, first_release=True,
                                vault_env=given)
    assert decision.allowed, decision.reasons


def _example_vault(project: gatekit.Project) -> Path:
    from safemail import vault

    path = project.root / "inventories" / "production" / vault.VAULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(gatekit.REPO / "inventories" / "production" / vault.VAULT_FILE, path)
    return path


def _example_values() -> list[str]:
    from ansible.parsing.vault import VaultLib, VaultSecret

    from safemail import vault

    lib = VaultLib([("production", VaultSecret(vault.EXAMPLE_PASSWORD.encode()))])
    data = yaml.safe_load(lib.decrypt(
        (gatekit.REPO / "inventories" / "production" / vault.VAULT_FILE).read_bytes()))
    found: list[str] = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif x not in (None, ""):
            found.append(str(x))

    walk(data)
    return found


@pytest.mark.parametrize("walk", ["decrypted", "rekeyed"])
def test_the_example_vault_decrypted_or_rekeyed_is_refused(
    project: gatekit.Project, monkeypatch: pytest.MonkeyPatch, walk: str
) -> None:
    """Review walks: `ansible-vault decrypt` the example in place (clear text, no password to
    test), or `ansible-vault rekey` it (new password, the published secrets kept)."""
    from safemail import vault

    path = _example_vault(project)
    example = project.keys / "example.pass"
    example.write_text(vault.EXAMPLE_PASSWORD + "\n")
    new = project.keys / "new.pass"
    new.write_text("a new password nobody published\n")
    ansible_vault = str(Path(sys.executable).parent / "ansible-vault")
    if walk == "decrypted":
        cmd = [ansible_vault, "decrypt", "--vault-password-file", str(example), str(path)]
    else:
        cmd = [ansible_vault, "rekey", "--vault-password-file", str(example),
               "--new-vault-password-file", str(new), str(path)]
    subprocess.run(cmd, check=True, capture_output=True)
    gatekit.git(project.root, "add", "-A")
    gatekit.git(project.root, "commit", "-qm", "production vault")
    monkeypatch.setenv("ANSIBLE_VAULT_PASSWORD_FILE", str(new))
    reasons = _reasons(project, _report(project))
    expected = {"decrypted": "is not encrypted (no $ANSIBLE_VAULT; header",
                "rekeyed": "holds secrets of the published example vault (values not shown): "
                           "encrypted_storage_passphrase, safemail_backup_passphrase_seed, "
                           "safemail_ldap_cadist_password"}[walk]
    _only(reasons, expected)
    assert not any(value in reasons[0] for value in _example_values())


def test_the_example_digests_are_the_committed_example_vaults_values() -> None:
    """EXAMPLE_VALUE_SHA256 follows the committed example (a new example needs new digests)."""
    import hashlib

    from safemail import vault

    assert {hashlib.sha256(v.encode()).hexdigest() for v in _example_values()} == \
        vault.EXAMPLE_VALUE_SHA256


def test_committed_example_vault_opens_with_the_published_password() -> None:
    """The check recognises the project's own example (so a clone that was never given its
    own vault cannot release)."""
    from safemail import vault

    production = gatekit.REPO / "inventories" / "production"
    assert vault.example_password_problem(production)
    assert not vault.opens_with(production / vault.VAULT_FILE, "another password")
