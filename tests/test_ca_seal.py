"""The journal sealer and exported heads (CA-05, issue 18): the issue's attack reproduced.

The CA account's material is everything in its state directory (the journal, the old HMAC key)
but not the seal key; root's material includes the seal key. Each attack rewrites or truncates
the journal with that material; the seal check or the heads held off the host must catch it.
The sealer runs behind a real UNIX socket (a thread serving ``seal.serve`` per connection, as
systemd's Accept=yes socket does).
"""

from __future__ import annotations

import io
import json
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from safemail.ca import journal
from safemail.ca.errors import CaError
from safemail.ca.journal import Journal, JournalKey
from safemail.ca.seal import Sealer, SocketSealer, serve
from safemail.cli import main

N = 6


@pytest.fixture
def sealer(tmp_path: Path) -> Sealer:
    s = Sealer(tmp_path / "seal", log=False)
    s.state_dir.mkdir()
    assert s.keygen(tmp_path / "seal.pub") is True
    assert s.keygen(tmp_path / "seal.pub") is False  # never regenerated
    return s


@pytest.fixture
def sock(tmp_path: Path, sealer: Sealer) -> Iterator[Path]:
    path = tmp_path / "seal.sock"

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            serve(sealer, self.rfile, self.wfile)  # type: ignore[arg-type]

    server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path
    server.shutdown()
    server.server_close()


def pub(tmp_path: Path) -> JournalKey:
    return JournalKey.load(tmp_path / "seal.pub")


def fill(tmp_path: Path, sock: Path, n: int = N) -> Path:
    j = Journal(tmp_path / "ca" / "journal.jsonl", host="ca-signer", key=SocketSealer(sock))
    for i in range(n):
        j.record("issue", "signer-cycle", serial=f"{i:032x}", participant="123456789")
    return j.path


def rows(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def write(p: Path, entries: list[dict]) -> None:
    p.write_text(
        "".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries)
    )


def rechain(entries: list[dict], key: JournalKey | None) -> list[dict]:
    """Recompute every hash and link (and re-sign with ``key``): what an insider does."""
    prev = journal.GENESIS
    for e in entries:
        e.pop("sig", None)
        e["prev_hash"] = prev
        e["hash"] = journal.entry_hash(e)
        if key is not None:
            e["sig"] = key.sign(e["hash"])
        prev = e["hash"]
    return entries


def rechain_from(entries: list[dict], prev: str, key: JournalKey) -> list[dict]:
    for e in entries:
        e.pop("sig", None)
        e["prev_hash"] = prev
        e["hash"] = journal.entry_hash(e)
        e["sig"] = key.sign(e["hash"])
        prev = e["hash"]
    return entries


def test_sealed_journal_verifies_and_head_is_exported(
    tmp_path: Path, sock: Path, sealer: Sealer
) -> None:
    p = fill(tmp_path, sock)
    result = journal.verify(p, pub(tmp_path))
    assert result.ok and result.entries == N
    head = sealer.head()
    assert head is not None and (head["seq"], head["hash"]) == (N, rows(p)[-1]["hash"])
    assert len(sealer.heads_path.read_text().splitlines()) == N
    heads = journal.parse_heads(sealer.head_path.read_text(), "head.json")
    assert journal.check_heads(p, heads, pub(tmp_path)).ok


def test_ca_account_rewrite_is_detected_and_cannot_be_resealed(tmp_path: Path, sock: Path) -> None:
    """The issue's reproduction, with what the CA account holds (journal + old HMAC key)."""
    p = fill(tmp_path, sock)
    original = rows(p)
    hmac_path = tmp_path / "journal.key"
    journal.generate_hmac_key(hmac_path)
    hmac_key = JournalKey.load(hmac_path)
    entries = rows(p)
    entries[2]["actor"] = "mallory"
    write(p, rechain(entries, hmac_key))  # everything "re-signed" with the CA's own key
    assert journal.verify(p).ok  # the chain alone cannot tell
    result = journal.verify(p, pub(tmp_path))
    assert (result.ok, result.seq) == (False, 1) and "not sealed" in result.problem
    # keep the sealed entries 1-2, rewrite from 3 on: the first rewritten entry fails
    tail = rechain(rows(p), hmac_key)[2:]
    tail[0]["prev_hash"] = original[1]["hash"]
    write(p, original[:2] + rechain_from(tail, original[1]["hash"], hmac_key))
    result = journal.verify(p, pub(tmp_path))
    assert (result.ok, result.seq) == (False, 3)
    # and the sealer will not seal the rewritten history's next entry either
    write(p, rechain(rows(p)[:N], None))
    with pytest.raises(CaError, match="refusing to seal|sealer refused"):
        Journal(p, host="ca-signer", key=SocketSealer(sock)).record("crl", "x")


