"""scripts/vault-pass-client: the vault password comes only from a file of the caller's,
readable by nobody else, outside the checkout (docs/production.md, "The vault")."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "scripts" / "vault-pass-client"


def _client(password_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAFEMAIL_VAULT_PASSWORD_FILE": str(password_file)}
    return subprocess.run(["sh", str(CLIENT), *args], env=env, capture_output=True, text=True,
                          check=False)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "vault-production.pass"
    path.write_text("s3cret\nsecond line is ignored\n")
    path.chmod(0o600)
    return path


def test_prints_the_first_line_of_a_private_file(secret: Path) -> None:
    proc = _client(secret, "--vault-id", "production")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "s3cret\n"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o700])
def test_refuses_a_file_others_can_read_or_run(secret: Path, mode: int) -> None:
    secret.chmod(mode)
    proc = _client(secret)
    assert proc.returncode != 0 and "chmod 600" in proc.stderr and not proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_refuses_a_file_of_another_user(secret: Path) -> None:
    os.chown(secret, 65534, 65534)
    proc = _client(secret)
    assert proc.returncode != 0 and "does not belong to you" in proc.stderr
    assert not proc.stdout


def test_follows_a_symlink_and_judges_the_file_it_names(secret: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.pass"
    link.symlink_to(secret)
    link_mode = os.lstat(link).st_mode & 0o777  # a symlink's own mode is 0777
    assert link_mode == 0o777
    assert _client(link).stdout == "s3cret\n"
    secret.chmod(0o644)
    assert _client(link).returncode != 0


def test_refuses_a_file_inside_the_checkout_even_through_a_symlink(tmp_path: Path) -> None:
    inside = REPO / "reports" / f"vault-test-{os.getpid()}.pass"
    inside.parent.mkdir(exist_ok=True)
    inside.write_text("s3cret\n")
    inside.chmod(0o600)
    try:
        link = tmp_path / "outside.pass"
        link.symlink_to(inside)
        proc = _client(link)
        assert proc.returncode != 0 and "inside the checkout" in proc.stderr
    finally:
        inside.unlink()


def test_a_vault_id_option_without_a_value_is_not_a_shell_error(secret: Path) -> None:
    proc = _client(secret, "--vault-id")
    assert proc.returncode == 0 and proc.stdout == "s3cret\n", proc.stderr
