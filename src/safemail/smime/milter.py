"""The relay's S/MIME gate as a milter (MAIL-03, MAIL-04).

Postfix hands every message to this milter before it is queued. The milter buffers headers and
body, classifies the whole message at end-of-message with :mod:`safemail.smime.classify`, and
rejects anything that is not S/MIME enveloped with ``550 5.7.1`` and a reason the sender can
act on. Subjects that look like they carry patient identifiers are refused or flagged with an
``X-SafeMail-Subject-Warning`` header, as configured. Any internal failure gives a temporary
failure (fail closed; Postfix's ``milter_default_action = tempfail`` covers a dead milter).

The per-message decision lives in :class:`MessageGate`, a plain class the tests drive directly.
The pymilter glue (Debian ``python3-milter``) is imported only inside :func:`run`, so this
module imports without it.

Privacy: the log holds the queue id and the verdict code, never addresses, subjects or content.

Run: ``python3 -m safemail.smime.milter --socket inet:10025@127.0.0.1``.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safemail.smime.classify import (
    DEFAULT_MAX_SIZE,
    DEFAULT_SUBJECT_PATTERNS,
    SubjectPattern,
    check_subject,
    classify,
    compile_subject_patterns,
)

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

_REJECT_REPLY = ("550", "5.7.1")
_TEMPFAIL_REPLY = ("451", "4.3.0")
_TEMPFAIL_TEXT = "Temporary failure in the S/MIME gate; please try again later"


class Action(enum.Enum):
    """What the milter tells the MTA at end-of-message."""

    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class Decision:
    """The gate's answer for one message: action, verdict code, SMTP reply, headers to add."""

    action: Action
    code: str
    reply: tuple[str, str, str] | None = None
    add_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GateConfig:
    """Settings of the gate (from the command line, rendered by the mailrelay role)."""

    max_size: int = DEFAULT_MAX_SIZE
    subject_policy: str = "flag"
    subject_patterns: tuple[SubjectPattern, ...] = field(
        default_factory=lambda: compile_subject_patterns(DEFAULT_SUBJECT_PATTERNS)
    )

    def __post_init__(self) -> None:
        if self.subject_policy not in SUBJECT_POLICIES:
            raise ValueError(
                f"subject policy {self.subject_policy!r} is not one of "
                + ", ".join(SUBJECT_POLICIES)
            )
        if self.max_size < 1:
            raise ValueError("max size must be positive")


def _as_bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    # pymilter hands header values over as str decoded with surrogateescape; undo that exactly.
    return value.encode("utf-8", "surrogateescape")


def _reply_text(text: str) -> str:
    """One printable line; libmilter drops a reply with a single '%', so double them."""
    clean = "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:400]
    return clean.replace("%", "%%")


