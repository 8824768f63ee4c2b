"""`safemail status`: the operator's view of a running stage, per host, with a verdict.

Per service host (the stage's inventory, the same reader as `safemail patch status`): reachable
over SSH; its services; on relay and store the LUKS volume unlocked and its paths mounted from
it; on relays the Postfix queue (active, deferred, hold) and the oldest deferred mail, the
S/MIME gate's unit and socket, the certificate expiry report; on every host the patch watch's
status; on every backup client the newest archive's age. Plus the stage's failover state
(:func:`failover`): with one relay, mode ``single`` (no failover, not a problem); with two or
more relays, mode ``vrrp`` (roles/relay_vrrp, applied by site.yml exactly when the inventory's
relay group has more than one host): every probed host says whether it holds the service
address (``safemail_relay_service.address``) and each relay whether keepalived is active.
Exactly one relay must hold it: none (participants cannot send) or two or more (split brain),
keepalived not active on a relay, or a host that is not a relay holding it are problems of the
hosts concerned (exit 4). A relay that did not answer is not counted as a holder.

One SSH connection per host, in parallel, with the command line Ansible's own ssh plugin builds
(:mod:`safemail.ops.sshcmd`, as `patch status` and `backup status`). It sends the stdlib-only
probe (:mod:`safemail.ops.healthprobe`) on stdin to ``python3 -``, under ``sudo -n`` for a
named admin: nothing is installed or written on the host, and the probe returns counts, never
a participant's address. The backup and patch parts reuse the parsers of `backup status`
(:func:`safemail.ops.backup.parse_helper`) and `patch status`
(:func:`safemail.ops.status.parse_status_text`).

The verdict (:func:`assess`), the table, the JSON and the Prometheus textfile are pure functions
of the collected facts and the thresholds (tests/test_ops_health.py).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import os
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safemail.errors import SafeMailError
from safemail.inventory import Host
from safemail.ops import backup, healthprobe, sshcmd
from safemail.ops import status as patchstatus
from safemail.ops.patchcheck import DEFAULT_STATUS as PATCH_STATUS_FILE
from safemail.ops.patchcheck import Status as PatchStatus
from safemail.project import project_root

# What the roles put where (their defaults; an inventory may override the first three).
VOLUME_NAME = "safemail-data"          # encrypted_storage_name
VOLUME_MOUNT = "/srv/safemail-data"    # encrypted_storage_mount
GATE_SOCKET = "/run/safemail-gate/milter.sock"  # mailrelay_milter_socket
GATE_UNIT = "safemail-smime-gate.service"
CERT_EXPIRY_REPORT = "/var/log/safemail/cert-expiry.json"  # safemail.ops.certexpiry
# The paths each kind keeps on its volume: playbooks/group_vars/{relay,store}.yml,
# encrypted_storage_binds (a unit test keeps the two equal).
VOLUME_BINDS: Mapping[str, tuple[str, ...]] = {
    "relay": ("/var/spool/postfix", "/var/log/safemail"),
    "store": ("/var/mail/vmail", "/var/log/safemail"),
}
CERT_EXPIRY_SERVICE = "safemail-cert-expiry.service"
# Units that must be active, per kind ("all": every service host). Timers count: a disabled
# backup timer is found at once, not 26 hours later when the archive is stale.
UNITS: Mapping[str, tuple[str, ...]] = {
    "all": ("safemail-patch-check.timer",),
    "relay": ("postfix@-.service", GATE_UNIT, "safemail-cert-expiry.timer"),
    "store": ("dovecot.service",),
    "auth": ("slapd.service",),
    "client": ("safemail-backup.timer",),
}
# Oneshot services: inactive between runs is normal; `failed` means the last run failed.
ONESHOTS: Mapping[str, tuple[str, ...]] = {"relay": (CERT_EXPIRY_SERVICE,)}
UNIT_LABELS = {GATE_UNIT: "S/MIME gate", "postfix@-.service": "Postfix",
               "dovecot.service": "Dovecot", "slapd.service": "directory (slapd)",
               "safemail-patch-check.timer": "patch watch timer",
               "safemail-backup.timer": "backup timer",
               "safemail-cert-expiry.timer": "certificate expiry timer",
               CERT_EXPIRY_SERVICE: "certificate expiry report"}
KEEPALIVED_UNIT = "keepalived.service"  # roles/relay_vrrp
PROBE_TIMEOUT = 240  # one host, connection and the backup helper's borg call included
PYTHON = "/usr/bin/python3"
EXIT_UNREACHABLE = 3
EXIT_UNHEALTHY = 4


@dataclass(frozen=True)
class Thresholds:
    max_active: int = 200
    max_deferred: int = 50
    max_hold: int = 0
    max_deferred_age_hours: float = 4.0
    backup_max_age_hours: float = backup.DEFAULT_STALE_HOURS
    report_max_age_hours: float = 48.0  # the daily patch watch and certificate expiry report

    def check(self) -> None:
        from safemail.errors import UsageError

        for name, value in asdict(self).items():
            if not isinstance(value, int | float) or math.isnan(value) or value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be 0 or more")
        for name in ("backup_max_age_hours", "report_max_age_hours", "max_deferred_age_hours"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive")


@dataclass
class HostHealth:
    host: str
    kinds: tuple[str, ...]
    reachable: bool = True
    error: str | None = None  # unreachable, or the probe gave no answer
    facts: dict[str, Any] = field(default_factory=dict)
    patch: patchstatus.HostResult | None = None
    backup: backup.BackupResult | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.reachable and not self.problems


# ------------------------------------------------------------------ what to ask each host
def kinds(host: Host) -> tuple[str, ...]:
    """The host's roles that status knows checks for; `client` for a backup client."""
    out = [k for k in ("relay", "store", "auth", "backup") if k in host.groups]
    if "service" in host.groups and "backup" not in host.groups:
        out.append("client")
    return tuple(out)


