"""The accounting ledger: counting, billing with the cap, anonymisation, maintenance window.

One SQLite file on the relay's encrypted log volume. Tables:

``raw``
    One row per delivery between two different participants: the hour (``YYYY-MM-DD HH``,
    local time), the quarter, sender and recipient participant number and specialty group.
    No address, no subject, nothing of the content. A mail to oneself (same participant
    number on both sides) is not recorded at all (ACC-01). ``ref`` is a digest of queue id,
    recipient and time, so reading the same log line twice records it once.
``traffic``
    The anonymised records: mails per hour and pair of specialty groups. No participant
    number (ACC-03); the only input of the maintenance window (ACC-04).
``statement`` / ``billed``
    The billing of a closed quarter: per participant sent, received, payout in cents (capped,
    ACC-02). Kept apart from the traffic records and deleted when their retention ends;
    ``billed`` keeps only the quarter's totals.
``pending`` / ``meta``
    The sender's participant (number and group, not the address) of each queue id still in
    Postfix's queue between two collect runs, and the log cursor.

Every operation is one transaction: it applies completely or not at all.
"""

from __future__ import annotations

import datetime
import hashlib
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from safemail.accounting.logparse import Delivery, DeliveryParser
from safemail.errors import SafeMailError, UsageError

__all__ = [
    "CollectResult",
    "Count",
    "Ledger",
    "Participant",
    "Policy",
    "Window",
    "normalise_quarter",
    "parse_quarter",
    "quarter_bounds",
    "quarter_of",
    "require_closed",
]

SCHEMA_VERSION = "1"
PENDING_DAYS = 7  # a queue id not removed after this long is forgotten (its mail is gone)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    queue_id TEXT PRIMARY KEY, sender TEXT NOT NULL, seen TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raw (
    ref TEXT PRIMARY KEY,
    hour TEXT NOT NULL,
    quarter TEXT NOT NULL,
    sender TEXT NOT NULL,
    sender_group TEXT NOT NULL,
    recipient TEXT NOT NULL,
    recipient_group TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS raw_quarter ON raw (quarter);
CREATE TABLE IF NOT EXISTS traffic (
    hour TEXT NOT NULL,
    quarter TEXT NOT NULL,
    sender_group TEXT NOT NULL,
    recipient_group TEXT NOT NULL,
    mails INTEGER NOT NULL,
    PRIMARY KEY (hour, sender_group, recipient_group));
CREATE TABLE IF NOT EXISTS billed (
    quarter TEXT PRIMARY KEY,
    billed_at TEXT NOT NULL,
    how TEXT NOT NULL,
    participants INTEGER NOT NULL,
    payout_cents INTEGER NOT NULL,
    statement_until TEXT NOT NULL,
    statement_deleted TEXT);
CREATE TABLE IF NOT EXISTS statement (
    quarter TEXT NOT NULL,
    number TEXT NOT NULL,
    specialty TEXT NOT NULL,
    sent INTEGER NOT NULL,
    received INTEGER NOT NULL,
    payout_cents INTEGER NOT NULL,
    capped INTEGER NOT NULL,
    PRIMARY KEY (quarter, number));
