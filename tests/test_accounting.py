"""safemail.accounting: log parsing, counting, billing with the cap, anonymisation, window."""

from __future__ import annotations

import datetime
import io
import json
import os
from pathlib import Path

import pytest
import yaml

from safemail.accounting import cli
from safemail.accounting.ledger import Ledger, Participant, Policy, quarter_bounds
from safemail.accounting.logparse import DeliveryParser, parse_timestamp
from safemail.errors import SafeMailError, UsageError
from safemail.project import Project

NOW = datetime.datetime(2026, 12, 1, 12, 0, 0)
PEOPLE = {
    "gp@safemail.example": Participant("100001", "GP"),
    "gp.second@safemail.example": Participant("100001", "GP"),  # same participant, 2nd box
    "lab@safemail.example": Participant("100002", "LAB"),
    "ent@safemail.example": Participant("100003", "ENT"),
}


def _mail(qid: str, when: str, sender: str, *recipients: str, status: str = "sent") -> list[str]:
    qid = f"{qid:0>8}"  # Postfix queue ids have at least 5 characters (often 10)
    lines = [f"{when} relay1 postfix/qmgr[812]: {qid}: from=<{sender}>, size=4711, "
             f"nrcpt={len(recipients)} (queue active)"]
    for r in recipients:
        lines.append(f"{when} relay1 postfix/lmtp[900]: {qid}: to=<{r}>, "
                     f"relay=store1[198.18.3.11]:24, delay=0.2, status={status} (250 2.0.0 ok)")
    lines.append(f"{when} relay1 postfix/qmgr[812]: {qid}: removed")
    return lines


def _resolver(calls: list | None = None):
    def resolve(addresses):
        if calls is not None:
            calls.append(list(addresses))
        return {a: PEOPLE[a] for a in addresses if a in PEOPLE}
    return resolve


def _write(path: Path, lines: list[str], mode: str = "a") -> None:
    with open(path, mode) as fh:
        fh.write("".join(f"{line}\n" for line in lines))


POLICY = Policy(rate_sent_cents=50, rate_received_cents=25, cap_cents=1000)


# -- log parsing ---------------------------------------------------------------------------
def test_timestamps_traditional_rfc3339_and_year_turn() -> None:
    at, rest = parse_timestamp("Dec  1 06:50:01 relay1 x", NOW)
    assert at == datetime.datetime(2026, 12, 1, 6, 50, 1) and rest == "relay1 x"
    at, _ = parse_timestamp("Nov 30 23:59:59.123456 relay1 x", NOW)
    assert at == datetime.datetime(2026, 11, 30, 23, 59, 59)
    # a December line read on 2 January belongs to the year before
    at, _ = parse_timestamp("Dec 31 23:00:00 relay1 x", datetime.datetime(2027, 1, 2))
    assert at.year == 2026
    at, _ = parse_timestamp("2026-07-01T10:00:00 relay1 x", NOW)
    assert at == datetime.datetime(2026, 7, 1, 10)
    with pytest.raises(ValueError):
        parse_timestamp("garbage line", NOW)


def test_parser_pairs_senders_with_sent_deliveries_only() -> None:
    lines = (_mail("4F2A01", "Dec  1 06:50:01", "GP@safemail.example", "lab@safemail.example")
             + _mail("4F2A02", "Dec  1 06:51:01", "lab@safemail.example",
                     "gp@safemail.example", status="deferred"))
    parser = DeliveryParser(NOW)
    got = list(parser.feed(lines))
    assert [(d.queue_id, d.sender, d.recipient) for d in got] == [
        ("004F2A01", "gp@safemail.example", "lab@safemail.example")]
    assert parser.pending() == {}  # both removed


