"""ACC-01 ... ACC-04: subsidy counting, capped billing, anonymisation, maintenance window.

ACC-01 is proven with real mail: the lab participants send S/MIME-shaped mail to each other
and to themselves through the relay, the deployed collection job reads the relay's log and
the deployed ledger's counts must move by exactly the mails between two participants (the
mail to oneself not at all). Nothing else sends meanwhile (the test is `disruptive`: it runs
alone) and Postfix's queue is empty before and after.

ACC-02..04 run the deployed program against a ledger of its own in a directory on the
relay's encrypted volume, fed from a Postfix log of the previous quarter written by the test
(real lab mailboxes, resolved through the real directory): one participant far above the cap,
one below it, one week with a known quiet gap. The deployed settings (rates, cap, directory
account) are copied; only the ledger path and the retention days differ.
"""

from __future__ import annotations

import datetime
import json
import shlex
import uuid

import pytest
import testinfra
import yaml
from waits import wait_for

from safemail.smime import samples

testinfra_hosts = ["ansible://relay"]
# The fixtures send mail from the lab's participant hosts (verify/profiles.py).
pytestmark = pytest.mark.lab_participants

TOOL = "/usr/local/sbin/safemail-accounting"
CONFIG = "/etc/safemail/accounting.yml"
CAFILE = "/etc/safemail/tls/ca.crt"
SAFEMAIL = "/opt/safemail/venv/bin/safemail"
GAP = (3, 2, 3)  # the quiet gap of the synthetic week: Thursday (3), 02:00, three hours


def _previous_quarter(today: datetime.date) -> tuple[str, datetime.date]:
    """The quarter before today's, and its first day."""
    q = (today.month - 1) // 3
    year, q = (today.year - 1, 4) if q == 0 else (today.year, q)
    return f"{year}Q{q}", datetime.date(year, 3 * q - 2, 1)


@pytest.fixture(scope="module")
def acc(request, host) -> dict:
    inventory = request.config.option.ansible_inventory
    hv = host.ansible.get_variables()
    people = [e for e in hv["safemail_participants"] if e.get("lab_host")]
    assert len(people) >= 2, "the lab needs two participants with a lab_host"
    senders = [testinfra.get_host(f"ansible://{p['lab_host']}", ansible_inventory=inventory)
               for p in people[:2]]
    config = yaml.safe_load(host.check_output(f"cat {CONFIG}"))
    return {
        "relay": host,
        "relay_name": host.backend.host,
        "people": people[:2],
        "hosts": senders,
        "passwords": [hv["safemail_participant_passwords"][p["number"]] for p in people[:2]],
        "config": config,
        "ledger": config["ledger"],
    }


def _counts(relay) -> dict[str, tuple[int, int]]:
    out = json.loads(relay.check_output(f"{TOOL} counts --json"))
    return {p["number"]: (p["sent"], p["received"]) for p in out["participants"]}


def _collect(relay) -> None:
    """The deployed job, as its timer runs it (a oneshot: returns when it is done)."""
    relay.check_output("systemctl start safemail-accounting-collect.service")


def _queue_empty(relay) -> bool:
    return relay.run("postqueue -j").stdout.strip() == ""


def _send(acc: dict, sender: int, recipient: int, subject: str) -> str:
    """Mail from participant `sender` to `recipient` (indexes); the relay's queue id."""
    host, who = acc["hosts"][sender], acc["people"][sender]
    msg = samples.with_from(samples.smime_message(samples.enveloped_der(), subject=subject),
                            who["mailbox"])
    path = f"/tmp/acc-probe-{uuid.uuid4().hex}.eml"
    host.run(f"cat > {path} <<'EOF_MSG'\n{msg.decode('latin-1')}\nEOF_MSG")
    args = [SAFEMAIL, "participant", "smtp-probe", "--host", acc["relay_name"], "--port", "587",
            "--cafile", CAFILE, "--from", who["mailbox"], "--to",
            acc["people"][recipient]["mailbox"], "--user", who["mailbox"], "--message", path]
    out = host.check_output(f"SAFEMAIL_PASSWORD={shlex.quote(acc['passwords'][sender])} "
                            f"{shlex.join(args)}; rm -f {path}")
    for step in json.loads(out)["steps"]:
        if step["step"].startswith("data"):
            assert step["code"] == 250, step
            return step["text"].rsplit(" ", 1)[-1]
    raise AssertionError(f"no DATA step: {out}")


