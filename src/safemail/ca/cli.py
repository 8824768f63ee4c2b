"""Subcommands of this area (filled in by its module)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # noqa: D103
    del sub