def test_parser_carries_senders_across_runs() -> None:
    first = _mail("AB12CD", "Dec  1 06:50:01", "gp@safemail.example", "lab@safemail.example")
    p1 = DeliveryParser(NOW)
    assert list(p1.feed(first[:1])) == []
    p2 = DeliveryParser(NOW, p1.pending())
    assert [d.recipient for d in p2.feed(first[1:])] == ["lab@safemail.example"]
    orphan = DeliveryParser(NOW)
    assert list(orphan.feed(first[1:2])) == [] and orphan.orphans == 1


# -- counting (ACC-01) ---------------------------------------------------------------------
def _traffic(log: Path) -> None:
    _write(log, _mail("Q1", "Dec  1 06:00:00", "gp@safemail.example", "lab@safemail.example")
           + _mail("Q2", "Dec  1 06:10:00", "gp@safemail.example", "lab@safemail.example",
                   "ent@safemail.example")
           + _mail("Q3", "Dec  1 07:00:00", "lab@safemail.example", "gp@safemail.example")
           # to oneself, and to one's own second mailbox: not counted
           + _mail("Q4", "Dec  1 07:05:00", "gp@safemail.example", "gp@safemail.example")
           + _mail("Q5", "Dec  1 07:06:00", "gp@safemail.example",
                   "gp.second@safemail.example")
           # a bounce (empty sender) and an unknown address: not participants
           + _mail("Q6", "Dec  1 07:07:00", "", "lab@safemail.example")
           + _mail("Q7", "Dec  1 07:08:00", "ghost@safemail.example", "lab@safemail.example"))


def _by_number(ledger: Ledger, quarter: str = "2026Q4") -> dict[str, tuple[int, int]]:
    return {c.number: (c.sent, c.received) for c in ledger.counts(quarter)}


