"""The signer-initiated exchange bundle: only expected regular files travel, all or nothing."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pytest

from safemail.ca import exchange
from safemail.ca.errors import CaError
from safemail.cli import main


def _tree(root: Path) -> None:
    (root / "issued").mkdir(parents=True)
    (root / "private").mkdir()
    (root / "ca.pem").write_text("CA")
    (root / "crl.pem").write_text("CRL")
    (root / "crl.der").write_bytes(b"\x30\x00")
    (root / "index.json").write_text("{}")
    (root / "issued" / "01.pem").write_text("CERT")
    (root / "private" / "ca.key").write_text("SECRET")
    (root / "journal.jsonl").write_text("{}\n")
    os.symlink(root / "private" / "ca.key", root / "issued" / "02.pem")


def test_pack_takes_only_the_kind_and_skips_links(tmp_path: Path) -> None:
    _tree(tmp_path / "s")
    doc = json.loads(exchange.pack(tmp_path / "s", exchange.SIGNER_OUTPUT))
    assert sorted(doc["files"]) == ["ca.pem", "crl.der", "crl.pem", "index.json", "issued/01.pem"]
    assert b"SECRET" not in exchange.pack(tmp_path / "s", exchange.SIGNER_OUTPUT)


def test_roundtrip_replaces_the_target(tmp_path: Path) -> None:
    _tree(tmp_path / "s")
    dest = tmp_path / "incoming"
    dest.mkdir()
    (dest / "stale.pem").write_text("old")
    names = exchange.unpack(
        exchange.pack(tmp_path / "s", exchange.SIGNER_OUTPUT), dest, exchange.SIGNER_OUTPUT
    )
    assert "issued/01.pem" in names
    assert (dest / "issued" / "01.pem").read_text() == "CERT"
    assert not (dest / "stale.pem").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incoming", "s"]


def test_pattern_depth_is_exact(tmp_path: Path) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "x.json").write_text("{}")
    (tmp_path / "a" / "sub" / "y.json").write_text("{}")
    doc = json.loads(exchange.pack(tmp_path / "a", exchange.APPROVED))
    assert list(doc["files"]) == ["x.json"]


@pytest.mark.parametrize(
    "name",
    ["../evil.json", "/etc/passwd", ".hidden.json", "sub/x.json", "a\\b.json", "", "x.txt"],
)
def test_unexpected_names_refuse_the_whole_bundle(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "approved"
    dest.mkdir()
    (dest / "keep.json").write_text("{}")
    files = {"good.json": base64.b64encode(b"{}").decode(), name: ""}
    data = json.dumps({"version": 1, "files": files}).encode()
    with pytest.raises(CaError, match="unexpected file|nothing was written"):
        exchange.unpack(data, dest, exchange.APPROVED)
    assert sorted(p.name for p in dest.iterdir()) == ["keep.json"]
    assert not (tmp_path / "evil.json").exists()


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"version": 2, "files": {}}',
        b'{"version": 1}',
        b'{"version": 1, "files": {"a.json": "***"}}',
    ],
)
def test_malformed_bundles_are_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(CaError):
        exchange.unpack(data, tmp_path / "d", exchange.APPROVED)
    assert not (tmp_path / "d").exists()


def test_cli_bundle_and_unbundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    _tree(tmp_path / "s")
    assert main(["ca", "bundle", "signer-output", str(tmp_path / "s")]) == 0
    data = capsysbinary.readouterr().out

    class _Stdin:
        buffer = io.BytesIO(data)

    monkeypatch.setattr("sys.stdin", _Stdin)
    assert main(["ca", "unbundle", "published", str(tmp_path / "p")]) == 1  # index.json refused
    monkeypatch.setattr("sys.stdin", type("S", (), {"buffer": io.BytesIO(data)}))
    assert main(["ca", "unbundle", "signer-output", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "ca.pem").read_text() == "CA"


# ------------------------------------------------ issue 14: unchanged files are not rewritten
def _bundle(files: dict[str, bytes]) -> bytes:
    encoded = {name: base64.b64encode(data).decode() for name, data in files.items()}
    return json.dumps({"version": 1, "files": encoded}).encode()


def test_unchanged_files_are_kept_changed_ones_written(tmp_path: Path) -> None:
    dest = tmp_path / "incoming"
    first = {"ca.pem": b"CA", "issued/01.pem": b"ONE", "issued/02.pem": b"TWO"}
    exchange.unpack(_bundle(first), dest, exchange.SIGNER_OUTPUT)
    inode = {n: (dest / n).stat().st_ino for n in first}
    second = {"ca.pem": b"CA", "issued/01.pem": b"ONE", "issued/02.pem": b"2WO"}
    second["issued/03.pem"] = b"THREE"
    exchange.unpack(_bundle(second), dest, exchange.SIGNER_OUTPUT)
    for name, data in second.items():
        assert (dest / name).read_bytes() == data
        assert (dest / name).stat().st_mode & 0o777 == 0o644
    assert (dest / "ca.pem").stat().st_ino == inode["ca.pem"]  # kept, not rewritten
    assert (dest / "issued/01.pem").stat().st_ino == inode["issued/01.pem"]
    assert (dest / "issued/02.pem").stat().st_ino != inode["issued/02.pem"]  # same size, new
    assert (dest / "issued/01.pem").stat().st_nlink == 1  # the old tree is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incoming"]


def test_a_file_is_kept_only_if_it_is_a_plain_0644_file(tmp_path: Path) -> None:
    dest = tmp_path / "incoming"
    exchange.unpack(_bundle({"ca.pem": b"CA", "crl.pem": b"CRL"}), dest, exchange.SIGNER_OUTPUT)
    outside = tmp_path / "outside.pem"
    outside.write_bytes(b"CA")
    os.chmod(outside, 0o644)
    (dest / "ca.pem").unlink()
    os.symlink(outside, dest / "ca.pem")  # same content behind a link: written anew
    os.chmod(dest / "crl.pem", 0o600)  # same content, other mode: written anew
    exchange.unpack(_bundle({"ca.pem": b"CA", "crl.pem": b"CRL"}), dest, exchange.SIGNER_OUTPUT)
    assert not (dest / "ca.pem").is_symlink()
    assert (dest / "ca.pem").stat().st_ino != outside.stat().st_ino
    assert (dest / "crl.pem").stat().st_mode & 0o777 == 0o644
    assert outside.read_bytes() == b"CA" and outside.stat().st_nlink == 1


def test_a_file_that_shares_its_inode_with_another_name_is_written_anew(tmp_path: Path) -> None:
    dest = tmp_path / "incoming"
    exchange.unpack(_bundle({"ca.pem": b"CA"}), dest, exchange.SIGNER_OUTPUT)
    elsewhere = tmp_path / "elsewhere.pem"
    os.link(dest / "ca.pem", elsewhere)  # changed in place there later, it would change here
    exchange.unpack(_bundle({"ca.pem": b"CA"}), dest, exchange.SIGNER_OUTPUT)
    assert (dest / "ca.pem").stat().st_ino != elsewhere.stat().st_ino
    assert (dest / "ca.pem").stat().st_nlink == 1 and (dest / "ca.pem").read_bytes() == b"CA"
