"""The mail load of the AV-01/AV-02 fault test (verify/test_faults.py) and its accounting.

One file, standard library only at import, used in three places:

- on the controller (imported by test_faults.py, unit-tested in tests/test_verify_faultload.py):
  the pure parts: the hard time bound (:class:`Deadline`), the plaintext needles of a body
  marker (:func:`marker_needles`), the Message-ID accounting (:func:`account`), the timing
  statistics (:func:`delay_stats`, :func:`acceptance_gap`), the pacing (:func:`due`);
- on a participant host, ``python faultload.py send CONFIG`` (with the host's SafeMail venv:
  it builds and encrypts each mail with ``safemail.participant.message``, as ``safemail
  participant send`` does) sends mails paced over the fault run, one SMTP session (STARTTLS,
  AUTH) per batch, retries what was not accepted, and writes every attempt to a JSON file;
- on the store, ``python3 faultload.py maildir ROOT TAG`` lists the message files of every
  Maildir under ROOT whose Message-ID carries TAG (path, Message-ID, Content-Type, delivery
  time from Dovecot's file name), one JSON object per line.

Times in the sender's file are the participant's wall clock, in the listing the store's: the
test converts both to the controller's clock with the offsets it measured.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# --------------------------------------------------------------------------- time bound


class TimeLimitReached(AssertionError):
    """The fault run's hard time limit passed; the message names the phase."""


