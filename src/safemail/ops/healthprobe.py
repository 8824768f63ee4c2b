#!/usr/bin/python3
"""The on-host half of `safemail status`: what one host sees of its own health, as one JSON
object on stdout. Reads only; writes, starts and logs nothing.

`safemail status` sends this file over the SSH connection Ansible would make and runs it with
the host's ``/usr/bin/python3`` reading the program from stdin (``python3 - ARGS``): nothing is
installed, so the probe always matches the controller's version and a host needs no converge
to be probed. It therefore imports nothing but the standard library (a unit test checks).

What it reports (each part only when asked for by an argument):

- ``units``: systemd's LoadState/ActiveState/SubState of each named unit (``systemctl show``);
- ``volume``: whether the LUKS mapping ``/dev/mapper/NAME`` exists (unlocked), and for its
  mount point and each bind path whether it is mounted from that mapping, and read-write
  (``/proc/self/mountinfo``);
- ``sockets``: whether each path is a UNIX socket (the S/MIME gate's milter socket);
- ``queue``: ``postqueue -j``'s messages counted per queue and the age of the oldest deferred
  one. Counts only: no sender, recipient, queue id or delay reason leaves the host;
- ``cert_expiry``: the relay's certificate expiry report reduced to counts per state, the
  fewest days left and the report's age. The report names participants; this output does not;
- ``patch``: the patch watch's status file, as it is (package names, no participant data);
- ``backup``: the last line of the backup status helper's output, as it is (archive name,
  time, counts);
- ``vrrp`` (AV-02, only when the stage has two or more relays behind one service address):
  whether an IPv4 address of one of the host's interfaces (``ip -4 -o addr show``) is the
  service address (``holds_address``), and keepalived's state (``systemctl show``'s
  ActiveState, as ``systemctl is-active`` prints it; its LoadState when not loaded, e.g.
  ``not-found``). Booleans and the address asked about: no interface list leaves the host.

Facts only: the thresholds and the verdict live on the controller (safemail.ops.health). The
parsers are pure and unit-tested with captured output (tests/test_ops_health.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import stat
import subprocess
import sys
from collections.abc import Sequence

SCHEMA = 1
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


# ------------------------------------------------------------------ pure parsers
def parse_postqueue(text: str, now: float) -> dict:
    """Counts per queue and the oldest deferred mail's age from ``postqueue -j`` output (one
    JSON object per line; Postfix 3.1+). A line that is not a queue entry raises ValueError:
    a wrong count is worse than a failed check."""
    counts = dict.fromkeys(QUEUES, 0)
    oldest: float | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if not isinstance(entry, dict) or "queue_name" not in entry:
            raise ValueError("not a postqueue -j entry")
        name = str(entry["queue_name"])
        counts[name] = counts.get(name, 0) + 1
        if name == "deferred":
            arrival = float(entry["arrival_time"])
            oldest = arrival if oldest is None else min(oldest, arrival)
    return {"counts": counts, "total": sum(counts.values()),
            "oldest_deferred_age_seconds": None if oldest is None else int(now - oldest),
            "error": None}


def parse_systemctl_show(text: str) -> dict:
    """``systemctl show -p LoadState -p ActiveState -p SubState UNIT`` as a dict."""
    props = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    return {"load": props.get("LoadState", "unknown"), "active": props.get("ActiveState",
            "unknown"), "sub": props.get("SubState", "unknown")}


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[dict]:
    """``/proc/self/mountinfo`` lines: device (major:minor), root, mount point, options,
    fstype, source. The last mount on a path wins (it hides the ones below)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        mounts.append({"device": fields[2], "root": _unescape(fields[3]),
                       "mountpoint": _unescape(fields[4]), "options": fields[5].split(","),
                       "fstype": fields[sep + 1] if len(fields) > sep + 1 else "",
                       "source": _unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""})
    return mounts


