"""Postfix log lines to deliveries.

A delivery is one recipient of one queued mail that Postfix handed on (``status=sent``). The
sender comes from the queue manager's ``from=<...>`` line of the same queue id, which always
precedes the delivery lines; :class:`DeliveryParser` keeps the senders of queue ids it has
seen (and the caller can persist them between runs, see :meth:`DeliveryParser.pending`).

Postfix's own log (``maillog_file``, written by postlogd) and syslog both write the
traditional ``Mmm dd hh:mm:ss[.ffffff] host program[pid]: text`` form without a year; RFC 3339
time stamps (``2026-12-01T06:50:01.123456+00:00``) are read too. The year of a traditional
time stamp is the reference year, or the year before when the date would otherwise lie more
than a day in the future (a December line read in January).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["Delivery", "DeliveryParser", "parse_timestamp"]

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}

_TRADITIONAL = re.compile(
    r"^(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)(?:\.\d+)? "
    r"(?P<rest>.*)$"
)
_RFC3339 = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) "
                      r"(?P<rest>.*)$")
# "host postfix/qmgr[123]: 4F2A01C0E7: from=<a@b>, size=..."; the program may carry a
# service name prefix (postfix-out/smtp) or none (postfix/lmtp).
_BODY = re.compile(
    r"^\S+ (?P<prog>[\w.-]+/[\w.-]+)\[\d+\]: (?P<qid>[0-9A-Za-z]{5,}): (?P<text>.*)$"
)
_FROM = re.compile(r"^from=<(?P<addr>[^>]*)>")
_TO = re.compile(r"^to=<(?P<addr>[^>]*)>.*\bstatus=(?P<status>\w+)")
_REMOVED = re.compile(r"^removed\b")


@dataclass(frozen=True)
class Delivery:
    """One recipient of one mail handed on by Postfix."""

    queue_id: str
    at: datetime.datetime  # naive, local time of the log
    sender: str  # envelope sender address, lower case ("" for bounces)
    recipient: str  # envelope recipient address, lower case


def parse_timestamp(line: str, reference: datetime.datetime) -> tuple[datetime.datetime, str]:
    """The time stamp of a log line (naive local time) and the rest of the line.

    Raises ValueError when the line has no time stamp this parser knows.
    """
    m = _RFC3339.match(line)
    if m:
        ts = datetime.datetime.fromisoformat(m.group("ts").replace("Z", "+00:00"))
        if ts.tzinfo is not None:
            ts = ts.astimezone().replace(tzinfo=None)
        return ts, m.group("rest")
    m = _TRADITIONAL.match(line)
    if not m or m.group("mon") not in _MONTHS:
        raise ValueError("no time stamp")
    month, day = _MONTHS[m.group("mon")], int(m.group("day"))
    hms = int(m.group("h")), int(m.group("m")), int(m.group("s"))
    year = reference.year
    ts = _at(year, month, day, hms)
    if ts is None or ts > reference + datetime.timedelta(days=1):
        year -= 1
        ts = _at(year, month, day, hms)
    if ts is None:
        raise ValueError(f"no such date: {m.group('mon')} {day}")
    return ts, m.group("rest")


def _at(year: int, month: int, day: int, hms: tuple[int, int, int]) -> datetime.datetime | None:
    try:
        return datetime.datetime(year, month, day, *hms)
    except ValueError:  # 29 February of a year without one
        return None


class DeliveryParser:
    """Feed log lines, get deliveries. Keeps the senders of queue ids still in the queue."""

    def __init__(
        self, reference: datetime.datetime, pending: dict[str, str] | None = None
    ) -> None:
        self.reference = reference
        self._senders: dict[str, str] = dict(pending or {})
        self.unreadable = 0  # lines without a known time stamp
        self.orphans = 0  # deliveries whose from= line was never seen

    def pending(self) -> dict[str, str]:
        """Queue ids seen with a sender and not yet removed from the queue."""
        return dict(self._senders)

    def feed(self, lines: Iterable[str]) -> Iterator[Delivery]:
        for raw in lines:
            line = raw.rstrip("\n")
            try:
                at, rest = parse_timestamp(line, self.reference)
            except ValueError:
                self.unreadable += 1
                continue
            m = _BODY.match(rest)
            if not m:
                continue
            qid, text = m.group("qid"), m.group("text")
            f = _FROM.match(text)
            if f:
                self._senders[qid] = f.group("addr").lower()
                continue
            t = _TO.match(text)
            if t:
                if t.group("status") != "sent":
                    continue
                sender = self._senders.get(qid)
                if sender is None:
                    self.orphans += 1
                    continue
                yield Delivery(qid, at, sender, t.group("addr").lower())
                continue
            if _REMOVED.match(text):
                self._senders.pop(qid, None)
