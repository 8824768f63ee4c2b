"""Promote's release steps: from the gate's decision to a deployed, recorded release.

``safemail promote`` (gate/cli.py) parses its options into :class:`ReleaseOptions` and calls
:func:`promote_release`; this module does the rest, in this order:

1. ask the gate (:func:`promote.evaluate`) and report its decision;
2. ``--preview``: run the production playbook with ``--check --diff`` (nothing recorded);
3. refused: exit code 3; ``--dry-run``: name the operator, change nothing;
4. tag the release (:func:`promote.tag_release`), append it to the release log;
5. run ``ansible-playbook -i inventories/<stage> playbooks/site.yml``, log how it ended;
6. the first release: write the pin ``release/first-release.yml``.

What the operator reads is handed to ``say`` line by line, in the order of the steps (each
line before the step that may take long or fail), so the CLI decides where it goes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safemail import ansible, vault
from safemail.errors import SafeMailError
from safemail.gate import promote, release_chain
from safemail.gate.report import load_report
from safemail.project import Project

EXIT_REFUSED = 3

Say = Callable[[str], None]


@dataclass(frozen=True)
class ReleaseOptions:
    """What ``safemail promote`` was asked to do (paths relative to the checkout or absolute)."""

    target: str = "production"
    report: Path = promote.DEFAULT_REPORT
    release_log: Path = promote.DEFAULT_RELEASE_LOG
    max_age_hours: float = promote.DEFAULT_MAX_AGE_HOURS
    first_release: bool = False
    dry_run: bool = False
    preview: bool = False
    limit: str | None = None
    vault_ids: tuple[str, ...] = ()
    vault_password_file: str | None = None
    ask_vault_pass: bool = False


def _in_repo(repo: Path, path: Path) -> Path:
    return path if path.is_absolute() else repo / path


def vault_env(opts: ReleaseOptions) -> dict[str, str]:
    """The vault options given, as Ansible's variables, for the gate's look into the vault."""
    env: dict[str, str] = {}
    if opts.vault_ids:
        env["ANSIBLE_VAULT_IDENTITY_LIST"] = ",".join(opts.vault_ids)
    if opts.vault_password_file:
        env["ANSIBLE_VAULT_PASSWORD_FILE"] = opts.vault_password_file
    return env


def playbook_options(opts: ReleaseOptions) -> list[str]:
    """Options passed through to ansible-playbook (limit and vault)."""
    out: list[str] = []
    if opts.limit:
        out += ["--limit", opts.limit]
    for vault_id in opts.vault_ids:
        out += ["--vault-id", vault_id]
    if opts.vault_password_file:
        out += ["--vault-password-file", opts.vault_password_file]
    if opts.ask_vault_pass:
        out.append("--ask-vault-pass")
    return out


def deploy_command(repo: Path, opts: ReleaseOptions) -> tuple[list[str], tuple[Path, Path]]:
    """The ansible-playbook command line of the deployment, and the files it needs."""
    project = Project(repo)
    inventory = project.inventory(opts.target)
    playbook = project.playbook("site.yml")
    options = playbook_options(opts)
    if not any(o in options for o in ("--vault-id", "--vault-password-file", "--ask-vault-pass")):
        options += vault.vault_args(repo, inventory)  # an encrypted vault.yml: its client
    cmd = [ansible.command("ansible-playbook"), "-i", str(inventory), str(playbook), *options]
    return cmd, (inventory, playbook)


def _require(paths: tuple[Path, ...], hint: str) -> None:
    for needed in paths:
        if not needed.exists():
            raise SafeMailError(f"{needed} does not exist", hint)


def promote_release(repo: Path, opts: ReleaseOptions, say: Say = print) -> int:
    """The whole ``safemail promote``; its exit code (docs/change-manager.md).

    0 released (or dry run allowed), 3 refused; ``--preview``: ansible-playbook's exit code.
    A failed deployment raises :class:`SafeMailError` after recording it (exit code 1).
    """
    report_path = _in_repo(repo, opts.report)
    decision = promote.evaluate(repo, report_path, max_age_hours=opts.max_age_hours,
                                first_release=opts.first_release, vault_env=vault_env(opts))
    say(decision.summary())
    cmd, needed = deploy_command(repo, opts)
    if opts.preview:
        _require(needed, "nothing to preview yet")
        cmd += ["--check", "--diff"]
        say("preview (check mode, nothing changes, nothing is recorded): " + " ".join(cmd))
        return ansible.run(cmd, repo, echo=False)
    if not decision.allowed:
        return EXIT_REFUSED
    if opts.dry_run:
        say(f"operator (the releasing approver, from the signature): {decision.operator}")
        say("dry run: nothing recorded, nothing deployed")
        return 0
    _require(needed, "nothing to deploy yet")
    report = load_report(report_path)
    now = dt.datetime.now(dt.UTC)
    tag = promote.tag_release(repo, decision, report, now)
    say(f"release tagged {tag} (operator {decision.operator}); publish it: "
        f"git push origin {tag}")
    log = _in_repo(repo, opts.release_log)
    state = promote.current_state(repo)
    common = {
        "operator": decision.operator or "unknown",
        "revision": decision.revision or state.revision,
        "report_digest": decision.report_digest or "",
        "stage": opts.target,
        "report_path": str(report_path),
        "content_hash": state.content_hash,
    }
    approvers = [f"{s.role}: {s.principal} {s.key_fingerprint}" for s in decision.approvers]
    promote.append_release_log(
        log, **common, extra={"tested_on": promote.TESTED_STAGE, "tag": tag,
                               "approvers": approvers}, when=now
    )
    say(f"release recorded in {log}")
    say("running: " + " ".join(cmd))
    rc = ansible.run(cmd, repo, echo=False)
    promote.append_release_log(
        log, **common, event="deploy-finished", extra={"exit_code": rc, "tag": tag}
    )
    if rc != 0:
        raise SafeMailError(
            f"ansible-playbook failed with exit code {rc}; the release is recorded as failed",
            "fix the cause, verify again on the test stage, then promote again",
        )
    say("deployed to production")
    if decision.policy_source == release_chain.FIRST_RELEASE:
        pin = release_chain.write_pin(repo, tag, decision.revision or state.revision)
        say(f"first release pinned in {pin}: commit it and push it with the tag, before the "
            f"next release:\n  git add {release_chain.PIN} && git commit -m 'release: pin "
            f"the first release {tag}' && git push origin HEAD {tag}")
    return 0
