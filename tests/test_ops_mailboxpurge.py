"""The store's deletion of removed participants' mailboxes (safemail.ops.mailboxpurge)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from safemail.ops import mailboxpurge as mp

NOW = dt.datetime(2026, 12, 6, 3, 0, tzinfo=dt.UTC)


KEEP = 30


def _marker(root: Path, mailbox: str, delete_after: dt.datetime) -> Path:
    """A marker whose keeping period (KEEP days) ends at ``delete_after``."""
    d = root / mp.MARKER_DIR
    d.mkdir(exist_ok=True)
    path = d / f"{mailbox}.json"
    removed = delete_after - dt.timedelta(days=KEEP)
    path.write_text(json.dumps({"mailbox": mailbox,
                                "removed_at": removed.strftime("%Y-%m-%dT%H:%M:%SZ")}))
    return path


def _config(tmp_path: Path, root: Path, keep: object = KEEP) -> str:
    cfg = tmp_path / "purge.json"
    cfg.write_text(json.dumps({"mail_root": str(root), "keep_days": keep}))
    return str(cfg)


def _mailbox(root: Path, mailbox: str) -> Path:
    local, _, domain = mailbox.partition("@")
    home = root / domain / local / "Maildir" / "cur"
    home.mkdir(parents=True)
    (home / "1.msg").write_text("x")
    return root / domain / local


@pytest.mark.parametrize("bad", ["../etc@x.example", "a/b@x.example", "a@..", "a@x",
                                 "@x.example", "a", "a@x.example/..", ".a@x.example"])
def test_mailbox_home_refuses_what_could_leave_the_root(bad: str) -> None:
    with pytest.raises(mp.MarkerError):
        mp.mailbox_home(Path("/m"), bad)


def test_mailbox_home_is_dovecots_lower_case_home() -> None:
    assert mp.mailbox_home(Path("/m"), "Praxis.Mueller@SafeMail.Example") == Path(
        "/m/safemail.example/praxis.mueller")


def test_marker_name_must_match_its_mailbox(tmp_path: Path) -> None:
    text = json.dumps({"mailbox": "a@x.example", "removed_at": "2026-01-01T00:00:00Z"})
    assert mp.parse_marker(tmp_path / "a@x.example.json", text).mailbox == "a@x.example"
    with pytest.raises(mp.MarkerError, match="does not match"):
        mp.parse_marker(tmp_path / "b@x.example.json", text)
    with pytest.raises(mp.MarkerError, match="time zone"):
        mp.parse_marker(tmp_path / "a@x.example.json", text.replace("00Z", "00"))


def test_due_mailbox_deleted_waiting_and_readded_kept(tmp_path: Path) -> None:
    due = _mailbox(tmp_path, "due@x.example")
    wait = _mailbox(tmp_path, "wait@x.example")
    back = _mailbox(tmp_path, "back@x.example")
    other = _mailbox(tmp_path, "other@x.example")
    m_due = _marker(tmp_path, "due@x.example", NOW - dt.timedelta(seconds=1))
    m_wait = _marker(tmp_path, "wait@x.example", NOW + dt.timedelta(days=1))
    m_back = _marker(tmp_path, "back@x.example", NOW - dt.timedelta(days=3))
    lines: list[str] = []
    rc = mp.run(tmp_path, NOW, KEEP, lambda mb: mb == "back@x.example", lines.append)
    assert rc == 0
    assert not due.exists() and not m_due.exists()
    assert wait.exists() and m_wait.exists()
    assert back.exists() and not m_back.exists()  # re-added: kept, marker dropped
    assert other.exists()
    assert lines == ["mailbox purge: deleted=1 kept_readded=1 waiting=1 unknown=0 problems=0"]
    assert "x.example" not in lines[0]  # no address in the log


def test_time_moved_forward_deletes_the_waiting_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(mp, "_doveadm_user", lambda mailbox: False)
    wait = _mailbox(tmp_path, "wait@x.example")
    _marker(tmp_path, "wait@x.example", NOW + dt.timedelta(days=30))
    cfg = _config(tmp_path, tmp_path)
    assert mp.main(["--config", cfg, "--no-syslog", "--now", "2026-12-20T00:00:00Z"]) == 0
    assert wait.exists()
    assert mp.main(["--config", cfg, "--no-syslog", "--now", "2027-01-05T03:00:00Z"]) == 0
    assert not wait.exists()


def test_symlinked_home_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    root = tmp_path / "root"
    (root / "x.example").mkdir(parents=True)
    (root / "x.example" / "evil").symlink_to(outside)
    marker = _marker(root, "evil@x.example", NOW - dt.timedelta(days=1))
    assert mp.run(root, NOW, KEEP, lambda mb: False, lambda s: None) == 1
    assert (outside / "keep").exists() and marker.exists()


def test_bad_marker_is_reported_and_others_still_handled(tmp_path: Path, capsys) -> None:
    due = _mailbox(tmp_path, "due@x.example")
    _marker(tmp_path, "due@x.example", NOW - dt.timedelta(days=1))
    (tmp_path / mp.MARKER_DIR / "junk.json").write_text("{")
    assert mp.run(tmp_path, NOW, KEEP, lambda mb: False, lambda s: None) == 1
    assert not due.exists()
    assert "junk.json" in capsys.readouterr().err


def test_missing_root_is_a_usage_error(tmp_path: Path, capsys) -> None:
    assert mp.main(["--config", _config(tmp_path, tmp_path / "none"), "--no-syslog"]) == 2
    assert "encrypted volume" in capsys.readouterr().err


@pytest.mark.parametrize("keep", [-1, "30", True, None])
def test_bad_keep_days_is_a_usage_error(tmp_path: Path, keep: object, capsys) -> None:
    assert mp.main(["--config", _config(tmp_path, tmp_path, keep), "--no-syslog"]) == 2
    assert "keep_days" in capsys.readouterr().err


def test_a_shorter_period_applies_to_earlier_removals(tmp_path: Path) -> None:
    box = _mailbox(tmp_path, "old@x.example")
    _marker(tmp_path, "old@x.example", NOW + dt.timedelta(days=20))  # removed 10 days ago
    assert mp.run(tmp_path, NOW, 10, lambda mb: False, lambda s: None) == 0
    assert not box.exists()


def test_without_doveadm_nothing_is_deleted(tmp_path: Path) -> None:
    """No userdb answer (doveadm missing, directory down): keep mailbox and marker, exit 1."""
    due = _mailbox(tmp_path, "due@x.example")
    marker = _marker(tmp_path, "due@x.example", NOW - dt.timedelta(days=1))
    assert mp.main(["--config", _config(tmp_path, tmp_path), "--no-syslog",
                    "--now", "2026-12-20T00:00:00Z"]) == 1
    assert due.exists() and marker.exists()
