"""What exactly was tested: git revision, dirty flag, content hash and inventory hash.

- content hash: sha256 over the committed (git-tracked) files that decide what gets deployed
  and how it is verified: roles/, playbooks/, inventories/<stage>/, inventories/production/
  (what promote deploys to), ansible.cfg, requirements.yml, verify/. Files are hashed from
  the working tree, sorted by path; the per-file map is kept so the gate can name the files
  that changed.
- inventory hash: sha256 over every file under inventories/<stage>/ on disk, tracked or not
  (the lab writes its generated host addresses there). It says which machines were tested.

Both hashes are "sha256:<hex>" strings. The per-file map holds bare hex digests.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safemail.errors import SafeMailError
from safemail.project import Project

CONTENT_PATHS: tuple[str, ...] = (
    "roles",
    "playbooks",
    "ansible.cfg",
    "requirements.yml",
    "verify",
)

_SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}

# Where a git-ignored file (.gitignore, .git/info/exclude) would change what is deployed or how
# it is verified: the deployable dirs, and the root files pytest reads before verify/ (a root
# conftest.py or pytest.ini is loaded by the verify run). Ignored files there make the checkout
# dirty, except the caches below: the list of allowed ignored patterns is kept explicit and small.
IGNORED_CHECKED: tuple[str, ...] = (
    "roles",
    "playbooks",
    "verify",
    "src",
    "inventories/production",
    "conftest.py",
    "pytest.ini",
    ".pytest.ini",
    "tox.ini",
    "setup.cfg",
)
ALLOWED_IGNORED = "__pycache__/, *.pyc, .pytest_cache/, src/*.egg-info/ (the editable install's)"


class GitError(SafeMailError):
    """git is missing or the directory is not a SafeMail checkout."""


def _git(repo: Path, *args: str) -> str:
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise GitError("git is not installed", "install git (apt-get install git)") from None
    if proc.returncode != 0:
        raise GitError(
            f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip() or proc.returncode}",
            "run safemail inside the SafeMail git checkout",
        )
    return proc.stdout


def git_revision(repo: Path) -> str:
    return _git(repo, "rev-parse", "HEAD").strip()


def _allowed_ignored(path: str) -> bool:
    """The caches that may lie ignored in the checked paths (see ALLOWED_IGNORED)."""
    parts = path.rstrip("/").split("/")
    if "__pycache__" in parts or ".pytest_cache" in parts or path.endswith(".pyc"):
        return True
    return len(parts) >= 2 and parts[0] == "src" and parts[1].endswith(".egg-info")


def _status_paths(out: str) -> list[tuple[str, str]]:
    """(status, path) of ``git status --porcelain=v1 -z`` output."""
    found: list[tuple[str, str]] = []
    entries = out.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        status, path = entry[:2], entry[3:]
        if status[0] in "RC":
            i += 1  # the next field is the rename source
        found.append((status, path))
    return found


def hidden_from_status(repo: Path) -> list[str]:
    """Tracked files git is told not to look at: assume-unchanged (``git ls-files -v`` tag in
    lower case) or skip-worktree (tag ``S``). Their edits never show in ``git status``."""
    out = _git(repo, "ls-files", "-v", "-z")
    return [
        entry[2:]
        for entry in out.split("\0")
        if len(entry) > 2 and (entry[0].islower() or entry[0] == "S")
    ]


def ignored_files(repo: Path) -> list[str]:
    """Git-ignored files under IGNORED_CHECKED, apart from the allowed caches."""
    out = _git(
        repo, "status", "--porcelain=v1", "-z", "--ignored=matching", "--untracked-files=all",
        "--", *IGNORED_CHECKED,
    )
    return [p for s, p in _status_paths(out) if s == "!!" and not _allowed_ignored(p)]


def git_dirty_files(repo: Path) -> list[str]:
    """Paths with uncommitted changes, including untracked files that git does not ignore,
    tracked files hidden from ``git status`` (skip-worktree, assume-unchanged) and ignored files
    where they would change the deployment or the verify run (IGNORED_CHECKED)."""
    out = _git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    paths = {p for s, p in _status_paths(out) if s != "!!"}
    paths.update(f"{p} (hidden from git status by skip-worktree or assume-unchanged)"
                 for p in hidden_from_status(repo))
    paths.update(f"{p} (git-ignored)" for p in ignored_files(repo))
    return sorted(paths)


def git_dirty(repo: Path) -> bool:
    return bool(git_dirty_files(repo))


def content_paths(stage: str) -> tuple[str, ...]:
    """The deployable content: the stage's inventory and production's (what promote deploys)."""
    return tuple(dict.fromkeys((*CONTENT_PATHS, f"inventories/{stage}", "inventories/production")))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def combine(files: Mapping[str, str]) -> str:
    """One hash over a path -> digest map, independent of insertion order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.encode("utf-8") + b"\0" + files[path].encode("ascii") + b"\n")
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class ContentHash:
    digest: str
    files: dict[str, str] = field(default_factory=dict)


def content_hash(repo: Path, stage: str, paths: Sequence[str] | None = None) -> ContentHash:
    """Hash the git-tracked files under the deploy-relevant paths (working-tree content).

    A tracked file deleted from the working tree is recorded as "deleted".
    """
    selected = list(paths) if paths is not None else list(content_paths(stage))
    listing = _git(repo, "ls-files", "-z", "--", *selected)
    files: dict[str, str] = {}
    for rel in sorted(p for p in listing.split("\0") if p):
        full = repo / rel
        if full.is_symlink():
            files[rel] = hashlib.sha256(str(full.readlink()).encode()).hexdigest()
        elif full.is_file():
            files[rel] = _file_digest(full)
        else:
            files[rel] = "deleted"
    return ContentHash(digest=combine(files), files=files)


def inventory_hash(repo: Path, stage: str) -> str:
    """Hash every file under inventories/<stage>/ on disk (generated files included)."""
    root = Project(repo).inventory(stage)
    if not root.is_dir():
        raise SafeMailError(
            f"inventory {root} does not exist",
            "for the test stage run `safemail lab up` first",
        )
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or _SKIP_PARTS.intersection(path.parts):
            continue
        files[path.relative_to(repo).as_posix()] = _file_digest(path)
    return combine(files)


def diff_files(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, list[str]]:
    """Changed, added and removed paths between two per-file maps."""
    return {
        "changed": sorted(p for p in old.keys() & new.keys() if old[p] != new[p]),
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
    }
