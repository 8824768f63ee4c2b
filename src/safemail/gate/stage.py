"""What the stage is, as the controller knows it: hosts, host keys, the key that reaches them.

The promotion gate compares a report with this, not with what the report says about itself:

- **service hosts**: the inventory's ``service`` group (participants are lab machines that
  play the practices; they may be reached, but they are not what is released);
- **host keys**: the fingerprints of the lab's own known_hosts (:class:`LabPaths`
  ``known_hosts``, under ``/var/lib/safemail-lab/ssh/``; ``safemail lab up`` writes it with
  every host's key when it creates the host). A host re-created since the run has a new key,
  so an old report no longer matches it;
- **run key**: the lab's own SSH key (``LabPaths.key_file``), which reaches the stage.
  ``safemail verify`` seals its report with it (``report.json.sig``, namespace
  ``safemail-verify-run``); the gate checks the seal with the public half derived from that
  private key (``ssh-keygen -y``), never with a key the inventory names. Only who holds the
  lab's key can make a report that passes the gate; a report changed after the run (by hand,
  or re-rendered by ``safemail report``) fails the seal;
- **pinning**: the inventory (its generated part is a git-ignored file) must make the run use
  exactly that key and known_hosts, with ``StrictHostKeyChecking=yes`` and an ssh connection,
  and may set only the Ansible variables and ssh ``-o`` options the lab itself writes
  (allowlists :data:`ALLOWED_VARS`, :data:`ALLOWED_OPTIONS`; :func:`lab_pinning_problems`):
  an inventory that redirects the run, or sets anything else, refuses the release;
- **inventory hash**: :func:`safemail.gate.hashing.inventory_hash`.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safemail.errors import SafeMailError
from safemail.gate import hashing, signing
from safemail.inventory import Host, read_inventory
from safemail.lab.config import LabPaths
from safemail.project import Project

SEAL_NAMESPACE = "safemail-verify-run"
SEAL_SUFFIX = ".sig"
SERVICE_GROUP = "service"


@dataclass(frozen=True)
class StageIdentity:
    name: str
    inventory_hash: str
    hosts: tuple[str, ...]
    service_hosts: tuple[str, ...]
    host_keys: Mapping[str, frozenset[str]] = field(default_factory=dict)
    run_key_private: Path | None = None
    run_key_public: str | None = None
    problems: tuple[str, ...] = ()  # what could not be read (each one refuses a release)


_ARG_VARS = ("ansible_ssh_args", "ansible_ssh_common_args", "ansible_ssh_extra_args")
_KEY_VARS = ("ansible_ssh_private_key_file", "ansible_private_key_file")
# An allowlist, not a blocklist: the Ansible (and Mitogen) variables the test inventory may
# set, i.e. what `safemail lab up` writes into zz_lab_generated.yml (src/safemail/lab/plan.py,
# generated_inventory), the ones checked below, and two that do not touch the connection.
# Any other ansible_*/mitogen_* variable (ansible_ssh_executable, ansible_control_path,
# ansible_port, mitogen_via, ...) refuses the release, named.
ALLOWED_VARS = frozenset({
    "ansible_host", "ansible_user",
    *_KEY_VARS, *_ARG_VARS,
    "ansible_connection", "ansible_host_key_checking", "ansible_ssh_host_key_checking",
    "ansible_managed", "ansible_python_interpreter",
})
_VAR_PREFIXES = ("ansible_", "mitogen_")
# The ssh -o options the inventory may give (lower case): those the lab generates. Any other
# (ControlPath/ControlMaster: reuse a master connection someone else opened, the host key
# never checked; ProxyCommand, GlobalKnownHostsFile, HostKeyAlias, ...) refuses the release.
# ansible.cfg's own ssh_args (ControlMaster, ControlPersist) and control_path are committed
# and part of the content hash; they are not the inventory's.
ALLOWED_OPTIONS = frozenset({
    "userknownhostsfile", "stricthostkeychecking", "identitiesonly", "connecttimeout",
    "serveraliveinterval", "serveralivecountmax",
})


def _ssh_options(host: Host) -> tuple[list[tuple[str, str]], list[str]]:
    """The ``-o`` options (lower-cased key, value) of a host's SSH argument variables, and
    the other arguments (``-F FILE`` and the like)."""
    text = " ".join(str(host.vars.get(k) or "") for k in _ARG_VARS)
    try:
        tokens = shlex.split(text)
    except ValueError:
        return [], [text]
    options: list[tuple[str, str]] = []
    other: list[str] = []
    it = iter(tokens)
    for token in it:
        if token == "-o":  # noqa: S105 - an ssh option flag, not a password
            token = "-o" + next(it, "")
        if token.startswith("-o"):
            key, _, value = token[2:].strip().replace("=", " ", 1).partition(" ")
            options.append((key.lower(), value.strip()))
        else:
            other.append(token)
    return options, other


def _same_file(given: str, own: Path) -> bool:
    return Path(given).expanduser().resolve() == own.resolve()


def lab_pinning_problems(hosts: Sequence[Host], lab: LabPaths) -> list[str]:
    """Every way the inventory would make the run use other SSH material than the lab's own:
    another key, another known_hosts, no strict host key checking, another connection.

    The inventory's generated part is a git-ignored file anyone who can write the checkout
    can edit; the lab's key and known_hosts under ``lab.ssh_dir`` are root's (docs/
    change-manager.md, "The stage as the gate knows it")."""
    problems: list[str] = []
    for host in sorted(hosts, key=lambda h: h.name):
        where = f"host {host.name}"
        connection = str(host.vars.get("ansible_connection") or "ssh")
        if connection not in ("ssh", "smart", "ansible.builtin.ssh"):
            problems.append(f"{where}: ansible_connection {connection!r} (the run must reach "
                            "the lab's hosts over ssh)")
        keys = [str(host.vars[k]) for k in _KEY_VARS if host.vars.get(k)]
        if not keys:
            problems.append(f"{where}: the inventory names no SSH key file (the lab's is "
                            f"{lab.key_file})")
        for key in keys:
            if not _same_file(key, lab.key_file):
                problems.append(f"{where}: the inventory's SSH key {key} is not the lab's own "
                                f"key {lab.key_file}")
        options, other = _ssh_options(host)
        known = [v for k, v in options if k == "userknownhostsfile"]
        if not known:
            problems.append(f"{where}: no -o UserKnownHostsFile=... in its SSH arguments (the "
                            f"lab's is {lab.known_hosts})")
        for value in known:
            for path in value.split():
                if not _same_file(path, lab.known_hosts):
                    problems.append(f"{where}: its SSH arguments name the known_hosts file "
                                    f"{path}, not the lab's own {lab.known_hosts}")
        strict = [v.lower() for k, v in options if k == "stricthostkeychecking"]
        if not strict or any(v != "yes" for v in strict):
            problems.append(f"{where}: its SSH arguments must say -o StrictHostKeyChecking=yes "
                            f"(found {', '.join(strict) or 'none'})")
        for var in sorted(host.vars):
            if var.lower().startswith(_VAR_PREFIXES) and var not in ALLOWED_VARS:
                problems.append(f"{where}: the variable {var} is not allowed for the test "
                                "stage (not one the lab writes: ALLOWED_VARS in "
                                "src/safemail/gate/stage.py)")
        for key, value in options:
            if key not in ALLOWED_OPTIONS:
                problems.append(f"{where}: SSH option {key}={value} is not allowed for the "
                                "test stage (only the lab's own: "
                                f"{', '.join(sorted(ALLOWED_OPTIONS))})")
        if other:
            problems.append(f"{where}: SSH arguments other than -o options are not allowed "
                            f"for the test stage: {' '.join(other)}")
        for var in ("ansible_host_key_checking", "ansible_ssh_host_key_checking"):
            if var in host.vars and str(host.vars[var]).lower() not in ("true", "yes", "1"):
                problems.append(f"{where}: {var} is {host.vars[var]!r}")
    return problems


def public_key_of(private: Path) -> str:
    """The public half of an OpenSSH private key file (``ssh-keygen -y``); SafeMailError if the
    file cannot be read."""
    try:
        proc = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True,
                              text=True, check=False, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SafeMailError(f"cannot run ssh-keygen -y: {exc}") from exc
    line = proc.stdout.strip()
    if proc.returncode != 0 or len(line.split()) < 2:
        raise SafeMailError(
            f"cannot read the lab's SSH key {private}: "
            f"{proc.stderr.strip() or 'no public key derived'}",
            "run the gate as the user that runs the lab (sudo -E)",
        )
    return line


def identity_from_hosts(name: str, inventory_hash: str, hosts: Sequence[Host],
                        lab: LabPaths | None = None) -> StageIdentity:
    """Build the stage identity from parsed inventory hosts and the lab's own SSH material.

    The seal's verifying key is derived from the lab's private key (``ssh-keygen -y``), never
    read from the inventory; the host keys come from the lab's known_hosts; and every host
    of the inventory must use exactly these (:func:`lab_pinning_problems`)."""
    lab = lab or LabPaths.default()
    problems: list[str] = []
    names = tuple(sorted(h.name for h in hosts))
    service = tuple(sorted(h.name for h in hosts if SERVICE_GROUP in h.groups))
    if not service:
        problems.append(f"the {name} inventory has no hosts in the '{SERVICE_GROUP}' group")
    problems.extend(lab_pinning_problems(hosts, lab))
    keys: dict[str, frozenset[str]] = {}
    try:
        text = lab.known_hosts.read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(
            f"cannot read the lab's known_hosts {lab.known_hosts}: {exc.strerror or exc} "
            "(run as the user that runs the lab, e.g. sudo -E)"
        )
    else:
        found = known_hosts_for(text, hosts)
        keys = {h: frozenset(f) for h, f in found.items()}
    public: str | None = None
    try:
        public = public_key_of(lab.key_file)
    except SafeMailError as exc:
        problems.append(exc.message)
    return StageIdentity(
        name=name,
        inventory_hash=inventory_hash,
        hosts=names,
        service_hosts=service,
        host_keys=keys,
        run_key_private=lab.key_file,
        run_key_public=public,
        problems=tuple(problems),
    )


def known_hosts_for(text: str, hosts: Sequence[Host]) -> dict[str, set[str]]:
    """Fingerprints per inventory host, matched by name or by its ansible_host address."""
    aliases = {h.name: {h.name, str(h.vars.get("ansible_host") or h.name)} for h in hosts}
    found = signing.known_hosts_fingerprints(text, {a for s in aliases.values() for a in s})
    return {name: set().union(*(found[a] for a in names)) for name, names in aliases.items()}


def read_stage(repo: Path, name: str, lab: LabPaths | None = None) -> StageIdentity:
    """The stage as its inventory and the lab's own known_hosts and key describe it now."""
    inventory = Project(repo).inventory(name)
    try:
        inv_hash = hashing.inventory_hash(repo, name)
        hosts = read_inventory(inventory)
    except SafeMailError as exc:  # InventoryError, or no inventory directory
        return StageIdentity(name, "", (), (), problems=(f"cannot read the stage: {exc.message}",))
    return identity_from_hosts(name, inv_hash, hosts, lab)


