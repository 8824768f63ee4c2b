"""Lab-wide settings: where the lab keeps its state, its images and its names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Every namespace, machine and unit the lab creates carries this prefix; `lab down`
# removes only names with it (and only those its state file lists, plus crash remains).
PREFIX = "smlab"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("SAFEMAIL_DEBIAN_MIRROR", "http://deb.debian.org/debian")


@dataclass(frozen=True)
class LabPaths:
    state: Path
    images: Path

    @classmethod
    def default(cls) -> LabPaths:
        return cls(
            state=Path(os.environ.get("SAFEMAIL_LAB_DIR", "/var/lib/safemail-lab")),
            images=Path(os.environ.get("SAFEMAIL_IMAGE_DIR", "/var/cache/safemail/images")),
        )

    @property
    def state_file(self) -> Path:
        return self.state / "state.json"

    @property
    def ssh_dir(self) -> Path:
        return self.state / "ssh"

    @property
    def key_file(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def machines(self) -> Path:
        return self.state / "machines"

    @property
    def mirror(self) -> Path:
        return self.state / "mirror"

    @property
    def logs(self) -> Path:
        return self.state / "logs"