def _units(k: Sequence[str], with_backup: bool = True) -> list[str]:
    """The units that must be active on a host of these kinds."""
    return [u for kind in ("all", *k) if with_backup or kind != "client"
            for u in UNITS.get(kind, ())]


def _oneshots(k: Sequence[str]) -> list[str]:
    return [u for kind in k for u in ONESHOTS.get(kind, ())]


def _is_ipv4(text: object) -> bool:
    try:
        ipaddress.IPv4Address(str(text))
    except ValueError:
        return False
    return True


def relays(hosts: Sequence[Host]) -> list[Host]:
    return sorted((h for h in hosts if "relay" in h.groups), key=lambda h: h.name)


def _relay_address(host: Host) -> str | None:
    """The service address this relay's keepalived holds, as site.yml gives it to
    roles/relay_vrrp: ``relay_vrrp_address`` when the inventory sets it to an address, else
    the site data it is wired to (playbooks/group_vars/relay.yml:
    ``safemail_relay_service.address``; ansible-inventory shows that wiring unrendered)."""
    own = host.vars.get("relay_vrrp_address")
    if isinstance(own, str) and _is_ipv4(own):
        return own
    service = host.vars.get("safemail_relay_service")
    address = service.get("address") if isinstance(service, Mapping) else None
    return str(address) if address else None


def service_address(hosts: Sequence[Host]) -> str | None:
    """The relays' service address when the stage has failover (roles/relay_vrrp runs: the
    relay group has more than one host, site.yml's condition), else None. ``hosts``: the
    stage's whole inventory (not a --hosts selection: the mode is the stage's). Relays whose
    inventory names different addresses, or none, are an inventory error."""
    group = relays(hosts)
    if len(group) <= 1:
        return None
    found = {h.name: _relay_address(h) for h in group}
    distinct = set(found.values())
    if len(distinct) != 1 or None in distinct or not _is_ipv4(next(iter(distinct))):
        raise SafeMailError(
            "the relays have no single service address in the inventory: "
            + ", ".join(f"{n}: {a or 'none'}" for n, a in found.items()),
            "set safemail_relay_service: {name, address} in the stage's group_vars "
            "(docs/availability.md, 'Two relays behind one service address')")
    return str(next(iter(distinct)))


def probe_args(host: Host, with_backup: bool = True,
               address: str | None = None) -> list[str]:
    """The probe's arguments for this host (which units, volume, queue, reports; with
    ``address``, the relays' service address, whether it holds it)."""
    k = kinds(host)
    hv = host.vars
    args: list[str] = ["--patch", str(PATCH_STATUS_FILE)]
    for unit in _units(k, with_backup) + _oneshots(k):
        args += ["--unit", unit]
    volume_kinds = [kind for kind in k if kind in VOLUME_BINDS]
    if volume_kinds:
        args += ["--volume", str(hv.get("encrypted_storage_name") or VOLUME_NAME),
                 "--mount", str(hv.get("encrypted_storage_mount") or VOLUME_MOUNT)]
        binds = dict.fromkeys(p for kind in volume_kinds for p in VOLUME_BINDS[kind])
        for path in binds:
            args += ["--bind", path]
    if "relay" in k:
        args += ["--queue", "--socket", str(hv.get("mailrelay_milter_socket") or GATE_SOCKET),
                 "--cert-expiry", CERT_EXPIRY_REPORT]
    if with_backup and "client" in k:
        args += ["--backup-helper", backup.HELPER]
    if address:
        args += ["--service-address", address]
    return args


