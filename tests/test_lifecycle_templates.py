"""The participant-facing notice and the removal report render and say what they must."""

from __future__ import annotations

import ast
from pathlib import Path

import jinja2

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "playbooks" / "templates"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True)  # as Ansible's template module
    # Ansible's `bool` filter, as far as these templates use it.
    env.filters["bool"] = lambda v: v if isinstance(v, bool) else (
        str(v).strip().lower() in ("yes", "on", "1", "true"))
    return env


def _verify_warning() -> tuple[str, ...]:
    """NOTICE_WARNING as verify/test_lifecycle.py checks it (read, not imported: the verify
    module needs testinfra and a lab)."""
    tree = ast.parse((REPO / "verify" / "test_lifecycle.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "NOTICE_WARNING":
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("NOTICE_WARNING not found")


def test_notice_carries_the_warning_the_verify_suite_looks_for() -> None:
    text = _env().get_template("enrolment-notice.txt.j2").render(
        __notice={"number": "100003", "name": "Praxis Dr. Beispiel",
                  "mailbox": "praxis.beispiel@safemail.example"},
        __notice_date="2026-12-06T12:00:00Z", __notice_operator="Alice Admin")
    for line in _verify_warning():
        assert line in text
    assert "100003" in text and "praxis.beispiel@safemail.example" in text
    assert "Alice Admin" in text and "2026-12-06T12:00:00Z" in text
    # the duties: key stays in the practice, report loss, only encrypted mail, password secret
    for duty in ("privater Schluessel", "Verlust", "S/MIME-verschluesselte", "Passwort"):
        assert duty in text


def test_removal_report_renders_every_part() -> None:
    report = {
        "certificates_revoked": ["1a2b"],
        "mailbox_deletion": [{"store": "store1", "delete_after": "2027-03-06T12:00:00Z",
                              "keep_days": 90}],
        "final_statement": [
            {"relay": "relay1", "quarter": "2026Q3", "sent": 3, "received": 1,
             "payout_cents": 35, "billed": True, "readable": True},
            {"relay": "relay1", "quarter": "2026Q4", "sent": 0, "received": 0,
             "payout_cents": 0, "billed": False, "readable": False},
        ],
        "kept": "the notice",
    }
    text = _env().get_template("removal-report.txt.j2").render(
        __remove={"number": "100003", "name": "Praxis", "mailbox": "p@safemail.example",
                  "started": "2026-12-06T12:00:00Z", "operator": "Alice"},
        __remove_report=report)
    assert "1a2b revoked" in text
    assert "kept on store1 until 2027-03-06T12:00:00Z (90 days)" in text
    assert "2026Q3 on relay1: 3 / 1 / 35 (already billed: see its statement)" in text
    assert "2026Q4 on relay1: 0 / 0 / 0 (not readable)" in text
    nothing = _env().get_template("removal-report.txt.j2").render(
        __remove={"number": "1", "name": "n", "mailbox": "m", "started": "s", "operator": "o"},
        __remove_report={**report, "certificates_revoked": []})
    assert "none valid (nothing to revoke)" in nothing
