"""An SMTP dialogue that records every reply: the verify suite's evidence for the relay.

`safemail participant smtp-probe` runs on a participant host and prints one JSON object:
the steps it took (``ehlo``, ``starttls``, ``auth``, ``mail``, ``rcpt``, ``data``) with the
server's code and text, stopping at the first refusal. Unlike `send` it does not give up on
a refusal with an error: a refusal is the result being looked at.
"""

from __future__ import annotations

import argparse
import json
import os
import smtplib
import ssl
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safemail.errors import SafeMailError


@dataclass
class Step:
    step: str
    code: int
    text: str


@dataclass
class Transcript:
    steps: list[Step] = field(default_factory=list)
    error: str = ""

    def add(self, step: str, code: int, text: bytes | str) -> bool:
        """Record a reply; True if the dialogue may go on (2xx/3xx)."""
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        self.steps.append(Step(step, code, " ".join(str(text).split())))
        return 200 <= code < 400

    def to_json(self) -> str:
        return json.dumps({"steps": [asdict(s) for s in self.steps], "error": self.error})


def run_probe(host: str, port: int, *, cafile: str | None, starttls: bool, user: str | None,
              password: str | None, sender: str, recipients: list[str],
              message: bytes | None, timeout: float = 30) -> Transcript:
    t = Transcript()
    try:
        smtp = smtplib.SMTP(host, port, timeout=timeout)
    except OSError as exc:
        t.error = f"connect: {exc}"
        return t
    step = "ehlo"
    try:
        code, text = smtp.ehlo("probe.safemail.invalid")
        if not t.add(step, code, text):
            return t
        if starttls:
            step = "starttls"
            ctx = ssl.create_default_context(cafile=cafile)
            code, text = smtp.starttls(context=ctx)
            if not t.add(step, code, text):
                return t
            smtp.ehlo("probe.safemail.invalid")
        if user is not None:
            step = "auth"
            try:
                code, text = smtp.login(user, password or "")
            except smtplib.SMTPNotSupportedError as exc:
                code, text = 503, str(exc).encode()
            if not t.add(step, code, text):
                return t
        step = "mail"
        code, text = smtp.mail(sender)
        if not t.add(step, code, text):
            return t
        accepted = 0
        for rcpt in recipients:
            step = f"rcpt {rcpt}"
            code, text = smtp.rcpt(rcpt)
            accepted += t.add(step, code, text)
        if not accepted or message is None:
            return t
        step = "data"
        code, text = smtp.data(message)
        t.add(step, code, text)
    except smtplib.SMTPResponseException as exc:
        # A refusal raised rather than returned (STARTTLS, AUTH, DATA): still a reply.
        t.add(step, exc.smtp_code, exc.smtp_error)
    except (smtplib.SMTPException, OSError) as exc:
        t.error = f"{step}: {type(exc).__name__}: {exc}"
    finally:
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()
    return t


def _cmd(args: argparse.Namespace) -> int:
    password = None
    if args.user is not None:
        password = os.environ.get(args.password_env)
        if password is None:
            raise SafeMailError(f"the password is not in ${args.password_env}",
                                hint="export it, or use --no-auth")
    message = None
    if args.message is not None:
        try:
            message = Path(args.message).read_bytes() if args.message != "-" else \
                sys.stdin.buffer.read()
        except OSError as exc:
            raise SafeMailError(f"cannot read {args.message}: {exc.strerror}") from exc
    t = run_probe(args.host, args.port, cafile=args.cafile, starttls=not args.no_starttls,
                  user=None if args.no_auth else args.user, password=password,
                  sender=args.sender, recipients=args.to, message=message,
                  timeout=args.timeout)
    print(t.to_json())
    return 0


def register(psub: argparse._SubParsersAction) -> None:
    p = psub.add_parser("smtp-probe", help="record an SMTP dialogue with the relay as JSON",
                        description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--host", required=True, help="relay host name")
    p.add_argument("--port", type=int, default=587)
    p.add_argument("--cafile", help="CA certificate to verify the relay")
    p.add_argument("--no-starttls", action="store_true", help="do not start TLS")
    p.add_argument("--user", help="login name (the mailbox)")
    p.add_argument("--no-auth", action="store_true", help="do not authenticate")
    p.add_argument("--password-env", default="SAFEMAIL_PASSWORD",
                   help="environment variable holding the password")
    p.add_argument("--from", dest="sender", required=True, help="envelope sender")
    p.add_argument("--to", action="append", required=True, help="envelope recipient (repeat)")
    p.add_argument("--message", help="message file to send after RCPT ('-' for stdin)")
    p.add_argument("--timeout", type=float, default=30)
    p.set_defaults(func=_cmd)
