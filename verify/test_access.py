"""SYS-03: only named admins, by key, can log in (the common role's SSH baseline).

Proven from outside: real SSH attempts from the controller with the admin key (must work,
and sudo must work), with an unknown key (must fail) and with a password (the server must
not even offer password or keyboard-interactive authentication).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

testinfra_hosts = ["ansible://service"]


def _ssh(host, user: str, key: Path | None, *extra: str, command: str = "true"):
    hv = host.ansible.get_variables()
    args = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", *extra]
    if key is not None:
        args += ["-i", str(key)]
    args += [f"{user}@{hv['ansible_host']}", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def _admin(host) -> tuple[str, Path]:
    hv = host.ansible.get_variables()
    admins = [a for a in hv["common_admins"] if a.get("state", "present") == "present"]
    assert admins, "the inventory lists no admin"
    return admins[0]["name"], Path(hv["ansible_ssh_private_key_file"])


@pytest.mark.req("SYS-03")
@pytest.mark.read_only
def test_named_admin_logs_in_by_key_and_may_sudo(host, evidence):
    user, key = _admin(host)
    proc = _ssh(host, user, key, command="sudo -n id -un")
    evidence(f"ssh {user}@{host.backend.host} sudo -n id -un -> rc={proc.returncode} "
             f"out={proc.stdout.strip()!r}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "root"


@pytest.mark.req("SYS-03")
@pytest.mark.read_only
def test_unknown_key_is_refused(host, evidence, tmp_path):
    user, _ = _admin(host)
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    for who in (user, "root"):
        proc = _ssh(host, who, stranger)
        evidence(f"unknown key as {who}: rc={proc.returncode} {proc.stderr.strip()[-120:]}")
        assert proc.returncode == 255
        assert "Permission denied" in proc.stderr


@pytest.mark.req("SYS-03")
@pytest.mark.read_only
def test_server_offers_no_password_login(host, evidence):
    user, _ = _admin(host)
    proc = _ssh(host, user, None, "-o", "PubkeyAuthentication=no",
                "-o", "PreferredAuthentications=password,keyboard-interactive")
    evidence(f"password attempt: {proc.stderr.strip()[-160:]}")
    assert proc.returncode == 255
    # The server lists the methods it still accepts: publickey alone.
    assert "Permission denied (publickey)" in proc.stderr


@pytest.mark.req("SYS-03")
@pytest.mark.read_only
def test_effective_sshd_settings_are_key_only(host, evidence):
    settings = dict(
        line.split(" ", 1) for line in host.check_output("sshd -T").splitlines() if " " in line
    )
    picked = {k: settings.get(k) for k in ("passwordauthentication", "kbdinteractiveauthentication",
                                           "permitrootlogin", "permitemptypasswords")}
    evidence(f"sshd -T: {picked}")
    assert picked["passwordauthentication"] == "no"
    assert picked["kbdinteractiveauthentication"] == "no"
    assert picked["permitemptypasswords"] == "no"
    assert picked["permitrootlogin"] in ("without-password", "prohibit-password", "no")
