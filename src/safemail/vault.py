"""Where Ansible gets an inventory's vault password from (docs/production.md, "The vault").

An inventory whose ``group_vars/all/vault.yml`` is ansible-vault ciphertext (production) needs
its password for every Ansible command that reads it. The password never comes from the
repository: the vault client ``scripts/vault-pass-client`` reads it from a 0600 file outside
the checkout. The ``safemail`` commands that run Ansible on an inventory (promote, patch,
docs, status) add ``--vault-id <id>@scripts/vault-pass-client`` for such an inventory, unless
the operator chose a source already (``ANSIBLE_VAULT_IDENTITY_LIST`` or
``ANSIBLE_VAULT_PASSWORD_FILE``). The lab's inventory has no ciphertext: no arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

VAULT_FILE = Path("group_vars") / "all" / "vault.yml"
CLIENT = Path("scripts") / "vault-pass-client"
HEADER = "$ANSIBLE_VAULT;"
# Environment variables by which the operator names a vault password source himself.
SOURCE_VARS = ("ANSIBLE_VAULT_IDENTITY_LIST", "ANSIBLE_VAULT_PASSWORD_FILE")


def vault_id(inventory: Path) -> str | None:
    """The vault id of the inventory's encrypted vault.yml, or None if it has none.

    From the file's header (``$ANSIBLE_VAULT;1.2;AES256;<id>``); a 1.1 header has no id, and
    the inventory's directory name stands in.
    """
    path = inventory / VAULT_FILE
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline().strip()
    except OSError:
        return None
    if not first.startswith(HEADER):
        return None
    fields = first.split(";")
    return fields[3] if len(fields) > 3 and fields[3] else inventory.name


def client(repo: Path | None) -> Path | None:
    """The vault client of the checkout `repo`, else of the checkout this package runs from."""
    for root in (repo, Path(__file__).resolve().parents[2]):
        if root is not None and (root / CLIENT).is_file():
            return root / CLIENT
    return None


def vault_args(repo: Path | None, inventory: Path,
               env: Mapping[str, str] | None = None) -> list[str]:
    """``--vault-id ID@<repo>/scripts/vault-pass-client`` when needed, else nothing."""
    env = os.environ if env is None else env
    if any(env.get(name) for name in SOURCE_VARS):
        return []
    vid = vault_id(inventory)
    script = client(repo)
    if vid is None or script is None:
        return []
    return ["--vault-id", f"{vid}@{script}"]


# Published in docs/production.md so anyone can read the committed example vault: a site's
# vault that still opens with it protects nothing.
EXAMPLE_PASSWORD = "safemail-example-vault"  # noqa: S105 - published on purpose


def opens_with(path: Path, password: str) -> bool:
    """True if the ansible-vault file ``path`` decrypts with ``password``."""
    from ansible.errors import AnsibleError
    from ansible.parsing.vault import VaultLib, VaultSecret

    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not data.startswith(HEADER.encode()):
        return False
    vid = vault_id(path.parent.parent.parent) or "default"
    lib = VaultLib([(vid, VaultSecret(password.encode()))])
    try:
        lib.decrypt(data)
    except AnsibleError:
        return False
    return True


def example_password_problem(inventory: Path) -> str | None:
    """Why the inventory's vault cannot be a real site's: it opens with the example password."""
    path = inventory / VAULT_FILE
    if opens_with(path, EXAMPLE_PASSWORD):
        return (
            f"{path} still opens with the published example password {EXAMPLE_PASSWORD!r}: "
            "its secrets are the project's examples, readable by anyone. Make the site's own "
            "vault with a new password first (docs/production.md, 'The vault')"
        )
    return None