@pytest.mark.req("ACC-01")
@pytest.mark.disruptive
@pytest.mark.stage_hosts("relay", also=("participants",))
def test_mails_between_participants_are_counted_and_mails_to_oneself_are_not(acc, evidence):
    relay, (p1, p2) = acc["relay"], acc["people"]
    log = acc["config"]["log"]
    assert wait_for(lambda: _queue_empty(relay), 180), "the relay's queue does not drain"
    _collect(relay)
    before = _counts(relay)
    marker = f"ACC01-{uuid.uuid4().hex[:12]}"
    sends = [(0, 1), (0, 1), (1, 0), (0, 0)]  # p1->p2 twice, p2->p1, p1->p1 (to oneself)
    # One subject each: two identical mails would be one mail to the store's duplicate filter
    # (roles/mailstore), and each of these is meant to be a mail of its own.
    qids = [_send(acc, s, r, f"Abrechnungstest {marker} {i}") for i, (s, r) in enumerate(sends)]
    delivered = wait_for(lambda: all(
        relay.run(f"grep -F {q}: {log} | grep -c status=sent").stdout.strip() not in ("", "0")
        for q in qids), 180)
    assert delivered, f"not every probe mail was delivered: {qids}"
    assert wait_for(lambda: _queue_empty(relay), 120)
    _collect(relay)
    after = _counts(relay)
    delta = {n: tuple(a - b for a, b in zip(after.get(n, (0, 0)), before.get(n, (0, 0)),
                                            strict=True))
             for n in (p1["number"], p2["number"])}
    ledger = acc["ledger"]
    leaks = {needle: relay.run(f"grep -caF {shlex.quote(needle)} {ledger}").stdout.strip()
             for needle in (p1["mailbox"], p2["mailbox"], marker)}
    volume = relay.check_output(f"findmnt -n -o SOURCE -T {ledger}")
    evidence(f"queue ids {qids}; counts (sent, received) before {before}, after {after}, "
             f"delta {delta}; ledger {ledger} on {volume}; addresses/subject in the ledger: "
             f"{leaks}")
    assert delta == {p1["number"]: (2, 1), p2["number"]: (1, 2)}, (
        f"expected p1 +2 sent +1 received, p2 +1 sent +2 received (the mail to oneself not "
        f"counted), got {delta}")
    assert set(leaks.values()) == {"0"}, f"the ledger holds addresses or subjects: {leaks}"
    assert volume.startswith("/dev/mapper/"), f"the ledger is on {volume}, not the LUKS volume"


@pytest.mark.req("ACC-01")
@pytest.mark.read_only
def test_collection_timer_runs_and_succeeds(acc, evidence):
    relay = acc["relay"]
    timer = relay.service("safemail-accounting-collect.timer")
    result = relay.run("systemctl show -p Result -p ExecMainStatus "
                       "safemail-accounting-collect.service").stdout.split()
    failed = "" if "Result=success" in result else relay.run(
        "journalctl -u safemail-accounting-collect.service --no-pager -o short-iso -n 15"
    ).stdout  # what the failed run said, for the report
    evidence(f"timer enabled={timer.is_enabled} running={timer.is_running}; last run {result}"
             + (f"; its journal:\n{failed}" if failed else ""))
    assert timer.is_enabled and timer.is_running
    assert "Result=success" in result


# --- ACC-02..04: billing a synthetic previous quarter ---------------------------------------


def _line(at: datetime.datetime, text: str) -> str:
    return f"{at:%b} {at.day:2d} {at:%H:%M:%S} relay1 {text}"


def _mail(qid: str, at: datetime.datetime, sender: str, recipient: str) -> list[str]:
    return [
        _line(at, f"postfix/qmgr[700]: {qid}: from=<{sender}>, size=4100, nrcpt=1 "
                  "(queue active)"),
        _line(at, f"postfix/lmtp[701]: {qid}: to=<{recipient}>, relay=store1[198.18.3.11]:24, "
                  "delay=0.1, dsn=2.0.0, status=sent (250 2.0.0 Saved)"),
        _line(at, f"postfix/qmgr[700]: {qid}: removed"),
    ]


