"""The project checkout: where its roles, playbooks, inventories and reports are.

Every controller command works on one checkout. :class:`Project` finds it once (the only way
the code looks for it) and names its paths, so no module builds ``repo / "inventories" / stage``
by hand and a stage name is checked in one place.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from safemail.errors import SafeMailError, UsageError

# The stages the checkout has an inventory for: the lab, then the real service.
STAGES: tuple[str, ...] = ("test", "production")
ENV_VAR = "SAFEMAIL_PROJECT"


def _is_checkout(path: Path) -> bool:
    return (path / "ansible.cfg").is_file() and (path / "inventories").is_dir()


@dataclass(frozen=True)
class Project:
    """One checkout (``root`` holds ansible.cfg and inventories/)."""

    root: Path

    @classmethod
    def find(cls, start: Path | None = None) -> Project:
        """The checkout to work on.

        ``start`` if given (it or a parent must be a checkout), else $SAFEMAIL_PROJECT, else the
        nearest parent of the working directory that holds ansible.cfg and inventories/.
        Nothing else: a command run from the wrong directory refuses, it never acts on some
        other checkout (the one this package was installed from, say).
        """
        if start is not None:
            candidates = [start.resolve(), *start.resolve().parents]
        else:
            env = os.environ.get(ENV_VAR)
            candidates = [Path(env)] if env else []
            cwd = Path.cwd().resolve()
            candidates += [cwd, *cwd.parents]
        for candidate in candidates:
            if _is_checkout(candidate):
                return cls(candidate)
        raise SafeMailError(
            "cannot find the SafeMail checkout (ansible.cfg and inventories/)",
            hint=f"run safemail from inside the checkout or set {ENV_VAR}",
        )

    def inventory(self, stage: str) -> Path:
        """inventories/<stage>; an unknown stage is a usage error."""
        check_stage(stage)
        return self.root / "inventories" / stage

    def inventory_name(self, stage: str) -> str:
        """``inventories/<stage>`` as shown to people (relative, stable across machines)."""
        check_stage(stage)
        return f"inventories/{stage}"

    def playbook(self, name: str) -> Path:
        """playbooks/<name> (``site.yml``, ``patch.yml``, ...)."""
        return self.root / "playbooks" / name

    @property
    def roles(self) -> Path:
        return self.root / "roles"

    def revision(self) -> str | None:
        """The checked-out git commit, or None outside a git checkout (or without git)."""
        try:
            proc = subprocess.run(["git", "-C", str(self.root), "rev-parse", "--verify", "HEAD"],
                                  capture_output=True, text=True, check=False, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    def path(self, path: Path) -> Path:
        """A path given on the command line: absolute as given, else inside the checkout."""
        return path if path.is_absolute() else self.root / path


def check_stage(stage: str) -> str:
    """``stage`` if it is one of :data:`STAGES`, else a usage error naming them."""
    if stage not in STAGES:
        raise UsageError(f"unknown stage {stage!r}", f"use one of {', '.join(STAGES)}")
    return stage


def project_root() -> Path:
    """The root of :meth:`Project.find` (for callers that need only the directory)."""
    return Project.find().root
