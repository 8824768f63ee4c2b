"""The header section of a message at the relay's S/MIME gate (issue 17; MAIL-03, MAIL-04).

S/MIME encrypts the body only: every header leaves the practice readable. Three decisions
about the headers live here, as pure functions the milter calls at end-of-message:

* :func:`plan_removals` — which headers leave the relay at all. Only the headers a mail
  client legitimately sends (:data:`DEFAULT_ALLOWED_HEADERS`, a site may narrow or widen the
  list) are kept; the milter deletes every other header before the message is queued. Removed,
  not refused: clients add private headers (X-Mozilla-Draft-Info, X-MS-Has-Attach, ...) that
  say nothing about a patient, and refusing them would stop ordinary mail; deleting them
  guarantees just as well that nothing outside the list reaches another practice.
* :func:`find_identifier` — does a kept header value, or a MIME parameter of Content-Type and
  Content-Disposition (``name=``, ``filename=``), match a patient-identifier pattern? The
  Subject policy of the gate (refuse / flag / off) applies to whatever this finds.
  Every kept value is examined whole, however long (a header is at most Postfix's
  header_size_limit; the section at most 256 KiB, see classify.MAX_HEADER_BYTES).
* :func:`check_from` — is the header From the authenticated participant's own mailbox?
  ``reject_sender_login_mismatch`` binds only the envelope sender to the login; without this
  a participant could show another practice's address to the recipient. Sender and Reply-To,
  when present, must be the login too. The raw value is parsed as RFC 5322 says (encoded
  words decode only inside a display name, so they cannot hide an address), and a display
  name may not carry an address of its own.

Received: Postfix never shows the milter its own Received header (milter8.c skips the first
header, and smfi_chgheader indexes skip it too), so every Received header the gate sees came
from the client: all are deleted. Postfix's own (it quotes the client's HELO) is dropped by the
mailrelay role's header_checks.

Standard library only (this runs on the relay under Debian's python3).
"""

from __future__ import annotations

import email.header
import email.policy
import email.utils
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from safemail.smime.classify import SubjectPattern

__all__ = [
    "CODE_FROM_NOT_LOGIN",
    "DEFAULT_ALLOWED_HEADERS",
    "FromCheck",
    "IdentifierHit",
    "check_from",
    "find_identifier",
    "mime_parameters",
    "normalise_allowed",
    "plan_removals",
]

CODE_FROM_NOT_LOGIN = "from_not_login"

#: Headers that pass the relay (case-insensitive). What the mail clients of the practices send
#: (Thunderbird, Outlook, Apple Mail, the project's participant client). Everything else is
#: deleted by the gate (Received too: see the module text). A site sets its own list in group_vars
#: (mailrelay_allowed_headers); From, To, Date, Message-ID, MIME-Version, Content-Type and
#: Content-Transfer-Encoding are always kept (without them the message is not one).
DEFAULT_ALLOWED_HEADERS: tuple[str, ...] = (
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "Content-Language",
    "User-Agent",
    "X-Mailer",
    "Disposition-Notification-To",
    "Importance",
    "X-Priority",
    "Thread-Topic",
    "Thread-Index",
    "Auto-Submitted",
)

