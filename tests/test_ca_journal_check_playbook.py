"""playbooks/ca-journal-check.yml run for real against a local "CA host" (CA-05).

The host is this machine (connection local) with a sealed journal, the sealer's head files
and an admin log in a temporary directory; the controller's files go to another. What is
checked: a missing pin or heads store is refused unless ca_journal_first_use is given (a fresh
controller or a lost reports/ must not silently re-pin whatever key the host offers), the first
use pins the key and prints its SHA-256, and a later run uses the pin and the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safemail.ca.journal import Journal
from safemail.ca.seal import Sealer

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOK = ROOT / "playbooks" / "ca-journal-check.yml"
ANSIBLE = Path(sys.executable).parent / "ansible-playbook"

pytestmark = pytest.mark.skipif(not ANSIBLE.exists(), reason="ansible-playbook not installed")


def _host(tmp_path: Path) -> dict[str, str]:
    state, seal, log = tmp_path / "state", tmp_path / "seal", tmp_path / "log"
    for d in (state, seal, log):
        d.mkdir()
    lines: list[str] = []
    sealer = Sealer(
        seal,
        log=lambda text: lines.append(
            f"2026-12-06T10:00:00+00:00 ca-signer safemail-ca-seal[1]: {text}"
        ),
    )
    sealer.keygen(seal / "journal-seal.pub")

    class InProcess:  # the CA account's socket client, in-process
        def seal(self, entry: dict) -> dict[str, str]:
            return sealer.seal(json.dumps({k: v for k, v in entry.items() if k != "sig"}).encode())

    j = Journal(state / "journal.jsonl", host="ca-signer", key=InProcess())
    for n in range(3):
        j.record("issue", "carol", detail=f"n{n}")
    # the CA account's own units log to the admin log too: a head-like line under their tag
    lines.append(
        "2026-12-06T10:00:02+00:00 ca-signer safemail-ca-cycle[9]: x safemail-ca-seal: "
        "journal head host=- seq=1 hash=" + "0" * 64 + " sig=AAAA"
    )
    (log / "admin.log").write_text("\n".join(lines) + "\n")
    wrapper = tmp_path / "safemail"
    wrapper.write_text(
        f"#!/bin/sh\nPYTHONPATH={ROOT / 'src'} exec {sys.executable} -c "
        "'import sys; from safemail.cli import main; sys.exit(main(sys.argv[1:]))' \"$@\"\n"
    )
    wrapper.chmod(0o755)
    return {
        "ca_hosts_state_dir": str(state),
        "ca_hosts_seal_dir": str(seal),
        "admin_log_dir": str(log),
        "ca_journal_check_dir": str(tmp_path / "reports"),
        "ca_journal_check_safemail": str(wrapper),
        "ansible_python_interpreter": sys.executable,
    }


def _run(tmp_path: Path, extra: dict[str, object]) -> subprocess.CompletedProcess[str]:
    inv = tmp_path / "inventory.yml"
    inv.write_text(
        json.dumps({"ca_signer": {"hosts": {"ca-signer": {"ansible_connection": "local"}}}})
    )
    env = dict(os.environ, ANSIBLE_STRATEGY="linear", ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"))
    env.pop("ANSIBLE_CALLBACKS_ENABLED", None)
    return subprocess.run(
        [str(ANSIBLE), "-i", str(inv), str(PLAYBOOK), "-e", json.dumps(extra)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_pin_and_store_are_refused_when_missing_unless_first_use(tmp_path: Path) -> None:
    host = _host(tmp_path)
    ctl = tmp_path / "reports" / "ca-signer"
    refused = _run(tmp_path, host)
    assert refused.returncode != 0, refused.stdout
    assert "journal-seal.pub.pinned and store.jsonl missing" in refused.stdout
    assert "ca_journal_first_use=true" in refused.stdout
    assert not (ctl / "journal-seal.pub.pinned").exists()

    first = _run(tmp_path, {**host, "ca_journal_first_use": True})
    assert first.returncode == 0, first.stdout + first.stderr
    digest = hashlib.sha256((tmp_path / "seal" / "journal-seal.pub").read_bytes()).hexdigest()
    assert f"pinned seal key SHA-256 {digest}" in first.stdout
    assert "head seq 3 added" in first.stdout
    assert (ctl / "store.jsonl").exists()
    admin_heads = (ctl / "admin-heads.log").read_text().splitlines()
    assert len(admin_heads) == 3 and all("safemail-ca-seal[1]: " in x for x in admin_heads)

    again = _run(tmp_path, host)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pinned seal key SHA-256" not in again.stdout

    # the store lost (reports/ not restored): refused again, the pin alone does not do
    store = (ctl / "store.jsonl").read_bytes()
    (ctl / "store.jsonl").unlink()
    lost = _run(tmp_path, host)
    assert lost.returncode != 0 and "store.jsonl missing" in lost.stdout
    # a replaced seal key on the host is refused against the pin, first use or not
    (ctl / "store.jsonl").write_bytes(store)
    shutil.move(tmp_path / "seal", tmp_path / "seal.old")
    (tmp_path / "seal").mkdir()
    Sealer(tmp_path / "seal", log=False).keygen(tmp_path / "seal" / "journal-seal.pub")
    for name in ("head.json", "heads.jsonl"):
        shutil.copy(tmp_path / "seal.old" / name, tmp_path / "seal" / name)
    replaced = _run(tmp_path, {**host, "ca_journal_first_use": True})
    assert replaced.returncode != 0
    assert "Refuse a replaced seal key" in replaced.stdout