def remote_command(host: Host, with_backup: bool = True, address: str | None = None) -> str:
    sudo = "" if str(host.vars.get("ansible_user", "root")) == "root" else "sudo -n "
    return f"{sudo}{PYTHON} - {shlex.join(probe_args(host, with_backup, address))}"


def probe_source() -> str:
    return Path(healthprobe.__file__).read_text(encoding="utf-8")


def collect(hosts: Sequence[Host], thresholds: Thresholds, now: dt.datetime,
            with_backup: bool = True, repo: Path | None = None,
            address: str | None = None) -> list[HostHealth]:
    """Probe every host in parallel and judge each (see the module text). ``address``: the
    relays' service address (:func:`service_address`), asked of every host."""
    if not hosts:
        return []
    by_name = {h.name: h for h in hosts}
    outcomes = sshcmd.run_everywhere(
        repo or project_root(), {h.name: h.vars for h in hosts},
        lambda name, _hv: remote_command(by_name[name], with_backup, address), PROBE_TIMEOUT,
        stdin=probe_source())
    return [judge(h, outcomes[h.name], thresholds, now, with_backup) for h in hosts]


def judge(host: Host, out: sshcmd.Outcome, thresholds: Thresholds, now: dt.datetime,
          with_backup: bool = True) -> HostHealth:
    """One host's health from its SSH outcome: unreachable, probe failure, or facts judged."""
    result = HostHealth(host.name, kinds(host))
    if out.unreachable:
        result.reachable = False
        result.error = f"unreachable ({out.unreachable})"
        result.problems.append(result.error)
        return result
    try:
        facts = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else None
        if not isinstance(facts, dict):
            raise ValueError("no JSON object")
    except ValueError:
        why = (out.stderr.strip().splitlines() or [f"exit {out.rc}, no output"])[-1]
        result.error = f"probe failed: {why[:300]}"
        result.problems.append(result.error)
        return result
    result.facts = facts
    result.patch = patchstatus.parse_status_text(host.name, facts.get("patch"))
    if with_backup and "client" in result.kinds:
        result.backup = backup.parse_helper(host.name, facts.get("backup"))
    result.problems, result.notes = assess(result, thresholds, now)
    return result


# ------------------------------------------------------------------ the verdict (pure)
def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def _checked_age(stamp: str, now: dt.datetime) -> float | None:
    try:
        when = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        return None
    return (now - when).total_seconds()


def _unix(stamp: Any) -> int | None:
    age = _checked_age(stamp, dt.datetime.fromtimestamp(0, dt.UTC))
    return None if age is None else int(-age)


def assess(h: HostHealth, t: Thresholds, now: dt.datetime) -> tuple[list[str], list[str]]:
    """(problems, notes) of one reachable host. A problem makes the host unhealthy; a note
    is shown and exported but changes no exit code."""
    problems: list[str] = []
    notes: list[str] = []
    f = h.facts
    units = f.get("units") or {}
    for unit in _units(h.kinds, h.backup is not None) + _oneshots(h.kinds):
        state = units.get(unit)
        label = UNIT_LABELS.get(unit, unit)
        oneshot = unit in _oneshots(h.kinds)
        if not isinstance(state, dict):
            problems.append(f"{label}: not reported")
        elif state.get("load") == "not-found":
            problems.append(f"{label}: {unit} not installed")
        elif state.get("load") != "loaded":
            problems.append(f"{label}: {unit} state unknown ({state.get('load')}: "
                            f"{state.get('sub')})")
        elif oneshot and state.get("active") == "failed":
            problems.append(f"{label}: the last run of {unit} failed (journalctl -u {unit})")
        elif not oneshot and state.get("active") != "active":
            problems.append(f"{label} down: {unit} {state.get('active')} "
                            f"({state.get('sub')})")
    for path, ok in (f.get("sockets") or {}).items():
        if not ok:
            problems.append(f"S/MIME gate socket {path} missing")
    if any(k in VOLUME_BINDS for k in h.kinds):
        problems += _volume_problems(f.get("volume"))
    if "relay" in h.kinds:
        problems += _queue_problems(f.get("queue"), t)
        p, n = _cert_problems(f.get("cert_expiry"), t, units.get(CERT_EXPIRY_SERVICE))
        problems += p
        notes += n
    p, n = _patch_problems(h.patch, t, now)
    problems += p
    notes += n
    if h.backup is not None:
        problems += _backup_problems(h.backup, t)
    return problems, notes


