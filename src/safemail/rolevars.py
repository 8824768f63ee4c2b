"""What every role receives from an inventory through a playbook, and whether its spec accepts it.

For each play of a playbook, each host the play matches and each role the play applies, this
module asks Ansible's own variable manager for the variables the role's first task sees
(inventory group_vars and host_vars, the group_vars beside the playbook, play and role vars,
role defaults), templates every option of the role's ``meta/argument_specs.yml`` entry point
``main`` one by one, and validates them with Ansible's ``ArgumentSpecValidator`` (what the
role's own argument validation task runs at the start of a converge). Nothing connects to a
host: no facts, no SSH.

Two uses:

- ``check``: every host of an inventory, every role: a missing required option, a value of the
  wrong type or one that cannot be templated is a :class:`Problem` naming host, role and option
  (tests/test_inventory_specs.py runs it for the test and the production inventory);
- the JSON it prints holds the templated values, to compare an inventory before and after a
  refactoring (``python -m safemail.rolevars --inventory ... --playbook ...``: two runs, then
  ``diff``).

Ansible keeps global state (config, plugin loaders, CLI arguments), so callers run this
module in a subprocess with ``ANSIBLE_CONFIG`` set to the project's ansible.cfg
(:func:`run`); the JSON it prints is the interface.

Roles checked: those a play lists (and their meta dependencies), and those a task pulls in
with ``import_role`` or ``include_role`` (service_tls from mailrelay, mailstore and auth), from
the play's own tasks or any role's tasks, nested; the include's ``vars`` count. An
``include_role``/``import_role`` with ``tasks_from: X`` is checked against the entry point
``X`` of the role's spec (none there: nothing, as Ansible); a templated role name is not
followed. Limits: a task's own ``vars`` outside an include are not seen. Facts are absent,
so a default that reads a fact cannot be templated (none of the
required options does). It uses a few of ansible-core's internal names (2.19, pinned in
pyproject.toml): ``Role._get_role_argspecs``, ``Play._included_path``,
``VariableManager._hostvars``; an ansible-core upgrade must keep tests/test_inventory_specs.py
green.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemail.errors import SafeMailError

# Values of these options are replaced by a marker in `render` output unless asked for.
SECRET_WORDS = ("password", "passphrase", "secret")
ENTRY_POINT = "main"
# Not inventory data: Ansible's own names in a host's variables.
SKIPPED = ("omit", "vars", "environment")
# The option an ArgumentSpecValidator message is about ("argument 'x' is of type ...").
_ARGUMENT = re.compile(r"argument '([^']+)'")


@dataclass(frozen=True)
class Problem:
    host: str
    role: str
    option: str
    message: str

    def __str__(self) -> str:
        return f"host {self.host}, role {self.role}, option {self.option}: {self.message}"


def _is_secret(name: str) -> bool:
    return any(w in name for w in SECRET_WORDS)


def _plain(value: Any) -> Any:
    """Templated Ansible values as plain JSON data (tagged str/dict/list subclasses dropped)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _play_tasks(blocks: Sequence[Any]) -> list[Any]:
    """The tasks of a play's own blocks (not its roles'), nested blocks flattened."""
    out = []
    for block in blocks:
        for item in block.block:
            out += _play_tasks([item]) if hasattr(item, "block") else [item]
    return out


def _flatten(blocks: Sequence[Any]) -> list[Any]:
    """Every task of blocks (block, rescue and always parts), nested blocks flattened."""
    out: list[Any] = []
    for block in blocks:
        for part in (block.block, block.rescue, block.always):
            for item in part or ():
                out += _flatten([item]) if hasattr(item, "block") else [item]
    return out


def _applied_roles(play: Any, variables: Any, loader: Any) -> list[tuple[Any, str, Any, str]]:
    """Every role a play applies, as (role, entry point, its first task, label): the roles it
    lists (with their meta dependencies), and those pulled in by ``import_role`` (their tasks
    sit in the compiled blocks under the imported role) or ``include_role`` (expanded here as
    Ansible expands it at run time), in the play's own tasks and in any role's tasks, nested."""
    from ansible.playbook.role_include import IncludeRole

    found: list[tuple[Any, str, Any, str]] = []
    labels: set[str] = set()

    def entry_of(role: Any) -> str:
        files = getattr(role, "_from_files", None) or {}
        return str(files.get("tasks") or ENTRY_POINT)

    def scan(blocks: Sequence[Any], depth: int) -> None:
        for task in _flatten(blocks):
            if isinstance(task, IncludeRole):
                if depth > 8 or "{{" in str(task._role_name):
                    continue  # a recursive or templated include: not followed
                included, _handlers = task.get_block_list(play=play, variable_manager=variables,
                                                          loader=loader)
                scan(included, depth + 1)
                continue
            role = getattr(task, "_role", None)
            if role is None or not hasattr(task, "action"):
                continue
            entry = entry_of(role)
            label = role.get_name() + ("" if entry == ENTRY_POINT else f" ({entry})")
            if label not in labels:
                labels.add(label)
                found.append((role, entry, task, label))

    listed = list(play.get_roles())  # include_role appends to play.roles while expanding
    scan(play.pre_tasks + play.tasks + play.post_tasks, 0)
    for role in listed:
        scan(role.compile(play=play), 0)
    return found


