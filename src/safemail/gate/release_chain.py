"""Which approval policy counts for a release: the one of the previous release.

A change to ``release/`` (a new key in ``allowed_signers``, a new principal in
``approvers.yml``) must not approve its own release. The policy that counts is the one
committed in the tree of the newest release tag (``release/production/<time>``): the people
who approved the last release approve the next one, including any change to who they are.

The tags themselves are checked as a chain, oldest first: each tag must be an annotated tag
on the revision its signed text names, carrying the signatures of every release role of the
policy that counted for it (the previous tag's tree; for the first tag, its own tree). A tag
made by hand (or a copied message on another revision) breaks the chain, and the gate refuses
until it is removed. Each tag also follows the one before it: its revision descends from (or
is) the previous tag's, and its signed time (``finished:`` of the signed text) is later, unless
it carries the very same signed text (a re-release of the same report). So an old approval
copied under a newer tag name cannot roll the policy back.

The root of the chain is pinned: after the first release, ``release/first-release.yml``
(written by ``promote --first-release`` after the deployment, committed by the operator) names
the first tag and its revision. Once any commit of any ref has that file, ``--first-release``
is refused, the oldest tag must be the pinned one, and the file may never change or be
deleted. Release tags without a committed pin refuse every release of another revision than
the first one. With no release tag and no pin, only an explicit first release may use the
released revision's own policy. docs/change-manager.md, "Which approval policy counts".
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from safemail.errors import SafeMailError
from safemail.gate import approvals, signing

TAG_PREFIX = "release/production/"
FIRST_RELEASE = "first release: release/ of the released revision itself (no earlier release tag)"
_ARMORED = re.compile(
    re.escape(signing.ARMOR_BEGIN) + r".*?" + re.escape(signing.ARMOR_END), re.DOTALL
)


PIN = Path("release") / "first-release.yml"
FETCH_HINT = ("(a release tag made outside `safemail promote`, or one of the chain deleted: "
              "restore the tags from the shared repository with git fetch --tags)")


@dataclass(frozen=True)
class Link:
    """One release of the chain (or the release being decided): what its approvers signed."""

    name: str
    commit: str
    text: bytes

    @property
    def finished(self) -> dt.datetime | None:
        for line in self.text.decode("utf-8", "replace").splitlines():
            if line.startswith("finished: "):
                try:
                    when = dt.datetime.fromisoformat(line.split(": ", 1)[1].strip())
                except ValueError:
                    return None
                return when if when.tzinfo is not None else None  # UTC as verify writes it
        return None


@dataclass(frozen=True)
class Pin:
    tag: str
    commit: str


@dataclass(frozen=True)
class Base:
    """The policy that approves the next release, and where it comes from."""

    policy: approvals.Policy | None
    source: str  # "release/production/<time> (<commit>)", FIRST_RELEASE, or "" (none)
    problem: str | None = None
    newest: Link | None = None  # the newest release tag (the next release must follow it)
    pin: Pin | None = None


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
    problem, _link = _check_tag(repo, name, policy)
    return problem


def _check_tag(repo: Path, name: str, policy: approvals.Policy) -> tuple[str | None, Link | None]:
    try:
        target, message = _tag_record(repo, name)
    except SafeMailError as exc:
        return exc.message, None
    text = signed_text(message)
    if text is None:
        return f"release tag {name} carries no signed release text", None
    revision = next((line.split(": ", 1)[1] for line in text.decode().splitlines()
                     if line.startswith("revision: ")), None)
    if revision != target:
        return (f"release tag {name} is on {target[:12]}, but its signed text is for "
                f"revision {str(revision)[:12]}"), None
    signatures = {f"{name}#{n}": block for n, block in enumerate(_ARMORED.findall(message))}
    result = approvals.check(policy, signatures, text, approvals.RELEASE_NAMESPACE,
                             policy.release_roles)
    if not result.complete:
        return (f"release tag {name} is not approved by the policy that counted for it: "
                + "; ".join(result.problems)), None
    return None, Link(name, target, text)


def follows(repo: Path, previous: Link, link: Link) -> str | None:
    """Why ``link`` cannot come after ``previous`` in the chain (None if it can): its revision
    must descend from (or be) the previous one, and its signed time must be later, unless it
    is the very same signed text (a re-release of the same report, same tree)."""
    if link.text == previous.text:
        return None
    if link.commit != previous.commit and _git(
        repo, "merge-base", "--is-ancestor", previous.commit, link.commit
    ).returncode != 0:
        return (f"{link.name} is on {link.commit[:12]}, which does not descend from "
                f"{previous.commit[:12]} of the release before it ({previous.name}): an "
                "older revision cannot follow a newer release (revert on top instead)")
    before, after = previous.finished, link.finished
    if before is None or after is None or after <= before:
        return (f"{link.name} was signed for a report finished at "
                f"{after.isoformat() if after else 'an unreadable time'}, not later than the "
                f"report of the release before it ({previous.name}, "
                f"{before.isoformat() if before else 'unreadable'}): an older approval "
                "cannot follow a newer release")
    return None


def read_pin(repo: Path) -> tuple[Pin | None, str | None]:
    """The pinned first release as every ref's history has it: (pin, problem). The file must
    never change or be deleted once committed (any commit of any ref)."""
    log = _git(repo, "log", "--all", "--full-history", "--format=%H", "--", PIN.as_posix())
    commits = log.stdout.split()
    if not commits:
        return None, None
    blobs: dict[str, str] = {}
    for commit in commits:
        blob = _git(repo, "rev-parse", "-q", "--verify", f"{commit}:{PIN.as_posix()}")
        if blob.returncode != 0:
            return None, (f"commit {commit[:12]} deletes {PIN}, the pin of the first release: "
                          "it may never be deleted (revert that commit)")
        blobs.setdefault(blob.stdout.strip(), commit)
    if len(blobs) > 1:
        changed = ", ".join(c[:12] for c in blobs.values())
        return None, (f"{PIN}, the pin of the first release, differs between commits "
                      f"({changed}): it may never change once committed")
    text = _git(repo, "cat-file", "blob", next(iter(blobs))).stdout
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    tag = data.get("tag") if isinstance(data, dict) else None
    commit = data.get("commit") if isinstance(data, dict) else None
    if not (isinstance(tag, str) and tag.startswith(TAG_PREFIX) and isinstance(commit, str)
            and re.fullmatch(r"[0-9a-f]{40}", commit)):
        return None, (f"{PIN} must say `tag: {TAG_PREFIX}<time>` and `commit: <40 hex>` "
                      "(as `safemail promote --first-release` wrote it)")
    return Pin(tag, commit), None


def pin_text(tag: str, commit: str) -> str:
    return (
        "# The first release: the root of the approval chain (docs/change-manager.md,\n"
        "# 'Which approval policy counts'). Written by `safemail promote --first-release`;\n"
        "# commit it and never change or delete it.\n"
        f"tag: {tag}\ncommit: {commit}\n"
    )


def write_pin(repo: Path, tag: str, commit: str) -> Path:
    path = repo / PIN
    path.write_text(pin_text(tag, commit), encoding="utf-8")
    return path


def base_policy(repo: Path) -> Base:
    """The policy of the newest release tag, after checking every tag as a chain; or no
    policy (source "") when there is no release tag."""
    pin, pin_problem = read_pin(repo)
    if pin_problem:
        return Base(None, "", pin_problem)
    tags = release_tags(repo)
    if not tags:
        if pin:
            return Base(None, "", (
                f"{PIN} pins the first release {pin.tag} ({pin.commit[:12]}), but there is no "
                "release tag: this repository has been released before (--first-release is "
                "not possible again); fetch the tags of the shared repository (git fetch "
                "--tags)"), pin=pin)
        return Base(None, "")
    counted: approvals.Policy | None = None
    previous: Link | None = None
    for name in tags:
        try:
            own = approvals.load_policy_at(repo, f"refs/tags/{name}^{{commit}}")
        except SafeMailError as exc:
            return Base(None, name, f"release tag {name}: {exc.message}")
        problem, link = _check_tag(repo, name, counted or own)
        if not problem and link is not None and previous is None and pin and (
                name != pin.tag or link.commit != pin.commit):
            problem = (f"the oldest release tag {name} ({link.commit[:12]}) is not the first "
                       f"release {PIN} pins ({pin.tag}, {pin.commit[:12]})")
        if not problem and link is not None and previous is not None:
            problem = follows(repo, previous, link)
        if problem or link is None:
            return Base(None, name, f"{problem} {FETCH_HINT}")
        counted, previous = own, link
    assert previous is not None
    return Base(counted, f"{previous.name} ({previous.commit[:12]})", newest=previous, pin=pin)


def pin_problem(repo: Path, base: Base, revision: str) -> str | None:
    """Release tags exist but no commit pins the first one: only the first release's own
    revision may be released again (a failed first deployment); anything else needs the pin."""
    if base.pin is not None or base.newest is None:
        return None
    first = release_tags(repo)[0]
    commit = _git(repo, "rev-parse", f"refs/tags/{first}^{{commit}}").stdout.strip()
    if revision == commit:
        return None
    return (f"there are release tags, but no commit pins the first release in {PIN}: check "
            f"that {first} is this repository's first release, then commit the file with "
            f"`tag: {first}` and `commit: {commit}` (safemail promote --first-release writes "
            "it after a successful deployment) and verify that revision")


def counting_policy(repo: Path) -> approvals.Policy:
    """The policy that signs now (approval requests, status, waivers): the newest release
    tag's; before the first release, the checkout's committed one."""
    base = base_policy(repo)
    head = _git(repo, "rev-parse", "HEAD").stdout.strip()
    problem = base.problem or pin_problem(repo, base, head)
    if problem:
        raise SafeMailError(problem)
    return base.policy or approvals.load_policy(repo)
