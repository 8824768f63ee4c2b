"""Finding and running Ansible's commands from the controller.

One place for what every controller command needs: the path of an ``ansible-*`` program, the
``ansible-playbook`` command line for a stage (inventory, vault client, playbook) and running
it. A program is taken from PATH (the Makefile and an activated venv put the venv's bin/ first;
an operator may put a wrapper there), else from beside this Python (``.venv/bin/safemail`` run
without an activated venv).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from safemail import vault
from safemail.errors import SafeMailError
from safemail.project import Project

INSTALL_HINT = "install the project: make setup (or .venv/bin/pip install -e .) and run " \
    "safemail from .venv/bin"


class AnsibleNotFound(SafeMailError):
    """An ansible-* program is not installed where this Python runs."""


def bin_dir() -> Path:
    """The directory of this Python's scripts (the venv's bin/)."""
    return Path(sys.executable).parent


def command(name: str) -> str:
    """Path of the Ansible program ``name`` (``ansible-playbook``, ``ansible-inventory``, ...)."""
    found = shutil.which(name)
    if found:
        return found
    beside = bin_dir() / name
    if beside.is_file():
        return str(beside)
    raise AnsibleNotFound(
        f"{name} not found (Ansible is not installed in this environment)", INSTALL_HINT)


def playbook_command(project: Project, stage: str, playbook: str, *extra: str,
                     program: str | None = None) -> list[str]:
    """``ansible-playbook -i inventories/<stage> [vault client] playbooks/<playbook> EXTRA``.

    The vault client arguments come from :func:`safemail.vault.vault_args` (nothing for an
    inventory without ciphertext, or when the operator named a password source).
    """
    inventory = project.inventory(stage)
    return [program or command("ansible-playbook"), "-i", str(inventory),
            *vault.vault_args(project.root, inventory), str(project.playbook(playbook)), *extra]


def run(cmd: Sequence[str], cwd: Path, *, echo: bool = True) -> int:
    """Run an Ansible command in the checkout, output to the terminal; its exit code."""
    if echo:
        print("running: " + " ".join(cmd), flush=True)
    try:
        return subprocess.run(list(cmd), cwd=cwd, check=False).returncode
    except OSError as exc:
        raise SafeMailError(f"cannot run {Path(cmd[0]).name}: {exc}") from exc
