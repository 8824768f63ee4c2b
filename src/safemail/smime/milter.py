"""The relay's S/MIME gate as a milter (MAIL-03, MAIL-04).

Postfix hands every message to this milter before it is queued. The body streams through
:class:`safemail.smime.stream.StreamClassifier` as it arrives (memory per message is a small
constant, the ciphertext is counted, not kept), which decides at end-of-message exactly as
:func:`safemail.smime.classify.classify` would on the whole message, under the site's
cryptographic policy (:mod:`safemail.smime.policy`); the milter rejects anything that is
not S/MIME enveloped with ``550 5.7.1`` and a reason the sender can act on (its stable code in
brackets at the end). Then the header section (:mod:`safemail.smime.headers`): the From header
must be the authenticated participant's mailbox; headers outside the allowed list are deleted;
a kept header value or MIME parameter that looks like it carries a patient identifier is
refused or flagged with an ``X-SafeMail-Subject-Warning`` header, as configured. Any internal
failure gives a temporary failure (fail closed; Postfix's ``milter_default_action = tempfail``
covers a dead milter). At most ``max_in_flight`` messages are held at once; a further one gets
a temporary failure at DATA, so memory stays bounded. The slot is taken only at DATA: by then
Postfix has passed the recipients, which on submission needs a SASL login, so a client without
one cannot hold slots by sending MAIL FROM alone. Headers and body chunks are answered without
a round trip (pymilter's ``noreply``); connect, HELO and RCPT are not sent to the gate at all
(``nocallback``).

Where a message comes from is told positively, by Postfix's ``{daemon_name}`` macro
(``milter_macro_daemon_name``): ``safemail-submission`` on the submission service,
``safemail-local`` for mail put in on the relay itself (sendmail). Anything else, or a
submission without a SASL login, is a temporary failure: a configuration mistake defers mail
loudly instead of letting a refused message be discarded without a word.

The per-message decision lives in :class:`MessageGate`, a plain class the tests drive directly.
The pymilter glue (Debian ``python3-milter``) is imported only inside :func:`run`, so this
module imports without it.

Privacy: the log holds the queue id and the verdict code, never addresses, subjects or content.

Run: ``python3 -m safemail.smime.milter --socket unix:/run/safemail-gate/milter.sock``.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safemail.smime.classify import (
    DEFAULT_MAX_SIZE,
    DEFAULT_SUBJECT_PATTERNS,
    MAX_HEADER_BYTES,
    SubjectPattern,
    compile_subject_patterns,
)
from safemail.smime.headers import (
    CODE_FROM_NOT_LOGIN,
    DEFAULT_ALLOWED_HEADERS,
    check_from,
    find_identifier,
    normalise_allowed,
    plan_removals,
)
from safemail.smime.policy import DEFAULT_POLICY, CryptoPolicy, load_crypto_policy
from safemail.smime.stream import StreamClassifier

__all__ = [
    "Action",
    "Decision",
    "GateConfig",
    "MessageGate",
    "SUBJECT_WARNING_HEADER",
    "build_parser",
    "load_subject_patterns",
    "main",
    "run",
]

LOG = logging.getLogger("safemail.smime.milter")

MILTER_NAME = "safemail-smime"
SUBJECT_WARNING_HEADER = "X-SafeMail-Subject-Warning"
SUBJECT_POLICIES = ("refuse", "flag", "off")

CODE_SUBJECT = "subject_patient_data"
CODE_TEMPFAIL = "internal_error"
CODE_BUSY = "busy"
CODE_UNKNOWN_ORIGIN = "unknown_origin"
CODE_NO_LOGIN = "no_login"
ORIGIN_SUBMISSION = "safemail-submission"
ORIGIN_LOCAL = "safemail-local"
DEFAULT_MAX_IN_FLIGHT = 16

_REJECT_REPLY = ("550", "5.7.1")
_TEMPFAIL_REPLY = ("451", "4.3.0")
_TEMPFAIL_TEXT = "Temporary failure in the S/MIME gate; please try again later"
_BUSY_REPLY = ("451", "4.3.2")
_BUSY_TEXT = "The S/MIME gate is busy; please try again later"


class Action(enum.Enum):
    """What the milter tells the MTA at end-of-message."""

    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    # A refused message put in on the relay itself (sendmail; origin safemail-local).
    # Rejecting it would make Postfix bounce it, and the bounce, a new message Postfix makes
    # itself, carries the refused plaintext to the envelope sender's mailbox without passing
    # the gate (measured on the lab: `sendmail -f <a participant>` put the text in that
    # participant's mailbox). So it is discarded: logged by Postfix and the gate, never
    # delivered, never bounced. Submission gets a 550 (the client holds the message).
    DISCARD = "discard"


@dataclass(frozen=True)
class Decision:
    """The gate's answer for one message: action, verdict code, SMTP reply, headers to add."""

    action: Action
    code: str
    reply: tuple[str, str, str] | None = None
    add_headers: tuple[tuple[str, str], ...] = ()
    #: (name, index) of headers to delete, index 1-based per name (smfi_chgheader).
    remove_headers: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class GateConfig:
    """Settings of the gate (from the command line, rendered by the mailrelay role)."""

    max_size: int = DEFAULT_MAX_SIZE
    subject_policy: str = "flag"
    subject_patterns: tuple[SubjectPattern, ...] = field(
        default_factory=lambda: compile_subject_patterns(DEFAULT_SUBJECT_PATTERNS)
    )
    crypto_policy: CryptoPolicy = DEFAULT_POLICY
    allowed_headers: frozenset[str] = field(
        default_factory=lambda: normalise_allowed(DEFAULT_ALLOWED_HEADERS)
    )
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    def __post_init__(self) -> None:
        if self.subject_policy not in SUBJECT_POLICIES:
            raise ValueError(
                f"subject policy {self.subject_policy!r} is not one of "
                + ", ".join(SUBJECT_POLICIES)
            )
        if self.max_size < 1:
            raise ValueError("max size must be positive")
        if self.max_in_flight < 1:
            raise ValueError("max in flight must be at least 1")