class Deadline:
    """A hard time limit for the whole run (monotonic clock)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise ValueError(f"the time limit must be positive, not {seconds!r}")
        self.seconds = float(seconds)
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def remaining(self) -> float:
        return max(0.0, self.seconds - self.elapsed())

    def expired(self) -> bool:
        return self.elapsed() >= self.seconds

    def check(self, phase: str) -> None:
        """Raise TimeLimitReached naming ``phase`` once the limit has passed."""
        if self.expired():
            raise TimeLimitReached(
                f"hard time limit of {self.seconds:.0f} s reached during {phase} (after "
                f"{self.elapsed():.0f} s): sending stopped, faults undone; raise "
                "SAFEMAIL_FAULTS_MINUTES or lower SAFEMAIL_FAULTS_MAILS")

    def wait_for(self, predicate: Callable[[], object], seconds: float, phase: str,
                 step: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> float | None:
        """Call ``predicate`` until it is true (the seconds it took), ``seconds`` passed (None)
        or the hard limit passed (TimeLimitReached)."""
        start = self._clock()
        while True:
            if predicate():
                return self._clock() - start
            self.check(phase)
            if self._clock() - start >= seconds:
                return None
            sleep(step)


# --------------------------------------------------------------------------- plaintext


def marker_needles(marker: str) -> list[str]:
    """What to search for so that the marker is found in clear and in base64 (at each of the
    three alignments a base64 encoder may give it): a text part sent base64-encoded instead of
    encrypted is plaintext too. Quoted-printable leaves an ASCII marker as it is."""
    data = marker.encode("ascii")
    if len(data) < 12:
        raise ValueError("the marker is too short to be found without false hits")
    needles = [marker]
    for skip in range(3):
        rest = data[skip:]
        whole = len(rest) // 3 * 3
        needles.append(base64.b64encode(rest[:whole]).decode("ascii"))
    return needles


def needle_hits(text: str, needles: Iterable[str]) -> list[str]:
    """The needles found in ``text`` (used on the controller for what a host returned)."""
    return [n for n in needles if n in text]


# --------------------------------------------------------------------------- accounting


@dataclass(frozen=True)
class Attempt:
    start: float
    end: float
    outcome: str  # "250 ...", "4xx ...", "5xx ...", "unconfirmed: ...", "failed: ..."

    @property
    def accepted(self) -> bool:
        return self.outcome.startswith("250")

    @property
    def unconfirmed(self) -> bool:
        return self.outcome.startswith("unconfirmed")


@dataclass(frozen=True)
class SentMail:
    message_id: str
    sender: str
    recipient: str
    attempts: tuple[Attempt, ...]

    @property
    def accepted_at(self) -> float | None:
        return next((a.end for a in self.attempts if a.accepted), None)

    @property
    def first_try(self) -> float | None:
        return self.attempts[0].start if self.attempts else None


@dataclass(frozen=True)
class StoredCopy:
    message_id: str
    mailbox: str
    saved: float
    content_type: str
    path: str = ""


@dataclass
class Accounting:
    sent: int
    accepted: int
    delivered_once: int
    lost: list[str] = field(default_factory=list)
    lost_after_250: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    duplicates_after_unconfirmed: list[str] = field(default_factory=list)
    misdelivered: dict[str, list[str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    not_smime: list[str] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    delays_after_250: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.misdelivered or self.unknown
                    or self.not_smime) and self.sent > 0

    def problems(self) -> list[str]:
        out = []
        if not self.sent:
            out.append("no mail was sent")
        if self.lost:
            out.append(f"{len(self.lost)} lost (not in the recipient's mailbox; "
                       f"{len(self.lost_after_250)} of them accepted with 250, "
                       f"{len(self.refused)} refused for good): {self.lost[:5]}")
        if self.duplicates:
            out.append(f"{len(self.duplicates)} delivered more than once "
                       f"({len(self.duplicates_after_unconfirmed)} after an attempt whose "
                       f"reply never came, i.e. resent by the client): "
                       f"{dict(list(self.duplicates.items())[:5])}")
        if self.misdelivered:
            out.append(f"{len(self.misdelivered)} in a mailbox not its recipient's: "
                       f"{dict(list(self.misdelivered.items())[:5])}")
        if self.unknown:
            out.append(f"{len(self.unknown)} stored with the run's tag but never sent: "
                       f"{self.unknown[:5]}")
        if self.not_smime:
            out.append(f"{len(self.not_smime)} stored copies are not S/MIME enveloped: "
                       f"{self.not_smime[:5]}")
        return out


SMIME_TYPES = ("application/pkcs7-mime", "application/x-pkcs7-mime")


def account(sent: Sequence[SentMail], stored: Sequence[StoredCopy]) -> Accounting:
    """Every sent mail must be in its recipient's mailbox exactly once (by Message-ID), and
    nothing else with the run's tag may be there. ``stored``: every copy found (any mailbox).

    Delays: from the first attempt to the first copy in the recipient's mailbox (what the
    sender waits), and from the relay's 250 to that copy."""
    by_id = {m.message_id: m for m in sent}
    copies: dict[str, list[StoredCopy]] = {}
    result = Accounting(sent=len(sent), accepted=sum(m.accepted_at is not None for m in sent),
                        delivered_once=0)
    for c in stored:
        if c.message_id not in by_id:
            result.unknown.append(c.message_id)
            continue
        if c.content_type.lower() not in SMIME_TYPES:
            result.not_smime.append(f"{c.message_id} ({c.content_type}) {c.path}")
        copies.setdefault(c.message_id, []).append(c)
    for mid, mail in by_id.items():
        own = [c for c in copies.get(mid, []) if c.mailbox.lower() == mail.recipient.lower()]
        other = [c.mailbox for c in copies.get(mid, []) if c not in own]
        if other:
            result.misdelivered[mid] = other
        if not own:
            result.lost.append(mid)
            if mail.accepted_at is not None:
                result.lost_after_250.append(mid)
            elif mail.attempts and mail.attempts[-1].outcome[:1] == "5":
                result.refused[mid] = mail.attempts[-1].outcome
            continue
        if len(own) > 1:
            result.duplicates[mid] = len(own)
            if any(a.unconfirmed for a in mail.attempts):
                result.duplicates_after_unconfirmed.append(mid)
        else:
            result.delivered_once += 1
        first = min(c.saved for c in own)
        if mail.first_try is not None:
            result.delays.append(first - mail.first_try)
        if mail.accepted_at is not None:
            result.delays_after_250.append(first - mail.accepted_at)
    return result


def mailbox_of(path: str, root: str) -> str:
    """``local@domain`` of a message file under ROOT/<domain>/<local>/Maildir/... (the
    store's home layout: roles/mailstore, ``home=<mail root>/%d/%n``)."""
    rel = os.path.relpath(path, root).split(os.sep)
    if len(rel) < 5 or rel[2] != "Maildir" or rel[-2] not in ("new", "cur"):
        raise ValueError(f"{path} is not a message file of a Maildir under {root}")
    return f"{rel[1]}@{rel[0]}"


_MAILDIR_NAME = re.compile(r"^(\d+)\.M(\d+)P")


def saved_time(name: str, mtime: float) -> float:
    """Delivery time of a Maildir file: Dovecot names it <seconds>.M<microseconds>P<pid>...;
    the file's mtime if the name is not of that form."""
    m = _MAILDIR_NAME.match(name)
    return int(m[1]) + int(m[2]) / 1e6 if m else mtime


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (the smallest value with at least ``fraction`` of the values at
    or below it)."""
    if not values:
        raise ValueError("no values")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} is not in (0, 1]")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def delay_stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, median, p95 and max (seconds, rounded to 0.01); None for an empty list."""
    if not values:
        return {"count": 0, "median": None, "p95": None, "max": None}
    ordered = sorted(values)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return {"count": n, "median": round(median, 2), "p95": round(percentile(ordered, 0.95), 2),
            "max": round(ordered[-1], 2)}