def _volume_problems(volume: Any) -> list[str]:
    if not isinstance(volume, dict):
        return ["encrypted volume: not reported"]
    if not volume.get("unlocked"):
        return [f"encrypted volume {volume.get('name')} locked (no /dev/mapper/"
                f"{volume.get('name')})"]
    out = []
    for p in volume.get("paths", []):
        if not p.get("mounted"):
            src = p.get("from")
            out.append(f"{p.get('path')} not on the encrypted volume"
                       + (f" (mounted from {src})" if src else " (not mounted)"))
        elif not p.get("rw"):
            out.append(f"{p.get('path')} mounted read-only")
    return out


def _queue_problems(queue: Any, t: Thresholds) -> list[str]:
    if not isinstance(queue, dict):
        return ["mail queue: not reported"]
    if queue.get("error"):
        return [f"mail queue unreadable: {queue['error']}"]
    counts = queue.get("counts") or {}
    out = []
    for name, limit in (("active", t.max_active), ("deferred", t.max_deferred),
                        ("hold", t.max_hold)):
        if counts.get(name, 0) > limit:
            out.append(f"{counts[name]} mail(s) in the {name} queue (limit {limit})")
    for name in ("corrupt",):
        if counts.get(name, 0):
            out.append(f"{counts[name]} corrupt queue file(s)")
    age = queue.get("oldest_deferred_age_seconds")
    if age is not None and age > t.max_deferred_age_hours * 3600:
        out.append(f"oldest deferred mail waits {_hours(age)} "
                   f"(limit {t.max_deferred_age_hours:g} h)")
    return out


def _cert_problems(report: Any, t: Thresholds,
                   service: Any = None) -> tuple[list[str], list[str]]:
    if not isinstance(report, dict):
        return ["certificate expiry report: not reported"], []
    if report.get("missing") and isinstance(service, dict) and service.get("active") in (
            "inactive", "activating"):
        # A fresh relay: the daily timer has not run yet and no run failed (a failed run and
        # a stopped timer are problems of their own). Staleness catches a report that stops.
        return [], [f"certificate expiry: {report['error']}; the daily timer makes one "
                    f"(now: systemctl start {CERT_EXPIRY_SERVICE})"]
    if report.get("error"):
        return [f"certificate expiry: {report['error']}"], []
    counts = report.get("counts") or {}
    out, notes = [], []
    if counts.get("expired"):
        out.append(f"{counts['expired']} participant certificate(s) expired")
    if counts.get("expiring"):
        out.append(f"{counts['expiring']} participant certificate(s) expire within "
                   f"{report.get('warn_days')} d (fewest days left: "
                   f"{report.get('min_days_left')})")
    if counts.get("unreadable") or counts.get("none"):
        notes.append(f"directory entries without a usable certificate: "
                     f"{counts.get('none', 0)} none, {counts.get('unreadable', 0)} unreadable")
    age = report.get("age_seconds")
    if isinstance(age, int | float) and age > t.report_max_age_hours * 3600:
        out.append(f"certificate expiry report is {_hours(age)} old "
                   f"(limit {t.report_max_age_hours:g} h; is safemail-cert-expiry.timer running?)")
    if isinstance(age, int | float) and age < -300:
        out.append("certificate expiry report is dated in the future (clock or hand edit?)")
    return out, notes


def _patch_problems(result: patchstatus.HostResult | None, t: Thresholds,
                    now: dt.datetime) -> tuple[list[str], list[str]]:
    if result is None:
        return ["patch status: not reported"], []
    if result.status is None:
        return [result.error or "no patch status"], []
    s: PatchStatus = result.status
    out, notes = [], []
    if not s.ok:
        out.append(f"patch check failed: {s.error}")
    age = _checked_age(s.checked_at, now)
    if age is None:
        out.append(f"patch status has an unreadable time {s.checked_at!r}")
    elif age > t.report_max_age_hours * 3600:
        out.append(f"patch check is {_hours(age)} old (limit {t.report_max_age_hours:g} h; "
                   "is safemail-patch-check.timer running?)")
    elif age < -300:
        out.append("patch status is dated in the future (clock or hand edit?)")
    security = sum(1 for p in s.pending if p.security)
    if s.ok and security:
        notes.append(f"{security} security update(s) pending (`safemail patch apply`)")
    if s.reboot_required:
        notes.append("reboot required")
    return out, notes


def _backup_problems(b: backup.BackupResult, t: Thresholds) -> list[str]:
    if not b.reachable:
        return [f"backup: {b.error or 'repository unreachable'}"]
    if b.error:
        return [f"backup: {b.error}"]
    if not b.archives or b.age_seconds is None:
        return ["backup: no archive yet"]
    if b.stale(t.backup_max_age_hours):
        return [f"backup is {_hours(b.age_seconds)} old (limit {t.backup_max_age_hours:g} h)"]
    if b.age_seconds < -300:
        return ["backup's newest archive is dated in the future (clock?)"]
    return []


