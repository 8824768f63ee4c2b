"""SMTP submission and IMAP retrieval for the participant client: the network edge only.

Both always use TLS verified against a CA file (or the system store) and authenticate; no
function here looks inside a message.
"""

from __future__ import annotations

import imaplib
import os
import re
import smtplib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safemail.errors import SafeMailError

__all__ = [
    "Account",
    "MailboxEntry",
    "fetch_message",
    "list_messages",
    "read_password",
    "submit",
    "tls_context",
]

DEFAULT_PASSWORD_ENV = "SAFEMAIL_PASSWORD"  # noqa: S105 - a variable name, not a secret


@dataclass(frozen=True)
class Account:
    """Where and as whom to connect."""

    host: str
    port: int
    user: str
    password: str
    cafile: Path | None = None
    timeout: float = 30.0


def read_password(password_file: Path | None, env_var: str = DEFAULT_PASSWORD_ENV) -> str:
    """The account password from a file (first line) or an environment variable; never argv."""
    if password_file is not None:
        try:
            lines = password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SafeMailError(
                f"cannot read password file {password_file}: {exc.strerror}",
                "check --password-file",
            ) from exc
        if not lines or not lines[0]:
            raise SafeMailError(f"password file {password_file} is empty", "write the password")
        return lines[0]
    value = os.environ.get(env_var)
    if not value:
        raise SafeMailError(
            "no password given",
            f"pass --password-file FILE or set the environment variable {env_var}",
        )
    return value


def tls_context(cafile: Path | None) -> ssl.SSLContext:
    """A verifying client context (TLS 1.2+), trusting ``cafile`` if given."""
    try:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except (OSError, ssl.SSLError) as exc:
        raise SafeMailError(
            f"cannot load CA file {cafile}: {exc}", "give the SafeNet CA as PEM with --cafile"
        ) from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def submit(account: Account, sender: str, recipients: Sequence[str], message: bytes) -> None:
    """Submit ``message`` with STARTTLS and AUTH; raise SafeMailError with the server's reply."""
    context = tls_context(account.cafile)
    where = f"{account.host}:{account.port}"
    try:
        with smtplib.SMTP(account.host, account.port, timeout=account.timeout) as smtp:
            smtp.ehlo()
            if not smtp.has_extn("starttls"):
                raise SafeMailError(
                    f"{where} does not offer STARTTLS; not sending",
                    "use the submission port of the SafeMail relay (587)",
                )
            smtp.starttls(context=context)
            smtp.ehlo()
            smtp.login(account.user, account.password)
            refused = smtp.sendmail(sender, list(recipients), message)
    except smtplib.SMTPRecipientsRefused as exc:
        raise SafeMailError(
            "the relay refused every recipient: " + _replies(exc.recipients),
            "check the addresses; only mailboxes of the service are accepted",
        ) from exc
    except smtplib.SMTPDataError as exc:
        raise SafeMailError(
            f"the relay refused the message: {exc.smtp_code} {_text(exc.smtp_error)}",
            "only S/MIME encrypted mail is accepted; see the reason above",
        ) from exc
    except smtplib.SMTPAuthenticationError as exc:
        raise SafeMailError(
            f"login to {where} failed: {exc.smtp_code} {_text(exc.smtp_error)}",
            "check --user and the password",
        ) from exc
    except smtplib.SMTPSenderRefused as exc:
        raise SafeMailError(
            f"the relay refused sender {exc.sender}: {exc.smtp_code} {_text(exc.smtp_error)}",
            "send from your own mailbox (--from)",
        ) from exc
    except ssl.SSLError as exc:
        raise SafeMailError(
            f"TLS with {where} failed: {exc}", "check --cafile and the host name"
        ) from exc
    except (smtplib.SMTPException, OSError) as exc:
        raise SafeMailError(f"SMTP with {where} failed: {exc}", "is the relay reachable?") from exc
    if refused:
        raise SafeMailError(
            "some recipients were refused: " + _replies(refused),
            "the others received the message; check the refused addresses",
        )


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _replies(refused: dict[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{rcpt}: {code} {_text(text)}" for rcpt, (code, text) in refused.items())


@dataclass(frozen=True)
class MailboxEntry:
    """One message in the mailbox listing (header fields as the server gave them)."""

    uid: str
    size: int
    header: bytes


def _imap(account: Account) -> imaplib.IMAP4_SSL:
    where = f"{account.host}:{account.port}"
    try:
        conn = imaplib.IMAP4_SSL(
            account.host,
            account.port,
            ssl_context=tls_context(account.cafile),
            timeout=account.timeout,
        )
    except ssl.SSLError as exc:
        raise SafeMailError(f"TLS with {where} failed: {exc}", "check --cafile") from exc
    except (OSError, imaplib.IMAP4.error) as exc:
        raise SafeMailError(f"cannot reach IMAP at {where}: {exc}", "is it reachable?") from exc
    try:
        conn.login(account.user, account.password)
    except imaplib.IMAP4.error as exc:
        conn.logout()
        raise SafeMailError(f"IMAP login to {where} failed: {exc}", "check --user") from exc
    return conn


def _select(conn: imaplib.IMAP4_SSL, folder: str) -> None:
    status, data = conn.select(_quote(folder), readonly=True)
    if status != "OK":
        raise SafeMailError(f"cannot open folder {folder!r}: {data!r}", "check --folder")


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


def list_messages(account: Account, folder: str = "INBOX") -> list[MailboxEntry]:
    """UID, size and the From/Date/Subject header lines of every message in ``folder``."""
    conn = _imap(account)
    try:
        _select(conn, folder)
        status, data = conn.uid(
            "FETCH", "1:*", "(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM DATE SUBJECT)])"
        )
        if status != "OK":
            raise SafeMailError(f"listing {folder!r} failed: {data!r}", "try again")
        entries: list[MailboxEntry] = []
        for item in data:
            if not isinstance(item, tuple):
                continue
            uid, size = _UID.search(item[0]), _SIZE.search(item[0])
            if uid is not None:
                entries.append(
                    MailboxEntry(uid[1].decode(), int(size[1]) if size else 0, bytes(item[1]))
                )
        return entries
    except imaplib.IMAP4.error as exc:
        raise SafeMailError(f"IMAP error: {exc}", "try again") from exc
    finally:
        conn.logout()


def fetch_message(account: Account, uid: str | None, folder: str = "INBOX") -> bytes:
    """The raw message with ``uid`` (or the newest one if None), without marking it read."""
    conn = _imap(account)
    try:
        _select(conn, folder)
        if uid is None:
            status, data = conn.uid("SEARCH", "ALL")
            uids = data[0].split() if status == "OK" and data and data[0] else []
            if not uids:
                raise SafeMailError(f"folder {folder!r} is empty", "nothing to fetch")
            uid = uids[-1].decode()
        if not uid.isdigit():
            raise SafeMailError(f"{uid!r} is not a message UID", "use a number from --list")
        status, data = conn.uid("FETCH", uid, "(BODY.PEEK[])")
        for item in data or []:
            if status == "OK" and isinstance(item, tuple):
                return bytes(item[1])
        raise SafeMailError(f"no message with UID {uid} in {folder!r}", "list them with --list")
    except imaplib.IMAP4.error as exc:
        raise SafeMailError(f"IMAP error: {exc}", "try again") from exc
    finally:
        conn.logout()
