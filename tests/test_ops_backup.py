"""`safemail backup status` (AV-01): client selection, the status helper's parsing, the table,
stale flags and exit codes; the CLI's --help and bad input."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from safemail import cli
from safemail.errors import SafeMailError
from safemail.inventory import parse_inventory_list
from safemail.ops import backup
from safemail.ops import backupcheck as bc

INVENTORY = {
    "_meta": {"hostvars": {"store1": {"ansible_host": "198.18.0.17"},
                           "backup1": {"ansible_host": "198.18.0.10"},
                           "practice1": {"ansible_host": "198.18.0.14"}}},
    "all": {"children": ["service", "participants"]},
    "service": {"children": ["store", "backup"]},
    "store": {"hosts": ["store1"]},
    "backup": {"hosts": ["backup1"]},
    "participants": {"hosts": ["practice1"]},
}


def test_clients_are_service_hosts_without_the_backup_host():
    hosts = parse_inventory_list(INVENTORY)
    assert [h.name for h in backup.clients(hosts)] == ["store1"]
    with pytest.raises(SafeMailError, match="backup1"):
        backup.clients(hosts, ["backup1"])


def test_helper_parses_borg_list_json_into_age():
    now = dt.datetime(2026, 12, 6, 12, 0, 0)
    text = json.dumps({"archives": [
        {"name": "store1-2026-12-05T01:30:00", "time": "2026-12-05T01:30:02.000000"},
        {"name": "store1-2026-12-06T01:30:00", "time": "2026-12-06T01:30:01.000000"}]})
    st = bc.parse_list(text, now)
    assert st["archives"] == 2 and st["last_archive"] == "store1-2026-12-06T01:30:00"
    assert st["age_seconds"] == 10 * 3600 + 29 * 60 + 59
    empty = bc.parse_list(json.dumps({"archives": []}), now)
    assert empty["archives"] == 0 and empty["age_seconds"] is None


def _r(text):
    return backup.parse_helper("store1", text)


def test_fresh_stale_missing_and_unreachable_are_told_apart():
    fresh = _r(json.dumps({"reachable": True, "archives": 3, "last_time": "2026-12-06T01:30:01",
                           "age_seconds": 3600}))
    stale = _r(json.dumps({"reachable": True, "archives": 3, "last_time": "2026-12-04T01:30:01",
                           "age_seconds": 50 * 3600}))
    none = _r(json.dumps({"reachable": True, "archives": 0}))
    down = _r(json.dumps({"reachable": False, "error": "Connection refused"}))
    silent = _r("")
    garbage = _r("not json")
    assert backup.exit_code([fresh], 26) == 0
    assert backup.exit_code([fresh, stale], 26) == 4
    assert backup.exit_code([fresh, none], 26) == 4
    assert backup.exit_code([stale, down], 26) == 3
    assert backup.exit_code([silent], 26) == 3 and "no answer" in silent.error
    assert "unreadable" in garbage.error
    rows = backup.rows([fresh, stale, none, down], 26)
    assert [r["state"] for r in rows] == ["ok", "STALE: older than 26 h", "STALE: no archive yet",
                                          "FAIL: Connection refused"]
    assert rows[0]["age"] == "60 min" and rows[1]["age"] == "50 h"
    table = backup.render_table(rows)
    assert table.splitlines()[0].split()[:2] == ["HOST", "REPOSITORY"]
    assert stale.to_json(26)["stale"] is True and fresh.to_json(26)["stale"] is False
    # A tighter limit makes the fresh one stale too.
    assert backup.exit_code([fresh], 0.5) == 4


def test_cli_help_and_bad_input(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["backup", "status", "--help"])
    assert exc.value.code == 0
    assert "--max-age-hours" in capsys.readouterr().out
    assert cli.main(["backup", "status", "--max-age-hours", "0"]) != 0
    assert "must be positive" in capsys.readouterr().err
