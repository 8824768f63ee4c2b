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

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

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


# sha256 of every secret value of the committed example vault (its values are public: the
# password above is). A site's vault that still holds one of them, under any password or in
# clear text, holds a published secret. tests/test_gate_release_trust.py checks that these are
# the committed example's values.
EXAMPLE_VALUE_SHA256 = frozenset({
    "043a0755c044d1f38f2e9b0b53855b0c7d2481d4c084d2c8e8093c8c85d98908",
    "2b805129383b2093178350ed1af2f41ef6cdcb0c23f0422dbea933c8c82e1895",  # AV-02 replicator
    "1cf3a48930fc0e8cd20534e31254be2fdcd447fff8948400a956a6a7982247d0",
    "22d6f7c69304823d217a299533c94e1af7b6314a3ea179fdadc48e02e94b3393",
    "36aed7b73272c62bc0023920df68296884c559041018cc2ae93b6f4076ce5e25",
    "413e6ab0bb05399b28222727cdeddaeb3549d9783cfb7f19b853df2326604a28",
    "4f7326cc82d200376a32375ad92dd46cd338a9ffdf9ccbaf4ecff77af6f02fa1",
    "56ba83680f84dac8b572375afa0ea4662723332466ffe8838be0513ff5a69317",
    "5d90c614c9b5d2427f31878ae4dffdfab4cb07e2459c5b12b6dd838c0558a094",
})


def secret_digests(data: object, path: str = "") -> dict[str, str]:
    """sha256 of every scalar value of a vault's YAML, by its key path (never the values)."""
    if isinstance(data, Mapping):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(secret_digests(value, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(data, list):
        out = {}
        for n, value in enumerate(data):
            out.update(secret_digests(value, f"{path}[{n}]"))
        return out
    if data is None or data == "":
        return {}
    return {path: hashlib.sha256(str(data).encode("utf-8")).hexdigest()}


def _open_vault(path: Path, inventory: Path, env: Mapping[str, str]) -> tuple[object, str | None]:
    """The vault's YAML, decrypted with the site's password source (the vault client, or the
    operator's ANSIBLE_VAULT_IDENTITY_LIST / ANSIBLE_VAULT_PASSWORD_FILE): (data, problem)."""
    repo = inventory.resolve().parent.parent
    # On PATH, else beside this Python (safemail.ansible.command is a layer above this one).
    program = shutil.which("ansible-vault") or str(Path(sys.executable).parent / "ansible-vault")
    cmd = [program, "decrypt", "--output", "-", *vault_args(repo, inventory, env), str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, env=dict(env), check=False,
                              timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"cannot run ansible-vault: {exc}"
    if proc.returncode != 0:
        why = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        return None, (why[-1] if why else f"ansible-vault exit code {proc.returncode}")
    try:
        return yaml.safe_load(proc.stdout), None
    except yaml.YAMLError as exc:
        return None, f"its decrypted text is not YAML: {exc}"


def example_password_problem(inventory: Path, env: Mapping[str, str] | None = None
                             ) -> str | None:
    """Why the inventory's vault cannot be a real site's (None if it can): it is not encrypted,
    it opens with the published example password, or it holds a secret of the published
    example (compared by sha256, never printed). No vault.yml: nothing to say."""
    path = inventory / VAULT_FILE
    hint = "Make the site's own vault with a new password first (docs/production.md, 'The vault')"
    try:
        head = path.read_bytes()[:len(HEADER)]
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if head != HEADER.encode():
        return (f"{path} is not encrypted (no {HEADER} header: decrypted in place?): "
                f"encrypt it with ansible-vault. {hint}")
    if opens_with(path, EXAMPLE_PASSWORD):
        return (
            f"{path} still opens with the published example password {EXAMPLE_PASSWORD!r}: "
            f"its secrets are the project's examples, readable by anyone. {hint}"
        )
    data, problem = _open_vault(path, inventory, os.environ if env is None
                                else {**os.environ, **env})
    if problem:
        return (f"cannot open {path} to compare its secrets with the published example vault: "
                f"{problem} (give the vault password: the vault client's file, "
                "ANSIBLE_VAULT_IDENTITY_LIST or ANSIBLE_VAULT_PASSWORD_FILE)")
    same = sorted(k for k, d in secret_digests(data).items() if d in EXAMPLE_VALUE_SHA256)
    if same:
        return (f"{path} holds secrets of the published example vault (values not shown): "
                f"{', '.join(same)}. Replace each with the site's own. {hint}")
    return None
