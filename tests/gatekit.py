"""A project-shaped git repository with a lab-like test stage, throwaway SSH keys and approvers,
and a report as `safemail verify` writes it (sealed with the stage's key). For the gate tests.

Every key is made with ssh-keygen in the test's tmp directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

REPO = Path(__file__).resolve().parents[1]
SERVICE = ("relay1", "store1")
PARTICIPANTS = ("practice1",)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def write(repo: Path, rel: str, text: str) -> None:
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def keygen(directory: Path, name: str) -> tuple[Path, str]:
    """A new ed25519 key pair; the private key path and the public key line."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True
    )
    return key, key.with_suffix(".pub").read_text().strip()


@dataclass
class Project:
    root: Path
    keys: Path
    stage_key: Path
    host_keys: dict[str, str]  # host -> public key line (what known_hosts holds)
    approvers: dict[str, Path] = field(default_factory=dict)  # principal -> private key

    @property
    def lab_dir(self) -> Path:
        """The lab's state directory (SAFEMAIL_LAB_DIR): its own key and known_hosts."""
        return self.stage_key.parent.parent

    @property
    def known_hosts(self) -> Path:
        return self.stage_key.parent / "known_hosts"

    def use_lab(self, monkeypatch: Any) -> Project:
        """Point LabPaths.default() at this project's lab directory."""
        monkeypatch.setenv("SAFEMAIL_LAB_DIR", str(self.lab_dir))
        return self

    def fingerprint(self, host: str) -> str:
        fp = signing.fingerprint_of_public_key(self.host_keys[host])
        assert fp
        return fp

    def recreate_host(self, host: str) -> None:
        """The lab re-created a host: it has a new key, known_hosts is rewritten."""
        _key, public = keygen(self.keys, f"hostkey-{host}-new")
        self.host_keys[host] = public
        self._write_known_hosts()

    def _write_known_hosts(self) -> None:
        lines = [f"{h},10.0.0.{i} {k}" for i, (h, k) in enumerate(sorted(self.host_keys.items()))]
        self.known_hosts.write_text("\n".join(lines) + "\n")


