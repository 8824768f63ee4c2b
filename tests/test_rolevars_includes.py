"""rolevars checks the roles a playbook applies through include_role and import_role too.

A fixture project of its own (ansible.cfg, two roles, one playbook, one host): the role
``needs_x`` has a required option on its ``main`` entry point and another on its ``extra``
entry point; it is reached only through ``include_role`` (from a play's tasks, with
``tasks_from``, and from another role's tasks) and ``import_role`` (with the option given in
the task's ``vars``). No play lists it under ``roles:``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from safemail import rolevars

pytestmark = pytest.mark.skipif(
    not (Path(sys.executable).parent / "ansible-playbook").exists(),
    reason="ansible is not installed in this environment")


def _write(root: Path, rel: str, data: object) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))


def _project(root: Path) -> Path:
    _write(root, "ansible.cfg", "[defaults]\nroles_path = roles\n")
    _write(root, "inventory/hosts.yml",
           {"all": {"hosts": {"h1": {"ansible_connection": "local"}}}})
    _write(root, "roles/needs_x/meta/argument_specs.yml", {"argument_specs": {
        "main": {"short_description": "x", "options": {
            "needs_x_value": {"type": "str", "required": True, "description": "x"}}},
        "extra": {"short_description": "x", "options": {
            "needs_x_other": {"type": "int", "required": True, "description": "x"}}},
    }})
    debug = [{"name": "Show", "ansible.builtin.debug": {"msg": "x"}}]
    _write(root, "roles/needs_x/tasks/main.yml", debug)
    _write(root, "roles/needs_x/tasks/extra.yml", debug)
    _write(root, "roles/wrapper/tasks/main.yml", [
        {"name": "Pull in needs_x", "ansible.builtin.include_role": {"name": "needs_x"}}])
    _write(root, "site.yml", [
        {"name": "included from the play", "hosts": "all", "gather_facts": False, "tasks": [
            {"name": "Include extra", "ansible.builtin.include_role": {
                "name": "needs_x", "tasks_from": "extra"}}]},
        {"name": "included from a role", "hosts": "all", "gather_facts": False,
         "roles": ["wrapper"]},
        {"name": "imported with vars", "hosts": "all", "gather_facts": False, "tasks": [
            {"name": "Import", "ansible.builtin.import_role": {"name": "needs_x"},
             "vars": {"needs_x_value": "given"}}]},
        {"name": "imported without", "hosts": "all", "gather_facts": False, "tasks": [
            {"name": "Import", "ansible.builtin.import_role": {"name": "needs_x"}}]},
    ])
    return root


def test_roles_from_include_role_and_import_role_are_spec_checked(tmp_path: Path) -> None:
    root = _project(tmp_path)
    data = rolevars.run(root, root / "inventory", root / "site.yml")
    problems = sorted(str(rolevars.Problem(**p)) for p in data["problems"])
    assert problems == [
        "host h1, role needs_x (extra), option needs_x_other: required, but not set",
        "host h1, role needs_x, option needs_x_value: required, but not set",
        "host h1, role needs_x, option needs_x_value: required, but not set",
    ], problems
    rendered = data["roles"]["h1"]
    assert rendered["imported with vars | needs_x"] == {"needs_x_value": "given"}
    assert "included from a role | needs_x" in rendered
    assert "included from the play | needs_x (extra)" in rendered
    # A wrong type through an include is named too.
    _write(root, "roles/needs_x/defaults/main.yml", {"needs_x_other": "many", "needs_x_value": 1})
    data = rolevars.run(root, root / "inventory", root / "site.yml")
    assert any(p["role"] == "needs_x (extra)" and p["option"] == "needs_x_other"
               and "int" in p["message"] for p in data["problems"]), data["problems"]
