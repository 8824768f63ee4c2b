"""Where the project checkout is: roles, playbooks, inventories, verify."""

from __future__ import annotations

import os
from pathlib import Path

from safemail.errors import SafeMailError


def project_root() -> Path:
    """The checkout holding ansible.cfg and inventories/.

    Taken from $SAFEMAIL_PROJECT, else the nearest parent of the working directory that holds
    both, else the checkout this package was installed from (editable install).
    """
    env = os.environ.get("SAFEMAIL_PROJECT")
    candidates = [Path(env)] if env else []
    cwd = Path.cwd().resolve()
    candidates += [cwd, *cwd.parents]
    candidates.append(Path(__file__).resolve().parents[2])
    for c in candidates:
        if (c / "ansible.cfg").is_file() and (c / "inventories").is_dir():
            return c
    raise SafeMailError("cannot find the SafeMail checkout (ansible.cfg and inventories/)",
                        hint="run safemail from inside the checkout or set SAFEMAIL_PROJECT")
