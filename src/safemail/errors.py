"""Errors the CLI reports to the operator: what failed and what to do next."""

from __future__ import annotations


class SafeMailError(Exception):
    """An error with a message for the operator and, where known, the next step.

    The CLI prints ``error: <message>`` and ``hint: <hint>`` and exits with ``exit_code``.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(SafeMailError):
    """Bad command-line input (exit code 2, as argparse uses)."""

    exit_code = 2
