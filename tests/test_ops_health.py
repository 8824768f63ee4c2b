"""`safemail status` (ops/health.py) and its on-host probe (ops/healthprobe.py).

The parsers read output captured from the real programs (see CAPTURED below); the verdict is
tested by breaking one property of a healthy host at a time and watching exactly that problem
appear; the SSH path runs the real probe through sshcmd with only the ssh binary replaced.
"""

from __future__ import annotations

import ast
import copy
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_ops_patchcheck import top_level_imports

from safemail import cli
from safemail.errors import SafeMailError, UsageError
from safemail.inventory import Host
from safemail.ops import backup, health, sshcmd
from safemail.ops import healthprobe as hp
from safemail.ops import patchcheck as pc
from safemail.ops import status as patchstatus

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "monitoring/prometheus/safemail-rules.yml"
NOW = dt.datetime(2026, 12, 6, 18, 0, tzinfo=dt.UTC)
T = health.Thresholds()

# ------------------------------------------------------------------ captured output
# tests/data/health/README.md says where each file comes from (postqueue -j of Postfix 3.7.11,
# systemctl show of systemd 252, the probe itself run in a booted bookworm machine).
DATA = Path(__file__).with_name("data") / "health"
POSTQUEUE_J = (DATA / "postqueue-j.txt").read_text()
SYSTEMCTL = json.loads((DATA / "systemctl-show.json").read_text())
MOUNTINFO = (DATA / "mountinfo.txt").read_text()
IP_ADDR_VIP = (DATA / "ip-addr-vip.txt").read_text()


# ------------------------------------------------------------------ the probe's parsers
def test_postqueue_counts_per_queue_and_oldest_deferred():
    entries = [json.loads(line) for line in POSTQUEUE_J.splitlines() if line.strip()]
    deferred = [e["arrival_time"] for e in entries if e["queue_name"] == "deferred"]
    assert deferred and any(e["queue_name"] == "hold" for e in entries)  # the capture is real
    now = max(e["arrival_time"] for e in entries) + 600
    q = hp.parse_postqueue(POSTQUEUE_J, now)
    assert q["counts"]["deferred"] == len(deferred)
    assert q["counts"]["hold"] == sum(1 for e in entries if e["queue_name"] == "hold")
    assert q["total"] == len(entries)
    assert q["oldest_deferred_age_seconds"] == now - min(deferred)
    assert hp.parse_postqueue("", now) == {"counts": dict.fromkeys(hp.QUEUES, 0), "total": 0,
                                            "oldest_deferred_age_seconds": None, "error": None}


def test_postqueue_result_names_no_participant():
    """Counts only leave the relay: no address, queue id or delay reason."""
    entries = [json.loads(line) for line in POSTQUEUE_J.splitlines() if line.strip()]
    text = json.dumps(hp.parse_postqueue(POSTQUEUE_J, 2e9))
    assert "@" in POSTQUEUE_J
    for e in entries:
        assert e["queue_id"] not in text and e["sender"] not in text
        for r in e["recipients"]:
            assert r["address"] not in text


@pytest.mark.parametrize("bad", ["not json\n", '{"queue_id": "X"}\n', "[1, 2]\n",
                                 '{"queue_name": "deferred"}\n'])
def test_postqueue_garbage_is_an_error_not_a_count(bad):
    with pytest.raises((ValueError, KeyError)):
        hp.parse_postqueue(bad, 2e9)


@pytest.mark.parametrize("case, load, active, sub", [
    ("active", "loaded", "active", "running"), ("timer-waiting", "loaded", "active", "waiting"),
    ("inactive", "loaded", "inactive", "dead"), ("failed", "loaded", "failed", "failed"),
    ("not-found", "not-found", "inactive", "dead")])
def test_systemctl_show_states(case, load, active, sub):
    assert hp.parse_systemctl_show(SYSTEMCTL[case]) == {"load": load, "active": active,
                                                        "sub": sub}
    assert hp.parse_systemctl_show("") == {"load": "unknown", "active": "unknown",
                                           "sub": "unknown"}


def test_real_probe_output_of_a_bare_postfix_host_is_judged():
    """The probe's own output from the booted machine (no gate, no volume, no reports): each
    missing piece is named, the queue is counted, and no address reaches the verdict."""
    facts = json.loads((DATA / "probe-running.json").read_text())
    assert facts["queue"]["counts"]["deferred"] == 3 and facts["queue"]["counts"]["hold"] == 1
    h = _judge(facts, Host("relay1", ("service", "relay"), {}), t=T)
    for expected in ("S/MIME gate: safemail-smime-gate.service not installed",
                     f"S/MIME gate socket {health.GATE_SOCKET} missing",
                     "encrypted volume safemail-data locked (no /dev/mapper/safemail-data)",
                     "1 mail(s) in the hold queue (limit 0)",
                     "no patch status yet (is the patch_monitor role applied?)",
                     "backup: no answer from the status helper (is roles/backup applied?)"):
        assert expected in h.problems, (expected, h.problems)
    assert "@" not in json.dumps(h.problems) and "praxis" not in json.dumps(h.facts)
    stopped = json.loads((DATA / "probe-postfix-stopped.json").read_text())
    assert stopped["units"]["postfix@-.service"]["active"] == "inactive"
    assert stopped["queue"]["error"] is None  # root reads the queue without the master


def test_mountinfo_volume_and_binds_from_the_mapping():
    mounts = hp.parse_mountinfo(MOUNTINFO)
    dev = next(m["device"] for m in mounts if m["source"] == "/dev/mapper/safemail-data")
    v = hp.volume_state(mounts, dev, "/srv/safemail-data",
                        ["/var/spool/postfix", "/var/log/safemail"])
    assert v["unlocked"] and all(p["mounted"] and p["rw"] for p in v["paths"]), v
    # Locked: the mapping is gone, nothing counts as mounted from it.
    locked = hp.volume_state(mounts, None, "/srv/safemail-data", ["/var/spool/postfix"])
    assert not locked["unlocked"] and not any(p["mounted"] for p in locked["paths"])
    # A path on the root disk (the bind missing) is not "on the volume".
    v = hp.volume_state(mounts, dev, "/srv/safemail-data", ["/var/mail/vmail"])
    assert v["paths"][1] == {"path": "/var/mail/vmail", "mounted": False, "rw": False,
                             "from": None}
    # Something else mounted over the bind hides it: the last mount wins.
    over = MOUNTINFO + ("99 30 0:77 / /var/spool/postfix rw,relatime shared:60 - tmpfs tmpfs "
                        "rw\n")
    v = hp.volume_state(hp.parse_mountinfo(over), dev, "/srv/safemail-data",
                        ["/var/spool/postfix"])
    assert v["paths"][1]["mounted"] is False and v["paths"][1]["from"] == "tmpfs"