def failover(results: Sequence[HostHealth], hosts: Sequence[Host]) -> dict[str, Any]:
    """The stage's failover state from the probed hosts (``results``) and the stage's whole
    inventory (``hosts``: which relays exist and the service address, :func:`service_address`).

    Mode ``single`` (one relay): nothing to check, never a problem. Mode ``vrrp``: holders are
    the relays that answered and hold the address; exactly one is healthy. Each problem is
    added to the hosts it concerns (so :func:`exit_code` counts it, 4; 3 still wins): no
    holder, to every relay that answered; split brain, to each holder; keepalived not active,
    to that relay; a non-relay holding the address, to that host. A relay left out by
    ``--hosts`` is not probed: no holder then is a note, not a problem (it may hold it)."""
    group = [h.name for h in relays(hosts)]
    address = service_address(hosts)
    if address is None:
        return {"configured": False, "mode": "single", "relays": group, "holders": [],
                "address": None,
                "note": ("one relay: no failover (AV-02 needs two relays behind one service "
                         "address; docs/availability.md)") if group else "no relay"}
    by_name = {r.host: r for r in results}
    answered = [by_name[n] for n in group if n in by_name and by_name[n].reachable
                and isinstance(by_name[n].facts.get("vrrp"), dict)]
    unknown = [n for n in group if n in by_name and by_name[n] not in answered]
    unprobed = [n for n in group if n not in by_name]

    def holds(r: HostHealth) -> bool:
        v = r.facts.get("vrrp")
        return isinstance(v, dict) and v.get("holds_address") is True and \
            v.get("address") == address

    holders = [r.host for r in answered if holds(r)]
    others = [r.host for r in results if r.host not in group and r.reachable and holds(r)]
    for r in answered:
        v = r.facts["vrrp"]
        if v.get("error"):
            r.problems.append(f"failover state unreadable: {v['error']}")
        if v.get("address") != address:
            r.problems.append(f"failover: probed for {v.get('address')}, not {address}")
        if v.get("keepalived") != "active":
            r.problems.append(f"keepalived {v.get('keepalived')}: this relay cannot take over "
                              f"the service address {address}")
    for name in unknown:
        r = by_name[name]
        if r.reachable and r.facts:  # the probe answered but said nothing of the address
            r.problems.append(f"failover state not reported (service address {address})")
    for name in others:
        by_name[name].problems.append(
            f"holds the relays' service address {address} but is not a relay (participants' "
            "mail may go to it: a hijack or a wrong address)")
    if len(holders) >= 2:
        for name in holders:
            by_name[name].problems.append(
                f"split brain: {', '.join(holders)} all hold {address}" if len(holders) > 2
                else f"split brain: {' and '.join(holders)} both hold {address}")
    elif not holders and not unprobed:
        why = f" (no answer from {', '.join(unknown)}: it may hold it)" if unknown else ""
        for r in answered:
            r.problems.append(f"no relay holds the service address {address}: participants "
                              f"cannot send{why}")
    parts = []
    if len(holders) == 1:
        parts.append(f"held by {holders[0]}")
    elif not holders:
        parts.append("held by no relay that answered")
    else:
        parts.append(f"SPLIT BRAIN: held by {', '.join(holders)}")
    if unknown:
        parts.append(f"not counted (no answer): {', '.join(unknown)}")
    if unprobed:
        parts.append(f"not probed (--hosts): {', '.join(unprobed)}")
    if others:
        parts.append(f"also held by non-relay {', '.join(others)}")
    return {"configured": True, "mode": "vrrp", "relays": group, "holders": holders,
            "address": address, "others": others, "unanswered": unknown,
            "unprobed": unprobed, "note": "; ".join(parts)}


def exit_code(results: Sequence[HostHealth]) -> int:
    """0 all healthy; 3 a host unreachable; 4 a host unhealthy (unreachable wins)."""
    if any(not r.reachable for r in results):
        return EXIT_UNREACHABLE
    if any(r.problems for r in results):
        return EXIT_UNHEALTHY
    return 0


# ------------------------------------------------------------------ output forms (pure)
def _queue_cell(h: HostHealth) -> tuple[str, str]:
    q = h.facts.get("queue")
    if "relay" not in h.kinds or not isinstance(q, dict):
        return "-", "-"
    if q.get("error"):
        return "?", "?"
    c = q.get("counts") or {}
    age = q.get("oldest_deferred_age_seconds")
    return (f"{c.get('active', 0)}/{c.get('deferred', 0)}/{c.get('hold', 0)}",
            "-" if age is None else backup._age(int(age)))


