"""Which approval policy counts for a release: the one of the previous release.

A change to ``release/`` (a new key in ``allowed_signers``, a new principal in
``approvers.yml``) must not approve its own release. The policy that counts is the one
committed in the tree of the newest release tag (``release/production/<time>``): the people
who approved the last release approve the next one, including any change to who they are.

The tags themselves are checked as a chain, oldest first: each tag must be an annotated tag
on the revision its signed text names, carrying the signatures of every release role of the
policy that counted for it (the previous tag's tree; for the first tag, its own tree). A tag
made by hand (or a copied message on another revision) breaks the chain, and the gate refuses
until it is removed. With no release tag at all, only an explicit first release
(``promote --first-release``) may use the released revision's own policy; the tag it makes
says so. docs/change-manager.md, "Which approval policy counts".
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from safemail.errors import SafeMailError
from safemail.gate import approvals, signing

TAG_PREFIX = "release/production/"
FIRST_RELEASE = "first release: release/ of the released revision itself (no earlier release tag)"
_ARMORED = re.compile(
    re.escape(signing.ARMOR_BEGIN) + r".*?" + re.escape(signing.ARMOR_END), re.DOTALL
)


@dataclass(frozen=True)
class Base:
    """The policy that approves the next release, and where it comes from."""

    policy: approvals.Policy | None
    source: str  # "release/production/<time> (<commit>)", FIRST_RELEASE, or "" (none)
    problem: str | None = None


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=False)


def _order(name: str) -> tuple[str, int]:
    stamp, _, n = name[len(TAG_PREFIX):].partition("-")
    return stamp, int(n) if n.isdigit() else 1


def release_tags(repo: Path) -> list[str]:
    """Every release tag, oldest first (by the time in its name, then its -N suffix)."""
    proc = _git(repo, "tag", "--list", f"{TAG_PREFIX}*")
    return sorted((t for t in proc.stdout.split() if t), key=_order)


def _tag_record(repo: Path, name: str) -> tuple[str, str]:
    """(target commit, message) of an annotated tag; SafeMailError for anything else."""
    kind = _git(repo, "cat-file", "-t", f"refs/tags/{name}").stdout.strip()
    if kind != "tag":
        raise SafeMailError(f"release tag {name} is not an annotated tag ({kind or 'missing'})")
    raw = _git(repo, "cat-file", "tag", f"refs/tags/{name}").stdout
    header, _, message = raw.partition("\n\n")
    fields = dict(line.split(" ", 1) for line in header.splitlines() if " " in line)
    if fields.get("type") != "commit" or not fields.get("object"):
        raise SafeMailError(f"release tag {name} does not point at a commit")
    return fields["object"], message


def signed_text(message: str) -> bytes | None:
    """The release text the approvers signed, as a tag message carries it."""
    lines = message.splitlines()
    try:
        start = lines.index("SafeMail release approval")
    except ValueError:
        return None
    end = start
    while end < len(lines) and lines[end].strip():
        end += 1
    return ("\n".join(lines[start:end]) + "\n").encode()


def check_tag(repo: Path, name: str, policy: approvals.Policy) -> str | None:
    """Why tag ``name`` is not a release that ``policy`` approved (None if it is)."""
    try:
        target, message = _tag_record(repo, name)
    except SafeMailError as exc:
        return exc.message
    text = signed_text(message)
    if text is None:
        return f"release tag {name} carries no signed release text"
    revision = next((line.split(": ", 1)[1] for line in text.decode().splitlines()
                     if line.startswith("revision: ")), None)
    if revision != target:
        return (f"release tag {name} is on {target[:12]}, but its signed text is for "
                f"revision {str(revision)[:12]}")
    signatures = {f"{name}#{n}": block for n, block in enumerate(_ARMORED.findall(message))}
    result = approvals.check(policy, signatures, text, approvals.RELEASE_NAMESPACE,
                             policy.release_roles)
    if not result.complete:
        return (f"release tag {name} is not approved by the policy that counted for it: "
                + "; ".join(result.problems))
    return None


def base_policy(repo: Path) -> Base:
    """The policy of the newest release tag, after checking every tag as a chain; or no
    policy (source "") when there is no release tag."""
    tags = release_tags(repo)
    if not tags:
        return Base(None, "")
    counted: approvals.Policy | None = None
    for name in tags:
        try:
            own = approvals.load_policy_at(repo, f"refs/tags/{name}^{{commit}}")
        except SafeMailError as exc:
            return Base(None, name, f"release tag {name}: {exc.message}")
        problem = check_tag(repo, name, counted or own)
        if problem:
            return Base(None, name, problem + " (a release tag made outside `safemail "
                        "promote`, or one of the chain deleted: restore the tags from the "
                        "shared repository with git fetch --tags)")
        counted = own
    newest = tags[-1]
    target = _git(repo, "rev-parse", f"refs/tags/{newest}^{{commit}}").stdout.strip()
    return Base(counted, f"{newest} ({target[:12]})")


def counting_policy(repo: Path) -> approvals.Policy:
    """The policy that signs now (approval requests, status, waivers): the newest release
    tag's; before the first release, the checkout's committed one."""
    base = base_policy(repo)
    if base.problem:
        raise SafeMailError(base.problem)
    return base.policy or approvals.load_policy(repo)
