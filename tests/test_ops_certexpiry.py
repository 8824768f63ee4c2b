"""The certificate expiry report (safemail.ops.certexpiry): which participants to warn, when."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from safemail.ops import certexpiry

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)
_KEY = ec.generate_private_key(ec.SECP256R1())


def _der(mailbox: str, not_after: dt.datetime, serial: int = 0x1234) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, mailbox)])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(_KEY.public_key()).serial_number(serial)
        .not_valid_before(not_after - dt.timedelta(days=730)).not_valid_after(not_after)
        .sign(_KEY, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _states(entries, warn=30):
    return {f.mailbox: f.state for f in certexpiry.assess(entries, NOW, warn)}


def test_states_at_the_edges_of_the_warning_period() -> None:
    entries = [
        ("far@x", [_der("far", NOW + dt.timedelta(days=30, seconds=1))]),
        ("edge@x", [_der("edge", NOW + dt.timedelta(days=30))]),
        ("soon@x", [_der("soon", NOW + dt.timedelta(hours=1))]),
        ("gone@x", [_der("gone", NOW)]),
        ("none@x", []),
        ("junk@x", [b"\x30\x03\x02\x01\x00"]),
    ]
    assert _states(entries) == {"far@x": "ok", "edge@x": "expiring", "soon@x": "expiring",
                                "gone@x": "expired", "none@x": "none", "junk@x": "unreadable"}


def test_order_puts_what_needs_attention_first() -> None:
    entries = [("ok@x", [_der("ok", NOW + dt.timedelta(days=300))]),
               ("late@x", [_der("late", NOW + dt.timedelta(days=20))]),
               ("early@x", [_der("early", NOW + dt.timedelta(days=2))]),
               ("gone@x", [_der("gone", NOW - dt.timedelta(days=1))])]
    findings = certexpiry.assess(entries, NOW, 30)
    assert [f.mailbox for f in findings] == ["gone@x", "early@x", "late@x", "ok@x"]
    assert findings[1].days_left == 2 and findings[1].serial == "1234"


def test_the_longest_valid_certificate_of_an_entry_counts() -> None:
    entries = [("two@x", [_der("old", NOW + dt.timedelta(days=3)),
                          _der("new", NOW + dt.timedelta(days=700))])]
    assert _states(entries) == {"two@x": "ok"}


def test_warn_days_zero_warns_only_about_expired() -> None:
    entries = [("soon@x", [_der("soon", NOW + dt.timedelta(hours=1))])]
    assert _states(entries, warn=0) == {"soon@x": "ok"}
    with pytest.raises(ValueError):
        certexpiry.assess(entries, NOW, -1)


def test_summary_line_counts_and_names_no_participant() -> None:
    findings = certexpiry.assess(
        [("ok@x", [_der("ok", NOW + dt.timedelta(days=300))]),
         ("soon@x", [_der("soon", NOW + dt.timedelta(days=5))])], NOW, 30)
    line = certexpiry.summary_line(findings, 30)
    assert "expiring=1" in line and "ok=1" in line
    assert "@" not in line and "soon" not in line and "to renew: see the status file" in line
    doc = certexpiry.status_document(findings, NOW, 30)
    assert doc["attention"] == 1 and json.loads(json.dumps(doc)) == doc
    assert "soon@x" in json.dumps(doc)


def test_bad_config_is_a_usage_error(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"ldap_uri": "ldap://auth1"}))
    assert certexpiry.main(["--config", str(cfg), "--no-syslog",
                            "--status-file", str(tmp_path / "s.json")]) == 2
    assert "missing base_dn, bind_dn, bind_password, cafile" in capsys.readouterr().err


def test_unreachable_directory_exits_1_and_keeps_the_old_status(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.json"
    ca = tmp_path / "ca.pem"
    ca.write_bytes(x509.load_der_x509_certificate(_der("ca", NOW)).public_bytes(
        serialization.Encoding.PEM))
    cfg.write_text(json.dumps({"ldap_uri": "ldap://127.0.0.1:1", "base_dn": "ou=p,dc=x",
                               "bind_dn": "cn=relay,dc=x", "bind_password": "pw",
                               "cafile": str(ca)}))
    status = tmp_path / "s.json"
    status.write_text("{}\n")
    assert certexpiry.main(["--config", str(cfg), "--no-syslog",
                            "--status-file", str(status)]) == 1
    assert status.read_text() == "{}\n"
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot reach the directory" in err


def test_main_writes_the_report_and_exits_3(tmp_path, monkeypatch, capsys) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"ldap_uri": "ldap://auth1", "base_dn": "ou=p,dc=x",
                               "bind_dn": "cn=relay,dc=x", "bind_password": "pw",
                               "cafile": "/etc/safemail/tls/ca.crt", "warn_days": 10}))
    monkeypatch.setattr(certexpiry, "read_directory", lambda config: [
        ("soon@x", [_der("soon", NOW + dt.timedelta(days=5))])])
    status = tmp_path / "s.json"
    rc = certexpiry.main(["--config", str(cfg), "--no-syslog", "--status-file", str(status),
                          "--now", NOW.isoformat()])
    assert rc == certexpiry.EXIT_WARN
    doc = json.loads(status.read_text())
    assert doc["warn_days"] == 10 and doc["certificates"][0]["state"] == "expiring"
    assert status.stat().st_mode & 0o777 == 0o600
    out = capsys.readouterr().out  # the line that goes to syslog: counts, no participant
    assert "expiring=1" in out and "soon@x" not in out