def _as_bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    # pymilter hands header values over as str decoded with surrogateescape; undo that exactly.
    return value.encode("utf-8", "surrogateescape")


def _reply_text(text: str, code: str | None = None) -> str:
    """One printable line ending in the verdict code; libmilter drops a reply with a single
    '%', so double them."""
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:400]
    if code:
        clean += f" [{code}]"
    return clean.replace("%", "%%")


def _as_text(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


class MessageGate:
    """Collects one message and decides about it; reusable after :meth:`reset`."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget the current message (new MAIL FROM, abort)."""
        # The body is classified as it streams by (safemail.smime.stream): memory per
        # message is a small constant, not the message's size.
        self._stream = StreamClassifier(self.config.max_size, self.config.crypto_policy)
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._login: str | None = None
        self._origin: str | None = None

    def set_login(self, login: str | None) -> None:
        """The SASL login of the session (Postfix's {auth_authen} macro), None if none."""
        self._login = login or None

    @property
    def origin(self) -> str | None:
        return self._origin

    def set_origin(self, daemon_name: str | None) -> None:
        """Where the message was put in (Postfix's {daemon_name} macro): ORIGIN_SUBMISSION,
        ORIGIN_LOCAL, or anything else (refused with a temporary failure)."""
        self._origin = daemon_name or None

    def add_header(self, name: str | bytes, value: str | bytes) -> None:
        """One header field as the MTA passes it (name without colon, unfolded value)."""
        self._stream.add_header(name, value)
        # Kept for the header decisions; beyond the classifier's header limit the message is
        # refused anyway (malformed_headers), so stop keeping copies.
        self._header_bytes += len(name) + len(value)
        if self._header_bytes <= MAX_HEADER_BYTES:
            self._headers.append((_as_text(name).strip(), _as_text(value)))

    def end_of_headers(self) -> None:
        """The blank line between headers and body."""
        self._stream.end_of_headers()

    def add_body(self, chunk: bytes) -> None:
        """A chunk of the body (CRLF line endings, as the MTA sends it)."""
        self._stream.add_body(chunk)

    @property
    def size(self) -> int:
        return self._stream.size

    def decide(self) -> Decision:
        """Classify the collected message; never raises (an internal error gives TEMPFAIL)."""
        try:
            if self._origin not in (ORIGIN_SUBMISSION, ORIGIN_LOCAL):
                # Postfix did not say where the mail comes from (milter_macro_daemon_name
                # or milter_mail_macros changed): defer it, never guess.
                return _tempfail(CODE_UNKNOWN_ORIGIN)
            if self._origin == ORIGIN_SUBMISSION and self._login is None:
                # Submission requires SASL before RCPT: a message without a login means the
                # restrictions were changed. Defer it rather than judge From against nothing.
                return _tempfail(CODE_NO_LOGIN)
            decision = self._decide()
            if decision.action is Action.REJECT and self._origin == ORIGIN_LOCAL:
                return Decision(Action.DISCARD, decision.code)
            return decision
        except Exception as exc:  # noqa: BLE001 - fail closed: the MTA defers, the sender retries
            # Only the exception type: a message or traceback could quote mail content.
            LOG.error("internal error while deciding (%s)", type(exc).__name__)
            return Decision(Action.TEMPFAIL, CODE_TEMPFAIL, (*_TEMPFAIL_REPLY, _TEMPFAIL_TEXT))

    def _decide(self) -> Decision:
        verdict = self._stream.finish()
        if verdict.code == "internal_error":
            return Decision(Action.TEMPFAIL, verdict.code, (*_TEMPFAIL_REPLY, _TEMPFAIL_TEXT))
        if not verdict.accepted:
            return _reject(verdict.code, verdict.reason)
        sender = check_from(self._headers, self._login)
        if not sender.ok:
            return _reject(CODE_FROM_NOT_LOGIN, f"From does not match your login: {sender.detail}")
        removals = tuple(plan_removals(self._headers, self.config.allowed_headers))
        if self.config.subject_policy != "off":
            hit = find_identifier(
                self._headers, self.config.allowed_headers, self.config.subject_patterns
            )
            if hit is not None and self.config.subject_policy == "refuse":
                where = "" if hit.where == "value" else f" ({hit.where})"
                text = (
                    f"header {hit.header}{where} looks like it contains patient data "
                    f"({hit.pattern}). Headers are not encrypted: put patient data in the "
                    "encrypted message instead"
                )
                return _reject(CODE_SUBJECT, text)
            if hit is not None:
                warning = (
                    f"{hit.header.lower()} may contain patient data ({hit.pattern}); "
                    "headers are not encrypted"
                )
                return Decision(
                    Action.ACCEPT,
                    CODE_SUBJECT,
                    add_headers=((SUBJECT_WARNING_HEADER, warning),),
                    remove_headers=removals,
                )
        return Decision(Action.ACCEPT, verdict.code, remove_headers=removals)


def _tempfail(code: str) -> Decision:
    return Decision(Action.TEMPFAIL, code, (*_TEMPFAIL_REPLY, _reply_text(_TEMPFAIL_TEXT, code)))


def _reject(code: str, text: str) -> Decision:
    return Decision(Action.REJECT, code, (*_REJECT_REPLY, _reply_text(text, code)))


class InFlight:
    """At most ``limit`` messages held at once across the milter's connections (threads)."""

    def __init__(self, limit: int) -> None:
        self._slots = threading.BoundedSemaphore(limit)

    def take(self) -> bool:
        return self._slots.acquire(blocking=False)

    def give(self) -> None:
        self._slots.release()


# --- configuration ------------------------------------------------------------------------


def load_subject_patterns(path: Path) -> tuple[SubjectPattern, ...]:
    """Read a YAML or JSON list of ``{name, regex}`` and compile it; ValueError if invalid."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read subject patterns {path}: {exc.strerror}") from exc
    data: Any
    if path.suffix.lower() == ".json":
        data = _load_json(text, path)
    else:
        try:
            import yaml  # Debian python3-yaml; JSON is valid YAML, so JSON files work too
        except ImportError:
            data = _load_json(text, path)
        else:
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    if isinstance(data, Mapping) and "patterns" in data:
        data = data["patterns"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} must hold a non-empty list of {{name, regex}} entries")
    return compile_subject_patterns(data)


def _load_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


# --- pymilter glue ------------------------------------------------------------------------


def _milter_class(milter_mod: Any, config: GateConfig) -> type:
    """The pymilter class for ``config``; one instance per SMTP connection."""
    in_flight = InFlight(config.max_in_flight)
    # pymilter's decorators: @noreply tells the MTA not to wait for an answer to a callback
    # (MAIL FROM, header, end of headers, body chunks: one round trip fewer each), @nocallback
    # not to send it at all (connect, HELO, RCPT: the gate does not look at them). DATA and
    # end-of-message need their answer (the in-flight slot; the verdict).
    noreply = getattr(milter_mod, "noreply", lambda func: func)
    nocallback = getattr(milter_mod, "nocallback", lambda func: func)

    class SafeMailGate(milter_mod.Base):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.gate = MessageGate(config)
            self.slot = False

        def _give_back(self) -> None:
            if self.slot:
                self.slot = False
                in_flight.give()

        @noreply
        def envfrom(self, mailfrom: str, *params: str) -> int:
            self.gate.reset()
            self._give_back()
            self.gate.set_login(self.getsymval("{auth_authen}"))
            self.gate.set_origin(self.getsymval("{daemon_name}"))
            return milter_mod.CONTINUE

        def _hold(self) -> bool:
            """Take a slot for this message; False, with the busy reply set, if none."""
            if self.slot:
                return True
            if not in_flight.take():
                LOG.warning("verdict=%s action=tempfail (%d in flight)", CODE_BUSY,
                            config.max_in_flight)
                self.setreply(*_BUSY_REPLY, _BUSY_TEXT)
                return False
            self.slot = True
            return True

        @nocallback
        def connect(self, *args: object) -> int:
            return milter_mod.CONTINUE

        @nocallback
        def hello(self, *args: object) -> int:
            return milter_mod.CONTINUE

        @nocallback
        def envrcpt(self, *args: object) -> int:
            return milter_mod.CONTINUE

        @nocallback
        def unknown(self, *args: object) -> int:
            return milter_mod.CONTINUE

        def data(self) -> int:
            """DATA: the recipients have passed Postfix's restrictions (on submission: only
            after a SASL login), so a client without one never takes a slot."""
            return milter_mod.CONTINUE if self._hold() else milter_mod.TEMPFAIL

        @noreply
        def header(self, name: str, value: str | bytes) -> int:
            self.gate.add_header(name, value)
            return milter_mod.CONTINUE

        @noreply
        def eoh(self) -> int:
            self.gate.end_of_headers()
            return milter_mod.CONTINUE

        @noreply
        def body(self, chunk: bytes) -> int:
            self.gate.add_body(chunk)
            return milter_mod.CONTINUE

        def eom(self) -> int:
            queue_id = "-"
            try:
                queue_id = str(self.getsymval("i") or "-")
                if not self._hold():  # no DATA callback came (an MTA without it): take it now
                    self.gate.reset()
                    return milter_mod.TEMPFAIL
                decision = self.gate.decide()
                if decision.action is Action.ACCEPT:
                    # Highest index first, so the indexes still to delete stay valid.
                    for name, index in sorted(decision.remove_headers, key=lambda r: -r[1]):
                        self.chgheader(name, index, None)
                    for name, value in decision.add_headers:
                        self.addheader(name, value)
                LOG.info(
                    "queue_id=%s origin=%s verdict=%s action=%s removed_headers=%d",
                    queue_id,
                    self.gate.origin or "-",
                    decision.code,
                    decision.action.value,
                    len(decision.remove_headers) if decision.action is Action.ACCEPT else 0,
                )
                if decision.reply is not None:
                    self.setreply(*decision.reply)
                result = {
                    Action.ACCEPT: milter_mod.CONTINUE,
                    Action.REJECT: milter_mod.REJECT,
                    Action.TEMPFAIL: milter_mod.TEMPFAIL,
                    Action.DISCARD: milter_mod.DISCARD,
                }[decision.action]
            except Exception as exc:  # noqa: BLE001 - fail closed on any glue error
                LOG.error(
                    "queue_id=%s verdict=%s action=tempfail (%s)",
                    queue_id,
                    CODE_TEMPFAIL,
                    type(exc).__name__,
                )
                try:
                    self.setreply(*_TEMPFAIL_REPLY, _TEMPFAIL_TEXT)
                except Exception:  # noqa: BLE001 - the TEMPFAIL result below still stands
                    LOG.warning("queue_id=%s could not set the temporary failure text", queue_id)
                result = milter_mod.TEMPFAIL
            finally:
                self.gate.reset()
                self._give_back()
            return result

        def abort(self) -> int:
            self.gate.reset()
            self._give_back()
            return milter_mod.CONTINUE

        def close(self) -> int:
            self._give_back()
            return milter_mod.CONTINUE

    return SafeMailGate


def run(socket: str, config: GateConfig, timeout: int = 600) -> None:
    """Serve the milter on ``socket`` until stopped (needs pymilter)."""
    import Milter  # Debian python3-milter; imported here so the module loads without it

    Milter.factory = _milter_class(Milter, config)
    # CHGHDRS: headers outside the allowed list are deleted; ADDHDRS: the subject warning.
    flags = Milter.CHGHDRS | (Milter.ADDHDRS if config.subject_policy == "flag" else 0)
    Milter.set_flags(flags)
    LOG.info(
        "starting on %s (max size %d bytes, subject policy %s, %d in flight, %d headers allowed)",
        socket,
        config.max_size,
        config.subject_policy,
        config.max_in_flight,
        len(config.allowed_headers),
    )
    try:
        Milter.runmilter(MILTER_NAME, socket, timeout)
    except Milter.milter.error as exc:
        raise RuntimeError(f"cannot serve the milter on {socket}: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safemail-smime-milter",
        description="SafeMail S/MIME gate: refuse mail that is not S/MIME enveloped.",
    )
    parser.add_argument(
        "--socket",
        required=True,
        help="milter socket, e.g. unix:/run/safemail-gate/milter.sock",
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=DEFAULT_MAX_SIZE,
        help=f"largest message accepted, bytes (default {DEFAULT_MAX_SIZE})",
    )
    parser.add_argument(
        "--subject-policy",
        choices=SUBJECT_POLICIES,
        default="flag",
        help=f"patient data in the subject: refuse the mail, flag it with {SUBJECT_WARNING_HEADER}"
        ", or do nothing (default flag)",
    )
    parser.add_argument(
        "--subject-patterns",
        type=Path,
        help="YAML or JSON list of {name, regex}; default: the built-in patient-identifier set",
    )
    parser.add_argument(
        "--crypto-policy",
        type=Path,
        help="YAML or JSON cryptographic policy (docs/mail.md); default: the built-in one",
    )
    parser.add_argument(
        "--allowed-headers",
        help="comma-separated header names that pass (others are deleted); default: "
        + ", ".join(DEFAULT_ALLOWED_HEADERS),
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_MAX_IN_FLIGHT,
        help=f"messages held at once; more get 451 at MAIL FROM (default {DEFAULT_MAX_IN_FLIGHT})",
    )
    parser.add_argument("--timeout", type=int, default=600, help="MTA timeout, seconds")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"))
    return parser


def config_from_args(args: argparse.Namespace) -> GateConfig:
    """Build the gate config from parsed arguments; ValueError with a readable message."""
    patterns = (
        load_subject_patterns(args.subject_patterns)
        if args.subject_patterns is not None
        else compile_subject_patterns(DEFAULT_SUBJECT_PATTERNS)
    )
    policy = DEFAULT_POLICY
    if args.crypto_policy is not None:
        try:
            policy = load_crypto_policy(args.crypto_policy)
        except OSError as exc:
            raise ValueError(
                f"cannot read crypto policy {args.crypto_policy}: {exc.strerror}"
            ) from exc
    names = (
        [n.strip() for n in args.allowed_headers.split(",") if n.strip()]
        if args.allowed_headers is not None
        else list(DEFAULT_ALLOWED_HEADERS)
    )
    return GateConfig(
        max_size=args.max_size,
        subject_policy=args.subject_policy,
        subject_patterns=patterns,
        crypto_policy=policy,
        allowed_headers=normalise_allowed(names),
        max_in_flight=args.max_in_flight,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(name)s[%(process)d]: %(levelname)s %(message)s"
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run(args.socket, config, args.timeout)
    except ModuleNotFoundError as exc:
        if exc.name not in ("Milter", "milter"):
            raise
        print(
            "error: pymilter is not installed; install the Debian package python3-milter",
            file=sys.stderr,
        )
        return 1
    except RuntimeError as exc:
        print(f"error: {exc}; check --socket and that its directory exists", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