def acceptance_gap(accepted: Iterable[float], start: float, end: float) -> float:
    """The longest time within [start, end] in which no mail was accepted (what a participant
    saw of a fault): gaps between consecutive acceptances, clipped to the window."""
    inside = sorted(t for t in accepted if start <= t <= end)
    edges = [start, *inside, end]
    return max(b - a for a, b in zip(edges, edges[1:], strict=False))


def queued_since(postqueue_json: str, since: float) -> int:
    """Messages in a relay's queue (``postqueue -j``: one JSON object a line) that arrived at or
    after ``since`` (the relay's clock): the run's own mail while the test holds the relays
    alone; older entries (another test's leftovers) do not keep the run waiting."""
    count = 0
    for line in postqueue_json.splitlines():
        if line.strip() and float(json.loads(line).get("arrival_time", 0)) >= since:
            count += 1
    return count


def due(elapsed: float, rate: float, made: int, limit: int) -> int:
    """How many new mails to make now: the pace ``rate`` per second from the start, never more
    than ``limit`` in all."""
    return max(0, min(limit, int(elapsed * rate) + 1) - made)


# --------------------------------------------------------------------------- parsing


def parse_sender_file(doc: Mapping) -> list[SentMail]:
    """The sender's JSON (see :func:`send`) as SentMail records."""
    return [SentMail(m["mid"], doc["sender"], doc["recipient"],
                     tuple(Attempt(float(a[0]), float(a[1]), str(a[2])) for a in m["attempts"]))
            for m in doc["messages"]]


def parse_maildir_lines(text: str, root: str) -> list[StoredCopy]:
    out = []
    for line in text.splitlines():
        if line.strip():
            e = json.loads(line)
            out.append(StoredCopy(e["mid"], mailbox_of(e["path"], root), float(e["saved"]),
                                  e["ctype"], e["path"]))
    return out


def shift(copies: Sequence[StoredCopy], offset: float) -> list[StoredCopy]:
    """Copies with their times moved from a host's clock to the controller's (host - offset)."""
    return [StoredCopy(c.message_id, c.mailbox, c.saved - offset, c.content_type, c.path)
            for c in copies]


def shift_mail(mails: Sequence[SentMail], offset: float) -> list[SentMail]:
    return [SentMail(m.message_id, m.sender, m.recipient,
                     tuple(Attempt(a.start - offset, a.end - offset, a.outcome)
                           for a in m.attempts)) for m in mails]


# --------------------------------------------------------------------------- on the store


def maildir_listing(root: str, tag: str) -> Iterable[dict]:
    """Message files under ``root`` whose Message-ID contains ``tag`` (standard library only:
    runs with the store's python3)."""
    import email.parser
    import email.policy

    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    for top, dirs, files in os.walk(root):
        dirs.sort()
        if os.path.basename(top) not in ("new", "cur"):
            continue
        for name in sorted(files):
            path = os.path.join(top, name)
            try:
                with open(path, "rb") as fh:
                    head = fh.read(65536).split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
                st = os.stat(path)
            except OSError:
                continue  # moved by Dovecot (new -> cur) meanwhile; the next look finds it
            msg = parser.parsebytes(head)
            mid = str(msg.get("Message-ID", "")).strip()
            if tag in mid:
                yield {"path": path, "mid": mid, "ctype": msg.get_content_type(),
                       "saved": saved_time(name, st.st_mtime)}


# --------------------------------------------------------------------------- on a participant