def _volume_cell(h: HostHealth) -> str:
    v = h.facts.get("volume")
    if not isinstance(v, dict):
        return "-"
    if not v.get("unlocked"):
        return "LOCKED"
    bad = [p for p in v.get("paths", []) if not p.get("mounted") or not p.get("rw")]
    return "ok" if not bad else f"{len(bad)} path(s) off"


def _gate_cell(h: HostHealth) -> str:
    if "relay" not in h.kinds:
        return "-"
    unit = (h.facts.get("units") or {}).get(GATE_UNIT) or {}
    sockets = h.facts.get("sockets") or {}
    return "up" if unit.get("active") == "active" and sockets and all(
        sockets.values()) else "DOWN"


def _cert_cell(h: HostHealth) -> str:
    r = h.facts.get("cert_expiry")
    if "relay" not in h.kinds or not isinstance(r, dict):
        return "-"
    if r.get("error"):
        return "?"
    c = r.get("counts") or {}
    return f"{c.get('expired', 0)} exp/{c.get('expiring', 0)} soon"


def _patch_cell(h: HostHealth) -> str:
    if h.patch is None or h.patch.status is None:
        return "-" if h.patch is None else "?"
    s = h.patch.status
    if not s.ok:
        return "FAILED"
    sec = sum(1 for p in s.pending if p.security)
    return f"{len(s.pending)} ({sec} security)" + (", reboot" if s.reboot_required else "")


def _backup_cell(h: HostHealth) -> str:
    b = h.backup
    if b is None:
        return "-"
    if not b.reachable:
        return "UNREACHABLE"
    return backup._age(b.age_seconds) if b.archives else "none"


COLUMNS = ("host", "state", "queue a/d/h", "oldest deferred", "gate", "volume", "backup age",
           "certs", "patches")


def rows(results: Sequence[HostHealth]) -> list[dict[str, str]]:
    out = []
    for h in results:
        state = "ok" if h.healthy else ("UNREACHABLE" if not h.reachable else "UNHEALTHY")
        queue, oldest = _queue_cell(h)
        out.append({"host": h.host, "state": state, "queue a/d/h": queue,
                    "oldest deferred": oldest, "gate": _gate_cell(h),
                    "volume": _volume_cell(h), "backup age": _backup_cell(h),
                    "certs": _cert_cell(h), "patches": _patch_cell(h)})
    return out


def render_table(results: Sequence[HostHealth], fail: Mapping[str, Any]) -> str:
    table = rows(results)
    widths = {c: max([len(c), *(len(r[c]) for r in table)]) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in table]
    lines.append("")
    if fail["mode"] == "vrrp":
        lines.append(f"failover: vrrp, service address {fail['address']}, holder "
                     f"{', '.join(fail['holders']) or 'NONE'} (relays "
                     f"{', '.join(fail['relays'])}); {fail['note']}")
    else:
        lines.append(f"failover: {fail['mode']} ({', '.join(fail['relays']) or 'no relay'}); "
                     f"{fail['note']}")
    for h in results:
        for p in h.problems:
            lines.append(f"{h.host}: {p}")
    for h in results:
        for n in h.notes:
            lines.append(f"{h.host}: note: {n}")
    if all(h.healthy for h in results):
        lines.append(f"all {len(results)} host(s) healthy")
    return "\n".join(lines)


def to_json(results: Sequence[HostHealth], stage: str, now: dt.datetime, t: Thresholds,
            fail: Mapping[str, Any]) -> dict[str, Any]:
    hosts = []
    for h in results:
        patch = None
        if h.patch is not None:
            s = h.patch.status
            patch = {"error": h.patch.error} if s is None else {
                "ok": s.ok, "checked_at": s.checked_at, "pending": len(s.pending),
                "security": sum(1 for p in s.pending if p.security),
                "reboot_required": s.reboot_required, "error": s.error}
        hosts.append({
            "host": h.host, "kinds": list(h.kinds), "reachable": h.reachable,
            "healthy": h.healthy, "problems": h.problems, "notes": h.notes, "error": h.error,
            "units": h.facts.get("units"), "sockets": h.facts.get("sockets"),
            "volume": h.facts.get("volume"), "queue": h.facts.get("queue"),
            "cert_expiry": h.facts.get("cert_expiry"), "vrrp": h.facts.get("vrrp"),
            "patch": patch,
            "backup": h.backup.to_json(t.backup_max_age_hours) if h.backup else None,
        })
    return {"stage": stage, "checked_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "healthy": all(h.healthy for h in results), "exit_code": exit_code(results),
            "thresholds": asdict(t), "failover": dict(fail), "hosts": hosts}