def _check_role(play: Any, hosts: Sequence[Any], spec: Mapping[str, Any], first: Any,
                label: str, variables: Any, loader: Any,
                rendered: dict[str, dict[str, dict[str, Any]]], problems: list[dict[str, str]],
                seen: set[tuple[str, str, str]], show_secrets: bool) -> None:
    """Template a role's options as its first task sees them on each host; check the spec."""
    from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
    from ansible.template import Templar

    for host in hosts:
        key = (play.get_name(), host.name, label)
        if key in seen:
            continue
        seen.add(key)
        task_vars = variables.get_vars(play=play, host=host, task=first)
        templar = Templar(loader=loader, variables=task_vars)
        args: dict[str, Any] = {}
        failed: set[str] = set()
        out = rendered.setdefault(host.name, {}).setdefault(
            f"{play.get_name()} | {label}", {})
        for name in sorted(spec):
            if name not in task_vars:
                continue
            try:
                args[name] = templar.template(task_vars[name])
            except Exception as exc:  # noqa: BLE001 - any templating error is reported
                problems.append(vars(Problem(host.name, label, name,
                                             f"cannot be templated: {exc}")))
                out[name] = "<error>"
                failed.add(name)
                continue
            out[name] = (_plain(args[name]) if show_secrets or not _is_secret(name)
                         else "<secret>")
        for name, body in sorted(spec.items()):
            if body.get("required") and args.get(name) is None and name not in failed:
                problems.append(vars(Problem(host.name, label, name,
                                             "required, but not set")))
        for name, body in sorted(spec.items()):
            value = args.get(name)
            if name in failed or value is None:
                continue
            # Ansible's validator turns a string into a one-item list (and a string of
            # commas into several) without complaint; a template's `join` over such a
            # value then writes it character by character. A list or dict option must
            # be one in the inventory.
            if body.get("type") in ("list", "dict") and isinstance(value, str):
                problems.append(vars(Problem(
                    host.name, label, name,
                    f"is a string, not a {body['type']}: write it as a YAML "
                    f"{'list' if body['type'] == 'list' else 'mapping'}")))
            elif body.get("required") and isinstance(value, str) and not value.strip():
                problems.append(vars(Problem(host.name, label, name,
                                             "required, but empty")))
        result = ArgumentSpecValidator(spec).validate(
            args, validate_role_argument_spec=True)
        for err in result.errors:
            if type(err).__name__ == "RequiredError":
                continue  # reported above, one problem per option
            named = _ARGUMENT.search(str(err))
            problems.append(vars(Problem(host.name, label,
                                         named.group(1) if named else "?", str(err))))


