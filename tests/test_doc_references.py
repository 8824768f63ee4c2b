"""References into docs/architecture.md name sections that exist; the retired design note is
cited nowhere."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "architecture.md"
REFERENCE = re.compile(r"architecture\.md#([A-Za-z0-9_-]+)")
RETIRED = "DESIGN " + "§"  # split so this file does not cite it


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", markdown, re.MULTILINE)}


def tracked_texts() -> dict[str, str]:
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], check=True,
                           capture_output=True, text=True).stdout.split("\0")
    out = {}
    for name in filter(None, names):
        path = REPO / name
        try:
            out[name] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
    return out


def test_slug_follows_github() -> None:
    assert slug("The flow matrix: firewall, probes, plan") == "the-flow-matrix-firewall-probes-plan"
    assert slug("Python code: layers") == "python-code-layers"


def test_every_architecture_anchor_exists() -> None:
    known = anchors(ARCHITECTURE.read_text(encoding="utf-8"))
    broken = [f"{name}: #{m.group(1)}" for name, text in tracked_texts().items()
              for m in REFERENCE.finditer(text) if m.group(1) not in known]
    assert broken == [], f"no such section in docs/architecture.md: {broken}"


def test_the_retired_design_note_is_cited_nowhere() -> None:
    citing = sorted(name for name, text in tracked_texts().items() if RETIRED in text)
    assert citing == [], "cite docs/architecture.md (a section anchor) instead"
