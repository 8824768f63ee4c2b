"""Who may approve a release or a waiver, and whether a set of signatures is enough.

Two committed files, reviewed like code:

- ``release/allowed_signers``: OpenSSH's allowed-signers format, one line per approver key::

      u.karlins@aerzteverband.example namespaces="safemail-release,safemail-waiver" ssh-ed25519 AA…

- ``release/approvers.yml``: the roles the audit names and who holds them::

      roles:
        head-of-it: {title: Head of IT, principals: [u.karlins@aerzteverband.example]}
        it-security: {title: IT security team, principals: [m.jensen@aerzteverband.example]}
      release_roles: [head-of-it, it-security]   # every one must sign a release
      waiver_roles: [head-of-it, it-security]    # and a waiver (default: release_roles)
      releasing_role: head-of-it                 # recorded as the operator of the release
      waiver_max_days: 90                        # longest waiver, granted to expires

What is signed is a short text (:func:`release_message`, :func:`waiver_message`), printed by
``safemail approval request``. A signature counts for one role only; two roles need two
different principals with two different keys (one person with two names, or one key listed
under two names, fills one role).
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safemail.errors import SafeMailError
from safemail.gate import signing

RELEASE_NAMESPACE = "safemail-release"
WAIVER_NAMESPACE = "safemail-waiver"
POLICY_DIR = Path("release")
ALLOWED_SIGNERS = POLICY_DIR / "allowed_signers"
APPROVERS = POLICY_DIR / "approvers.yml"
DEFAULT_ROLES = ("head-of-it", "it-security")
DEFAULT_WAIVER_MAX_DAYS = 90


class ApprovalError(SafeMailError):
    """The approval policy is missing or malformed."""


@dataclass(frozen=True)
class Role:
    name: str
    title: str
    principals: tuple[str, ...]


@dataclass(frozen=True)
class Policy:
    roles: Mapping[str, Role]
    release_roles: tuple[str, ...]
    waiver_roles: tuple[str, ...]
    releasing_role: str
    waiver_max_days: int
    allowed_signers: Path


def load_policy(repo: Path) -> Policy:
    """Read release/approvers.yml and check it against release/allowed_signers (the working
    tree's files, which must equal HEAD's)."""
    path = repo / APPROVERS
    signers = repo / ALLOWED_SIGNERS
    hint = f"see docs/change-manager.md, section 'Approvers'; fix {APPROVERS}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ApprovalError(f"approval policy {path} does not exist", hint) from None
    except OSError as exc:
        raise ApprovalError(f"cannot read {path}: {exc}", hint) from exc
    if not signers.is_file():
        raise ApprovalError(f"allowed signers file {signers} does not exist", hint)
    for rel in (APPROVERS, ALLOWED_SIGNERS):
        _require_committed(repo, rel, hint)
    return parse_policy(text, signers, str(path))


_POLICY_COPIES: list[tempfile.TemporaryDirectory[str]] = []


def load_policy_at(repo: Path, revision: str) -> Policy:
    """The approval policy as committed in ``revision`` (e.g. a release tag): its
    approvers.yml, and its allowed_signers copied to a temporary file for ssh-keygen."""
    hint = "see docs/change-manager.md, section 'Which approval policy counts'"
    blobs: dict[Path, bytes] = {}
    for rel in (APPROVERS, ALLOWED_SIGNERS):
        proc = subprocess.run(["git", "-C", str(repo), "show", f"{revision}:{rel.as_posix()}"],
                              capture_output=True, check=False)
        if proc.returncode != 0:
            raise ApprovalError(f"{rel} does not exist in {revision}", hint)
        blobs[rel] = proc.stdout
    copy = tempfile.TemporaryDirectory(prefix="safemail-policy-")
    _POLICY_COPIES.append(copy)  # lives as long as the process: Policy names the file
    signers = Path(copy.name) / "allowed_signers"
    signers.write_bytes(blobs[ALLOWED_SIGNERS])
    return parse_policy(blobs[APPROVERS].decode("utf-8", "replace"), signers,
                        f"{revision}:{APPROVERS}")


def parse_policy(text: str, signers: Path, path: str) -> Policy:
    """Check an approvers.yml text against an allowed_signers file."""
    hint = f"see docs/change-manager.md, section 'Approvers'; fix {APPROVERS}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ApprovalError(f"cannot read {path}: {exc}", hint) from exc
    _reject_cert_authority(signers, hint)
    if not isinstance(data, Mapping) or not isinstance(data.get("roles"), Mapping):
        raise ApprovalError(f"{path}: expected a mapping with 'roles'", hint)
    problems: list[str] = []
    roles: dict[str, Role] = {}
    for name, body in data["roles"].items():
        if not isinstance(body, Mapping) or not isinstance(body.get("principals"), list):
            problems.append(f"role {name}: needs 'principals' (a list) and 'title'")
            continue
        roles[str(name)] = Role(
            str(name), str(body.get("title") or name), tuple(str(p) for p in body["principals"])
        )
    release_roles = tuple(str(r) for r in data.get("release_roles") or DEFAULT_ROLES)
    waiver_roles = tuple(str(r) for r in data.get("waiver_roles") or release_roles)
    releasing = str(data.get("releasing_role") or release_roles[0])
    for role in {*release_roles, *waiver_roles, releasing}:
        if role not in roles:
            problems.append(f"role {role} is required but not defined under 'roles'")
    if releasing not in release_roles:
        problems.append(f"releasing_role {releasing} is not one of release_roles")
    if len(set(release_roles)) != len(release_roles):
        problems.append("release_roles names the same role twice")
    max_days = data.get("waiver_max_days", DEFAULT_WAIVER_MAX_DAYS)
    if not isinstance(max_days, int) or isinstance(max_days, bool) or not 1 <= max_days <= 366:
        problems.append(f"waiver_max_days must be a number of days from 1 to 366, not {max_days!r}")
        max_days = DEFAULT_WAIVER_MAX_DAYS
    unknown = sorted(set(data) - {"roles", "release_roles", "waiver_roles", "releasing_role",
                                  "waiver_max_days"})
    if unknown:
        problems.append(f"unknown key(s): {', '.join(unknown)}")
    if problems:
        raise ApprovalError(f"{path} is invalid:\n  " + "\n  ".join(problems), hint)
    return Policy(roles, release_roles, waiver_roles, releasing, max_days, signers)


def _require_committed(repo: Path, rel: Path, hint: str) -> None:
    """The policy is what was reviewed: the working-tree file must equal HEAD's (an edit hidden
    from ``git status`` by skip-worktree or assume-unchanged included)."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), "show", f"HEAD:{rel.as_posix()}"],
            capture_output=True, check=False,
        )
    except FileNotFoundError:
        raise ApprovalError("git is not installed", "install git (apt-get install git)") from None
    if proc.returncode != 0:
        raise ApprovalError(f"{rel} is not committed: the approval policy is read only as "
                            "committed (reviewed like code)", hint)
    if proc.stdout != (repo / rel).read_bytes():
        raise ApprovalError(f"{rel} differs from the committed revision (HEAD): the approval "
                            "policy is used only as committed; commit or restore it", hint)


