from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from safemail.ca import journal
from safemail.ca.errors import CaError
from safemail.ca.journal import JournalKey, entry_hash

N = 6


def fill(path: Path, key: JournalKey | None = None, n: int = N) -> None:
    for i in range(1, n + 1):
        journal.append(
            path,
            "issue",
            "carol",
            host="ca-signer",
            key=key,
            participant=f"10000000{i}",
            serial=f"{i:032x}",
            mailbox=f"p{i}@safemail.example",
        )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write(path: Path, rows: list[str]) -> None:
    path.write_text("".join(r + "\n" for r in rows))


def test_fresh_journal_verifies(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    fill(p)
    result = journal.verify(p)
    assert result.ok and result.entries == N
    first, last = json.loads(lines(p)[0]), json.loads(lines(p)[-1])
    assert first["seq"] == 1 and first["prev_hash"] == journal.GENESIS
    assert last["hash"] == result.head == journal.head(p)[1]
    assert set(first) == {
        "seq",
        "time",
        "host",
        "action",
        "actor",
        "participant",
        "serial",
        "mailbox",
        "prev_hash",
        "hash",
    }
    assert str(result).startswith("OK: 6 entries")


@pytest.mark.parametrize("k", range(1, N + 1))
def test_altering_any_entry_is_found_at_its_seq(tmp_path: Path, k: int) -> None:
    p = tmp_path / "j.jsonl"
    fill(p)
    rows = lines(p)
    rows[k - 1] = rows[k - 1].replace('"actor":"carol"', '"actor":"mallory"')
    write(p, rows)
    result = journal.verify(p)
    assert not result.ok and result.seq == k and "hash mismatch" in (result.problem or "")
    assert result.entries == k - 1


@pytest.mark.parametrize("k", range(1, N))
def test_deleting_an_entry_is_found(tmp_path: Path, k: int) -> None:
    p = tmp_path / "j.jsonl"
    fill(p)
    rows = lines(p)
    del rows[k - 1]
    write(p, rows)
    result = journal.verify(p)
    assert not result.ok and result.seq == k
    assert f"seq gap: expected seq {k}, found {k + 1}" == result.problem


@pytest.mark.parametrize("k", range(1, N))
def test_reordering_entries_is_found(tmp_path: Path, k: int) -> None:
    p = tmp_path / "j.jsonl"
    fill(p)
    rows = lines(p)
    rows[k - 1], rows[k] = rows[k], rows[k - 1]
    write(p, rows)
    result = journal.verify(p)
    assert not result.ok and result.seq == k and "seq gap" in (result.problem or "")


def _rewrite(row: str, **changes: object) -> str:
    entry = json.loads(row)
    entry.update(changes)
    entry["hash"] = entry_hash(entry)
    return json.dumps(entry, sort_keys=True, separators=(",", ":"))


def test_altered_entry_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    fill(p)
    rows = lines(p)
    rows[2] = _rewrite(rows[2], mailbox="other@safemail.example")
    write(p, rows)
    result = journal.verify(p)
    assert (result.ok, result.seq) == (False, 4) and "broken link" in (result.problem or "")


def test_renumbered_deletion_breaks_the_link(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    fill(p)
    rows = lines(p)
    del rows[2]
    rows[2:] = [_rewrite(r, seq=i) for i, r in enumerate(rows[2:], start=3)]
    write(p, rows)
    result = journal.verify(p)
    assert (result.ok, result.seq) == (False, 3) and "broken link" in (result.problem or "")


def test_damaged_line_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    fill(p)
    rows = lines(p)
    rows[1] = rows[1][:20]
    write(p, rows)
    assert journal.verify(p).seq == 2


def test_hmac_signed_journal_detects_a_full_rewrite(tmp_path: Path) -> None:
    secret = tmp_path / "journal.key"
    journal.generate_hmac_key(secret)
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        journal.generate_hmac_key(secret)
    key = JournalKey.load(secret)
    p = tmp_path / "j.jsonl"
    fill(p, key)
    assert journal.verify(p, key).ok
    # an attacker without the key rewrites entry 3 and re-chains everything after it
    rows = lines(p)
    rows[2] = _rewrite(rows[2], actor="mallory")
    for i in range(3, N):
        rows[i] = _rewrite(rows[i], prev_hash=json.loads(rows[i - 1])["hash"])
    write(p, rows)
    assert journal.verify(p).ok  # the chain alone cannot tell
    result = journal.verify(p, key)
    assert (result.ok, result.seq, result.problem) == (False, 3, "bad signature")


def test_missing_signature_is_reported(tmp_path: Path) -> None:
    journal.generate_hmac_key(tmp_path / "k")
    key = JournalKey.load(tmp_path / "k")
    p = tmp_path / "j.jsonl"
    fill(p, key, 2)
    journal.append(p, "crl", "carol")  # unsigned
    result = journal.verify(p, key)
    assert (result.seq, result.problem) == (3, "missing signature")


def test_ed25519_signed_journal(tmp_path: Path) -> None:
    priv = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "host.key").write_bytes(
        priv.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "host.pub").write_bytes(
        priv.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    p = tmp_path / "j.jsonl"
    fill(p, JournalKey.load(tmp_path / "host.key"))
    pub = JournalKey.load(tmp_path / "host.pub")
    assert journal.verify(p, pub).ok
    other = JournalKey(ed_private=ed25519.Ed25519PrivateKey.generate())
    result = journal.verify(p, other)
    assert (result.seq, result.problem) == (1, "bad signature")
    with pytest.raises(CaError, match="but not sign"):
        journal.append(p, "crl", "carol", key=pub)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"csr": "x"}, "not allowed"),
        ({"detail": "-----BEGIN PRIVATE KEY-----"}, "key material"),
        ({"detail": "x" * 500}, "too long"),
        ({"participant": ["a"]}, "text or a number"),
    ],
)
def test_only_minimal_subject_fields_are_accepted(tmp_path: Path, fields, fragment) -> None:
    p = tmp_path / "j.jsonl"
    with pytest.raises(CaError, match=fragment):
        journal.append(p, "issue", "carol", **fields)
    assert not p.exists() or p.read_text() == ""


def _appender(path: str, worker: int, count: int) -> None:
    for i in range(count):
        journal.append(Path(path), "issue", f"w{worker}", host="h", serial=str(i))


def test_concurrent_appenders_keep_the_chain(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(str(p), w, 25)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    result = journal.verify(p)
    assert result.ok and result.entries == 100


def test_refuses_to_append_after_a_damaged_last_line(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    fill(p, n=2)
    with p.open("a") as fh:
        fh.write("{half\n")
    with pytest.raises(CaError, match="damaged"):
        journal.append(p, "crl", "carol")


def test_missing_journal_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CaError, match="does not exist"):
        journal.verify(tmp_path / "none.jsonl")
