"""A task named with a requirement id carries its ``req_*`` tag, and a ``req_*`` tag stands on a
task that names its id (CONTRIBUTING.md, "add a role", item 7).

Read from the YAML of every role's tasks and handlers, of playbooks/tasks/ and of every
playbook's plays: a task's name is matched for ids (``MAIL-03``), its tags for
``req_mail_03``. A task inside a block or a play inherits their tags (Ansible does), so its
name may name an id the block is tagged with; a tag written on a task, block or play must be
named in that same name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
ID = re.compile(r"\b([A-Z]{2,8})-([0-9]{2,3})\b")
TAG = re.compile(r"^req_([a-z]{2,8})_([0-9]{2,3})$")
BLOCK_KEYS = ("block", "rescue", "always")
PLAY_TASK_KEYS = ("pre_tasks", "tasks", "post_tasks", "handlers")

# Known violations, each to be fixed: an entry that is fixed makes the test fail until it is
# taken out of this list. None left.
KNOWN: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Problem:
    file: str
    name: str
    what: str

    def key(self) -> tuple[str, str, str]:
        return (self.file, self.name, self.what)


def _tags(entry: dict[str, Any]) -> list[str]:
    tags = entry.get("tags") or []
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",")]
    return [str(t) for t in tags]


def _req_ids(tags: Iterable[str]) -> set[str]:
    return {f"{m[1].upper()}-{m[2]}" for t in tags if (m := TAG.match(t))}


def _check(entry: dict[str, Any], inherited: set[str], where: str, out: list[Problem]) -> set[str]:
    """Check one task, block or play; return the requirement tags its children inherit."""
    name = str(entry.get("name") or "")
    named = {f"{a}-{b}" for a, b in ID.findall(name)}
    own = _req_ids(_tags(entry))
    effective = inherited | own
    if named - effective:
        out.append(Problem(where, name, "id in the name without its tag: "
                           + ", ".join(sorted(named - effective))))
    if own - named:
        out.append(Problem(where, name, "tag without its id in the name: "
                           + ", ".join(sorted(own - named))))
    return effective


def _walk(entries: Any, inherited: set[str], where: str, out: list[Problem]) -> None:
    for entry in entries or []:
        if not isinstance(entry, dict):
            continue
        effective = _check(entry, inherited, where, out)
        for key in BLOCK_KEYS:
            if key in entry:
                _walk(entry[key], effective, where, out)


def problems(root: Path) -> list[Problem]:
    out: list[Problem] = []
    task_files = sorted({*root.glob("roles/*/tasks/**/*.yml"),
                         *root.glob("roles/*/handlers/*.yml"),
                         *root.glob("playbooks/tasks/**/*.yml")})
    for path in task_files:
        _walk(yaml.safe_load(path.read_text(encoding="utf-8")), set(),
              path.relative_to(root).as_posix(), out)
    for path in sorted(root.glob("playbooks/*.yml")):
        where = path.relative_to(root).as_posix()
        for play in yaml.safe_load(path.read_text(encoding="utf-8")) or []:
            if isinstance(play, dict) and "import_playbook" not in play:
                effective = _check(play, set(), where, out)
                for key in PLAY_TASK_KEYS:
                    _walk(play.get(key), effective, where, out)
    return out


def test_requirement_names_and_tags_agree() -> None:
    found = {p.key() for p in problems(REPO)}
    assert sorted(found - KNOWN) == []
    assert sorted(KNOWN - found) == [], "fixed: take these out of KNOWN"


def test_the_scan_reads_tasks_blocks_handlers_and_plays() -> None:
    assert len(problems(REPO)) >= len(KNOWN)
    counted: list[Problem] = []
    _walk(yaml.safe_load((REPO / "roles/auth/tasks/main.yml").read_text()), set(), "x", counted)
    assert counted == []


def test_each_direction_is_caught(tmp_path: Path) -> None:
    tasks = tmp_path / "roles" / "demo" / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "main.yml").write_text("""\
- name: MAIL-03 | Reject plaintext
  ansible.builtin.debug: {msg: x}
  tags: [req_mail_03]
- name: MAIL-04 | Warn about subjects
  ansible.builtin.debug: {msg: x}
- name: Open a port
  ansible.builtin.debug: {msg: x}
  tags: [req_net_01, other]
- name: CA-05 | Journal
  tags: req_ca_05
  block:
    - name: CA-05 | Write the journal entry
      ansible.builtin.debug: {msg: x}
    - name: CA-06 | Guard the key
      ansible.builtin.debug: {msg: x}
""")
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "playbooks" / "patch.yml").write_text("""\
- name: Patch
  hosts: all
  tasks:
    - name: SYS-04 | Patch the host
      tags: [req_sys_04]
      ansible.builtin.debug: {msg: x}
    - name: Log it
      tags: [req_sys_04]
      ansible.builtin.debug: {msg: x}
""")
    found = {(p.name, p.what) for p in problems(tmp_path)}
    assert found == {
        ("MAIL-04 | Warn about subjects", "id in the name without its tag: MAIL-04"),
        ("Open a port", "tag without its id in the name: NET-01"),
        ("CA-06 | Guard the key", "id in the name without its tag: CA-06"),
        ("Log it", "tag without its id in the name: SYS-04"),
    }
