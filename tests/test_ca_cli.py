"""End to end through the ``safemail`` command: register -> submit -> approve -> issue ->
crl -> publish -> revoke -> publish, each host with its own state directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from test_ca_support import DOMAIN, MAILBOX, NUMBER, make_csr, policy_dict, rsa_key

from safemail.ca import journal
from safemail.cli import main


@pytest.fixture
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    pol = tmp_path / "policy.yml"
    pol.write_text(yaml.safe_dump({"ca_policy": policy_dict()}))
    monkeypatch.setenv("SAFEMAIL_CA_POLICY", str(pol))
    monkeypatch.delenv("SAFEMAIL_CA_DIR", raising=False)
    key = tmp_path / "journal.key"
    journal.generate_hmac_key(key)
    monkeypatch.setenv("SAFEMAIL_CA_JOURNAL_KEY", str(key))
    return {name: tmp_path / name for name in ("ra", "signer", "dist", "key")} | {"root": tmp_path}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["ca", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def sync(src: Path, dst: Path) -> None:
    """Stand-in for the SSH pull/push done by the ca_hosts role."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("private", "*.lock", "journal.*"))


def test_full_flow(hosts: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    ra, signer, dist = (str(hosts[h]) for h in ("ra", "signer", "dist"))
    csr = hosts["root"] / "praxis.csr"
    csr.write_bytes(make_csr(rsa_key(), san=[MAILBOX]))

    code, out, _ = run(capsys, "init", "--state-dir", signer, "--operator", "carol")
    assert code == 0 and "CA created" in out
    code, out, _ = run(capsys, "init", "--state-dir", signer, "--operator", "carol")
    assert code == 0 and "not regenerated" in out

    code, out, _ = run(
        capsys,
        "register",
        NUMBER,
        "--name",
        "Praxis Mueller",
        "--mailbox",
        MAILBOX,
        "--specialty",
        "GP",
        "--state-dir",
        ra,
        "--operator",
        "alice",
    )
    assert code == 0 and "registered" in out
    code, _, err = run(
        capsys,
        "register",
        "222333444",
        "--name",
        "X",
        "--mailbox",
        f"x@{DOMAIN}",
        "--specialty",
        "VET",
        "--state-dir",
        ra,
    )
    assert code == 3 and "refused (unknown-specialty)" in err

    code, out, _ = run(
        capsys,
        "submit",
        str(csr),
        "--participant",
        NUMBER,
        "--state-dir",
        ra,
        "--published-dir",
        str(hosts["ra"] / "published"),
    )
    assert code == 0
    request_id = out.strip()
    code, out, _ = run(capsys, "list", "--state", "pending", "--state-dir", ra)
    assert request_id in out and "pending" in out

    with pytest.raises(SystemExit) as exc:  # approval needs a named operator
        run(capsys, "approve", request_id, "--state-dir", ra)
    assert exc.value.code == 2 and "--operator" in capsys.readouterr().err
    code, out, _ = run(capsys, "approve", request_id, "--operator", "bob", "--state-dir", ra)
    assert code == 0 and "approved by bob" in out

    pulled = hosts["root"] / "signer-inbox"
    sync(hosts["ra"] / "outbox" / "approved", pulled)  # signer pulls from the RA
    code, out, _ = run(capsys, "issue", "--from", str(pulled), "--state-dir", signer)
    assert code == 0 and "issued" in out
    serial = out.split("serial ")[1].strip()
    code, out, _ = run(capsys, "issue", "--from", str(pulled), "--state-dir", signer)
    assert code == 0 and f"already issued  serial {serial}" in out

    code, out, _ = run(capsys, "crl", "--state-dir", signer)
    assert code == 0 and "number 1, 0 revoked" in out

    pushed = hosts["root"] / "dist-incoming"
    sync(hosts["signer"], pushed)  # signer pushes its public output
    assert not (pushed / "private").exists()
    ldif = hosts["root"] / "changes.ldif"
    code, out, _ = run(
        capsys,
        "publish",
        "--from",
        str(pushed),
        "--state-dir",
        dist,
        "--ldif",
        str(ldif),
        "--ldap-dn-template",
        "uid={participant},ou=participants,dc=safemail",
    )
    assert code == 0 and "published 1 certificate(s)" in out
    assert f"dn: uid={NUMBER},ou=participants,dc=safemail" in ldif.read_text()
    published = hosts["dist"] / "published"
    cert = x509.load_pem_x509_certificate((published / "certs" / f"{MAILBOX}.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((published / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)

    # RA now sees the valid cert (read-only copy of the published tree): a new request is refused
    sync(published, hosts["ra"] / "published")
    code, _, err = run(capsys, "submit", str(csr), "--participant", NUMBER, "--state-dir", ra)
    assert code == 3 and "already-certified" in err

    code, out, _ = run(capsys, "list", "--certs", "--json", "--state-dir", signer)
    [row] = json.loads(out)
    assert (row["serial"], row["status"], row["mailbox"]) == (serial, "valid", MAILBOX)

    code, out, _ = run(
        capsys, "revoke", "--mailbox", MAILBOX, "--reason", "key-compromise", "--state-dir", signer
    )
    assert code == 0 and f"revoked {serial}" in out and "number 2, 1 revoked" in out
    code, out, _ = run(capsys, "crl", "--show", "--state-dir", signer)
    assert serial in out

    sync(hosts["signer"], pushed)
    code, out, _ = run(capsys, "publish", "--from", str(pushed), "--state-dir", dist)
    assert code == 0 and f"withdrawn {MAILBOX}" in out
    crl = x509.load_der_x509_crl((published / "crl.der").read_bytes())
    assert crl.is_signature_valid(ca.public_key())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None

    key = str(hosts["root"] / "journal.key")
    for host in ("ra", "signer", "dist"):
        code, out, _ = run(
            capsys, "journal", "verify", str(hosts[host] / "journal.jsonl"), "--key", key
        )
        assert code == 0 and out.startswith("OK"), (host, out)
    # tamper with the signer's journal: verify exits 4 and names the entry
    j = hosts["signer"] / "journal.jsonl"
    rows = j.read_text().splitlines()
    k = next(i for i, r in enumerate(rows) if '"action":"issue"' in r)
    rows[k] = rows[k].replace(f'"participant":"{NUMBER}"', '"participant":"999999999"')
    j.write_text("\n".join(rows) + "\n")
    code, out, _ = run(capsys, "journal", "verify", str(j))
    assert code == 4 and out.startswith(f"BROKEN at seq {k + 1}: hash mismatch")


def test_operator_errors_have_hints(
    hosts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys, "issue", "--from", str(hosts["root"] / "nope"), "--state-dir", str(hosts["signer"])
    )
    assert code == 1 and "error:" in err and "hint:" in err
    code, _, err = run(capsys, "crl", "--state-dir", str(hosts["signer"]))
    assert code == 1 and "safemail ca init" in err
    code, _, err = run(
        capsys,
        "reject",
        "0123456789abcdef",
        "--reason",
        "x",
        "--operator",
        "b",
        "--state-dir",
        str(hosts["ra"]),
    )
    assert code == 1 and "no request" in err
    code, _, err = run(
        capsys, "revoke", "--reason", "superseded", "--state-dir", str(hosts["signer"])
    )
    assert code == 1 and "either a SERIAL or --mailbox" in err


def test_every_step_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for step in (
        "init",
        "register",
        "submit",
        "list",
        "approve",
        "reject",
        "issue",
        "revoke",
        "crl",
        "publish",
    ):
        with pytest.raises(SystemExit) as exc:
            main(["ca", step, "--help"])
        assert exc.value.code == 0
        assert "--state-dir" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["ca", "journal", "verify", "--help"])
    assert "--key" in capsys.readouterr().out