def _synthetic_log(p1: str, p2: str, first_day: datetime.date) -> tuple[list[str], dict]:
    """One week of the quarter: p2 (the lab) sends p1 one mail every hour except the gap;
    p1 sends p2 two mails and itself one."""
    monday = first_day + datetime.timedelta(days=(7 - first_day.weekday()) % 7)
    start = datetime.datetime.combine(monday, datetime.time())
    gap = {GAP[0] * 24 + GAP[1] + i for i in range(GAP[2])}
    lines: list[str] = []
    n = 0
    for hour in range(168):
        if hour in gap:
            continue
        n += 1
        lines += _mail(f"5AC{n:07X}", start + datetime.timedelta(hours=hour, minutes=7), p2, p1)
    extra = [(p1, p2), (p1, p2), (p1, p1)]
    for i, (s, r) in enumerate(extra):
        lines += _mail(f"6AC{i:07X}", start + datetime.timedelta(hours=10, minutes=20 + i), s, r)
    return lines, {"p2_to_p1": n, "p1_to_p2": 2, "p1_to_p1": 1}


@pytest.fixture(scope="module")
def billed(acc) -> dict:
    """Bill the synthetic previous quarter in a ledger of its own; every output kept."""
    relay = acc["relay"]
    p1, p2 = acc["people"]
    today = datetime.date.fromisoformat(relay.check_output("date +%F"))
    quarter, first_day = _previous_quarter(today)
    current = f"{today.year}Q{(today.month - 1) // 3 + 1}"
    work = f"{acc['config']['require_mount'] or '/var/log/safemail'}/accounting/verify-" \
           f"{uuid.uuid4().hex[:8]}"
    lines, sent = _synthetic_log(p1["mailbox"], p2["mailbox"], first_day)
    config = dict(acc["config"], log=f"{work}/mail.log", ledger=f"{work}/ledger.sqlite",
                  statement_retention_days=0)
    relay.check_output(f"install -d -m 0700 {work}")
    try:
        relay.check_output(f"cat > {work}/mail.log <<'EOF_LOG'\n" + "\n".join(lines)
                           + "\nEOF_LOG")
        relay.check_output(f"cat > {work}/accounting.yml <<'EOF_CFG'\n"
                           + yaml.safe_dump(config) + "EOF_CFG")
        run = f"{TOOL} --config {work}/accounting.yml"
        out = {"quarter": quarter, "current": current, "sent": sent, "work": work,
               "policy": acc["config"]["policy"]}
        out["open"] = relay.run(f"{run} bill --quarter {current}")
        out["bill"] = relay.run(f"{run} bill --quarter {quarter} --json")
        out["again"] = relay.run(f"{run} bill --quarter {quarter}")
        out["counts_after"] = relay.run(f"{run} counts --quarter {quarter} --json")
        out["statement"] = relay.run(f"{run} statement --quarter {quarter} --format csv")
        out["numbers_before_purge"] = {
            p["number"]: relay.run(f"grep -caF {p['number']} {work}/ledger.sqlite").stdout.strip()
            for p in (p1, p2)}
        out["purge"] = relay.run(f"{run} purge")
        out["statement_after_purge"] = relay.run(f"{run} statement --quarter {quarter}")
        out["numbers_after_purge"] = {
            p["number"]: relay.run(f"grep -caF {p['number']} {work}/ledger.sqlite").stdout.strip()
            for p in (p1, p2)}
        out["groups_after_purge"] = {
            p["specialty"]: relay.run(f"grep -caF {p['specialty']} {work}/ledger.sqlite")
            .stdout.strip() for p in (p1, p2)}
        out["window"] = relay.run(f"{run} window --hours {GAP[2]} --json")
        out["status"] = relay.run(f"{run} status")
        yield out
    finally:
        relay.run(f"rm -rf {shlex.quote(work)}")


@pytest.mark.req("ACC-02")
def test_payout_follows_the_counts_and_never_exceeds_the_cap(acc, billed, evidence):
    p1, p2 = acc["people"]
    policy = billed["policy"]
    bill = billed["bill"]
    evidence(f"bill {billed['quarter']}: rc {bill.rc}; {bill.stdout.strip()[:600]} "
             f"{bill.stderr.strip()[:300]}")
    assert bill.rc == 0, bill.stderr
    got = {p["number"]: p for p in json.loads(bill.stdout)["participants"]}
    n = billed["sent"]
    expect = {  # the mail to oneself counts nowhere
        p1["number"]: (n["p1_to_p2"], n["p2_to_p1"]),
        p2["number"]: (n["p2_to_p1"], n["p1_to_p2"]),
    }
    capped = set()
    for number, (sent, received) in expect.items():
        uncapped = sent * policy["rate_sent_cents"] + received * policy["rate_received_cents"]
        want = min(uncapped, policy["cap_cents"])
        assert (got[number]["sent"], got[number]["received"]) == (sent, received), got[number]
        assert got[number]["payout_cents"] == want, (number, got[number], want)
        assert got[number]["payout_cents"] <= policy["cap_cents"]
        assert got[number]["capped"] == (uncapped > policy["cap_cents"])
        if uncapped > policy["cap_cents"]:
            capped.add(number)
    # the synthetic quarter is only a proof if the cap bites for one and not for the other
    assert capped == {p2["number"]}, f"policy {policy} does not separate the two: {got}"