def _collect(inventory: Path, playbook: Path, vault_ids: Sequence[tuple[str, Path]],
             show_secrets: bool, task_args: bool = False) -> dict[str, Any]:
    """Run inside a process of its own (Ansible's global state): see :func:`run`."""
    from ansible import context
    from ansible.inventory.manager import InventoryManager
    from ansible.module_utils.common.collections import ImmutableDict
    from ansible.parsing.dataloader import DataLoader
    from ansible.parsing.vault import get_file_vault_secret
    from ansible.playbook import Playbook
    from ansible.plugins.loader import init_plugin_loader
    from ansible.template import Templar
    from ansible.vars.hostvars import HostVars
    from ansible.vars.manager import VariableManager

    init_plugin_loader()
    context.CLIARGS = ImmutableDict(tags=(), skip_tags=(), check=False, diff=False,
                                    inventory=[str(inventory)], subset=None)
    loader = DataLoader()
    secrets = []
    for vid, path in vault_ids:
        # As ansible's --vault-id: a file holds the password, an executable prints it (a
        # `-client` script, such as scripts/vault-pass-client, is asked for its id).
        secret = get_file_vault_secret(filename=str(path), vault_id=vid, loader=loader)
        secret.load()
        secrets.append((vid, secret))
    loader.set_vault_secrets(secrets)
    inv = InventoryManager(loader=loader, sources=[str(inventory)])
    variables = VariableManager(loader=loader, inventory=inv)
    # As ansible-playbook: group_vars/host_vars beside the playbook are read.
    variables.safe_basedir = True
    # What the task queue manager sets for a run: `hostvars` for templates that read other hosts.
    variables._hostvars = HostVars(inventory=inv, variable_manager=variables, loader=loader)
    book = Playbook.load(str(playbook), variable_manager=variables, loader=loader)

    rendered: dict[str, dict[str, dict[str, Any]]] = {}
    tasks_out: dict[str, dict[str, Any]] = {}
    problems: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    for play in book.get_plays():
        # As the playbook executor: an imported playbook's plays read the vars beside it.
        loader.set_basedir(play._included_path or book._basedir)
        play_vars = variables.get_vars(play=play)
        pattern = Templar(loader=loader, variables=play_vars).template(play.hosts)
        hosts = inv.get_hosts(pattern)
        if task_args:
            for task in _play_tasks(play.pre_tasks + play.tasks + play.post_tasks):
                for host in hosts:
                    where = f"{play.get_name()} | {task.get_name()}"
                    task_vars = variables.get_vars(play=play, host=host, task=task)
                    templar = Templar(loader=loader, variables=task_vars)
                    try:
                        items = templar.template(task.loop) if task.loop else [None]
                        values = []
                        for item in items:
                            templar = Templar(loader=loader, variables={**task_vars,
                                                                        "item": item})
                            values.append(_plain(templar.template(task.args)))
                    except Exception as exc:  # noqa: BLE001 - any templating error is reported
                        problems.append(vars(Problem(host.name, f"play {play.get_name()}",
                                                     f"task {task.get_name()}",
                                                     f"cannot be templated: {exc}")))
                        continue
                    tasks_out.setdefault(host.name, {})[where] = (
                        values if task.loop else values[0])
        for role, entry, first, label in _applied_roles(play, variables, loader):
            spec = (role._get_role_argspecs() or {}).get(entry, {}).get("options", {})
            if entry != ENTRY_POINT and not spec:
                continue  # no entry point for these tasks_from: Ansible validates nothing
            _check_role(play, hosts, spec, first, label, variables, loader, rendered,
                        problems, seen, show_secrets)
    # Every other variable of every host (outside any play: inventory, the playbook's group_vars).
    host_level: dict[str, dict[str, Any]] = {}
    loader.set_basedir(book._basedir)
    for host in inv.get_hosts("all"):
        all_vars = variables.get_vars(host=host)
        magic = set(variables._get_magic_variables(None, host, None, True))
        templar = Templar(loader=loader, variables=all_vars)
        out = host_level.setdefault(host.name, {})
        for name in sorted(all_vars):
            if name in magic or name in SKIPPED or name.startswith("ansible_"):
                continue
            try:
                value = _plain(templar.template(all_vars[name]))
            except Exception as exc:  # noqa: BLE001 - shown, not judged: no role reads it here
                value = f"<error: {exc}>"
            out[name] = value if show_secrets or not _is_secret(name) else "<secret>"
    data = {"roles": rendered, "hostvars": host_level, "problems": problems}
    if task_args:
        data["tasks"] = tasks_out
    return data


def run(repo: Path, inventory: Path, playbook: Path | None = None,
        vault_ids: Sequence[tuple[str, Path]] = (), show_secrets: bool = False,
        task_args: bool = False, timeout: int = 600) -> dict[str, Any]:
    """Render/check in a subprocess with the project's ansible.cfg; the decoded JSON."""
    playbook = playbook or repo / "playbooks" / "site.yml"
    cmd = [sys.executable, "-m", "safemail.rolevars", "--inventory", str(inventory),
           "--playbook", str(playbook)]
    for vid, path in vault_ids:
        cmd += ["--vault-id", f"{vid}@{path}"]
    if show_secrets:
        cmd.append("--show-secrets")
    if task_args:
        cmd.append("--task-args")
    env = {**os.environ, "ANSIBLE_CONFIG": str(repo / "ansible.cfg")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode not in (0, 1):
        raise SafeMailError(f"rendering {inventory} failed: {proc.stderr.strip()[-3000:]}",
                            hint="check the inventory and the vault password")
    return json.loads(proc.stdout)


def _parse_vault_id(text: str) -> tuple[str, Path]:
    vid, sep, path = text.partition("@")
    if not sep or not vid or not path:
        raise argparse.ArgumentTypeError("give ID@PASSWORD_FILE")
    return vid, Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safemail.rolevars",
        description="Render what each role of a playbook receives on every host of an "
                    "inventory and check it against the roles' meta/argument_specs.yml. Prints "
                    "JSON {roles: {host: {'play | role': {option: value}}}, problems: [...]}; "
                    "exit 1 when a problem was found.")
    parser.add_argument("--inventory", required=True, type=Path)
    parser.add_argument("--playbook", required=True, type=Path)
    parser.add_argument("--vault-id", action="append", default=[], type=_parse_vault_id,
                        help="ID@PASSWORD_FILE_OR_CLIENT, as ansible's --vault-id (repeatable)")
    parser.add_argument("--show-secrets", action="store_true",
                        help="print values of password/passphrase/secret options too")
    parser.add_argument("--task-args", action="store_true",
                        help="also template the arguments of every task the plays list "
                        "themselves, per host and loop item (for playbooks whose tasks need no "
                        "registered results, such as vmware-provision.yml)")
    args = parser.parse_args(argv)
    data = _collect(args.inventory, args.playbook, args.vault_id, args.show_secrets,
                    args.task_args)
    json.dump(data, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 1 if data["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