def test_ca_account_truncation_is_detected_by_the_sealers_head(
    tmp_path: Path, sock: Path, sealer: Sealer
) -> None:
    p = fill(tmp_path, sock)
    write(p, rows(p)[:-2])
    assert journal.verify(p, pub(tmp_path)).ok  # a cut chain is still a chain
    heads = journal.parse_heads(sealer.head_path.read_text(), "head.json")
    result = journal.check_heads(p, heads, pub(tmp_path))
    assert not result.ok and result.problem.startswith("truncated: head seq 6")
    with pytest.raises(CaError, match="refusing to seal"):
        Journal(p, host="ca-signer", key=SocketSealer(sock)).record("crl", "x")


def test_root_with_the_seal_key_is_caught_by_heads_held_off_the_host(
    tmp_path: Path, sock: Path, sealer: Sealer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Root reads the seal key, rewrites and re-seals the whole journal, and rewrites the
    sealer's own head files too. Only the controller's earlier copy of the head remains."""
    p = fill(tmp_path, sock)
    store = tmp_path / "controller" / "ca-signer.heads.jsonl"
    verify = [
        "ca",
        "verify-journal",
        str(p),
        "--key",
        str(tmp_path / "seal.pub"),
        "--heads",
        str(store),
        "--remember",
        str(store),
    ]
    assert main(verify) == 1  # no store yet: refused unless the first use is stated
    assert "--first-use" in capsys.readouterr()[1]
    assert main([*verify, "--first-use"]) == 0
    assert "head seq 6 added" in capsys.readouterr()[0]
    stolen = JournalKey.load(sealer.key_path)

    entries = rows(p)
    entries[1]["actor"] = "mallory"
    write(p, rechain(entries, stolen))
    assert journal.verify(p, pub(tmp_path)).ok  # locally perfect
    assert main(verify) == 4
    out = capsys.readouterr()[0]
    assert "rewritten: entry seq 6 differs" in out

    write(p, rechain(rows(p)[:3], stolen))  # truncated and re-sealed
    assert main(verify) == 4
    assert "truncated: head seq 6" in capsys.readouterr()[0]


def test_sealer_seals_each_seq_once_and_in_order(tmp_path: Path, sealer: Sealer) -> None:
    p = tmp_path / "j.jsonl"
    journal.append(p, "init", "a", host="h")
    e = rows(p)[0]
    del_sig = {k: v for k, v in e.items() if k != "sig"}
    sealer.seal(json.dumps(del_sig).encode())
    with pytest.raises(CaError, match="refusing to seal seq 1"):
        sealer.seal(json.dumps(del_sig).encode())  # the same seq again
    altered = dict(del_sig, actor="b")
    with pytest.raises(CaError, match="hash does not match"):
        sealer.seal(json.dumps(altered).encode())
    with pytest.raises(CaError, match="not an unsealed"):
        sealer.seal(json.dumps(e | {"sig": {}}).encode())
    out = io.BytesIO()
    assert serve(sealer, io.BytesIO(b"not json\n"), out) == 3
    assert "not JSON" in json.loads(out.getvalue())["error"]


def test_sealing_adopts_an_older_hmac_journal(tmp_path: Path, sock: Path) -> None:
    """The lab's journals were HMAC-signed before the sealer existed: the first seal pins them
    (its prev_hash), later entries must all be sealed, and the last one must be."""
    journal.generate_hmac_key(tmp_path / "k")
    old = JournalKey.load(tmp_path / "k")
    p = tmp_path / "ca" / "journal.jsonl"
    for _ in range(3):
        journal.append(p, "register", "a", host="ca-ra", key=old)
    assert not journal.verify(p, pub(tmp_path)).ok  # nothing sealed yet
    Journal(p, host="ca-ra", key=SocketSealer(sock)).record("register", "a")
    assert journal.verify(p, pub(tmp_path)).ok
    journal.append(p, "register", "a", host="ca-ra", key=old)  # CA account's own "seal"
    result = journal.verify(p, pub(tmp_path))
    assert (result.ok, result.seq) == (False, 5)
    entries = rows(p)[:4]
    entries[0]["actor"] = "mallory"  # rewrite adopted history, re-chain: breaks the seal
    write(p, rechain(entries[:3], old) + entries[3:])
    assert not journal.verify(p, pub(tmp_path)).ok


def test_admin_log_lines_are_heads(tmp_path: Path, sock: Path, sealer: Sealer) -> None:
    p = fill(tmp_path, sock, 3)
    log = tmp_path / "admin.log"
    lines = ["2026-12-06T10:00:00+00:00 ca-signer sshd[1]: Accepted publickey for x"]
    for h in journal.parse_heads(sealer.heads_path.read_text()):
        lines.append(
            f"2026-12-06T10:00:01+00:00 ca-signer safemail-ca-seal: journal head "
            f"host={h.host} seq={h.seq} hash={h.hash} sig={h.sig['value']}"
        )
    log.write_text("\n".join(lines) + "\n")
    heads = journal.parse_heads(log.read_text(), "admin.log")
    assert [h.seq for h in heads] == [1, 2, 3]
    assert journal.check_heads(p, heads, pub(tmp_path)).ok
    write(p, rows(p)[:2])
    assert "truncated" in journal.check_heads(p, heads, pub(tmp_path)).problem
    forged = [
        journal.Head(
            2,
            heads[1].hash,
            {"alg": "ed25519", "value": heads[0].sig["value"]},
            "ca-signer",
            "forged",
        )
    ]
    assert (
        "exported head forged: bad signature"
        in journal.check_heads(p, forged, pub(tmp_path)).problem
    )


def test_sealer_without_its_socket_stops_the_ca_step(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.jsonl", key=SocketSealer(tmp_path / "nope.sock", timeout=1))
    with pytest.raises(CaError, match="did not answer"):
        j.record("crl", "x")


def test_start_sealing_through_the_cli(
    tmp_path: Path, sock: Path, sealer: Sealer, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "ra"
    journal.append(state / "journal.jsonl", "register", "a", host="ca-ra")  # before sealing
    assert (
        main(
            [
                "ca",
                "journal",
                "start-sealing",
                "--state-dir",
                str(state),
                "--journal-sealer",
                str(sock),
                "--operator",
                "ansible",
            ]
        )
        == 0
    )
    assert "seq 2 sealed" in capsys.readouterr()[0]
    assert journal.verify(state / "journal.jsonl", pub(tmp_path)).ok
    assert sealer.head()["seq"] == 2
    assert main(["ca", "journal", "start-sealing", "--state-dir", str(tmp_path / "x")]) == 1


@pytest.mark.parametrize(
    "host",
    [
        "x seq=1 hash=" + "0" * 64 + " sig=AAAA",  # the admin-log line would parse as an old head
        "a\nforged line",  # splits the syslog line in two
        "ca-signer ",
        "-ca",
        "a" * 64,
    ],
)
def test_sealer_refuses_an_entry_whose_host_is_not_a_hostname(
    tmp_path: Path, sealer: Sealer, host: str
) -> None:
    """The CA account chooses the entry's host; the sealer writes it into its admin-log line."""
    logged: list[str] = []
    sealer.log = logged.append
    p = tmp_path / "j.jsonl"
    journal.append(p, "init", "a", host="ca-signer")
    e = {k: v for k, v in rows(p)[0].items() if k != "sig"}
    sealer.seal(json.dumps(e).encode())
    journal.append(p, "issue", "a", host=host)
    bad = {k: v for k, v in rows(p)[1].items() if k != "sig"}
    with pytest.raises(CaError, match="host"):
        sealer.seal(json.dumps(bad).encode())
    assert len(logged) == 1 and sealer.head()["seq"] == 1  # nothing sealed, nothing logged


def test_admin_log_head_lines_are_parsed_whole(tmp_path: Path, sock: Path, sealer: Sealer) -> None:
    """A line under the sealer's tag that is not exactly a sealer head is a finding, not a head
    (nor a head hidden in it): any local user can 'logger -t safemail-ca-seal'."""
    fill(tmp_path, sock, 2)
    [h1, h2] = journal.parse_heads(sealer.heads_path.read_text())
    good = f"journal head host=ca-signer seq=2 hash={h2.hash} sig={h2.sig['value']}"
    prefix = "2026-12-06T10:00:01+00:00 ca-signer safemail-ca-seal[42]: "
    assert [h.seq for h in journal.parse_heads(prefix + good, "admin.log")] == [2]
    adopted = good + " (first seal, earlier entries adopted)"
    assert [h.seq for h in journal.parse_heads(prefix + adopted, "admin.log")] == [2]
    injected = (
        f"journal head host=x seq=1 hash={h1.hash} sig={h1.sig['value']} "
        f"seq=2 hash={h2.hash} sig={h2.sig['value']}"
    )
    for line in (injected, good + " trailing", "journal head host=ca-signer seq=x"):
        with pytest.raises(CaError, match="admin.log:1 .*not a journal head"):
            journal.parse_heads(prefix + line, "admin.log")
