"""Errors raised by the CA tooling.

All of them are :class:`safemail.errors.SafeMailError`, so the ``safemail`` CLI prints the
message and the hint and exits with the class's exit code:

* 1 - an operational error (missing state, corrupt file, wrong configuration);
* 3 - a request refused by policy (the refusal carries a machine-readable ``code``).
"""

from __future__ import annotations

from safemail.errors import SafeMailError


class CaError(SafeMailError):
    """An operational error of the CA tooling (exit code 1)."""


class PolicyError(CaError):
    """The CA policy is invalid; the message names the field and the allowed values."""


class RefusedError(CaError):
    """A request or registration refused by policy (exit code 3).

    ``code`` is a short stable identifier (``email-mismatch``, ``key-too-small``, ...) for
    scripts and tests; ``message`` is the reason in words a person understands.
    """

    exit_code = 3

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.code = code


class CsrRefused(RefusedError):
    """The RA (or, re-checking, the signer) refuses a certificate signing request."""


class RegistrationRefused(RefusedError):
    """The RA refuses to add or change a participant in the register."""


class IssueRefused(RefusedError):
    """The signer refuses to issue a certificate for a request."""