def test_collect_counts_sent_and_received_without_mails_to_oneself(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    _traffic(log)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        r = ledger.collect(log, _resolver(), NOW)
        assert (r.deliveries, r.recorded, r.to_oneself, r.not_participants) == (8, 4, 2, 2)
        # a mail to two participants counts as two sent (one per recipient copy)
        assert _by_number(ledger) == {"100001": (3, 1), "100002": (1, 2), "100003": (0, 1)}
        assert ledger.counts("2026q4")[0].specialty == "GP"
        # nothing of addresses or content in the records
        row = ledger.db.execute("SELECT * FROM raw LIMIT 1").fetchone()
        assert not any("@" in str(v) for v in row)


def test_collect_reads_each_line_once_and_waits_for_unfinished_lines(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    lines = _mail("Q1", "Dec  1 06:00:00", "gp@safemail.example", "lab@safemail.example")
    _write(log, lines[:2])
    with open(log, "a") as fh:
        fh.write(lines[2][:10])  # a line being written
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.collect(log, _resolver(), NOW).recorded == 1
        assert ledger.collect(log, _resolver(), NOW).lines == 0
        with open(log, "a") as fh:
            fh.write(lines[2][10:] + "\n")
        r = ledger.collect(log, _resolver(), NOW)
        assert (r.lines, r.recorded) == (1, 0)
        assert ledger.status()["pending_queue_ids"] == 0
        assert _by_number(ledger) == {"100001": (1, 0), "100002": (0, 1)}


def test_a_sender_waiting_between_runs_is_kept_as_participant_not_address(
        tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    lines = _mail("Q1", "Dec  1 06:00:00", "lab@safemail.example", "gp@safemail.example")
    _write(log, lines[:1])  # queued, not yet delivered
    calls: list = []
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.collect(log, _resolver(calls), NOW).deliveries == 0
        assert list(ledger.db.execute("SELECT sender FROM pending")) == [("#100002\tLAB",)]
        _write(log, lines[1:])
        assert ledger.collect(log, _resolver(calls), NOW).recorded == 1
        assert calls == [["lab@safemail.example"], ["gp@safemail.example"]]
        assert _by_number(ledger) == {"100001": (0, 1), "100002": (1, 0)}
        assert ledger.status()["pending_queue_ids"] == 0


def test_collect_restarts_on_a_new_log_and_never_counts_twice(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    _traffic(log)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.collect(log, _resolver(), NOW)
        log.rename(tmp_path / "mail.log.1")
        _write(log, [])  # rotated: a new, shorter file
        _traffic(log)  # the same lines again (e.g. a copy): recorded once
        _write(log, _mail("Q9", "Dec  1 08:00:00", "ent@safemail.example",
                          "gp@safemail.example"))
        r = ledger.collect(log, _resolver(), NOW)
        assert r.restarted and r.duplicates == 4 and r.recorded == 1
        assert _by_number(ledger)["100003"] == (1, 1)


def test_collect_changes_nothing_when_the_directory_fails(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    _traffic(log)

    def down(addresses):
        raise SafeMailError("the directory ldap://auth1 closed the connection")

    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        with pytest.raises(SafeMailError):
            ledger.collect(log, down, NOW)
        assert ledger.status()["log_offset"] == 0 and ledger.counts("2026Q4") == []
        assert ledger.collect(log, _resolver(), NOW).recorded == 4


def test_collect_without_a_log_says_so(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger, \
            pytest.raises(SafeMailError, match="not exist"):
        ledger.collect(tmp_path / "missing.log", _resolver(), NOW)


# -- billing with the cap (ACC-02) ---------------------------------------------------------
def test_policy_caps_the_payout() -> None:
    assert POLICY.payout(10, 4) == (600, False)
    assert POLICY.payout(20, 0) == (1000, False)  # exactly the cap
    assert POLICY.payout(100, 100) == (1000, True)
    with pytest.raises(UsageError):
        Policy(-1, 0, 0)


def _q3_log(log: Path, lab_to_gp: int = 30) -> None:
    lines: list[str] = []
    for i in range(lab_to_gp):  # the lab sends a lot: above the cap
        lines += _mail(f"L{i:04d}", f"Aug {1 + i % 28:2d} 14:{i % 60:02d}:00",
                       "lab@safemail.example", "gp@safemail.example")
    lines += _mail("G0001", "Sep  3 09:00:00", "gp@safemail.example", "ent@safemail.example")
    _write(log, lines)


def test_bill_computes_capped_payouts_and_anonymises(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    _q3_log(log)
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.collect(log, _resolver(), NOW)
        lines = ledger.bill("2026q3", POLICY, NOW, statement_days=400)
        got = {c.number: (c.sent, c.received, cents, capped) for c, cents, capped in lines}
        assert got == {"100001": (1, 30, 800, False),
                       "100002": (30, 0, 1000, True),
                       "100003": (0, 1, 25, False)}
        assert ledger.counts("2026Q3") == []  # raw records gone
        traffic = dict(((s, r), n) for s, r, n in ledger.db.execute(
            "SELECT sender_group, recipient_group, SUM(mails) FROM traffic "
            "GROUP BY sender_group, recipient_group"))
        assert traffic == {("LAB", "GP"): 30, ("GP", "ENT"): 1}
        assert [r[0] for r in ledger.statement("2026Q3")] == ["100001", "100002", "100003"]
        # second billing refused, nothing changes
        with pytest.raises(SafeMailError, match="was billed on"):
            ledger.bill("2026Q3", POLICY, NOW, statement_days=400)
        # late lines of a billed quarter: anonymised only
        _write(log, _mail("LATE1", "Sep 30 23:00:00", "lab@safemail.example",
                          "gp@safemail.example"))
        r = ledger.collect(log, _resolver(), NOW)
        assert r.after_billing == 1 and ledger.counts("2026Q3") == []


def test_bill_refuses_a_running_quarter(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        with pytest.raises(SafeMailError, match="2026Q4 is not over"):
            ledger.bill("2026Q4", POLICY, NOW, statement_days=400)
        with pytest.raises(UsageError, match="not a quarter"):
            ledger.bill("2026-4", POLICY, NOW, statement_days=400)
    assert quarter_bounds("2026Q4") == (datetime.datetime(2026, 10, 1),
                                        datetime.datetime(2027, 1, 1))


# -- deletion schedule and anonymity (ACC-03) ----------------------------------------------
def test_no_participant_number_left_in_the_file_after_billing_and_purge(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    _q3_log(log)
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        ledger.collect(log, _resolver(), NOW)
        ledger.bill("2026Q3", POLICY, NOW, statement_days=30)
        assert b"100002" in path.read_bytes()  # the statement, while it is kept
        assert ledger.purge(NOW, raw_days=120) == ([], [], 0)
        deleted, expired, _ = ledger.purge(NOW + datetime.timedelta(days=31), raw_days=120)
        assert deleted == ["2026Q3"] and expired == []
        with pytest.raises(SafeMailError, match="deleted"):
            ledger.statement("2026Q3")
    data = path.read_bytes()
    for number in ("100001", "100002", "100003"):
        assert number.encode() not in data
    assert b"LAB" in data  # the specialty group stays


def test_purge_anonymises_unbilled_quarters_past_retention(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    _q3_log(log, lab_to_gp=3)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.collect(log, _resolver(), NOW)
        assert ledger.purge(NOW, raw_days=120)[1] == []  # Q3 ended 61 days before NOW
        assert ledger.purge(NOW, raw_days=60)[1] == ["2026Q3"]
        assert ledger.counts("2026Q3") == []
        assert ledger.status()["anonymised_mails"] == 4
        with pytest.raises(SafeMailError, match="never billed"):
            ledger.statement("2026Q3")
        with pytest.raises(SafeMailError, match="was billed"):
            ledger.bill("2026Q3", POLICY, NOW, statement_days=1)


# -- maintenance window (ACC-04) -----------------------------------------------------------
def _anonymised(ledger: Ledger, hours: dict[str, int]) -> None:
    for hour, n in hours.items():
        ledger.db.execute("INSERT INTO traffic VALUES (?, '2026Q3', 'GP', 'LAB', ?)", (hour, n))


def test_window_is_the_quietest_run_of_hours(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        with pytest.raises(SafeMailError, match="no anonymised records"):
            ledger.window(4)
        # every hour of one week busy (10), except Wednesday 01:00-04:00 (1 each)
        week = datetime.datetime(2026, 8, 3)  # a Monday
        busy = {(week + datetime.timedelta(hours=h)).strftime("%Y-%m-%d %H"): 10
                for h in range(168)}
        for h in (49, 50, 51):
            busy[(week + datetime.timedelta(hours=h)).strftime("%Y-%m-%d %H")] = 1
        _anonymised(ledger, busy)
        w = ledger.window(3)
        assert (w.start_weekday, w.start_hour, w.mails, w.weeks) == (2, 1, 3, 1)
        assert w.describe() == "Wednesday 01:00 - Wednesday 04:00"
        assert ledger.window(4).mails == 13
        with pytest.raises(UsageError):
            ledger.window(0)


def test_window_wraps_around_the_week(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        week = datetime.datetime(2026, 8, 3)
        hours = {(week + datetime.timedelta(hours=h)).strftime("%Y-%m-%d %H"): 5
                 for h in range(2, 166)}  # Sunday 22:00 - Monday 02:00 silent
        _anonymised(ledger, hours)
        w = ledger.window(4)
        assert (w.start_weekday, w.start_hour, w.mails) == (6, 22, 0)
        assert w.describe() == "Sunday 22:00 - Monday 02:00"


# -- the command line ----------------------------------------------------------------------
@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "acc").mkdir()
    path = tmp_path / "accounting.yml"
    path.write_text(yaml.safe_dump({
        "log": str(tmp_path / "mail.log"),
        "ledger": str(tmp_path / "acc" / "ledger.sqlite"),
        "directory": {"uri": "ldap://auth1", "base": "ou=p", "bind_dn": "cn=r", "password": "x"},
        "policy": {"rate_sent_cents": 50, "rate_received_cents": 25, "cap_cents": 1000},
        "statement_retention_days": 0,
        "window_hours": 2,
    }))
    monkeypatch.setattr(cli, "directory_resolver", lambda settings: _resolver())
    monkeypatch.setattr(cli, "_now", lambda: NOW)
    return path


def test_cli_collect_bill_statement_purge_window(config: Path, tmp_path: Path, capsys) -> None:
    _q3_log(tmp_path / "mail.log")
    c = str(config)
    umask = os.umask(0o022)
    os.umask(umask)
    assert cli.main(["--config", c, "collect"]) == 0
    assert "31 deliveries; 31 recorded" in capsys.readouterr().out
    ledger = tmp_path / "acc" / "ledger.sqlite"
    assert ledger.stat().st_mode & 0o777 == 0o600  # root's only
    assert os.umask(umask) == umask  # the caller's umask is back
    assert cli.main(["--config", c, "counts", "--quarter", "2026Q3", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert {p["number"]: p["sent"] for p in counts["participants"]} == {
        "100001": 1, "100002": 30, "100003": 0}
    assert cli.main(["--config", c, "bill", "--quarter", "2026Q3", "--json"]) == 0
    bill = json.loads(capsys.readouterr().out)
    assert bill["payout_cents"] == 1825
    assert cli.main(["--config", c, "statement", "--quarter", "2026Q3", "--format", "csv"]) == 0
    assert "100002,LAB,30,0,10.00,yes" in capsys.readouterr().out
    assert cli.main(["--config", c, "purge"]) == 0  # retention 0: the statement goes
    assert "statements deleted: 2026Q3" in capsys.readouterr().out
    assert cli.main(["--config", c, "window", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hours"] == 2


def test_cli_errors_are_clear_and_change_nothing(config: Path, tmp_path: Path, capsys) -> None:
    c = str(config)
    assert cli.main(["--config", c, "bill", "--quarter", "2026Q4"]) == 1
    err = capsys.readouterr().err
    assert "error: 2026Q4 is not over (it ends 2027-01-01)" in err and "hint:" in err
    assert not (tmp_path / "acc" / "ledger.sqlite").exists()  # refused before touching it
    assert cli.main(["--config", c, "bill", "--quarter", "Q3"]) == 2
    assert "not a quarter" in capsys.readouterr().err
    assert cli.main(["--config", str(tmp_path / "nope.yml"), "status"]) == 1
    assert "no configuration" in capsys.readouterr().err
    data = yaml.safe_load(config.read_text())
    data["require_mount"] = str(tmp_path / "acc")  # a plain directory, not a mount point
    config.write_text(yaml.safe_dump(data))
    assert cli.main(["--config", c, "collect"]) == 1
    assert "is not mounted" in capsys.readouterr().err
    assert not (tmp_path / "acc" / "ledger.sqlite").exists()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "maintenance window" in capsys.readouterr().out


def test_directory_resolver_maps_mail_to_number_and_group(monkeypatch) -> None:
    from safemail.participant import directory

    answers = {
        "gp@safemail.example": [{"employeenumber": [b"100001"], "businesscategory": [b"GP"]}],
        "twice@safemail.example": [{"employeenumber": [b"1"], "businesscategory": [b"GP"]}] * 2,
        "bare@safemail.example": [{"mail": [b"bare@safemail.example"]}],
    }

    class Fake:
        def __init__(self, config, issuer=None):
            assert config.search_base == "ou=participants,dc=x"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def search(self, attribute, value, attributes):
            assert attribute == "mail" and "employeeNumber" in attributes
            return answers.get(value, [])

    monkeypatch.setattr(directory, "LdapCertificateDirectory", Fake)
    resolve = cli.directory_resolver({"uri": "ldap://auth1", "base": "ou=participants,dc=x",
                                      "bind_dn": "cn=relay", "password": "pw",
                                      "cafile": "/etc/safemail/tls/ca.crt"})
    got = resolve(["gp@safemail.example", "twice@safemail.example", "bare@safemail.example",
                   "ghost@safemail.example"])
    assert got == {"gp@safemail.example": Participant("100001", "GP")}
    with pytest.raises(SafeMailError, match="lack password"):
        cli.directory_resolver({"uri": "ldap://a", "base": "b", "bind_dn": "c", "cafile": "d"})
    # The directory is always verified: no CA file, no lookup (the real client's checks:
    # tests/test_participant_directory.py::test_accounting_resolves_mailboxes_through_...).
    with pytest.raises(SafeMailError, match="lack cafile"):
        cli.directory_resolver({"uri": "ldap://a", "base": "b", "bind_dn": "c",
                                "password": "pw"})


def test_controller_bill_command_and_its_refusals(tmp_path: Path, capsys) -> None:
    from safemail import cli as main_cli
    from safemail.accounting import control

    cmd = control.bill_command(Project(tmp_path), "test", "2026q3", " ops ", program="a-p")
    assert cmd == ["a-p", "-i", str(tmp_path / "inventories" / "test"),
                   str(tmp_path / "playbooks" / "accounting-bill.yml"),
                   "-e", "accounting_quarter=2026Q3", "-e", "accounting_operator=ops"]
    checked = control.bill_command(Project(tmp_path), "test", "2026Q3", "o", check=True,
                                   program="a")
    assert checked[-1] == "--check"
    with pytest.raises(UsageError, match="not a quarter"):
        control.bill_command(Project(tmp_path), "test", "Q3", "o", program="a")
    with pytest.raises(UsageError, match="operator"):
        control.bill_command(Project(tmp_path), "test", "2026Q3", " ", program="a")
    with pytest.raises(SystemExit) as exc:
        main_cli.main(["accounting", "bill", "--quarter", "2026Q3"])  # no --stage
    assert exc.value.code == 2 and "--stage" in capsys.readouterr().err


def test_bill_command_opens_an_encrypted_vault_with_the_client(tmp_path: Path,
                                                               monkeypatch) -> None:
    """Production's vault.yml is ciphertext: the bill run gets the vault client's --vault-id
    as promote and patch do (without it ansible-playbook stops at the inventory)."""
    from safemail.accounting import control

    for name in ("ANSIBLE_VAULT_IDENTITY_LIST", "ANSIBLE_VAULT_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    vault_file = tmp_path / "inventories" / "production" / "group_vars" / "all" / "vault.yml"
    vault_file.parent.mkdir(parents=True)
    vault_file.write_text("$ANSIBLE_VAULT;1.2;AES256;production\n6162\n")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "vault-pass-client").write_text("#!/bin/sh\n")
    cmd = control.bill_command(Project(tmp_path), "production", "2026q3", "ops", program="a-p")
    assert cmd[cmd.index("--vault-id") + 1] == (
        f"production@{tmp_path / 'scripts' / 'vault-pass-client'}")
    plain = control.bill_command(Project(tmp_path), "test", "2026q3", "ops", program="a-p")
    assert "--vault-id" not in plain


# -- AV-02: the cap over every relay ---------------------------------------------------------


def _relay_statement(tmp_path: Path, name: str, lines: list[str], capsys) -> str:
    """A relay's real statement CSV: its own ledger collects its own log, bills, prints."""
    root = tmp_path / name
    (root / "acc").mkdir(parents=True)
    _write(root / "mail.log", lines)
    conf = root / "accounting.yml"
    conf.write_text(yaml.safe_dump({
        "log": str(root / "mail.log"), "ledger": str(root / "acc" / "ledger.sqlite"),
        "directory": {"uri": "ldap://auth1", "base": "ou=p", "bind_dn": "cn=r", "password": "x"},
        "policy": {"rate_sent_cents": 50, "rate_received_cents": 25, "cap_cents": 1000},
    }))
    assert cli.main(["--config", str(conf), "bill", "--quarter", "2026Q3"]) == 0
    capsys.readouterr()
    assert cli.main(["--config", str(conf), "statement", "--quarter", "2026Q3",
                     "--format", "csv"]) == 0
    return capsys.readouterr().out


def _lab_mails(first: int, count: int) -> list[str]:
    lines: list[str] = []
    for i in range(first, first + count):
        lines += _mail(f"R{i:04d}", f"Aug {1 + i % 28:2d} 10:{i % 60:02d}:00",
                       "lab@safemail.example", "gp@safemail.example")
    return lines


@pytest.fixture
def two_relays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> dict[str, str]:
    """The lab (100002) sends 12 mails through relay1 and 12 through relay2: 600 ct on each
    relay, under the 1000 ct cap there, 1200 ct together, over it."""
    monkeypatch.setattr(cli, "directory_resolver", lambda settings: _resolver())
    monkeypatch.setattr(cli, "_now", lambda: NOW)
    return {"relay1": _relay_statement(tmp_path, "relay1", _lab_mails(0, 12), capsys),
            "relay2": _relay_statement(tmp_path, "relay2", _lab_mails(100, 12)
                                       + _mail("E1", "Sep  1 08:00:00", "ent@safemail.example",
                                               "gp@safemail.example"), capsys)}


def test_each_relay_alone_stays_under_the_cap(two_relays: dict[str, str]) -> None:
    """The premise: per relay the cap does not bite, so capping per relay would pay 1200."""
    for text in two_relays.values():
        assert "100002,LAB,12,0,6.00,no" in text


def test_the_cap_applies_to_the_sum_over_the_relays(two_relays: dict[str, str]) -> None:
    from safemail.accounting import total

    lines = total.combine({r: total.parse_statement(r, t) for r, t in two_relays.items()},
                          POLICY)
    got = {t.number: (t.sent, t.received, t.payout_cents, t.capped, t.relays) for t in lines}
    assert got["100002"] == (24, 0, 1000, True, ("relay1", "relay2"))
    # the GP received on both relays: 24 + 1 received at 25 ct
    assert got["100001"] == (0, 25, 625, False, ("relay1", "relay2"))
    assert got["100003"] == (1, 0, 50, False, ("relay2",))
    assert sum(t.payout_cents for t in lines) == 1000 + 625 + 50


def test_total_command_reads_json_and_prints_the_statement(
        two_relays: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from safemail.accounting import total

    policy = {"rate_sent_cents": 50, "rate_received_cents": 25, "cap_cents": 1000}
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(
        {"policy": policy, "statements": two_relays})))
    assert total.main([]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "number,specialty,sent,received,payout_eur,capped,relays"
    assert "100002,LAB,24,0,10.00,yes,relay1 relay2" in out.splitlines()


@pytest.mark.parametrize(("text", "message"), [
    ("number,sent\n", "first line"),
    ("number,specialty,sent,received,payout_eur,capped\n100002,LAB,-3,0,0.00,no\n",
     "not a whole number"),
    ("number,specialty,sent,received,payout_eur,capped\n100002,LAB,1,0,0.50,no\n"
     "100002,LAB,1,0,0.50,no\n", "appears twice"),
    ("number,specialty,sent,received,payout_eur,capped\nx1,LAB,1,0,0.50,no\n", "not digits"),
])
def test_a_statement_that_is_not_a_relays_is_refused(text: str, message: str) -> None:
    """A hand-edited statement (a line split in two to halve the counts under the cap, a
    negative count) is refused rather than summed."""
    from safemail.accounting import total

    with pytest.raises(SafeMailError, match=message):
        total.parse_statement("relay1", text)
    with pytest.raises(SafeMailError, match="no relay statement"):
        total.combine({}, POLICY)


def test_a_relay_billed_at_other_rates_or_with_edited_counts_is_refused(
        two_relays: dict[str, str]) -> None:
    """The relays' own payouts must follow the site's policy: a relay left at other rates (or
    billed before a rate change), or counts lowered without the payout, is not summed."""
    from safemail.accounting import total

    statements = {r: total.parse_statement(r, t) for r, t in two_relays.items()}
    assert total.combine(statements, POLICY)
    with pytest.raises(SafeMailError, match="relay1, participant 100002: the relay billed 6.00"):
        total.combine(statements, Policy(40, 25, 1000))
    edited = two_relays["relay1"].replace("100002,LAB,12,0,6.00,no", "100002,LAB,11,0,6.00,no")
    assert edited != two_relays["relay1"]
    with pytest.raises(SafeMailError, match="relay1, participant 100002"):
        total.combine({**statements, "relay1": total.parse_statement("relay1", edited)}, POLICY)


@pytest.mark.parametrize(("text", "message"), [
    # the same participant in other digits would be a second participant in the sum
    ("number,specialty,sent,received,payout_eur,capped\n１００００２,LAB,1,0,0.50,no\n",
     "not digits"),
    ("number,specialty,sent,received,payout_eur,capped\n100002,LAB,١,0,0.50,no\n",
     "not a whole number"),
    ("number,specialty,sent,received,payout_eur,capped\n100002,LAB,1,0,0.5,no\n",
     "not euros.cents"),
    ("number,specialty,sent,received,payout_eur,capped\n100002,LAB,1,0,0.50,maybe\n",
     "not yes or no"),
])
def test_a_statement_in_other_digits_or_forms_is_refused(text: str, message: str) -> None:
    from safemail.accounting import total

    with pytest.raises(SafeMailError, match=message):
        total.parse_statement("relay1", text)


@pytest.mark.parametrize("rate", [2.5, "2.5", True, -1])
def test_total_command_refuses_a_rate_that_is_not_a_whole_number(
        rate: object, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from safemail.accounting import total

    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({
        "policy": {"rate_sent_cents": rate, "rate_received_cents": 25, "cap_cents": 1000},
        "statements": {"relay1": "number,specialty,sent,received,payout_eur,capped\n"}})))
    assert total.main([]) == 2
    assert "rate_sent_cents" in capsys.readouterr().err


@pytest.mark.parametrize(("relay2", "refused"), [
    ({"safemail_address": "198.18.2.10", "ansible_port": 9}, True),   # a copied entry
    ({"safemail_address": "198.18.2.11", "ansible_port": 9}, True),   # same host:port
    ({"safemail_address": "198.18.2.11", "ansible_port": 7}, False),  # two machines
])
def test_bill_play_refuses_two_inventory_names_for_one_relay(
        tmp_path: Path, relay2: dict, refused: bool) -> None:
    """AV-02: accounting-bill.yml sums one ledger per inventory name; two names for one
    machine would pay its counts twice (up to the cap). Refused before anything runs on a
    host; the twin (two machines) passes the check and fails only at the first connection
    (closed ports on 127.0.0.1: nothing is billed anywhere)."""
    import subprocess
    import sys

    playbook = Path(sys.executable).parent / "ansible-playbook"
    if not playbook.exists():
        pytest.skip("ansible is not installed in this environment")
    root = Path(__file__).resolve().parents[1]
    common = {"ansible_host": "127.0.0.1", "ansible_user": "nobody"}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"relay": {
        "hosts": {"relay1": {**common, "safemail_address": "198.18.2.10", "ansible_port": 9},
                  "relay2": {**common, **relay2}}}}}}))
    proc = subprocess.run(
        [str(playbook), "-i", str(tmp_path / "hosts.yml"), "playbooks/accounting-bill.yml",
         "-e", "accounting_quarter=2026Q1", "-e", "accounting_operator=test"],
        cwd=root, capture_output=True, text=True, timeout=120,
        env={**os.environ, "ANSIBLE_CONFIG": str(root / "ansible.cfg")})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ("are the same machine" in out) is refused, out[-2000:]
    assert ("UNREACHABLE" in out) is not refused, out[-2000:]
