"""report.html renders in a real browser (headless Chromium), offline. Skipped without Chromium."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest

from safemail.gate.catalogue import load_catalogue
from safemail.gate.report import RunMetadata, TestResult, build_report, write_report
from safemail.gate.waivers import Waiver

REPO = Path(__file__).resolve().parents[1]
BROWSER = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)


@pytest.mark.skipif(BROWSER is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    assert BROWSER is not None
    catalogue = load_catalogue(REPO / "verify" / "requirements.yml")
    results = [
        TestResult(
            f"verify.test_area::test_{r.id.lower()}[ansible://relay]",
            "failed" if r.id == "MAIL-03" else "passed",
            message="<plaintext> accepted: 250 2.0.0 Ok: queued" if r.id == "MAIL-03" else "",
            evidence=[f"probe for {r.id}: ok"],
            req_ids=[r.id],
            host="relay",
        )
        for r in catalogue
        if r.id != "AV-02"
    ]
    meta = RunMetadata(
        stage="test",
        revision="c" * 40,
        dirty=False,
        content_hash="sha256:" + "a" * 64,
        content_files={},
        inventory_hash="sha256:" + "b" * 64,
        hosts=["relay", "store"],
        started="2026-11-28T10:00:00Z",
        finished="2026-11-28T10:04:00Z",
    )
    waiver = Waiver(
        "AV-02", "Second relay arrives with the new cluster.", "Head of IT", dt.date(2026, 12, 31)
    )
    report = build_report(results, catalogue, [waiver], meta, today=dt.date(2026, 11, 28))
    _json, html, _digest = write_report(report, tmp_path / "report")
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-extensions",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--window-size=1280,2400",
            f"--screenshot={shot}",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