def volume_state(mounts: Sequence[dict], device: str | None, mount: str,
                 binds: Sequence[str]) -> dict:
    """The volume's state: ``device`` is the mapping's major:minor (None: not unlocked). Each
    path (the mount point, then the binds) is ``mounted`` only if the mount on it, the last one,
    comes from that device; ``rw`` says whether it is writable."""
    def one(path: str) -> dict:
        top = [m for m in mounts if m["mountpoint"] == path]
        if not top:
            return {"path": path, "mounted": False, "rw": False, "from": None}
        m = top[-1]
        return {"path": path, "mounted": device is not None and m["device"] == device,
                "rw": "rw" in m["options"], "from": m["source"] or m["device"]}

    return {"unlocked": device is not None, "paths": [one(p) for p in [mount, *binds]]}


def cert_counts(document: dict, now: dt.datetime) -> dict:
    """The certificate expiry report (safemail.ops.certexpiry) reduced to what may leave the
    relay: counts per state (each state recomputed from the end of validity and the warning
    period, as of now), the fewest days left and the earliest end of validity (no mailbox), the
    warning period and the report's age."""
    certs = document.get("certificates")
    if not isinstance(certs, list):
        raise ValueError("no certificates list")
    counts = dict.fromkeys(("expired", "expiring", "unreadable", "none", "ok"), 0)
    warn = document.get("warn_days")
    days, ends = [], []
    for c in certs:
        state = str(c.get("state"))
        if c.get("not_after") and isinstance(warn, int):
            # The state again from the end of validity, as of now: a certificate that expired
            # since the daily report (or a state edited by hand) is counted as it is now.
            end = dt.datetime.strptime(str(c["not_after"]), "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=dt.UTC)
            state = ("expired" if end <= now else
                     "expiring" if end - now <= dt.timedelta(days=warn) else "ok")
            days.append((end - now).days)
            ends.append(str(c["not_after"]))
        counts[state] = counts.get(state, 0) + 1
    checked = dt.datetime.strptime(str(document["checked_at"]),
                                   "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return {"counts": counts, "min_days_left": min(days) if days else None,
            "earliest_not_after": min(ends) if ends else None,
            "warn_days": warn,
            "age_seconds": int((now - checked).total_seconds()), "error": None}


def parse_ip_addr(text: str) -> list[str]:
    """The IPv4 addresses (without prefix length) of ``ip -4 -o addr show``: one line per
    address, ``N: IFNAME    inet A.B.C.D/LEN ...``. A line without ``inet ADDRESS`` raises
    ValueError: a wrong "holds no address" is worse than a failed check."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        if "inet" not in fields or fields.index("inet") + 1 >= len(fields):
            raise ValueError(f"not an ip -4 -o addr line: {line[:80]!r}")
        out.append(fields[fields.index("inet") + 1].partition("/")[0])
    return out


def vrrp_state(addresses: Sequence[str], address: str, keepalived: dict) -> dict:
    """The service address held or not (exact match: 198.18.2.10 does not hold .100), and
    keepalived as ``systemctl is-active`` names it (the LoadState if not loaded)."""
    return {"address": address, "holds_address": address in addresses,
            "keepalived": _keepalived(keepalived), "error": None}


def _keepalived(state: dict) -> str:
    """keepalived as ``systemctl is-active`` names it (the LoadState if not loaded)."""
    return (state.get("active") if state.get("load") == "loaded" else state.get("load")) \
        or "unknown"


# ------------------------------------------------------------------ reading the host
def _run(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)


def _last_line(text: str, fallback: str) -> str:
    return (text.strip().splitlines() or [fallback])[-1][:300]


def read_units(units: Sequence[str]) -> dict:
    out = {}
    for unit in units:
        try:
            proc = _run(["systemctl", "show", "-p", "LoadState", "-p", "ActiveState",
                         "-p", "SubState", unit], 30)
            out[unit] = parse_systemctl_show(proc.stdout)
            if proc.returncode != 0 and out[unit]["load"] == "unknown":
                out[unit]["sub"] = _last_line(proc.stderr, f"systemctl exited {proc.returncode}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            out[unit] = {"load": "unknown", "active": "unknown", "sub": str(exc)[:200]}
    return out


def read_volume(name: str, mount: str, binds: Sequence[str]) -> dict:
    try:
        st = os.stat(f"/dev/mapper/{name}")
        device = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" if stat.S_ISBLK(
            st.st_mode) else None
    except OSError:
        device = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        mounts = parse_mountinfo(fh.read())
    return {"name": name, **volume_state(mounts, device, mount, binds)}


def read_sockets(paths: Sequence[str]) -> dict:
    out = {}
    for path in paths:
        try:
            out[path] = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            out[path] = False
    return out


def read_queue() -> dict:
    try:
        proc = _run(["postqueue", "-j"], 120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"postqueue did not run: {exc}"[:300]}
    if proc.returncode != 0:
        return {"error": _last_line(proc.stderr, f"postqueue exited {proc.returncode}")}
    try:
        return parse_postqueue(proc.stdout, dt.datetime.now(dt.UTC).timestamp())
    except (ValueError, KeyError, TypeError) as exc:
        return {"error": f"unreadable postqueue -j output: {exc}"[:300]}


def read_cert_expiry(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            document = json.load(fh)
    except FileNotFoundError:
        return {"error": f"no report at {path} yet", "missing": True}
    except (OSError, ValueError) as exc:
        return {"error": f"unreadable report {path}: {exc}"[:300]}
    try:
        return cert_counts(document, dt.datetime.now(dt.UTC))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return {"error": f"unreadable report {path}: {exc}"[:300]}


def read_vrrp(address: str) -> dict:
    keepalived = read_units(["keepalived.service"])["keepalived.service"]

    def unknown(error: str) -> dict:  # whether the address is held: not known
        return {"address": address, "holds_address": None, "error": error[:300],
                "keepalived": _keepalived(keepalived)}

    try:
        proc = _run(["ip", "-4", "-o", "addr", "show"], 30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return unknown(f"ip did not run: {exc}")
    if proc.returncode != 0:
        return unknown(_last_line(proc.stderr, f"ip exited {proc.returncode}"))
    try:
        return vrrp_state(parse_ip_addr(proc.stdout), address, keepalived)
    except ValueError as exc:
        return unknown(f"unreadable ip output: {exc}")


def read_patch(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return json.dumps({"unreadable": str(exc)})


def read_backup(helper: str) -> str | None:
    if not os.path.exists(helper):
        return None
    try:
        proc = _run([helper], 180)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return json.dumps({"reachable": False, "error": f"status helper did not run: {exc}"})
    return _last_line(proc.stdout, "") or None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safemail-health-probe",
                                     description="One host's health facts as JSON (read-only).")
    parser.add_argument("--unit", action="append", default=[], help="systemd unit to report")
    parser.add_argument("--socket", action="append", default=[], help="UNIX socket path")
    parser.add_argument("--volume", default=None, help="LUKS mapping name (/dev/mapper/NAME)")
    parser.add_argument("--mount", default=None, help="the volume's mount point")
    parser.add_argument("--bind", action="append", default=[], help="a bind path on the volume")
    parser.add_argument("--queue", action="store_true", help="count the Postfix queue")
    parser.add_argument("--cert-expiry", default=None, help="the certificate expiry report")
    parser.add_argument("--patch", default=None, help="the patch watch's status file")
    parser.add_argument("--backup-helper", default=None, help="the backup status helper")
    parser.add_argument("--service-address", default=None,
                        help="the relays' service address (AV-02): held here? keepalived?")
    args = parser.parse_args(argv)
    out: dict = {"schema": SCHEMA, "units": read_units(args.unit),
                 "sockets": read_sockets(args.socket)}
    if args.volume:
        out["volume"] = read_volume(args.volume, args.mount or "", args.bind)
    if args.queue:
        out["queue"] = read_queue()
    if args.cert_expiry:
        out["cert_expiry"] = read_cert_expiry(args.cert_expiry)
    if args.patch:
        out["patch"] = read_patch(args.patch)
    if args.backup_helper:
        out["backup"] = read_backup(args.backup_helper)
    if args.service_address:
        out["vrrp"] = read_vrrp(args.service_address)
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