"""

_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


@dataclass(frozen=True)
class Participant:
    number: str
    specialty: str


@dataclass(frozen=True)
class Policy:
    """The subsidy: cents per sent and per received mail, capped per participant and quarter."""

    rate_sent_cents: int
    rate_received_cents: int
    cap_cents: int

    def __post_init__(self) -> None:
        for name in ("rate_sent_cents", "rate_received_cents", "cap_cents"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"policy {name} must be a whole number >= 0, not {value!r}")

    def payout(self, sent: int, received: int) -> tuple[int, bool]:
        """The payout in cents and whether the cap cut it."""
        uncapped = sent * self.rate_sent_cents + received * self.rate_received_cents
        return min(uncapped, self.cap_cents), uncapped > self.cap_cents


@dataclass(frozen=True)
class Count:
    number: str
    specialty: str
    sent: int
    received: int


@dataclass(frozen=True)
class Window:
    """The maintenance window: ``hours`` consecutive hours of the week with least traffic."""

    start_weekday: int  # 0 = Monday
    start_hour: int
    hours: int
    mails: int  # anonymised mails in the window over all recorded weeks
    total: int  # anonymised mails in all records
    weeks: int  # distinct weeks the records cover

    def describe(self) -> str:
        end = (self.start_weekday * 24 + self.start_hour + self.hours) % 168
        return (f"{_WEEKDAYS[self.start_weekday]} {self.start_hour:02d}:00 - "
                f"{_WEEKDAYS[end // 24]} {end % 24:02d}:00")


def parse_quarter(text: str) -> tuple[int, int]:
    """``2026Q3`` -> (2026, 3); UsageError otherwise."""
    t = text.strip().upper()
    if len(t) == 6 and t[:4].isdigit() and t[4] == "Q" and t[5] in "1234":
        return int(t[:4]), int(t[5])
    raise UsageError(f"{text!r} is not a quarter", "write it as YYYYQn, for example 2026Q3")


def normalise_quarter(text: str) -> str:
    year, q = parse_quarter(text)
    return f"{year}Q{q}"


def quarter_of(at: datetime.datetime | datetime.date) -> str:
    return f"{at.year}Q{(at.month - 1) // 3 + 1}"


def quarter_bounds(quarter: str) -> tuple[datetime.datetime, datetime.datetime]:
    """First moment of the quarter and first moment after it (naive local time)."""
    year, q = parse_quarter(quarter)
    start = datetime.datetime(year, 3 * q - 2, 1)
    end = datetime.datetime(year + 1, 1, 1) if q == 4 else datetime.datetime(year, 3 * q + 1, 1)
    return start, end


# A queue id's sender kept between runs: "#<number>\t<group>" ("#" alone: no participant).
_KEPT = "#"


def _token(who: Participant | None) -> str:
    return _KEPT if who is None else f"{_KEPT}{who.number}\t{who.specialty}"


def _from_token(text: str) -> Participant | None:
    if not text.startswith(_KEPT) or "\t" not in text:
        return None
    number, group = text[1:].split("\t", 1)
    return Participant(number, group)


def require_closed(quarter: str, now: datetime.datetime) -> str:
    """The quarter's normal name if it is over at `now`; SafeMailError if it is still running."""
    quarter = normalise_quarter(quarter)
    _, end = quarter_bounds(quarter)
    if now < end:
        raise SafeMailError(
            f"{quarter} is not over (it ends {end:%Y-%m-%d}): it cannot be billed yet",
            "bill a quarter after its end; `counts` shows the running quarter",
        )
    return quarter


def _hour(at: datetime.datetime) -> str:
    return at.strftime("%Y-%m-%d %H")


def _ref(d: Delivery) -> str:
    key = f"{d.queue_id}\0{d.recipient}\0{d.at.isoformat()}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


@dataclass
class CollectResult:
    lines: int = 0
    deliveries: int = 0
    recorded: int = 0
    duplicates: int = 0
    to_oneself: int = 0
    not_participants: int = 0
    after_billing: int = 0
    orphans: int = 0
    unreadable: int = 0
    restarted: bool = False  # the log was replaced (rotated) since the last run

    def summary(self) -> str:
        parts = [f"{self.lines} new log lines, {self.deliveries} deliveries",
                 f"{self.recorded} recorded"]
        for value, text in (
            (self.to_oneself, "to oneself, not counted"),
            (self.not_participants, "not between two participants, not counted"),
            (self.after_billing, "in an already billed quarter, kept anonymised only"),
            (self.duplicates, "already recorded"),
            (self.orphans, "without a sender line in the log"),
            (self.unreadable, "unreadable lines"),
        ):
            if value:
                parts.append(f"{value} {text}")
        if self.restarted:
            parts.append("the log was replaced since the last run: read from its start")
        return "; ".join(parts)