# name -> (type, help). Every metric the textfile can hold; the alert rules use these names
# (monitoring/prometheus/safemail-rules.yml; a unit test checks each name there is here).
METRICS: Mapping[str, tuple[str, str]] = {
    "safemail_status_collected_timestamp_seconds": (
        "gauge", "When safemail status collected this file (Unix time)."),
    "safemail_host_up": ("gauge", "1 if safemail status reached the host over SSH and the "
                                  "probe answered."),
    "safemail_host_healthy": ("gauge", "1 if the host has no problem at the thresholds of "
                                       "the collecting run."),
    "safemail_host_problems": ("gauge", "Number of problems safemail status found on the host."),
    "safemail_unit_active": ("gauge", "1 if the systemd unit (a service or timer that must "
                                      "run) is active."),
    "safemail_unit_failed": ("gauge", "1 if the systemd unit is in the failed state (for a "
                                      "oneshot report: its last run failed)."),
    "safemail_volume_unlocked": ("gauge", "1 if the LUKS volume's mapping exists."),
    "safemail_volume_path_mounted": ("gauge", "1 if the path is mounted read-write from the "
                                              "encrypted volume."),
    "safemail_smime_gate_socket_present": ("gauge", "1 if the S/MIME gate's milter socket "
                                                    "exists."),
    "safemail_queue_messages": ("gauge", "Mails in the Postfix queue, per queue."),
    "safemail_queue_oldest_deferred_age_seconds": (
        "gauge", "Age of the oldest mail in the deferred queue (0 when it is empty)."),
    "safemail_queue_readable": ("gauge", "1 if postqueue -j answered."),
    "safemail_backup_repository_reachable": (
        "gauge", "1 if the client's backup repository answered and decrypted."),
    "safemail_backup_archives": ("gauge", "Archives in the client's backup repository."),
    "safemail_backup_age_seconds": ("gauge", "Age of the client's newest backup archive."),
    "safemail_cert_expiry_report_age_seconds": (
        "gauge", "Age of the relay's certificate expiry report."),
    "safemail_cert_expiry_certificates": (
        "gauge", "Participant certificates in the expiry report, per state."),
    "safemail_cert_expiry_earliest_timestamp_seconds": (
        "gauge", "End of validity of the participant certificate that expires first (Unix "
                 "time)."),
    "safemail_patch_check_ok": ("gauge", "1 if the host's last patch check ran."),
    "safemail_patch_check_age_seconds": ("gauge", "Age of the host's last patch check."),
    "safemail_patch_pending_updates": ("gauge", "Pending package updates."),
    "safemail_patch_security_updates": ("gauge", "Pending security updates."),
    "safemail_patch_reboot_required": ("gauge", "1 if the host asks for a reboot."),
    "safemail_failover_configured": (
        "gauge", "1 if relay failover (VRRP, two or more relays) is configured; 0: one relay."),
    "safemail_relays": ("gauge", "Relays in the stage's inventory."),
    "safemail_failover_holders": (
        "gauge", "Relays that answered and hold the service address (healthy: exactly 1)."),
    "safemail_relay_holds_service_address": (
        "gauge", "1 if the host holds the relays' service address on an interface."),
}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _samples(results: Sequence[HostHealth], stage: str, now: dt.datetime,
             fail: Mapping[str, Any]) -> dict[str, list[tuple[dict[str, str], float]]]:
    s: dict[str, list[tuple[dict[str, str], float]]] = {m: [] for m in METRICS}
    st = {"stage": stage}
    s["safemail_status_collected_timestamp_seconds"].append((st, int(now.timestamp())))
    s["safemail_failover_configured"].append((st, 1 if fail["configured"] else 0))
    s["safemail_relays"].append((st, len(fail["relays"])))
    if fail["mode"] == "vrrp":
        s["safemail_failover_holders"].append(
            ({**st, "address": str(fail["address"])}, len(fail["holders"])))
    for h in results:
        lab = {**st, "host": h.host}
        s["safemail_host_up"].append((lab, 1 if h.reachable and h.facts else 0))
        s["safemail_host_healthy"].append((lab, 1 if h.healthy else 0))
        s["safemail_host_problems"].append((lab, len(h.problems)))
        if not h.facts:
            continue
        f = h.facts
        oneshots = _oneshots(h.kinds)
        for unit, state in sorted((f.get("units") or {}).items()):
            if unit not in oneshots:
                s["safemail_unit_active"].append(
                    ({**lab, "unit": unit}, 1 if state.get("active") == "active" else 0))
            s["safemail_unit_failed"].append(
                ({**lab, "unit": unit}, 1 if state.get("active") == "failed" else 0))
        vr = f.get("vrrp")
        if isinstance(vr, dict):
            if vr.get("holds_address") is not None:
                s["safemail_relay_holds_service_address"].append(
                    ({**lab, "address": str(vr.get("address"))},
                     1 if vr.get("holds_address") else 0))
            if "relay" in h.kinds:  # SafeMailServiceDown covers keepalived on relays
                s["safemail_unit_active"].append(
                    ({**lab, "unit": KEEPALIVED_UNIT}, 1 if vr.get("keepalived") == "active"
                     else 0))
        for path, ok in sorted((f.get("sockets") or {}).items()):
            s["safemail_smime_gate_socket_present"].append(({**lab, "path": path},
                                                            1 if ok else 0))
        v = f.get("volume")
        if isinstance(v, dict):
            vl = {**lab, "volume": str(v.get("name"))}
            s["safemail_volume_unlocked"].append((vl, 1 if v.get("unlocked") else 0))
            for p in v.get("paths", []):
                s["safemail_volume_path_mounted"].append(
                    ({**vl, "path": str(p.get("path"))},
                     1 if p.get("mounted") and p.get("rw") else 0))
        q = f.get("queue")
        if isinstance(q, dict):
            s["safemail_queue_readable"].append((lab, 0 if q.get("error") else 1))
            if not q.get("error"):
                for name, count in sorted((q.get("counts") or {}).items()):
                    s["safemail_queue_messages"].append(({**lab, "queue": name}, count))
                s["safemail_queue_oldest_deferred_age_seconds"].append(
                    (lab, q.get("oldest_deferred_age_seconds") or 0))
        c = f.get("cert_expiry")
        if isinstance(c, dict) and not c.get("error"):
            s["safemail_cert_expiry_report_age_seconds"].append((lab, c.get("age_seconds")))
            for state, count in sorted((c.get("counts") or {}).items()):
                s["safemail_cert_expiry_certificates"].append(({**lab, "state": state}, count))
            end = _unix(c.get("earliest_not_after"))
            if end is not None:
                s["safemail_cert_expiry_earliest_timestamp_seconds"].append((lab, int(end)))
        if h.patch is not None and h.patch.status is not None:
            ps = h.patch.status
            s["safemail_patch_check_ok"].append((lab, 1 if ps.ok else 0))
            age = _checked_age(ps.checked_at, now)
            if age is not None:
                s["safemail_patch_check_age_seconds"].append((lab, int(age)))
            if ps.ok:
                s["safemail_patch_pending_updates"].append((lab, len(ps.pending)))
                s["safemail_patch_security_updates"].append(
                    (lab, sum(1 for p in ps.pending if p.security)))
            s["safemail_patch_reboot_required"].append((lab, 1 if ps.reboot_required else 0))
        elif h.patch is not None:
            s["safemail_patch_check_ok"].append((lab, 0))
        b = h.backup
        if b is not None:
            s["safemail_backup_repository_reachable"].append((lab, 1 if b.reachable else 0))
            if b.archives is not None:
                s["safemail_backup_archives"].append((lab, b.archives))
            if b.age_seconds is not None:
                s["safemail_backup_age_seconds"].append((lab, b.age_seconds))
    return s


