"""Participant certificates close to expiry, reported to the operator ahead of time (CA-04).

Runs on the relay from a daily systemd timer (role ``mailrelay``,
``safemail-cert-expiry.timer``). It reads every participant entry's ``userCertificate;binary``
from the directory with the relay's read-only bind account (StartTLS, server checked against
the service TLS CA), and writes

- ``/var/log/safemail/cert-expiry.json``: every participant's mailbox, the certificate's
  serial and end of validity, days left, and a state (``ok``, ``expiring``, ``expired``,
  ``none``, ``unreadable``);
- one line to syslog (tag ``safemail-cert-expiry``, which the admin log collects) naming the
  mailboxes whose certificate expires within the warning period.

Why the directory: it is what the relay's recipient check reads (a mailbox without a
certificate there gets no mail), so the report shows exactly which participants will stop
receiving when. An expired certificate leaves the directory at the CA distribution's next
resync; until then the relay would still accept RCPT, which the report shows as ``expired``.

Exit codes: 0 nothing expires within the period, 3 something does (or already did), 1 the
directory could not be read (the previous status file stays), 2 bad command line.

:func:`assess` and :func:`summary_line` are pure (tests/test_ops_certexpiry.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509

SCHEMA = 1
SYSLOG_TAG = "safemail-cert-expiry"
DEFAULT_STATUS = Path("/var/log/safemail/cert-expiry.json")
DEFAULT_WARN_DAYS = 30
# At most this many participant entries in one search (asked of the server, checked by the
# client): slapd's own limit for a bound user is 500 too (olcSizeLimit). More is an error.
SIZE_LIMIT = 500
EXIT_WARN = 3


@dataclass(frozen=True)
class Finding:
    mailbox: str
    state: str  # ok | expiring | expired | none | unreadable
    serial: str | None = None
    not_after: str | None = None  # ISO 8601, UTC
    days_left: int | None = None


def assess(
    entries: Iterable[tuple[str, Sequence[bytes]]], now: dt.datetime, warn_days: int
) -> list[Finding]:
    """One finding per mailbox, sorted: expired, expiring, unreadable, none, ok.

    ``entries``: (mailbox, DER values of its entry's certificate attribute). With several
    certificates on one entry, the one valid longest counts (the others go at the next
    publish)."""
    if warn_days < 0:
        raise ValueError("warn_days must be 0 or more")
    findings: list[Finding] = []
    for mailbox, values in entries:
        certs = []
        for der in values:
            try:
                certs.append(x509.load_der_x509_certificate(der))
            except ValueError:
                continue
        if not values:
            findings.append(Finding(mailbox, "none"))
            continue
        if not certs:
            findings.append(Finding(mailbox, "unreadable"))
            continue
        cert = max(certs, key=lambda c: c.not_valid_after_utc)
        end = cert.not_valid_after_utc
        left = end - now
        days = left.days  # floor: 0 means less than a day
        if end <= now:
            state = "expired"
        elif left <= dt.timedelta(days=warn_days):
            state = "expiring"
        else:
            state = "ok"
        findings.append(Finding(mailbox, state, f"{cert.serial_number:x}",
                                end.strftime("%Y-%m-%dT%H:%M:%SZ"), days))
    order = {"expired": 0, "expiring": 1, "unreadable": 2, "none": 3, "ok": 4}
    findings.sort(key=lambda f: (order[f.state], f.not_after or "", f.mailbox))
    return findings


def needs_attention(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.state in ("expired", "expiring")]


def summary_line(findings: Sequence[Finding], warn_days: int) -> str:
    """The one syslog line: counts only. The line goes to the admin log, which records what
    admins do and names no participant (SYS-02, audit 2.5); which mailboxes need a new
    certificate is in the status file on the encrypted volume."""
    counts = {s: sum(1 for f in findings if f.state == s)
              for s in ("expired", "expiring", "ok", "none", "unreadable")}
    head = (f"certificate expiry (warn {warn_days} d): "
            + " ".join(f"{k}={v}" for k, v in counts.items()))
    return head + ("; to renew: see the status file" if needs_attention(findings) else "")


def status_document(findings: Sequence[Finding], now: dt.datetime, warn_days: int) -> dict:
    return {
        "schema": SCHEMA,
        "checked_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "warn_days": warn_days,
        "attention": len(needs_attention(findings)),
        "certificates": [asdict(f) for f in findings],
    }


# ------------------------------------------------------------------ I/O at the edges
def read_directory(config: dict) -> list[tuple[str, list[bytes]]]:
    from safemail.participant.directory import (
        CERT_ATTRIBUTE,
        DirectoryConfig,
        LdapCertificateDirectory,
    )

    cfg = DirectoryConfig(
        uri=config["ldap_uri"], bind_dn=config["bind_dn"], password=config["bind_password"],
        base=config["base_dn"], cafile=Path(config["cafile"]),
        # AV-02: the directory's read-only replicas, tried when the provider is down.
        replica_uris=tuple(config.get("ldap_replica_uris") or ()),
    )
    with LdapCertificateDirectory(cfg) as directory:
        found = directory.search("objectClass", "inetOrgPerson", ["mail", CERT_ATTRIBUTE],
                                 size_limit=SIZE_LIMIT)
    entries = []
    for entry in found:
        for mail in entry.get("mail", [b""])[:1]:
            entries.append((mail.decode("utf-8", "replace"), entry.get("usercertificate", [])))
    return entries


def write_status(document: dict, path: Path) -> None:
    """Atomically, root-only (the list names participants)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cert-expiry-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def log_line(text: str) -> None:
    import syslog

    syslog.openlog(SYSLOG_TAG, 0, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_NOTICE, text)
    syslog.closelog()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safemail.ops.certexpiry",
        description="Report participant certificates (from the directory) that expire within "
        "the warning period. Exit 0: none; 3: some; 1: the directory could not be read.",
    )
    parser.add_argument("--config", type=Path, required=True,
                        help="JSON: ldap_uri, base_dn, bind_dn, bind_password, cafile, warn_days")
    parser.add_argument("--status-file", type=Path, default=DEFAULT_STATUS,
                        help=f"where the report goes (default {DEFAULT_STATUS})")
    parser.add_argument("--warn-days", type=int, default=None,
                        help="days ahead to warn (default: the config's, else "
                        f"{DEFAULT_WARN_DAYS})")
    parser.add_argument("--now", default=None, help=argparse.SUPPRESS)  # tests: ISO time
    parser.add_argument("--no-syslog", action="store_true", help="do not write the log line")
    args = parser.parse_args(argv)
    try:
        config = json.loads(args.config.read_text(encoding="utf-8"))
        missing = [k for k in ("ldap_uri", "base_dn", "bind_dn", "bind_password", "cafile")
                   if not config.get(k)]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
    except (OSError, ValueError) as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        print("hint: the mailrelay role writes this file (/etc/safemail/cert-expiry.json)",
              file=sys.stderr)
        return 2
    warn_days = args.warn_days if args.warn_days is not None else int(
        config.get("warn_days", DEFAULT_WARN_DAYS))
    if warn_days < 0:
        print("error: --warn-days must be 0 or more", file=sys.stderr)
        return 2
    now = (dt.datetime.fromisoformat(args.now) if args.now
           else dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    from safemail.errors import SafeMailError

    try:
        entries = read_directory(config)
    except SafeMailError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        if not args.no_syslog:
            log_line(f"certificate expiry: directory not readable: {exc.message}")
        return 1
    findings = assess(entries, now, warn_days)
    write_status(status_document(findings, now, warn_days), args.status_file)
    line = summary_line(findings, warn_days)
    if not args.no_syslog:
        log_line(line)
    print(line)
    return EXIT_WARN if needs_attention(findings) else 0


if __name__ == "__main__":
    sys.exit(main())
