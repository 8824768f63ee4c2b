"""The OpenSSH command line Ansible would use for a host, built by Ansible itself.

`safemail patch status` reads a file on every host. It must connect exactly as Ansible does:
user, key, known_hosts, StrictHostKeyChecking, ConnectTimeout, ControlMaster/ControlPersist,
and a bastion (ProxyJump or ProxyCommand in ``ansible_ssh_common_args``). So it does not
rebuild those settings from the variables: Ansible's own ``ssh`` connection plugin builds the
command (``Connection._build_command``) from ansible.cfg, the ``ANSIBLE_*`` environment and
the host's variables. That runs in a child Python started in the checkout, where
ansible-playbook runs, so the same ansible.cfg applies however this process was started.

    python -m safemail.ops.sshcmd < {"host": {hostvars...}, ...}   ->   {"host": [argv...]}
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safemail.errors import SafeMailError


def build(hostvars: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Each host's ssh argv, target included, without the remote command (run in the child)."""
    from ansible.playbook.play_context import PlayContext
    from ansible.plugins.loader import connection_loader, init_plugin_loader

    init_plugin_loader()
    commands: dict[str, list[str]] = {}
    for name, hv in hostvars.items():
        variables = {"inventory_hostname": name, **hv}
        connection = variables.get("ansible_connection", "ssh")
        if connection not in ("ssh", "smart"):
            raise SafeMailError(
                f"{name}: ansible_connection is {connection!r}; safemail reads host files over "
                "ssh only", "use the ssh connection for service hosts")
        conn = connection_loader.get("ssh", PlayContext(), io.StringIO())
        conn.set_options(var_options=variables)
        conn.host = conn.get_option("host") or name
        argv = conn._build_command(conn.get_option("ssh_executable"), "ssh", conn.host)
        commands[name] = [a.decode() if isinstance(a, bytes) else str(a) for a in argv]
    return commands


def ssh_commands(repo: Path, hostvars: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Ask a child Python in ``repo`` for the hosts' ssh argv (see the module text)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "safemail.ops.sshcmd"], input=json.dumps(hostvars),
            capture_output=True, text=True, cwd=repo, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SafeMailError(f"cannot build the SSH commands: {exc}") from exc
    if proc.returncode != 0:
        raise SafeMailError("cannot build the SSH commands with Ansible's ssh plugin: "
                            + (proc.stderr.strip().splitlines() or ["no message"])[-1])
    return json.loads(proc.stdout)


@dataclass(frozen=True)
class Outcome:
    """One host's answer: the remote command's exit code and output, or why SSH failed."""

    host: str
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    unreachable: str | None = None  # set when ssh itself failed (exit 255, timeout, no ssh)


def run_everywhere(repo: Path, hosts: Mapping[str, Mapping[str, Any]],
                   remote: Callable[[str, Mapping[str, Any]], str],
                   timeout: float = 90, stdin: str | None = None) -> dict[str, Outcome]:
    """Run ``remote(name, hostvars)`` on every host in parallel, over Ansible's ssh command
    line for it plus ``BatchMode=yes`` (a host asking for a password fails, never waits).
    ``stdin``: text the remote command reads (`safemail status` sends its probe so); without
    it the command reads nothing."""
    if not hosts:
        return {}
    commands = ssh_commands(repo, hosts)

    def one(name: str) -> Outcome:
        argv = [*commands[name][:-1], "-o", "BatchMode=yes", commands[name][-1],
                remote(name, hosts[name])]
        try:
            feed = ({"stdin": subprocess.DEVNULL} if stdin is None else {"input": stdin})
            proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  timeout=timeout, **feed)
        except subprocess.TimeoutExpired:
            return Outcome(name, unreachable=f"no answer in {timeout:g} s")
        except OSError as exc:
            return Outcome(name, unreachable=f"cannot run ssh: {exc}")
        if proc.returncode == 255:
            why = (proc.stderr.strip().splitlines() or ["SSH failed"])[-1]
            return Outcome(name, unreachable=f"SSH failed: {why}")
        return Outcome(name, proc.returncode, proc.stdout, proc.stderr)

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        return {o.host: o for o in pool.map(one, list(hosts))}


def main(argv: Sequence[str] | None = None) -> int:
    if argv or sys.argv[1:]:
        print(__doc__)
        return 0 if (argv or sys.argv[1:])[0] in ("-h", "--help") else 2
    try:
        print(json.dumps(build(json.load(sys.stdin))))
    except SafeMailError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