REQUIRED_HEADERS = frozenset(
    {
        "from",
        "to",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)

# Headers whose MIME parameters (RFC 2045/2183/2231) carry file names.
_PARAMETER_HEADERS = frozenset({"content-type", "content-disposition"})


def normalise_allowed(names: Iterable[str]) -> frozenset[str]:
    """The allowed header names, lower-cased, with the required ones added; ValueError for a
    name that is not a header field name (RFC 5322 ftext)."""
    out = set(REQUIRED_HEADERS)
    for name in names:
        if not isinstance(name, str) or not name or any(
            not (33 <= ord(ch) <= 126) or ch == ":" for ch in name
        ):
            raise ValueError(f"allowed header {name!r} is not a header field name")
        out.add(name.lower())
    return frozenset(out)


def plan_removals(
    headers: Sequence[tuple[str, str]], allowed: frozenset[str]
) -> list[tuple[str, int]]:
    """(name, index) of every header to delete, index 1-based per name as the milter protocol
    counts (smfi_chgheader)."""
    seen: dict[str, int] = {}
    removals: list[tuple[str, int]] = []
    for name, _ in headers:
        key = name.lower()
        seen[key] = seen.get(key, 0) + 1
        if key not in allowed:
            removals.append((name, seen[key]))
    return removals


@dataclass(frozen=True, slots=True)
class IdentifierHit:
    """A patient-identifier pattern matched in header ``header`` (``where`` says which part)."""

    header: str
    where: str
    pattern: str


def mime_parameters(value: str) -> list[tuple[str, str]]:
    """The parameters of a Content-Type or Content-Disposition value, RFC 2231 decoded."""
    from email.message import Message

    msg = Message()
    msg["Content-Type"] = value if "/" in value.split(";", 1)[0] else f"x/{value}"
    params = msg.get_params(header="content-type", unquote=True) or []
    out = []
    for key, val in params[1:]:
        text = email.utils.collapse_rfc2231_value(val) if isinstance(val, tuple) else val
        out.append((key.lower(), str(text)))
    return out


def find_identifier(
    headers: Sequence[tuple[str, str]],
    allowed: frozenset[str],
    patterns: Sequence[SubjectPattern],
) -> IdentifierHit | None:
    """The first kept header value or MIME parameter that matches a pattern, or None."""
    for name, value in headers:
        key = name.lower()
        if key not in allowed:  # deleted by the gate, so not examined
            continue
        whole = _whole_text(value)
        found = _first_match(value, patterns, whole)
        if found:
            return IdentifierHit(name, "value", found)
        if key in _PARAMETER_HEADERS:
            for param, text in mime_parameters(whole):
                found = _first_match(text, patterns)
                if found:
                    return IdentifierHit(name, f"parameter {param}", found)
    return None


_WHITESPACE_RUN = re.compile(r"\s+")


def _whole_text(value: str) -> str:
    """RFC 2047 decoded and unfolded, not cut (classify.decode_subject cuts at 4096)."""
    if "=?" not in value:
        # No encoded word: decode_header returns the value as its only chunk and make_header
        # gives it back unchanged (tests/test_smime_headers.py checks this against the
        # decoding below on generated values), without building a Header per value.
        return _WHITESPACE_RUN.sub(" ", value)
    try:
        text = str(email.header.make_header(email.header.decode_header(value)))
    except Exception:  # noqa: BLE001 - malformed encoded words: the raw text is examined too
        text = value
    return _WHITESPACE_RUN.sub(" ", text)


def _first_match(
    value: str, patterns: Sequence[SubjectPattern], whole: str | None = None
) -> str | None:
    """Name of the first pattern found in the decoded (``whole``, computed if not given) or
    the raw value, whole."""
    texts = (_whole_text(value) if whole is None else whole, value)
    for pattern in patterns:
        for text in texts:
            if pattern.regex.search(text):
                return pattern.name
    return None


@dataclass(frozen=True, slots=True)
class FromCheck:
    """Result of :func:`check_from`: ``ok``, else a sentence for the sender."""

    ok: bool
    detail: str = ""


# A bare mailbox or "Plain Name <mailbox>" as mail clients write From: letters, digits and
# ". _ + -" in the local part and the domain, no leading, trailing or double dot, words of
# letters and digits as the display name. Such a value reads the same with and without the
# RFC 5322 parser below (checked on generated values in tests/test_smime_headers.py), so the
# parser, a few hundred microseconds a value, runs only for the rest.
_DOT_ATOM = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
_BARE_ADDRESS = re.compile(rf" *(?P<addr>{_DOT_ATOM}@{_DOT_ATOM}) *")
_NAMED_ADDRESS = re.compile(
    rf" *(?:(?P<name>[A-Za-z0-9]+(?: +[A-Za-z0-9]+)*) *)?<(?P<addr>{_DOT_ATOM}@{_DOT_ATOM})> *"
)


def _simple_address(value: str) -> tuple[str, str] | None:
    """(display name, lower-cased address) of a value of the simple forms above, else None."""
    found = _BARE_ADDRESS.fullmatch(value) or _NAMED_ADDRESS.fullmatch(value)
    if found is None:
        return None
    name = found.groupdict().get("name") or ""
    return " ".join(name.split()), found["addr"].lower()


def _addresses(value: str) -> list[tuple[str, str]] | None:
    """(display name, lower-cased address) of a raw address header, parsed by RFC 5322 (the
    email package's default policy); None if it cannot be read without defects."""
    simple = _simple_address(value)
    if simple is not None:
        return [simple]
    return _parsed_addresses(value)


def _parsed_addresses(value: str) -> list[tuple[str, str]] | None:
    try:
        raw = value.replace("\r\n", "\n")
        msg = email.message_from_string(f"To: {raw}\n\n", policy=email.policy.default)
        field = msg["To"]
        if field is None or field.defects:
            return None
        return [(a.display_name, a.addr_spec.strip().lower()) for a in field.addresses]
    except Exception:  # noqa: BLE001 - hostile input: not readable
        return None


def _one_own_address(value: str, own: str, what: str) -> str:
    """Empty if `value` names exactly `own` with a plain display name, else the reason."""
    parsed = _addresses(value)
    if parsed is None:
        return f"the {what} header cannot be read as an address"
    if len(parsed) != 1:
        return f"the {what} header must name exactly one address, your mailbox"
    display, addr = parsed[0]
    if addr != own:
        return f"{what} <{addr[:100]}> is not your mailbox <{own[:100]}>; send as yourself"
    if any(ch in display for ch in "@<>"):
        return f"the {what} display name must not show an address; use your name only"
    return ""


def check_from(headers: Sequence[tuple[str, str]], login: str | None) -> FromCheck:
    """With a SASL login, exactly one From header with exactly one address, equal (ignoring
    case) to the login; a Sender or Reply-To header, if any, the same. Without a login (local
    submission on the relay, no participant) there is nothing to compare: ``ok``."""
    if not login:
        return FromCheck(True)
    own = login.strip().lower()
    froms = [v for n, v in headers if n.lower() == "from"]
    if len(froms) != 1:
        return FromCheck(False, f"the message has {len(froms)} From headers; send exactly one")
    problem = _one_own_address(froms[0], own, "From")
    if problem:
        return FromCheck(False, problem)
    # Sender and Reply-To: a reply to a message from practice 1 must go to practice 1, not to
    # a mailbox it names for another practice (replies carry the patient's case).
    for field in ("Sender", "Reply-To"):
        for value in (v for n, v in headers if n.lower() == field.lower()):
            problem = _one_own_address(value, own, field)
            if problem:
                return FromCheck(False, problem)
    return FromCheck(True)