def _session(cfg: Mapping, password: str, batch: list[dict], log: Callable[[str], None]) -> None:
    """One SMTP session (STARTTLS, AUTH) for ``batch``; each message gets one attempt."""
    import smtplib

    from safemail.participant import transport

    context = transport.tls_context(cfg.get("cafile"))
    t0 = time.time()
    try:
        smtp = smtplib.SMTP(cfg["host"], int(cfg.get("port", 587)),
                            timeout=float(cfg.get("timeout", 30)))
        smtp.ehlo()
        smtp.starttls(context=context)
        smtp.ehlo()
        smtp.login(cfg["sender"], password)
    except (smtplib.SMTPException, OSError) as exc:
        log(f"session failed before sending: {type(exc).__name__}: {exc}")
        for m in batch:
            m["attempts"].append([t0, time.time(), f"failed: session: {exc}"[:200]])
        return
    try:
        for m in batch:
            start = time.time()
            stage = "before DATA"
            try:
                code, text = smtp.mail(cfg["sender"])
                if code == 250:
                    code, text = smtp.rcpt(cfg["recipient"])
                if code == 250:
                    code, text = smtp.docmd("DATA")
                    if code == 354:
                        payload = re.sub(rb"(?m)^\.", b"..", m["raw"])
                        if not payload.endswith(b"\r\n"):
                            payload += b"\r\n"
                        stage = "sending"
                        smtp.send(payload + b".\r\n")
                        stage = "after the final dot"
                        code, text = smtp.getreply()
                outcome = f"{code} {text.decode('utf-8', 'replace')}"[:200]
                if code != 250:
                    smtp.rset()
            except (TimeoutError, smtplib.SMTPException, OSError) as exc:
                kind = "unconfirmed" if stage == "after the final dot" else "failed"
                m["attempts"].append([start, time.time(), f"{kind}: {stage}: {exc}"[:200]])
                # The rest of the batch was not tried: it stays pending for the next session.
                log(f"session lost {stage}: {type(exc).__name__}: {exc}")
                return
            m["attempts"].append([start, time.time(), outcome])
    finally:
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()


def send(cfg: Mapping, password: str) -> dict:
    """Send mails from cfg['sender'] to cfg['recipient'] through cfg['host'], paced at
    cfg['rate'] per second, one session every cfg['batch_seconds'] for what is due (at most
    cfg['batch_max'] mails). Stops when cfg['quota'] mails are made and the file
    cfg['stop_file'] exists, at cfg['max'] mails, or after cfg['seconds'] (status
    "deadline"). A mail not accepted is tried again in the next session; one refused with 5xx
    is not (a real client would tell its user it failed)."""
    from cryptography import x509

    from safemail.participant import message

    cert = x509.load_pem_x509_certificate(open(cfg["cert"], "rb").read())
    messages: list[dict] = []
    pending: list[dict] = []
    log_lines: list[str] = []
    status = "done"
    start = time.monotonic()

    def log(text: str) -> None:
        log_lines.append(f"{time.time():.3f} {text}")
        print(log_lines[-1], file=sys.stderr, flush=True)

    def make() -> dict:
        n = len(messages)
        mid = f"<{cfg['tag']}-{cfg['sender'].split('@')[0]}-{n:05d}@{cfg['domain']}>"
        text = (f"Lastprobe {n} von {cfg['sender']}.\n{cfg['marker']}\n"
                + "Dieser Text ist nur verschluesselt unterwegs.\n" * 20)
        entity = message.build_inner_entity(text)
        raw = message.build_message(entity, [cert], sender=cfg["sender"],
                                    recipients=[cfg["recipient"]],
                                    subject=f"Lastprobe {cfg['tag']} {n}", message_id=mid)
        record = {"mid": mid, "raw": raw, "attempts": []}
        messages.append(record)
        return record

    try:
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= float(cfg["seconds"]):
                status = "deadline"
                log("time limit reached; stopping")
                break
            stop = os.path.exists(cfg["stop_file"])
            enough = len(messages) >= int(cfg["quota"]) and stop
            if not enough:
                limit = int(cfg["max"])
                for _ in range(due(elapsed, float(cfg["rate"]), len(messages), limit)):
                    pending.append(make())
            if not pending:
                if enough or len(messages) >= int(cfg["max"]):
                    break
                time.sleep(0.5)
                continue
            batch = pending[: int(cfg["batch_max"])]
            _session(cfg, password, batch, log)
            pending = [m for m in pending
                       if not m["attempts"] or m["attempts"][-1][2][:1] not in ("2", "5")]
            time.sleep(float(cfg["batch_seconds"]) if not any(
                m["attempts"] and m["attempts"][-1][2].startswith(("failed", "unconfirmed"))
                for m in batch) else float(cfg.get("retry_seconds", 2)))
    except KeyboardInterrupt:
        status = "stopped"
    return {"status": status, "sender": cfg["sender"], "recipient": cfg["recipient"],
            "messages": [{"mid": m["mid"], "attempts": m["attempts"]} for m in messages],
            "log": log_lines[-50:]}


def _main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "send":
        import signal

        cfg = json.loads(open(argv[1]).read())

        def stop(signum, frame):  # noqa: ARG001 - signal handler signature
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        result = send(cfg, os.environ["SAFEMAIL_PASSWORD"])
        tmp = cfg["out"] + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh)
        os.replace(tmp, cfg["out"])
        return 0
    if len(argv) == 3 and argv[0] == "maildir":
        for entry in maildir_listing(argv[1], argv[2]):
            print(json.dumps(entry))
        return 0
    print("usage: faultload.py send CONFIG.json | maildir ROOT TAG", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