Resolver = Callable[[Iterable[str]], dict[str, Participant]]


class Ledger:
    """The ledger file. Use as a context manager; every method is one transaction."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise SafeMailError(
                f"the ledger's directory {self.path.parent} does not exist",
                "run the accounting role, or give --ledger a path in an existing directory",
            )
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self.db.execute("PRAGMA foreign_keys = ON")
        # secure_delete: deleted participant numbers are overwritten in the file, not left in
        # free pages (ACC-03 is about the file, not only about what a query returns).
        self.db.execute("PRAGMA secure_delete = ON")
        with self._tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        version = self._meta("schema")
        if version != SCHEMA_VERSION:
            raise SafeMailError(f"{self.path} has ledger schema {version}, this program "
                                f"knows {SCHEMA_VERSION}", "use the matching safemail version")

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.db.close()

    # -- plumbing -------------------------------------------------------------------------
    def _tx(self) -> _Transaction:
        return _Transaction(self.db)

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def billed_quarters(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT quarter, billed_at FROM billed"))

    # -- ACC-01: counting -----------------------------------------------------------------
    def collect(
        self, log: Path, resolve: Resolver, now: datetime.datetime
    ) -> CollectResult:
        """Read the log from the cursor to its last complete line and record the deliveries.

        Addresses are resolved to participants before anything is written; when that fails
        (directory down), nothing is recorded and the cursor stays, so the next run reads the
        same lines again.
        """
        result = CollectResult()
        try:
            fh = open(log, "rb")  # noqa: SIM115 -- closed below, after the size check
        except FileNotFoundError:
            raise SafeMailError(f"the mail log {log} does not exist",
                                "check the relay's maillog_file and the log volume") from None
        with fh:
            st = Path(log).stat()
            inode, offset = str(st.st_ino), int(self._meta("log_offset") or 0)
            if self._meta("log_inode") != inode or st.st_size < offset:
                result.restarted = self._meta("log_inode") is not None
                offset = 0
            fh.seek(offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        lines = data[:end].decode("utf-8", "replace").splitlines()
        result.lines = len(lines)
        pending = dict(self.db.execute("SELECT queue_id, sender FROM pending"))
        parser = DeliveryParser(now, pending)
        deliveries = list(parser.feed(lines))
        result.deliveries, result.orphans = len(deliveries), parser.orphans
        result.unreadable = parser.unreadable
        still = parser.pending()
        addresses = ({d.sender for d in deliveries} | {d.recipient for d in deliveries}
                     | set(still.values()))
        wanted = sorted(a for a in addresses if a and not a.startswith(_KEPT))
        who = resolve(wanted) if wanted else {}
        who.update({t: p for t in addresses if (p := _from_token(t)) is not None})
        billed = self.billed_quarters()
        with self._tx():
            for d in deliveries:
                s, r = who.get(d.sender), who.get(d.recipient)
                if s is None or r is None:
                    result.not_participants += 1
                    continue
                if s.number == r.number:
                    result.to_oneself += 1
                    continue
                quarter = quarter_of(d.at)
                if quarter in billed:
                    result.after_billing += 1
                    self._add_traffic(_hour(d.at), quarter, s.specialty, r.specialty, 1)
                    continue
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO raw VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (_ref(d), _hour(d.at), quarter, s.number, s.specialty,
                     r.number, r.specialty))
                if cur.rowcount:
                    result.recorded += 1
                else:
                    result.duplicates += 1
            seen = dict(self.db.execute("SELECT queue_id, seen FROM pending"))
            self.db.execute("DELETE FROM pending")
            stamp = now.isoformat(timespec="seconds")
            for qid, sender in still.items():
                # The sender's participant, not its address, waits for the next run.
                self.db.execute("INSERT INTO pending VALUES (?, ?, ?)",
                                (qid, _token(who.get(sender)), seen.get(qid, stamp)))
            self._set_meta("log_inode", inode)
            self._set_meta("log_offset", str(offset + end))
            self._set_meta("collected_at", stamp)
        return result

    def counts(self, quarter: str) -> list[Count]:
        """Sent and received mails per participant of the quarter (its raw records)."""
        quarter = normalise_quarter(quarter)
        rows: dict[str, list] = {}
        for number, group, n in self.db.execute(
                "SELECT sender, sender_group, COUNT(*) FROM raw WHERE quarter = ? "
                "GROUP BY sender, sender_group", (quarter,)):
            rows.setdefault(number, [group, 0, 0])[1] += n
        for number, group, n in self.db.execute(
                "SELECT recipient, recipient_group, COUNT(*) FROM raw WHERE quarter = ? "
                "GROUP BY recipient, recipient_group", (quarter,)):
            rows.setdefault(number, [group, 0, 0])[2] += n
        return [Count(n, g, s, r) for n, (g, s, r) in sorted(rows.items())]

    # -- ACC-02/03: billing, anonymisation ------------------------------------------------
    def bill(
        self, quarter: str, policy: Policy, now: datetime.datetime, statement_days: int
    ) -> list[tuple[Count, int, bool]]:
        """Bill a closed quarter: statement, then anonymise its records, in one transaction."""
        quarter = require_closed(quarter, now)
        billed = self.billed_quarters()
        if quarter in billed:
            raise SafeMailError(f"{quarter} was billed on {billed[quarter]}",
                                "`statement` shows its statement while it is kept")
        lines = []
        for c in self.counts(quarter):
            cents, capped = policy.payout(c.sent, c.received)
            lines.append((c, cents, capped))
        until = now + datetime.timedelta(days=statement_days)
        with self._tx():
            for c, cents, capped in lines:
                self.db.execute("INSERT INTO statement VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (quarter, c.number, c.specialty, c.sent, c.received, cents,
                                 int(capped)))
            self.db.execute(
                "INSERT INTO billed VALUES (?, ?, 'billed', ?, ?, ?, NULL)",
                (quarter, now.isoformat(timespec="seconds"), len(lines),
                 sum(cents for _, cents, _ in lines), until.isoformat(timespec="seconds")))
            self._anonymise(quarter)
        return lines

    def _add_traffic(self, hour: str, quarter: str, sgroup: str, rgroup: str, n: int) -> None:
        self.db.execute(
            "INSERT INTO traffic VALUES (?, ?, ?, ?, ?) ON CONFLICT (hour, sender_group, "
            "recipient_group) DO UPDATE SET mails = mails + excluded.mails",
            (hour, quarter, sgroup, rgroup, n))

    def _anonymise(self, quarter: str) -> int:
        rows = self.db.execute(
            "SELECT hour, sender_group, recipient_group, COUNT(*) FROM raw WHERE quarter = ? "
            "GROUP BY hour, sender_group, recipient_group", (quarter,)).fetchall()
        for hour, sgroup, rgroup, n in rows:
            self._add_traffic(hour, quarter, sgroup, rgroup, n)
        return self.db.execute("DELETE FROM raw WHERE quarter = ?", (quarter,)).rowcount

    def statement(self, quarter: str) -> list[tuple[str, str, int, int, int, bool]]:
        quarter = normalise_quarter(quarter)
        row = self.db.execute("SELECT how, statement_deleted FROM billed WHERE quarter = ?",
                              (quarter,)).fetchone()
        if row is None:
            raise SafeMailError(f"{quarter} is not billed", "`bill --quarter` bills it")
        if row[0] != "billed":
            raise SafeMailError(f"{quarter} was never billed: its records were anonymised "
                                "when their retention ended")
        if row[1]:
            raise SafeMailError(f"the statement of {quarter} was deleted on {row[1]} "
                                "(its retention ended)")
        return [(n, g, s, r, c, bool(k)) for n, g, s, r, c, k in self.db.execute(
            "SELECT number, specialty, sent, received, payout_cents, capped FROM statement "
            "WHERE quarter = ? ORDER BY number", (quarter,))]

    def purge(
        self, now: datetime.datetime, raw_days: int
    ) -> tuple[list[str], list[str], int]:
        """The deletion schedule (ACC-03), one transaction.

        Deletes the statements whose retention ended; anonymises the raw records of every
        quarter that ended more than ``raw_days`` days ago and was never billed (the payout
        is then lost, the participant numbers are not kept longer for it); forgets queue ids
        pending for more than a week. Returns (statements deleted, quarters anonymised
        unbilled, pending entries dropped).
        """
        stamp = now.isoformat(timespec="seconds")
        deleted, expired = [], []
        with self._tx():
            for (quarter,) in self.db.execute(
                    "SELECT quarter FROM billed WHERE statement_deleted IS NULL AND "
                    "statement_until <= ?", (stamp,)).fetchall():
                self.db.execute("DELETE FROM statement WHERE quarter = ?", (quarter,))
                self.db.execute("UPDATE billed SET statement_deleted = ? WHERE quarter = ?",
                                (stamp, quarter))
                deleted.append(quarter)
            for (quarter,) in self.db.execute(
                    "SELECT DISTINCT quarter FROM raw ORDER BY quarter").fetchall():
                _, end = quarter_bounds(quarter)
                if now >= end + datetime.timedelta(days=raw_days):
                    self.db.execute(
                        "INSERT OR IGNORE INTO billed VALUES (?, ?, 'expired', 0, 0, ?, ?)",
                        (quarter, stamp, stamp, stamp))
                    self._anonymise(quarter)
                    expired.append(quarter)
            cutoff = (now - datetime.timedelta(days=PENDING_DAYS)).isoformat(timespec="seconds")
            dropped = self.db.execute("DELETE FROM pending WHERE seen < ?", (cutoff,)).rowcount
        return deleted, expired, dropped

    # -- ACC-04: maintenance window -------------------------------------------------------
    def window(self, hours: int) -> Window:
        """The ``hours`` consecutive hours of the week with the fewest anonymised mails."""
        if not 1 <= hours <= 167:
            raise UsageError(f"a window of {hours} hours does not fit in a week",
                             "give 1 to 167 hours")
        per_slot = [0] * 168
        weeks: set[tuple[int, int]] = set()
        for hour, mails in self.db.execute("SELECT hour, mails FROM traffic"):
            at = datetime.datetime.strptime(hour, "%Y-%m-%d %H")
            per_slot[at.weekday() * 24 + at.hour] += mails
            weeks.add(at.isocalendar()[:2])
        total = sum(per_slot)
        if not weeks:
            raise SafeMailError("there are no anonymised records yet",
                                "they appear when a quarter is billed")
        best_start, best = 0, None
        for start in range(168):  # ties: the earliest slot of the week (Monday 00:00 first)
            mails = sum(per_slot[(start + i) % 168] for i in range(hours))
            if best is None or mails < best:
                best_start, best = start, mails
        return Window(best_start // 24, best_start % 24, hours, best or 0, total, len(weeks))

    def status(self) -> dict[str, object]:
        raw = dict(self.db.execute("SELECT quarter, COUNT(*) FROM raw GROUP BY quarter"))
        return {
            "ledger": str(self.path),
            "collected_at": self._meta("collected_at"),
            "log_offset": int(self._meta("log_offset") or 0),
            "raw_records": raw,
            "pending_queue_ids": self.db.execute("SELECT COUNT(*) FROM pending").fetchone()[0],
            "billed": [
                {"quarter": q, "billed_at": b, "how": h, "participants": p,
                 "payout_cents": c, "statement_until": u, "statement_deleted": d}
                for q, b, h, p, c, u, d in self.db.execute(
                    "SELECT * FROM billed ORDER BY quarter")],
            "anonymised_mails": self.db.execute(
                "SELECT COALESCE(SUM(mails), 0) FROM traffic").fetchone()[0],
        }


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