def to_prometheus(results: Sequence[HostHealth], stage: str, now: dt.datetime,
                  fail: Mapping[str, Any]) -> str:
    """node_exporter's textfile collector format: HELP and TYPE once per family, then its
    samples; no timestamps (the collector refuses them); families without samples left out."""
    lines = []
    for name, samples in _samples(results, stage, now, fail).items():
        samples = [(lab, v) for lab, v in samples if v is not None]
        if not samples:
            continue
        kind, text = METRICS[name]
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for lab, value in samples:
            labels = ",".join(f'{k}="{_label(str(v))}"' for k, v in lab.items())
            lines.append(f"{name}{{{labels}}} {value:g}" if isinstance(value, float)
                         else f"{name}{{{labels}}} {value}")
    return "\n".join(lines) + "\n"


def write_textfile(text: str, path: Path) -> None:
    """Atomically (a temporary file in the same directory, renamed), world-readable: the
    collector must never read half a file, and the node exporter runs as its own user. The
    file holds host names and counts, no participant data."""
    path = Path(path)
    if not path.parent.is_dir():
        from safemail.errors import UsageError

        raise UsageError(f"{path.parent} is not a directory",
                         "Debian's prometheus-node-exporter reads "
                         "/var/lib/prometheus/node-exporter/*.prom")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".safemail-status-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