def seal_path(report_json: Path) -> Path:
    return report_json.with_name(report_json.name + SEAL_SUFFIX)


def seal(report_json: Path, key: Path) -> Path:
    """Sign report.json with the stage's key; write report.json.sig beside it."""
    text = signing.sign(key, SEAL_NAMESPACE, report_json.read_bytes())
    path = seal_path(report_json)
    path.write_text(text, encoding="ascii")
    return path


def lab_seal_problem(report_json: Path, lab: LabPaths | None = None) -> str | None:
    """:func:`seal_problem` against the lab's own key alone (no inventory read)."""
    lab = lab or LabPaths.default()
    try:
        public: str | None = public_key_of(lab.key_file)
    except SafeMailError:
        public = None
    return seal_problem(report_json, StageIdentity("test", "", (), (), run_key_public=public))


def seal_problem(report_json: Path, identity: StageIdentity) -> str | None:
    """Why the report's seal does not prove it is the stage's own, unchanged run (or None)."""
    path = seal_path(report_json)
    if not path.is_file():
        return (
            f"the report is not sealed ({path.name} missing): only `safemail verify` on the "
            "stage seals a report; re-rendered or hand-made reports cannot release"
        )
    if not identity.run_key_public:
        return ("the lab's SSH key could not be read: the seal is unchecked (run as the user "
                "that runs the lab, e.g. sudo -E)")
    armored = path.read_text(encoding="ascii", errors="replace")
    if not signing.verify_with_key(identity.run_key_public, SEAL_NAMESPACE, armored,
                                   report_json.read_bytes()):
        return (
            "the report's seal does not match: report.json was changed after `safemail verify` "
            "wrote it, or it was sealed with another key than the stage's"
        )
    return None
