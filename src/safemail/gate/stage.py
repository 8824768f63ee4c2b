"""What the stage is, as the controller knows it: hosts, host keys, the key that reaches them.

The promotion gate compares a report with this, not with what the report says about itself:

- **service hosts**: the inventory's ``service`` group (participants are lab machines that
  play the practices; they may be reached, but they are not what is released);
- **host keys**: the fingerprints of the known_hosts file that the inventory's SSH options
  name (``-o UserKnownHostsFile=...`` in ``ansible_ssh_common_args``; ``safemail lab up``
  writes it with every host's key when it creates the host). A host re-created since the run
  has a new key, so an old report no longer matches it;
- **run key**: the SSH key that reaches the stage (``ansible_ssh_private_key_file``).
  ``safemail verify`` seals its report with it (``report.json.sig``, namespace
  ``safemail-verify-run``); the gate checks the seal with the public half, taken from the
  inventory's ``lab_ssh_public_key`` (which ``lab up`` writes) or ``<key file>.pub``. Only who
  holds the key that reaches the stage can make a report that passes the gate; a report
  changed after the run (by hand, or re-rendered by ``safemail report``) fails the seal;
- **inventory hash**: :func:`safemail.gate.hashing.inventory_hash`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safemail.errors import SafeMailError
from safemail.gate import hashing, signing
from safemail.inventory import Host, read_inventory
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


def _common_args(host: Host) -> str:
    return " ".join(
        str(host.vars.get(k, "")) for k in ("ansible_ssh_common_args", "ansible_ssh_extra_args")
    )


def _one(values: Sequence[str], what: str, problems: list[str]) -> str | None:
    distinct = sorted(set(v for v in values if v))
    if len(distinct) > 1:
        problems.append(f"the stage's hosts use different {what}s: {', '.join(distinct)}")
    return distinct[0] if distinct else None


def identity_from_hosts(name: str, inventory_hash: str, hosts: Sequence[Host]) -> StageIdentity:
    """Build the stage identity from parsed inventory hosts (reads known_hosts and .pub)."""
    problems: list[str] = []
    names = tuple(sorted(h.name for h in hosts))
    service = tuple(sorted(h.name for h in hosts if SERVICE_GROUP in h.groups))
    if not service:
        problems.append(f"the {name} inventory has no hosts in the '{SERVICE_GROUP}' group")
    known_files = [m.group(1) for h in hosts if (m := re.search(r"UserKnownHostsFile=(\S+)",
                                                                 _common_args(h)))]
    known_file = _one(known_files, "known_hosts file", problems)
    keys: dict[str, frozenset[str]] = {}
    if known_file is None:
        problems.append(
            f"the {name} inventory names no known_hosts file (-o UserKnownHostsFile=... in "
            "ansible_ssh_common_args): the hosts' keys cannot be compared"
        )
    else:
        try:
            text = Path(known_file).read_text(encoding="utf-8")
        except OSError as exc:
            problems.append(
                f"cannot read the stage's known_hosts {known_file}: {exc.strerror or exc} "
                "(run as the user that runs the lab, e.g. sudo -E)"
            )
        else:
            found = known_hosts_for(text, hosts)
            keys = {h: frozenset(f) for h, f in found.items()}
    private = _one([str(h.vars.get("ansible_ssh_private_key_file") or "") for h in hosts],
                   "SSH key file", problems)
    public = _one([str(h.vars.get("lab_ssh_public_key") or "").strip() for h in hosts],
                  "lab_ssh_public_key", problems)
    if public is None and private is not None:
        try:
            public = Path(private + ".pub").read_text(encoding="ascii").strip() or None
        except OSError:
            public = None
    return StageIdentity(
        name=name,
        inventory_hash=inventory_hash,
        hosts=names,
        service_hosts=service,
        host_keys=keys,
        run_key_private=Path(private) if private else None,
        run_key_public=public,
        problems=tuple(problems),
    )


def known_hosts_for(text: str, hosts: Sequence[Host]) -> dict[str, set[str]]:
    """Fingerprints per inventory host, matched by name or by its ansible_host address."""
    aliases = {h.name: {h.name, str(h.vars.get("ansible_host") or h.name)} for h in hosts}
    found = signing.known_hosts_fingerprints(text, {a for s in aliases.values() for a in s})
    return {name: set().union(*(found[a] for a in names)) for name, names in aliases.items()}


def read_stage(repo: Path, name: str) -> StageIdentity:
    """The stage as its inventory, known_hosts and key describe it now."""
    inventory = Project(repo).inventory(name)
    try:
        inv_hash = hashing.inventory_hash(repo, name)
        hosts = read_inventory(inventory)
    except SafeMailError as exc:  # InventoryError, or no inventory directory
        return StageIdentity(name, "", (), (), problems=(f"cannot read the stage: {exc.message}",))
    return identity_from_hosts(name, inv_hash, hosts)


def seal_path(report_json: Path) -> Path:
    return report_json.with_name(report_json.name + SEAL_SUFFIX)


def seal(report_json: Path, key: Path) -> Path:
    """Sign report.json with the stage's key; write report.json.sig beside it."""
    text = signing.sign(key, SEAL_NAMESPACE, report_json.read_bytes())
    path = seal_path(report_json)
    path.write_text(text, encoding="ascii")
    return path


def seal_problem(report_json: Path, identity: StageIdentity) -> str | None:
    """Why the report's seal does not prove it is the stage's own, unchanged run (or None)."""
    path = seal_path(report_json)
    if not path.is_file():
        return (
            f"the report is not sealed ({path.name} missing): only `safemail verify` on the "
            "stage seals a report; re-rendered or hand-made reports cannot release"
        )
    if not identity.run_key_public:
        return "the stage's SSH key (lab_ssh_public_key or <key>.pub) is unknown: seal unchecked"
    armored = path.read_text(encoding="ascii", errors="replace")
    if not signing.verify_with_key(identity.run_key_public, SEAL_NAMESPACE, armored,
                                   report_json.read_bytes()):
        return (
            "the report's seal does not match: report.json was changed after `safemail verify` "
            "wrote it, or it was sealed with another key than the stage's"
        )
    return None