def make_project(tmp: Path, roles: dict[str, list[str]] | None = None) -> Project:
    """A checkout with roles, playbook, a test stage (inventory, generated part, known_hosts,
    stage key), release/ with two approvers, one per role (alice: head-of-it, bob: it-security)."""
    root = tmp / "checkout"
    root.mkdir()
    keys = tmp / "keys"
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "ci@example.invalid")
    git(root, "config", "user.name", "CI")
    write(root, ".gitignore", "/reports/\n/inventories/test/zz_lab_generated.yml\n")
    write(root, "ansible.cfg", "[defaults]\nroles_path = roles\n")
    write(root, "requirements.yml", "collections: []\n")
    write(root, "roles/mailrelay/tasks/main.yml", "- name: Install postfix\n")
    write(root, "roles/common/tasks/main.yml", "- name: Baseline\n")
    write(root, "playbooks/site.yml", "- hosts: all\n")
    hosts_yml = {
        "all": {
            "children": {
                "service": {
                    "children": {
                        "relay": {"hosts": {"relay1": {}}},
                        "store": {"hosts": {"store1": {}}},
                    }
                },
                "participants": {"hosts": {"practice1": {}}},
            }
        }
    }
    write(root, "inventories/test/hosts.yml", yaml.safe_dump(hosts_yml))
    write(root, "inventories/production/hosts.yml", "all: {}\n")
    write(root, "docs/readme.md", "docs are not deployed\n")
    (root / "verify").mkdir()
    shutil.copy(REPO / "verify" / "requirements.yml", root / "verify" / "requirements.yml")
    stage_key, stage_pub = keygen(tmp / "lab" / "ssh", "id_ed25519")
    host_keys = {h: keygen(keys, f"hostkey-{h}")[1] for h in (*SERVICE, *PARTICIPANTS)}
    project = Project(root, keys, stage_key, host_keys)
    project._write_known_hosts()
    signers = []
    for principal in ("alice@example.invalid", "bob@example.invalid", "carol@example.invalid"):
        key, public = keygen(keys, principal.split("@")[0])
        project.approvers[principal] = key
        signers.append(f'{principal} namespaces="safemail-release,safemail-waiver" {public}')
    roles = roles or {
        "head-of-it": ["alice@example.invalid"],
        "it-security": ["bob@example.invalid"],
    }
    write(root, "release/allowed_signers", "\n".join(signers) + "\n")
    write(
        root,
        "release/approvers.yml",
        yaml.safe_dump(
            {
                "roles": {
                    name: {"title": name.replace("-", " "), "principals": principals}
                    for name, principals in roles.items()
                },
                "release_roles": ["head-of-it", "it-security"],
                "releasing_role": "head-of-it",
                "waiver_max_days": 90,
            }
        ),
    )
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    generated = {
        "all": {
            "vars": {
                "ansible_ssh_private_key_file": str(stage_key),
                "ansible_ssh_common_args": (
                    f"-o UserKnownHostsFile={project.known_hosts} -o StrictHostKeyChecking=yes"
                ),
                "lab_ssh_public_key": stage_pub,
            },
            "hosts": {
                h: {"ansible_host": f"10.0.0.{i}"} for i, h in enumerate(sorted(host_keys))
            },
        }
    }
    write(root, "inventories/test/zz_lab_generated.yml", yaml.safe_dump(generated))
    return project


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="{n}" timestamp="{ts}" time="60">
{cases}
</testsuite></testsuites>
"""


def junit_text(
    ids: list[str], hosts: dict[str, list[str]], failing: tuple[str, ...] = ()
) -> str:
    cases = []
    for n, rid in enumerate(ids):
        props = [f'<property name="req" value="{rid}"/>']
        if n == 0:
            props += [
                f'<property name="host_key" value="{h} {fp}"/>'
                for h, fps in sorted(hosts.items())
                for fp in fps
            ]
        fail = '<failure message="broken"/>' if rid in failing else ""
        host = sorted(hosts)[n % len(hosts)] if hosts else "local"
        cases.append(
            f'<testcase classname="verify.t" name="test_{rid}[ansible://{host}]" time="0.1">'
            f"<properties>{''.join(props)}</properties>{fail}</testcase>"
        )
    return JUNIT.format(n=len(ids), ts="2026-11-28T10:00:00", cases="\n".join(cases))


def make_report(
    project: Project,
    *,
    finished: dt.datetime,
    failing: tuple[str, ...] = (),
    hosts: dict[str, list[str]] | None = None,
    out: Path | None = None,
    selection: dict[str, Any] | None = None,
    profile: str = "full",
    waivers: list[Any] | None = None,
    skip: tuple[str, ...] = (),
    seal: bool = True,
    today: dt.date | None = None,
) -> Path:
    """junit.xml, report.json (+ html) and report.json.sig as `safemail verify` writes them.

    ``hosts`` are the hosts reached with the fingerprints seen (default: every service host and
    the participant, with their known_hosts keys)."""
    repo = project.root
    if hosts is None:
        hosts = {h: [project.fingerprint(h)] for h in project.host_keys}
    catalogue = load_catalogue(repo / "verify" / "requirements.yml")
    ids = [r.id for r in catalogue if r.id not in skip]
    out = out or repo / "reports" / "test" / "run"
    out.mkdir(parents=True, exist_ok=True)
    junit = out / "junit.xml"
    junit.write_text(junit_text(ids, hosts, failing))
    results = [
        TestResult(f"verify.t::test_{rid}", "failed" if rid in failing else "passed",
                   req_ids=[rid], host=sorted(hosts)[n % len(hosts)] if hosts else None)
        for n, rid in enumerate(ids)
    ]
    content = hashing.content_hash(repo, "test")
    meta = RunMetadata(
        stage="test",
        revision=hashing.git_revision(repo),
        dirty=hashing.git_dirty(repo),
        content_hash=content.digest,
        content_files=content.files,
        inventory_hash=hashing.inventory_hash(repo, "test"),
        hosts=sorted(hosts),
        started=utc_iso(finished - dt.timedelta(minutes=5)),
        finished=utc_iso(finished),
        created_by=CREATED_BY_VERIFY,
        profile=profile,
        junit_sha256=hashlib.sha256(junit.read_bytes()).hexdigest(),
        host_keys={h: sorted(f) for h, f in hosts.items()},
    )
    if selection:
        meta.selection = selection
    report = build_report(results, catalogue, waivers or [], meta, generated=finished,
                          today=today)
    json_path, _html, _digest = write_report(report, out)
    if seal:
        stage.seal(json_path, project.stage_key)
    return json_path


def approve(project: Project, report_json: Path, *principals: str, key_of: str | None = None
            ) -> None:
    """Each principal signs the release text of the report into approvals/<name>.sig.
    ``key_of``: sign with that principal's key instead (someone else's key)."""
    report = json.loads(report_json.read_text())
    digest = hashlib.sha256(report_json.read_bytes()).hexdigest()
    message = approvals.release_message(report, digest)
    directory = report_json.parent / "approvals"
    directory.mkdir(exist_ok=True)
    for principal in principals:
        key = project.approvers[key_of or principal]
        (directory / f"{principal.split('@')[0]}.sig").write_text(
            signing.sign(key, approvals.RELEASE_NAMESPACE, message)
        )


def sign_waiver(project: Project, principal: str, req_id: str, justification: str,
                granted: dt.date, expires: dt.date) -> str:
    message = approvals.waiver_message(req_id, justification, granted, expires)
    return signing.sign(project.approvers[principal], approvals.WAIVER_NAMESPACE, message)
