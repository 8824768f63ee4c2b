"""The ``safemail`` command: one entry point, one subcommand per area.

Each area lives in its own module that exposes ``register(subparsers)``; the module adds its
subcommand and sets ``func`` (a callable taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from safemail import __version__
from safemail.errors import SafeMailError

# Modules that add subcommands. Order is the order shown in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "safemail.lab.cli",
    "safemail.ca.cli",
    "safemail.participant.cli",
    "safemail.gate.cli",
    "safemail.docs.cli",
    "safemail.ops.cli",
    "safemail.accounting.control",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safemail",
        description="Provision and verify the SafeMail closed S/MIME mail service.",
    )
    parser.add_argument("--version", action="version", version=f"safemail {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SafeMailError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