def _reject_cert_authority(signers: Path, hint: str) -> None:
    """A ``cert-authority`` line trusts every key the CA certifies: one key with two
    certificates would fill two roles (the signature names the certificate, not the person's
    key). Approvers are listed by their own keys only."""
    for number, raw in enumerate(signers.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # principals, then options, then the key: look at everything before the key type
        head = re.split(r"\s(?:ssh-|ecdsa-|sk-)", " " + line, maxsplit=1)[0]
        if re.search(r"(?:^|[\s,])cert-authority(?:[\s,=]|$)", head, re.IGNORECASE):
            raise ApprovalError(
                f"{ALLOWED_SIGNERS} line {number}: cert-authority lines are not accepted "
                "(list each approver's own key)", hint)


def release_message(report: Mapping[str, Any], report_digest: str) -> bytes:
    """The exact text an approver signs to release a report (ends with a newline)."""
    return (
        "SafeMail release approval\n"
        f"stage: {report.get('stage')}\n"
        f"revision: {report.get('revision', {}).get('commit')}\n"
        f"report-sha256: {report_digest}\n"
        f"verdict: {report.get('verdict')}\n"
        f"finished: {report.get('finished')}\n"
    ).encode()


def waiver_message(req_id: str, justification: str, granted: dt.date, expires: dt.date) -> bytes:
    """The exact text an approver signs to grant a waiver (ends with a newline)."""
    return (
        "SafeMail waiver approval\n"
        f"requirement: {req_id}\n"
        f"granted: {granted.isoformat()}\n"
        f"expires: {expires.isoformat()}\n"
        f"justification: {' '.join(justification.split())}\n"
    ).encode()


@dataclass(frozen=True)
class Signer:
    principal: str
    key_fingerprint: str
    role: str
    signature: str = field(repr=False, default="")
    label: str = ""


@dataclass
class Approval:
    """The outcome of checking signatures against the policy for a message."""

    signers: list[Signer] = field(default_factory=list)  # one per filled role
    problems: list[str] = field(default_factory=list)  # each unusable signature, each gap

    @property
    def complete(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return ", ".join(f"{s.role}: {s.principal} ({s.key_fingerprint})" for s in self.signers)


def _assign(
    candidates: Sequence[tuple[str, str, tuple[str, ...], str]], roles: Sequence[str],
    policy: Policy,
) -> list[Signer]:
    """Largest role assignment: each role one signature, every signature, principal and key at
    most once. ``candidates`` are (label, fingerprint, verified principals, armored)."""
    best: list[Signer] = []
    options: list[list[Signer | None]] = []
    for role in roles:
        allowed = set(policy.roles[role].principals)
        opts: list[Signer | None] = [
            Signer(p, fp, role, armored, label)
            for label, fp, principals, armored in candidates
            for p in principals
            if p in allowed
        ]
        options.append([*opts, None])
    for combo in itertools.product(*options):
        chosen = [s for s in combo if s is not None]
        if len({s.principal for s in chosen}) != len(chosen):
            continue
        if len({s.key_fingerprint for s in chosen}) != len(chosen):
            continue
        if len(chosen) > len(best):
            best = chosen
            if len(best) == len(roles):
                break
    return best


def check(
    policy: Policy,
    signatures: Mapping[str, str],
    message: bytes,
    namespace: str,
    roles: Sequence[str],
) -> Approval:
    """Which roles the signatures (label -> armored text) fill for ``message``; every problem."""
    result = Approval()
    candidates: list[tuple[str, str, tuple[str, ...], str]] = []
    role_principals = sorted({p for r in roles for p in policy.roles[r].principals})
    for label, armored in sorted(signatures.items()):
        try:
            info = signing.signature_info(armored)
        except signing.SigningError as exc:
            result.problems.append(f"signature {label}: {exc.message}")
            continue
        if info.namespace != namespace:
            result.problems.append(
                f"signature {label}: made for namespace {info.namespace!r}, not {namespace!r}"
            )
            continue
        # Every role holder whose allowed_signers line(s) validate this signature of this text
        # (a key listed under two names validates for both: the assignment below counts it
        # once). ssh-keygen -Y find-principals would name only the first matching line.
        valid = tuple(
            p for p in role_principals
            if signing.verify(policy.allowed_signers, p, namespace, armored, message)
        )
        if not valid:
            why = _why_not(policy, armored, namespace, message, info, roles)
            result.problems.append(f"signature {label}: {why}")
            continue
        candidates.append((label, info.key_fingerprint, valid, armored))
    result.signers = _assign(candidates, roles, policy)
    filled = {s.role for s in result.signers}
    missing = [r for r in roles if r not in filled]
    if missing:
        used = {s.label for s in result.signers}
        spare = [c for c in candidates if c[0] not in used]
        detail = ""
        if spare:
            detail = (
                f" (the signature(s) of {', '.join(p for c in spare for p in c[2])} cannot "
                "fill it: one person, one key, one role)"
            )
        titles = ", ".join(f"{policy.roles[r].title} ({r})" for r in missing)
        result.problems.append(f"no valid signature for the role(s) {titles}{detail}")
    return result


def _why_not(
    policy: Policy,
    armored: str,
    namespace: str,
    message: bytes,
    info: signing.SignatureInfo,
    roles: Sequence[str],
) -> str:
    """Why a signature fills no role: unknown key, a signer without a role, or another text."""
    principals = signing.find_principals(policy.allowed_signers, armored)
    if not principals:
        return f"key {info.key_fingerprint} is not in {ALLOWED_SIGNERS} (unknown signer)"
    if any(signing.verify(policy.allowed_signers, p, namespace, armored, message)
           for p in principals):
        return (f"{', '.join(principals)} holds none of the roles {', '.join(roles)} in "
                f"{APPROVERS}")
    return (f"by {', '.join(principals)}: does not match the text to approve (signed "
            "something else, or the report changed since)")


def read_signature_dir(directory: Path) -> dict[str, str]:
    """Every ``*.sig`` file of a directory, by file name."""
    if not directory.is_dir():
        return {}
    out: dict[str, str] = {}
    for path in sorted(directory.glob("*.sig")):
        try:
            out[path.name] = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            out[path.name] = f"unreadable: {exc}"
    return out
