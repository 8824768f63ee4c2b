"""Shared by the bench scripts: where and how a benchmark result is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parent / "results"


def write(result: dict, out: Path = DEFAULT_DIR) -> Path:
    """Write ``result`` to ``out/<benchmark>-<when>.json``, echo it on stdout, name the file on
    stderr. ``result`` carries ``benchmark`` and ``when`` (UTC, ``%Y-%m-%dT%H:%M:%SZ``)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['benchmark']}-{result['when'].replace(':', '')}.json"
    text = json.dumps(result, indent=2)
    path.write_text(text + "\n")
    print(text)
    print(f"written: {path}", file=sys.stderr)
    return path