@pytest.mark.req("ACC-02")
def test_a_running_quarter_or_a_billed_one_is_refused(billed, evidence):
    open_, again = billed["open"], billed["again"]
    evidence(f"bill {billed['current']}: rc {open_.rc} {open_.stderr.strip()}; "
             f"bill {billed['quarter']} again: rc {again.rc} {again.stderr.strip()}")
    assert open_.rc == 1 and f"{billed['current']} is not over" in open_.stderr
    assert again.rc == 1 and "was billed on" in again.stderr


@pytest.mark.req("ACC-03")
def test_billing_deletes_participant_numbers_and_keeps_specialty_groups(acc, billed, evidence):
    p1, p2 = acc["people"]
    counts = json.loads(billed["counts_after"].stdout)
    status = json.loads(billed["status"].stdout)
    evidence(f"after billing {billed['quarter']}: raw participants {counts['participants']}; "
             f"statement {billed['statement'].stdout.strip()!r}; numbers in the ledger before "
             f"purge {billed['numbers_before_purge']}, after {billed['numbers_after_purge']}; "
             f"groups after {billed['groups_after_purge']}; purge: "
             f"{billed['purge'].stdout.strip()}; status {status['billed']}")
    assert counts["participants"] == [] and counts["billed"] is True
    # the statement (kept apart, with the numbers) exists until its retention ends ...
    assert f"{p2['number']},{p2['specialty']}," in billed["statement"].stdout
    assert billed["numbers_before_purge"][p2["number"]] != "0"
    # ... and the schedule (retention 0 days here) deletes it: no number left in the file
    assert billed["purge"].rc == 0 and f"statements deleted: {billed['quarter']}" in \
        billed["purge"].stdout
    assert "deleted" in billed["statement_after_purge"].stderr
    assert set(billed["numbers_after_purge"].values()) == {"0"}, billed["numbers_after_purge"]
    assert all(v != "0" for v in billed["groups_after_purge"].values())
    assert status["raw_records"] == {} and status["anonymised_mails"] == sum(
        v for k, v in billed["sent"].items() if k != "p1_to_p1")


@pytest.mark.req("ACC-03")
@pytest.mark.read_only
def test_deletion_schedule_is_deployed(acc, evidence):
    relay = acc["relay"]
    timer = relay.service("safemail-accounting-purge.timer")
    mode = relay.file(acc["ledger"]).mode if relay.file(acc["ledger"]).exists else None
    ledger_dir = relay.file(acc["ledger"].rsplit("/", 1)[0])
    cfg = acc["config"]
    evidence(f"purge timer enabled={timer.is_enabled} running={timer.is_running}; retention: "
             f"statements {cfg['statement_retention_days']} d, unbilled raw records "
             f"{cfg['raw_retention_days']} d after the quarter; ledger dir mode "
             f"{oct(ledger_dir.mode)}, ledger mode {oct(mode) if mode is not None else None}")
    assert timer.is_enabled and timer.is_running
    assert ledger_dir.mode == 0o700 and ledger_dir.user == "root"
    assert 0 < cfg["statement_retention_days"] and 0 < cfg["raw_retention_days"] <= 366


@pytest.mark.req("ACC-04")
def test_maintenance_window_from_the_anonymised_records(billed, evidence):
    window = billed["window"]
    evidence(f"window --hours {GAP[2]}: rc {window.rc} {window.stdout.strip()} "
             f"{window.stderr.strip()}")
    assert window.rc == 0, window.stderr
    w = json.loads(window.stdout)
    # The synthetic week is busy every hour except Thursday 02:00-05:00; the statement and
    # the participant numbers are gone by now (purged above), so only anonymised records
    # remain to compute it from.
    assert (w["start_weekday"], w["start_hour"], w["hours"]) == GAP
    assert w["mails"] == 0 and w["total"] > 0
    assert w["window"] == "Thursday 02:00 - Thursday 05:00"
