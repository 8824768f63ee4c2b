"""AV-02: plays that write participant entries run on the directory provider only.

With two auth hosts the first is the provider and every further one a read-only replica
(playbooks/group_vars/all.yml, roles/auth/tasks/replication.yml): a play that writes through
the auth role on `hosts: auth` would also write on the replica and fail there ("unwilling to
perform"), after the provider had taken the change.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _writes_directory(tasks: list) -> bool:
    for task in tasks or []:
        for key in ("ansible.builtin.include_role", "ansible.builtin.import_role",
                    "include_role", "import_role"):
            spec = task.get(key)
            if isinstance(spec, dict) and spec.get("name") == "auth" \
                    and spec.get("tasks_from") in ("participants", "remove"):
                return True
        if _writes_directory(task.get("block", [])):
            return True
    return False


def test_plays_that_write_participants_target_the_provider_only():
    writers = []
    for path in sorted((ROOT / "playbooks").glob("*.yml")):
        for play in yaml.safe_load(path.read_text()) or []:
            if isinstance(play, dict) and _writes_directory(play.get("tasks", [])):
                writers.append((path.name, play.get("hosts")))
    assert writers, "no play writes participants: the scan is broken"
    assert {name for name, _ in writers} >= {"participant-add.yml", "participant-remove.yml"}
    assert [w for w in writers if w[1] != "auth[0]"] == []