def test_mountinfo_escapes_and_read_only():
    text = ("40 30 254:1 /a\\040b /srv/with\\040space ro,relatime shared:9 - ext4 "
            "/dev/mapper/safemail-data rw\n")
    [m] = hp.parse_mountinfo(text)
    assert m["mountpoint"] == "/srv/with space" and m["root"] == "/a b"
    v = hp.volume_state([m], "254:1", "/srv/with space", [])
    assert v["paths"][0]["mounted"] and not v["paths"][0]["rw"]


LEFT = {"ok": 200, "expiring": 10, "expired": -1}


def _cert_report(states, checked=NOW - dt.timedelta(hours=3)):
    def end(i, s):
        if s not in LEFT:
            return None
        return (NOW + dt.timedelta(days=LEFT[s] + i, hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

    certs = [{"mailbox": f"dr.{i}@praxis.example", "state": s, "serial": "1f",
              "not_after": end(i, s), "days_left": LEFT[s] + i if s in LEFT else None}
             for i, s in enumerate(states)]
    return {"schema": 1, "checked_at": checked.strftime("%Y-%m-%dT%H:%M:%SZ"), "warn_days": 30,
            "attention": 0, "certificates": certs}


def test_cert_expiry_report_reduced_to_counts():
    doc = _cert_report(["expiring", "ok", "ok", "none"])
    c = hp.cert_counts(doc, NOW)
    assert c["counts"] == {"expired": 0, "expiring": 1, "unreadable": 0, "none": 1, "ok": 2}
    assert c["min_days_left"] == 10 and c["age_seconds"] == 3 * 3600 and c["warn_days"] == 30
    assert "@" not in json.dumps(c) and "praxis" not in json.dumps(c)
    # A state edited by hand, or one that changed since the daily report, counts as it is now.
    doc = _cert_report(["ok", "ok"])
    doc["certificates"][0]["not_after"] = "2026-12-06T17:00:00Z"  # an hour before NOW
    doc["certificates"][1]["not_after"] = "2026-12-20T00:00:00Z"  # within the 30 days
    assert hp.cert_counts(doc, NOW)["counts"] | {} == {"expired": 1, "expiring": 1,
                                                       "unreadable": 0, "none": 0, "ok": 0}
    with pytest.raises(ValueError):
        hp.cert_counts({"checked_at": "x"}, NOW)


def test_probe_is_standard_library_only_and_writes_nothing():
    """It runs as `python3 -` on hosts (no safemail package there) and must change nothing:
    no writing open(), no file/system-changing calls, no syslog/logging."""
    tree = ast.parse(Path(hp.__file__).read_text())
    names = top_level_imports(Path(hp.__file__))
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
    assert not names & {"syslog", "logging", "shutil", "tempfile"}, names
    changing = {"remove", "unlink", "rename", "replace", "mkdir", "makedirs", "chmod",
                "chown", "rmdir", "symlink", "link", "truncate", "kill", "system", "utime"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and \
                    fn.value.id in ("os", "shutil", "Path"):
                assert fn.attr not in changing, ast.unparse(node)
            assert getattr(fn, "attr", "") not in ("write", "write_text", "write_bytes",
                                                   "unlink", "touch"), ast.unparse(node)
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name == "open":
                modes = [a for a in node.args[1:2]] + [k.value for k in node.keywords
                                                      if k.arg == "mode"]
                assert all(isinstance(m, ast.Constant) and m.value in ("r", "rb")
                           for m in modes), ast.unparse(node)
    # The programs it runs only read: systemctl show, postqueue -j, the backup helper.
    runs = [ast.unparse(n.args[0]) for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "id", "") == "_run"]
    assert sorted(runs) == ["['ip', '-4', '-o', 'addr', 'show']", "['postqueue', '-j']",
                            "['systemctl', 'show', '-p', 'LoadState', "
                            "'-p', 'ActiveState', '-p', 'SubState', unit]", "[helper]"], runs


# ------------------------------------------------------------------ the verdict
def _patch_text(host="relay1", checked=NOW - dt.timedelta(hours=2), sim="", ok=True):
    s = pc.build_status(host, checked, sim, reboot_flag=False)
    if not ok:
        s.ok, s.error = False, "E: boom"
    return json.dumps(s.to_json())


def _backup_line(age=3600, reachable=True, archives=5):
    return json.dumps({"reachable": reachable, "archives": archives,
                       "last_archive": "relay1-2026-12-06T17:00:00",
                       "last_time": "2026-12-06T17:00:00", "age_seconds": age, "error": None})


RELAY = Host("relay1", ("service", "relay"), {"ansible_user": "root"})
STORE = Host("store1", ("service", "store"), {"ansible_user": "admin"})
BACKUP = Host("backup1", ("service", "backup"), {})


def _healthy_relay_facts():
    active = {"load": "loaded", "active": "active", "sub": "running"}
    waiting = {"load": "loaded", "active": "active", "sub": "waiting"}
    return {
        "schema": 1,
        "units": {"postfix@-.service": dict(active), health.GATE_UNIT: dict(active),
                  "safemail-cert-expiry.timer": dict(waiting),
                  "safemail-patch-check.timer": dict(waiting),
                  "safemail-backup.timer": dict(waiting),
                  health.CERT_EXPIRY_SERVICE: {"load": "loaded", "active": "inactive",
                                               "sub": "dead"}},
        "sockets": {health.GATE_SOCKET: True},
        "volume": {"name": "safemail-data", "unlocked": True, "paths": [
            {"path": p, "mounted": True, "rw": True, "from": "/dev/mapper/safemail-data"}
            for p in ("/srv/safemail-data", "/var/spool/postfix", "/var/log/safemail")]},
        "queue": {"counts": dict.fromkeys(hp.QUEUES, 0) | {"deferred": 2, "active": 1},
                  "total": 3, "oldest_deferred_age_seconds": 600, "error": None},
        "cert_expiry": hp.cert_counts(_cert_report(["ok", "ok"]), NOW),
        "patch": _patch_text(),
        "backup": _backup_line(),
    }


def _judge(facts, host=RELAY, t=T):
    out = sshcmd.Outcome(host.name, 0, json.dumps(facts) + "\n", "")
    return health.judge(host, out, t, NOW)


def test_a_healthy_relay_has_no_problem():
    h = _judge(_healthy_relay_facts())
    assert h.healthy and h.problems == [] and h.notes == [], h.problems
    assert h.kinds == ("relay", "client")
    assert health.exit_code([h]) == 0


def _set(path, value):
    def apply(facts):
        target = facts
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return apply


def _vol_path(i, **kw):
    def apply(facts):
        facts["volume"]["paths"][i].update(kw)
    return apply


# Each entry breaks one property of the healthy relay; the problem must name it.
BREAKS = {
    "gate-inactive": (_set(["units", health.GATE_UNIT], {"load": "loaded", "active": "failed",
                                                        "sub": "failed"}),
                      "S/MIME gate down: safemail-smime-gate.service failed (failed)"),
    "gate-not-installed": (_set(["units", health.GATE_UNIT], {"load": "not-found",
                                                             "active": "inactive",
                                                             "sub": "dead"}),
                           "S/MIME gate: safemail-smime-gate.service not installed"),
    "gate-unreported": (lambda f: f["units"].pop(health.GATE_UNIT), "S/MIME gate: not reported"),
    "backup-timer-off": (_set(["units", "safemail-backup.timer"], {
        "load": "loaded", "active": "inactive", "sub": "dead"}),
        "backup timer down: safemail-backup.timer inactive (dead)"),
    "patch-timer-off": (_set(["units", "safemail-patch-check.timer"], {
        "load": "loaded", "active": "inactive", "sub": "dead"}), "patch watch timer down"),
    "cert-timer-off": (_set(["units", "safemail-cert-expiry.timer"], {
        "load": "loaded", "active": "inactive", "sub": "dead"}), "certificate expiry timer down"),
    "cert-run-failed": (_set(["units", health.CERT_EXPIRY_SERVICE], {
        "load": "loaded", "active": "failed", "sub": "failed"}),
        "certificate expiry report: the last run of safemail-cert-expiry.service failed"),
    "systemctl-unusable": (_set(["units", "postfix@-.service"], {
        "load": "unknown", "active": "unknown", "sub": "Failed to connect to bus"}),
        "Postfix: postfix@-.service state unknown (unknown: Failed to connect to bus)"),
    "postfix-down": (_set(["units", "postfix@-.service"], {"load": "loaded",
                                                          "active": "inactive", "sub": "dead"}),
                     "Postfix down"),
    "socket-missing": (_set(["sockets", health.GATE_SOCKET], False),
                       f"S/MIME gate socket {health.GATE_SOCKET} missing"),
    "volume-locked": (_set(["volume", "unlocked"], False),
                      "encrypted volume safemail-data locked"),
    "bind-not-mounted": (_vol_path(1, mounted=False, rw=False, **{"from": None}),
                         "/var/spool/postfix not on the encrypted volume (not mounted)"),
    "bind-on-root-disk": (_vol_path(2, mounted=False, **{"from": "/dev/vda1"}),
                          "/var/log/safemail not on the encrypted volume (mounted from "
                          "/dev/vda1)"),
    "volume-read-only": (_vol_path(0, rw=False), "/srv/safemail-data mounted read-only"),
    "volume-unreported": (lambda f: f.pop("volume"), "encrypted volume: not reported"),
    "deferred-many": (_set(["queue", "counts", "deferred"], 51),
                      "51 mail(s) in the deferred queue (limit 50)"),
    "active-many": (_set(["queue", "counts", "active"], 201),
                    "201 mail(s) in the active queue (limit 200)"),
    "held": (_set(["queue", "counts", "hold"], 1), "1 mail(s) in the hold queue (limit 0)"),
    "corrupt": (_set(["queue", "counts", "corrupt"], 2), "2 corrupt queue file(s)"),
    "deferred-old": (_set(["queue", "oldest_deferred_age_seconds"], 4 * 3600 + 1),
                     "oldest deferred mail waits 4.0 h (limit 4 h)"),
    "queue-unreadable": (_set(["queue"], {"error": "postqueue: fatal: Queue report "
                                                   "unavailable - mail system is down"}),
                         "mail queue unreadable: postqueue: fatal: Queue report unavailable"),
    "cert-expired": (_set(["cert_expiry"], hp.cert_counts(_cert_report(["expired", "ok"]),
                                                           NOW)),
                     "1 participant certificate(s) expired"),
    "cert-expiring": (_set(["cert_expiry"], hp.cert_counts(_cert_report(["expiring"]), NOW)),
                      "1 participant certificate(s) expire within 30 d (fewest days left: 10)"),
    "cert-report-stale": (_set(["cert_expiry"], hp.cert_counts(
        _cert_report(["ok"], NOW - dt.timedelta(hours=49)), NOW)),
        "certificate expiry report is 49.0 h old (limit 48 h"),
    "cert-report-future": (_set(["cert_expiry"], hp.cert_counts(
        _cert_report(["ok"], NOW + dt.timedelta(hours=2)), NOW)),
        "certificate expiry report is dated in the future"),
    "cert-report-unreadable": (_set(["cert_expiry"], {"error": "unreadable report /var/log/"
                                                               "safemail/cert-expiry.json: x"}),
                               "certificate expiry: unreadable report"),

    "patch-missing": (_set(["patch"], None), "no patch status yet"),
    "patch-failed": (_set(["patch"], _patch_text(ok=False)), "patch check failed: E: boom"),
    "patch-stale": (_set(["patch"], _patch_text(checked=NOW - dt.timedelta(hours=49))),
                    "patch check is 49.0 h old (limit 48 h"),
    "patch-garbage": (_set(["patch"], "{not json"), "unreadable patch status"),
    "backup-stale": (_set(["backup"], _backup_line(age=27 * 3600)),
                     "backup is 27.0 h old (limit 26 h)"),
    "backup-unreachable": (_set(["backup"], json.dumps({"reachable": False,
                                                        "error": "Connection closed"})),
                           "backup: Connection closed"),
    "backup-none": (_set(["backup"], _backup_line(age=None, archives=0)),
                    "backup: no archive yet"),
    "backup-helper-missing": (_set(["backup"], None), "backup: no answer from the status "
                                                      "helper"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_each_broken_property_is_named(name):
    breaker, expected = BREAKS[name]
    facts = _healthy_relay_facts()
    breaker(facts)
    h = _judge(facts)
    assert not h.healthy and health.exit_code([h]) == 4
    assert len(h.problems) == 1 and h.problems[0].startswith(expected), h.problems
    table = health.render_table([h], health.failover([h], [RELAY]))
    assert f"relay1: {h.problems[0]}" in table and "UNHEALTHY" in table


def test_limits_are_inclusive_and_configurable():
    facts = _healthy_relay_facts()
    facts["queue"]["counts"].update(deferred=50, active=200)
    facts["queue"]["oldest_deferred_age_seconds"] = 4 * 3600
    assert _judge(facts).healthy
    strict = health.Thresholds(max_deferred=1, max_deferred_age_hours=0.1)
    assert len(_judge(facts, t=strict).problems) == 2


def test_a_fresh_relay_without_an_expiry_report_yet_is_noted_not_failed():
    facts = _healthy_relay_facts()
    facts["cert_expiry"] = {"error": "no report at /var/log/safemail/cert-expiry.json yet",
                            "missing": True}
    h = _judge(facts)
    assert h.healthy and h.notes[0].startswith("certificate expiry: no report at"), h.notes
    facts["units"]["safemail-cert-expiry.timer"]["active"] = "inactive"
    assert _judge(facts).problems == [
        "certificate expiry timer down: safemail-cert-expiry.timer inactive (waiting)"]
    # A run that failed leaves no report: both are problems, not a note.
    facts = _healthy_relay_facts()
    facts["cert_expiry"] = {"error": "no report yet", "missing": True}
    facts["units"][health.CERT_EXPIRY_SERVICE]["active"] = "failed"
    assert _judge(facts).problems == [
        "certificate expiry report: the last run of safemail-cert-expiry.service failed "
        "(journalctl -u safemail-cert-expiry.service)", "certificate expiry: no report yet"]


def test_notes_do_not_fail():
    facts = _healthy_relay_facts()
    sim = ("Inst libssl3 [3.0.15-1~deb12u1] (3.0.17-1~deb12u2 Debian-Security:12/stable-security"
           " [amd64])\n")
    s = pc.build_status("relay1", NOW - dt.timedelta(hours=1), sim, reboot_flag=True)
    facts["patch"] = json.dumps(s.to_json())
    facts["cert_expiry"] = hp.cert_counts(_cert_report(["ok", "none"]), NOW)
    h = _judge(facts)
    assert h.healthy and h.notes == [
        "directory entries without a usable certificate: 1 none, 0 unreadable",
        "1 security update(s) pending (`safemail patch apply`)", "reboot required"], h.notes


def test_unreachable_and_probe_failure():
    down = health.judge(RELAY, sshcmd.Outcome("relay1", unreachable="SSH failed: timeout"),
                        T, NOW)
    assert not down.reachable and down.problems == ["unreachable (SSH failed: timeout)"]
    sudo = health.judge(STORE, sshcmd.Outcome("store1", 1, "", "sudo: a password is required\n"),
                        T, NOW)
    assert sudo.reachable and sudo.problems == ["probe failed: sudo: a password is required"]
    assert health.exit_code([sudo]) == 4 and health.exit_code([sudo, down]) == 3


def test_kinds_and_probe_arguments():
    assert health.kinds(BACKUP) == ("backup",)
    assert health.kinds(STORE) == ("store", "client")
    args = health.probe_args(STORE)
    assert args == ["--patch", "/var/lib/safemail/patch-status.json",
                    "--unit", "safemail-patch-check.timer", "--unit", "dovecot.service",
                    "--unit", "safemail-backup.timer", "--volume", "safemail-data",
                    "--mount", "/srv/safemail-data",
                    "--bind", "/var/mail/vmail", "--bind", "/var/log/safemail",
                    "--backup-helper", backup.HELPER]
    lean = health.probe_args(STORE, with_backup=False)
    assert "--backup-helper" not in lean and "safemail-backup.timer" not in lean
    assert health.probe_args(BACKUP) == ["--patch", "/var/lib/safemail/patch-status.json",
                                         "--unit", "safemail-patch-check.timer"]
    relay = health.probe_args(Host("r", ("service", "relay"), {"encrypted_storage_mount": "/d"}))
    assert "--queue" in relay and "/d" in relay and health.CERT_EXPIRY_REPORT in relay
    assert health.remote_command(STORE).startswith("sudo -n /usr/bin/python3 - --patch ")
    assert health.remote_command(RELAY).startswith("/usr/bin/python3 - ")


def test_volume_binds_match_the_playbooks_group_vars():
    """The paths status expects on the volume are those site.yml puts there."""
    for kind, expected in health.VOLUME_BINDS.items():
        gv = yaml.safe_load((REPO / f"playbooks/group_vars/{kind}.yml").read_text())
        assert tuple(b["path"] for b in gv["encrypted_storage_binds"]) == expected, kind


def test_single_relay_stage_has_no_failover_and_no_problem():
    """One relay: roles/relay_vrrp does not run (site.yml), status asks nothing of VRRP and
    judges nothing, even if a relay's facts say keepalived is down."""
    h = _judge(_healthy_relay_facts())
    f = health.failover([h], [RELAY, STORE])
    assert f["configured"] is False and f["mode"] == "single" and f["relays"] == ["relay1"]
    assert f["holders"] == [] and f["address"] is None and "one relay" in f["note"]
    assert h.problems == [] and health.exit_code([h]) == 0
    assert health.service_address([RELAY, STORE]) is None
    assert "--service-address" not in health.probe_args(RELAY)
    assert health.failover([], [STORE])["note"] == "no relay"


# ------------------------------------------------------------------ failover (AV-02)
VIP = "198.18.2.100"
# As ansible-inventory --list shows a redundant stage: the site data, and relay_vrrp_address
# as playbooks/group_vars/relay.yml wires it (unrendered).
_SERVICE = {"safemail_relay_service": {"name": "mail", "address": VIP},
            "relay_vrrp_address": "{{ safemail_relay_service.address }}"}
R1 = Host("relay1", ("service", "relay"), {"ansible_user": "root", **_SERVICE})
R2 = Host("relay2", ("service", "relay"), {"ansible_user": "root", **_SERVICE})
STAGE = [R1, R2, STORE]


def test_parse_ip_addr_on_captured_output():
    """iproute2 6.1.0 with the service address added as keepalived adds it (secondary)."""
    addresses = hp.parse_ip_addr(IP_ADDR_VIP)
    assert addresses == ["127.0.0.1", "198.18.2.10", VIP]
    active = {"load": "loaded", "active": "active", "sub": "running"}
    assert hp.vrrp_state(addresses, VIP, active) == {
        "address": VIP, "holds_address": True, "keepalived": "active", "error": None}
    # Without the secondary line it is not held, and an address that is a prefix of another
    # (198.18.2.10 of .100, .1 of .10) is not taken for it.
    without = "".join(line for line in IP_ADDR_VIP.splitlines(True) if VIP not in line)
    assert hp.vrrp_state(hp.parse_ip_addr(without), VIP, active)["holds_address"] is False
    assert hp.vrrp_state(["198.18.2.100"], "198.18.2.10", active)["holds_address"] is False
    assert hp.vrrp_state(["198.18.2.10"], "198.18.2.1", active)["holds_address"] is False
    gone = {"load": "not-found", "active": "inactive", "sub": "dead"}
    assert hp.vrrp_state([], VIP, gone)["keepalived"] == "not-found"
    with pytest.raises(ValueError):
        hp.parse_ip_addr("3: eth0    link/ether 52:54:00:12:34:56\n")


def test_service_address_is_decided_as_site_yml_decides():
    assert health.service_address(STAGE) == VIP
    assert health.service_address([R1, STORE]) is None  # one relay: the role does not run
    literal = Host("relay2", R2.groups, {**_SERVICE, "relay_vrrp_address": "198.18.2.200"})
    with pytest.raises(SafeMailError, match="no single service address.*relay2: 198.18.2.200"):
        health.service_address([R1, literal])
    both = Host("relay1", R1.groups, {**_SERVICE, "relay_vrrp_address": "198.18.2.200"})
    assert health.service_address([both, literal]) == "198.18.2.200"
    bare = Host("relay2", R2.groups, {})
    with pytest.raises(SafeMailError, match="relay2: none"):
        health.service_address([R1, bare])
    args = health.probe_args(R1, address=VIP)
    assert args[-2:] == ["--service-address", VIP]
    assert health.remote_command(STORE, address=VIP).endswith(f"--service-address {VIP}")


def _vrrp_relay(host, holds, keepalived="active", address=VIP):
    facts = _healthy_relay_facts()
    facts["vrrp"] = {"address": address, "holds_address": holds, "keepalived": keepalived,
                     "error": None}
    return _judge(facts, host)


def _store(holds=False):
    facts = _healthy_relay_facts()
    for key in ("queue", "cert_expiry", "sockets"):
        facts.pop(key)
    facts["units"] = {u: {"load": "loaded", "active": "active", "sub": "running"} for u in
                      ("dovecot.service", "safemail-patch-check.timer", "safemail-backup.timer")}
    facts["vrrp"] = {"address": VIP, "holds_address": holds, "keepalived": "not-found",
                     "error": None}
    return _judge(facts, STORE)


def test_failover_one_holder_is_healthy():
    results = [_vrrp_relay(R1, True), _vrrp_relay(R2, False), _store()]
    f = health.failover(results, STAGE)
    assert f["configured"] is True and f["mode"] == "vrrp" and f["address"] == VIP
    assert f["relays"] == ["relay1", "relay2"] and f["holders"] == ["relay1"]
    assert all(r.healthy for r in results) and health.exit_code(results) == 0
    table = health.render_table(results, f)
    assert f"failover: vrrp, service address {VIP}, holder relay1 (relays relay1, relay2); " \
           "held by relay1" in table and "all 3 host(s) healthy" in table
    doc = health.to_json(results, "test", NOW, T, f)
    assert doc["failover"]["holders"] == ["relay1"] and doc["exit_code"] == 0
    assert doc["hosts"][0]["vrrp"]["holds_address"] is True


def test_failover_no_holder_is_a_problem_of_every_relay():
    results = [_vrrp_relay(R1, False), _vrrp_relay(R2, False), _store()]
    f = health.failover(results, STAGE)
    msg = f"no relay holds the service address {VIP}: participants cannot send"
    assert results[0].problems == [msg] and results[1].problems == [msg]
    assert results[2].problems == [] and health.exit_code(results) == 4
    assert f["holders"] == [] and "holder NONE" in health.render_table(results, f)
    assert health.to_json(results, "test", NOW, T, f)["healthy"] is False


def test_failover_two_holders_are_split_brain():
    results = [_vrrp_relay(R1, True), _vrrp_relay(R2, True), _store()]
    f = health.failover(results, STAGE)
    msg = f"split brain: relay1 and relay2 both hold {VIP}"
    assert results[0].problems == [msg] and results[1].problems == [msg]
    assert f["holders"] == ["relay1", "relay2"] and health.exit_code(results) == 4
    assert "SPLIT BRAIN" in health.render_table(results, f)
    # A probe that says it holds another address is not a holder of this one.
    results = [_vrrp_relay(R1, True), _vrrp_relay(R2, True, address="198.18.2.200"), _store()]
    f = health.failover(results, STAGE)
    assert f["holders"] == ["relay1"]
    assert results[1].problems == [f"failover: probed for 198.18.2.200, not {VIP}"]


def test_failover_keepalived_inactive_is_a_problem_of_that_relay():
    results = [_vrrp_relay(R1, True), _vrrp_relay(R2, False, keepalived="inactive"), _store()]
    f = health.failover(results, STAGE)
    assert f["holders"] == ["relay1"] and results[0].problems == []
    assert results[1].problems == [f"keepalived inactive: this relay cannot take over the "
                                   f"service address {VIP}"]
    assert health.exit_code(results) == 4
    # On a host that is not a relay keepalived is not expected (not-found) and not judged.
    assert results[2].problems == []


def test_failover_unreachable_relay_is_not_counted():
    down = health.judge(R2, sshcmd.Outcome("relay2", unreachable="SSH failed: timeout"), T, NOW)
    # Whatever a down relay's stale facts might say, it does not count.
    down.facts = {"vrrp": {"address": VIP, "holds_address": True, "keepalived": "active"}}
    results = [_vrrp_relay(R1, True), down, _store()]
    f = health.failover(results, STAGE)
    assert f["holders"] == ["relay1"] and results[0].problems == []
    assert f["unanswered"] == ["relay2"] and "not counted (no answer): relay2" in f["note"]
    assert health.exit_code(results) == 3
    # The relay that answered does not hold it: a problem, with the doubt named; 3 still wins.
    results = [_vrrp_relay(R1, False), down, _store()]
    f = health.failover(results, STAGE)
    assert f["holders"] == [] and results[0].problems == [
        f"no relay holds the service address {VIP}: participants cannot send (no answer "
        "from relay2: it may hold it)"]
    assert health.exit_code(results) == 3
    # A relay whose probe failed (no facts) is not a holder either.
    failed = health.judge(R2, sshcmd.Outcome("relay2", 1, "", "sudo: a password is required"),
                          T, NOW)
    results = [_vrrp_relay(R1, True), failed, _store()]
    assert health.failover(results, STAGE)["holders"] == ["relay1"]
    assert health.exit_code(results) == 4


def test_failover_non_relay_holding_the_address_is_a_problem():
    results = [_vrrp_relay(R1, True), _vrrp_relay(R2, False), _store(holds=True)]
    f = health.failover(results, STAGE)
    assert f["holders"] == ["relay1"] and f["others"] == ["store1"]
    assert results[2].problems == [f"holds the relays' service address {VIP} but is not a "
                                   "relay (participants' mail may go to it: a hijack or a "
                                   "wrong address)"]
    assert health.exit_code(results) == 4


def test_failover_with_a_relay_left_out_by_hosts():
    """`--hosts relay1`: relay2 is not probed; no holder among relay1 is not proof of none."""
    results = [_vrrp_relay(R1, False)]
    f = health.failover(results, STAGE)
    assert f["unprobed"] == ["relay2"] and results[0].problems == []
    assert "not probed (--hosts): relay2" in f["note"]
    # Missing VRRP facts from a relay that answered are named.
    facts = _healthy_relay_facts()
    silent = _judge(facts, R2)
    health.failover([_vrrp_relay(R1, True), silent], STAGE)
    assert silent.problems == [f"failover state not reported (service address {VIP})"]


def test_failover_metrics_and_rule():
    results = [_vrrp_relay(R1, True), _vrrp_relay(R2, True, keepalived="failed"), _store()]
    f = health.failover(results, STAGE)
    families, samples = _parse_prom(health.to_prometheus(results, "test", NOW, f))

    def value(name, **labels):
        found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    assert value("safemail_failover_holders", stage="test", address=VIP) == 2
    assert value("safemail_failover_configured") == 1
    assert value("safemail_relays") == 2
    assert value("safemail_relay_holds_service_address", host="relay1", address=VIP) == 1
    assert value("safemail_relay_holds_service_address", host="store1") == 0
    assert value("safemail_unit_active", host="relay1", unit=health.KEEPALIVED_UNIT) == 1
    assert value("safemail_unit_active", host="relay2", unit=health.KEEPALIVED_UNIT) == 0
    assert not [s for s in samples if s[1].get("host") == "store1"
                and s[1].get("unit") == health.KEEPALIVED_UNIT]
    f = health.failover([_vrrp_relay(R1, True), _vrrp_relay(R2, False)], STAGE)
    _, samples = _parse_prom(health.to_prometheus([], "test", NOW, f))
    assert value("safemail_failover_holders") == 1
    # Single relay: no holders gauge (nothing to hold), failover_configured 0.
    _, samples = _parse_prom(health.to_prometheus([], "test", NOW,
                                                  health.failover([], [RELAY])))
    assert value("safemail_failover_configured") == 0
    assert not [s for s in samples if s[0] == "safemail_failover_holders"]
    # The alert: holders other than exactly one, for long enough to span two collections.
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"]}
    rule = rules["SafeMailRelayServiceAddressNotHeldOnce"]
    assert rule["expr"] == "safemail_failover_holders != 1"
    assert rule["labels"]["severity"] == "critical" and rule["for"] == "10m"
    assert rules["SafeMailServiceDown"]["expr"] == "safemail_unit_active == 0"


def test_real_probe_reports_whether_this_machine_holds_an_address(tmp_path):
    """The real probe through sshcmd (only ssh replaced): this machine's loopback holds
    127.0.0.1 and no interface holds 192.0.2.254 (TEST-NET-1, never assigned here)."""
    ssh = _fake_ssh(tmp_path, 'for last; do :; done; exec sh -c "$last"')
    host = Host("backup1", ("service", "backup"), {
        "ansible_host": "backup1.invalid", "ansible_user": "root",
        "ansible_ssh_executable": ssh})
    [held] = health.collect([host], T, NOW, repo=REPO, address="127.0.0.1")
    assert held.facts["vrrp"]["holds_address"] is True, held.facts.get("vrrp")
    assert held.facts["vrrp"]["error"] is None and held.facts["vrrp"]["keepalived"]
    [free] = health.collect([host], T, NOW, repo=REPO, address="192.0.2.254")
    assert free.facts["vrrp"]["holds_address"] is False
    [none] = health.collect([host], T, NOW, repo=REPO)
    assert "vrrp" not in none.facts


def test_thresholds_are_checked():
    with pytest.raises(UsageError, match="--max-deferred must be 0 or more"):
        health.Thresholds(max_deferred=-1).check()
    with pytest.raises(UsageError, match="--backup-max-age-hours must be positive"):
        health.Thresholds(backup_max_age_hours=0).check()
    with pytest.raises(UsageError):
        health.Thresholds(report_max_age_hours=float("nan")).check()


# ------------------------------------------------------------------ output forms
def _results():
    facts = _healthy_relay_facts()
    broken = copy.deepcopy(facts)
    broken["units"][health.GATE_UNIT]["active"] = "inactive"
    store = copy.deepcopy(facts)
    for key in ("queue", "cert_expiry", "sockets"):
        store.pop(key)
    store["units"] = {u: {"load": "loaded", "active": "active", "sub": "running"} for u in
                      ("dovecot.service", "safemail-patch-check.timer", "safemail-backup.timer")}
    return [_judge(broken), _judge(store, STORE),
            health.judge(BACKUP, sshcmd.Outcome("backup1", unreachable="no answer in 240 s"),
                         T, NOW)]


def test_table_and_json():
    results = _results()
    fail = health.failover(results, [RELAY, STORE, BACKUP])
    table = health.render_table(results, fail)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["HOST", "STATE"]
    assert re.search(r"^relay1\s+UNHEALTHY\s+1/2/0\s+10 min\s+DOWN\s+ok\s+60 min\s+0 exp/0 soon"
                     r"\s+0 \(0 security\)", table, re.M), table
    assert re.search(r"^backup1\s+UNREACHABLE", table, re.M)
    assert "failover: single (relay1); one relay: no failover" in table
    assert "relay1: S/MIME gate down: safemail-smime-gate.service inactive" in table
    doc = health.to_json(results, "test", NOW, T, fail)
    assert doc["healthy"] is False and doc["exit_code"] == 3
    assert doc["failover"]["configured"] is False
    relay, store, down = doc["hosts"]
    assert relay["queue"]["counts"]["deferred"] == 2 and relay["backup"]["stale"] is False
    assert store["healthy"] and store["problems"] == [] and store["patch"]["pending"] == 0
    assert down["reachable"] is False and down["problems"]
    json.dumps(doc)


def _parse_prom(text):
    families, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in families, f"{name} described twice"
            families[name] = {"help": True}
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families[name]["type"] = kind
        else:
            m = re.fullmatch(r'(safemail_[a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (\S+)',
                             line)
            assert m, line
            assert m[1] in families, f"{m[1]} sample before its HELP/TYPE"
            samples.append((m[1], dict(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', m[2])),
                            float(m[3])))
    return families, samples


def test_prometheus_textfile():
    results = _results()
    text = health.to_prometheus(results, "test", NOW, health.failover(results, [RELAY]))
    families, samples = _parse_prom(text)
    assert all(f.get("type") == "gauge" for f in families.values())
    assert set(families) <= set(health.METRICS)

    def value(name, **labels):
        found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    assert value("safemail_host_up", host="backup1") == 0
    assert not [s for s in samples if s[1].get("host") == "backup1"
                and s[0] not in ("safemail_host_up", "safemail_host_healthy",
                                 "safemail_host_problems")]
    assert value("safemail_unit_active", host="relay1", unit=health.GATE_UNIT) == 0
    assert value("safemail_host_healthy", host="relay1") == 0
    assert value("safemail_host_healthy", host="store1") == 1
    assert value("safemail_queue_messages", host="relay1", queue="deferred") == 2
    assert value("safemail_queue_oldest_deferred_age_seconds", host="relay1") == 600
    assert value("safemail_backup_age_seconds", host="store1") == 3600
    assert value("safemail_volume_path_mounted", host="store1", path="/var/spool/postfix") == 1
    assert value("safemail_failover_configured", stage="test") == 0
    assert value("safemail_status_collected_timestamp_seconds") == NOW.timestamp()
    assert value("safemail_cert_expiry_earliest_timestamp_seconds", host="relay1") == \
        (NOW + dt.timedelta(days=200, hours=1)).timestamp()
    assert value("safemail_unit_failed", host="relay1", unit=health.CERT_EXPIRY_SERVICE) == 0
    assert not [s for s in samples if s[0] == "safemail_unit_active"
                and s[1]["unit"] == health.CERT_EXPIRY_SERVICE]  # a oneshot is not "down"
    assert not re.search(r"[\w.]+@[\w]+\.[a-z]+", text)  # no address (postfix@-.service is)


def test_prometheus_label_values_are_escaped():
    h = health.HostHealth('we"ird\\host\n', ("auth",), facts={"units": {}})
    text = health.to_prometheus([h], "test", NOW, health.failover([h], []))
    assert 'host="we\\"ird\\\\host\\n"' in text
    _parse_prom(text)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus) "
                    "not installed; the YAML-shape tests run instead")
def test_promtool_accepts_rules_and_metrics():
    proc = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _results()
    text = health.to_prometheus(results, "test", NOW, health.failover(results, [RELAY]))
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_shape_and_names():
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert doc["groups"][0]["name"] and rules
    alerts = [r["alert"] for r in rules]
    assert len(alerts) == len(set(alerts))
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
        assert re.fullmatch(r"SafeMail[A-Za-z]+", r["alert"])
        assert r["labels"]["severity"] in ("critical", "warning", "info")
        assert r["annotations"]["summary"]
        assert "for" not in r or re.fullmatch(r"\d+[smhd]", r["for"])
        used = set(re.findall(r"safemail_[a-z_]+", r["expr"]))
        assert used and used <= set(health.METRICS), (r["alert"], used - set(health.METRICS))
        assert r["expr"].count("(") == r["expr"].count(")")
    # Every per-host check has an alert.
    used = {m for r in rules for m in re.findall(r"safemail_[a-z_]+", r["expr"])}
    assert set(health.METRICS) - used <= {"safemail_host_healthy", "safemail_relays",
                                          "safemail_relay_holds_service_address",
                                          "safemail_backup_archives",
                                          "safemail_cert_expiry_earliest_timestamp_seconds",
                                          "safemail_patch_pending_updates"}


def test_alert_thresholds_equal_the_command_defaults():
    exprs = {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"]}
    assert exprs["SafeMailActiveQueueLarge"].endswith(f"> {T.max_active}")
    assert exprs["SafeMailDeferredQueueLarge"].endswith(f"> {T.max_deferred}")
    assert exprs["SafeMailMailOnHold"].endswith(f"> {T.max_hold}")
    assert exprs["SafeMailDeferredMailOld"].endswith(f"> {T.max_deferred_age_hours:g} * 3600")
    assert exprs["SafeMailBackupStale"].endswith(f"> {T.backup_max_age_hours:g} * 3600")
    for name in ("SafeMailCertExpiryReportStale", "SafeMailPatchCheckStale"):
        assert exprs[name].endswith(f"> {T.report_max_age_hours:g} * 3600")


def test_textfile_written_atomically_and_readable(tmp_path):
    target = tmp_path / "safemail.prom"
    target.write_text("old\n")
    health.write_textfile("new 1\n", target)
    assert target.read_text() == "new 1\n" and oct(target.stat().st_mode)[-3:] == "644"
    assert [p.name for p in tmp_path.iterdir()] == ["safemail.prom"]
    with pytest.raises(UsageError, match="is not a directory"):
        health.write_textfile("x", tmp_path / "missing" / "safemail.prom")


# ------------------------------------------------------------------ the SSH path, for real
def _fake_ssh(tmp_path: Path, body: str) -> str:
    """An ssh executable that runs the remote command (its last argument) here."""
    ssh = tmp_path / "ssh"
    ssh.write_text(f"#!/bin/sh\n{body}\n")
    ssh.chmod(0o755)
    return str(ssh)


def test_collect_sends_the_probe_on_stdin_and_judges_its_answer(tmp_path):
    """sshcmd builds the argv with Ansible's plugin; the 'ssh' here runs the remote command
    locally, so the real probe reads this machine (no relay services: each is named)."""
    ssh = _fake_ssh(tmp_path, 'for last; do :; done; exec sh -c "$last"')
    host = Host("relay1", ("service", "relay"), {
        "ansible_host": "relay1.invalid", "ansible_user": "root",
        "ansible_ssh_executable": ssh, "encrypted_storage_name": "status19-no-such-volume"})
    [h] = health.collect([host], T, NOW, repo=REPO)
    assert h.reachable and h.facts.get("schema") == 1, h.error
    assert set(h.facts["units"]) == {"postfix@-.service", health.GATE_UNIT,
                                     "safemail-cert-expiry.timer", "safemail-patch-check.timer",
                                     "safemail-backup.timer", health.CERT_EXPIRY_SERVICE}
    assert "encrypted volume status19-no-such-volume locked (no /dev/mapper/" \
           "status19-no-such-volume)" in h.problems
    assert any(p.startswith("mail queue unreadable") for p in h.problems)
    assert h.backup is not None and not h.backup.reachable
    assert health.exit_code([h]) == 4


def test_collect_reports_an_unreachable_host(tmp_path):
    ssh = _fake_ssh(tmp_path, 'echo "ssh: connect to host relay1.invalid port 22: No route" >&2;'
                              " exit 255")
    host = Host("relay1", ("service", "relay"), {"ansible_host": "relay1.invalid",
                                                 "ansible_ssh_executable": ssh})
    [h] = health.collect([host], T, NOW, repo=REPO)
    assert not h.reachable and "No route" in h.problems[0]
    assert health.exit_code([h]) == 3


# ------------------------------------------------------------------ the command line
def test_cli_help_and_bad_input(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        cli.main(["status", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("--json", "--prometheus", "--textfile", "exit 0 all healthy".lower()):
        assert word in out.lower()
    with pytest.raises(SystemExit) as exc:
        cli.main(["status", "--json", "--prometheus"])
    assert exc.value.code == 2
    assert cli.main(["status", "--max-deferred", "-1"]) == UsageError.exit_code
    assert "--max-deferred must be 0 or more" in capsys.readouterr().err
    assert cli.main(["status", "--textfile", "/nonexistent/dir/safemail.prom"]) == 2
    assert "/nonexistent/dir is not a directory" in capsys.readouterr().err


def test_cli_runs_end_to_end_with_collected_results(capsys, monkeypatch, tmp_path):
    from safemail.ops import cli as ops_cli

    results = _results()
    monkeypatch.setattr(ops_cli, "read_inventory", lambda _inv: [RELAY, STORE, BACKUP])
    monkeypatch.setattr(health, "collect",
                        lambda hosts, t, now, with_backup, repo, address: results)
    prom = tmp_path / "safemail.prom"
    assert cli.main(["status", "--json", "--textfile", str(prom)]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert [h["host"] for h in doc["hosts"]] == ["relay1", "store1", "backup1"]
    assert "safemail_host_up" in prom.read_text()
    assert cli.main(["status"]) == 3
    assert "relay1: S/MIME gate down" in capsys.readouterr().out
    assert cli.main(["status", "--prometheus"]) == 3
    _parse_prom(capsys.readouterr().out)


def test_cli_redundant_stage_asks_for_the_service_address(capsys, monkeypatch):
    """The mode is the whole stage's (also with --hosts); collect gets the address; a relay
    pair with no holder fails with 4; relays without one address are a clear error."""
    from safemail.ops import cli as ops_cli

    asked = {}

    def collect(hosts, t, now, with_backup, repo, address):
        asked.update(hosts=[h.name for h in hosts], address=address)
        return [_vrrp_relay(R1, False)] if len(hosts) == 1 else \
            [_vrrp_relay(R1, False), _vrrp_relay(R2, False), _store()]

    monkeypatch.setattr(ops_cli, "read_inventory", lambda _inv: STAGE)
    monkeypatch.setattr(health, "collect", collect)
    assert cli.main(["status"]) == 4
    out = capsys.readouterr().out
    assert asked["address"] == VIP and asked["hosts"] == ["relay1", "relay2", "store1"]
    assert f"relay2: no relay holds the service address {VIP}" in out
    assert cli.main(["status", "--hosts", "relay1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert asked["address"] == VIP and doc["failover"]["unprobed"] == ["relay2"]
    bad = Host("relay2", R2.groups, {})
    monkeypatch.setattr(ops_cli, "read_inventory", lambda _inv: [R1, bad, STORE])
    assert cli.main(["status"]) != 0
    assert "no single service address" in capsys.readouterr().err


def test_patch_parser_is_the_one_patch_status_uses():
    """Reuse, not a copy: the patch part is read by ops/status.py's parser."""
    r = patchstatus.parse_status_text("relay1", _patch_text())
    assert r.status is not None and r.status.ok