class MessageGate:
    """Collects one message and decides about it; reusable after :meth:`reset`."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget the current message (new MAIL FROM, abort)."""
        self._parts: list[bytes] = []
        self._size = 0
        self._overflow = False
        self._subjects: list[str | bytes] = []

    def _append(self, data: bytes) -> None:
        if self._overflow:
            return
        self._size += len(data)
        if self._size > self.config.max_size:
            self._overflow = True
            self._parts = []  # stop holding a message we will refuse anyway
            return
        self._parts.append(data)

    def add_header(self, name: str | bytes, value: str | bytes) -> None:
        """One header field as the MTA passes it (name without colon, unfolded value)."""
        raw_name, raw_value = _as_bytes(name), _as_bytes(value)
        if raw_name.strip().lower() == b"subject":
            self._subjects.append(value)
        raw_value = raw_value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self._append(raw_name + b": " + raw_value + b"\r\n")

    def end_of_headers(self) -> None:
        """The blank line between headers and body."""
        self._append(b"\r\n")

    def add_body(self, chunk: bytes) -> None:
        """A chunk of the body (CRLF line endings, as the MTA sends it)."""
        self._append(bytes(chunk))

    @property
    def size(self) -> int:
        return self._size

    def decide(self) -> Decision:
        """Classify the collected message; never raises (an internal error gives TEMPFAIL)."""
        try:
            return self._decide()
        except Exception as exc:  # noqa: BLE001 - fail closed: the MTA defers, the sender retries
            # Only the exception type: a message or traceback could quote mail content.
            LOG.error("internal error while deciding (%s)", type(exc).__name__)
            return Decision(Action.TEMPFAIL, CODE_TEMPFAIL, (*_TEMPFAIL_REPLY, _TEMPFAIL_TEXT))

    def _decide(self) -> Decision:
        if self._overflow:
            text = (
                f"523 Encryption Needed: message larger than {self.config.max_size} bytes "
                "is not accepted by the S/MIME gate"
            )
            return Decision(Action.REJECT, "too_large", (*_REJECT_REPLY, _reply_text(text)))
        verdict = classify(b"".join(self._parts), self.config.max_size)
        if verdict.code == "internal_error":
            return Decision(Action.TEMPFAIL, verdict.code, (*_TEMPFAIL_REPLY, _TEMPFAIL_TEXT))
        if not verdict.accepted:
            return Decision(
                Action.REJECT, verdict.code, (*_REJECT_REPLY, _reply_text(verdict.reason))
            )
        if self.config.subject_policy == "off":
            return Decision(Action.ACCEPT, verdict.code)
        for subject in self._subjects:
            hit = check_subject(subject, self.config.subject_patterns)
            if not hit.matched:
                continue
            if self.config.subject_policy == "refuse":
                text = (
                    f"Subject looks like it contains patient data ({hit.pattern}). The subject "
                    "is not encrypted: put patient data in the encrypted message instead"
                )
                return Decision(Action.REJECT, CODE_SUBJECT, (*_REJECT_REPLY, _reply_text(text)))
            warning = (
                f"subject may contain patient data ({hit.pattern}); subjects are not encrypted"
            )
            return Decision(
                Action.ACCEPT, CODE_SUBJECT, add_headers=((SUBJECT_WARNING_HEADER, warning),)
            )
        return Decision(Action.ACCEPT, verdict.code)


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

    class SafeMailGate(milter_mod.Base):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.gate = MessageGate(config)

        def envfrom(self, mailfrom: str, *params: str) -> int:
            self.gate.reset()
            return milter_mod.CONTINUE

        def header(self, name: str, value: str | bytes) -> int:
            self.gate.add_header(name, value)
            return milter_mod.CONTINUE

        def eoh(self) -> int:
            self.gate.end_of_headers()
            return milter_mod.CONTINUE

        def body(self, chunk: bytes) -> int:
            self.gate.add_body(chunk)
            return milter_mod.CONTINUE

        def eom(self) -> int:
            queue_id = "-"
            try:
                queue_id = str(self.getsymval("i") or "-")
                decision = self.gate.decide()
                for name, value in decision.add_headers:
                    self.addheader(name, value)
                LOG.info(
                    "queue_id=%s verdict=%s action=%s",
                    queue_id,
                    decision.code,
                    decision.action.value,
                )
                if decision.reply is not None:
                    self.setreply(*decision.reply)
                result = {
                    Action.ACCEPT: milter_mod.CONTINUE,
                    Action.REJECT: milter_mod.REJECT,
                    Action.TEMPFAIL: milter_mod.TEMPFAIL,
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
            return result

        def abort(self) -> int:
            self.gate.reset()
            return milter_mod.CONTINUE

        def close(self) -> int:
            return milter_mod.CONTINUE

    return SafeMailGate


def run(socket: str, config: GateConfig, timeout: int = 600) -> None:
    """Serve the milter on ``socket`` until stopped (needs pymilter)."""
    import Milter  # Debian python3-milter; imported here so the module loads without it

    Milter.factory = _milter_class(Milter, config)
    flags = Milter.ADDHDRS if config.subject_policy == "flag" else 0
    Milter.set_flags(flags)
    LOG.info(
        "starting on %s (max size %d bytes, subject policy %s)",
        socket,
        config.max_size,
        config.subject_policy,
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
        help="milter socket, e.g. inet:10025@127.0.0.1 or "
        "unix:/var/spool/postfix/safemail/milter.sock",
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
    return GateConfig(
        max_size=args.max_size, subject_policy=args.subject_policy, subject_patterns=patterns
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
