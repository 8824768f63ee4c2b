"""The signer's cycle does not grow with the CA's history (issue 14, docs/PERFORMANCE.md 14).

The RA keeps every approved request in its outbox and the signer pulls them all on every
cycle. Each used to cost a full load of the CA key (about half a second for RSA 4096), so a
cycle cost that much per request ever approved. These tests count the key loads and check that
answering handled requests from the index keeps every outcome and every check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_ca_support import DOMAIN, Trio, make_csr, make_trio, rsa_key

from safemail.ca.errors import CaError
from safemail.ca.signer import Signer


class CountingSigner(Signer):
    """The real signer, counting how often the CA key is read and checked."""

    loads = 0

    def load_ca(self) -> Any:
        self.loads += 1
        return super().load_ca()


def _history(tmp_path: Path, n: int) -> tuple[Trio, CountingSigner, list[str]]:
    trio = make_trio(tmp_path)
    serials = []
    for i in range(n):
        number, mailbox = f"10000000{i}", f"praxis{i}@{DOMAIN}"
        trio.register(number, mailbox)
        serials.append(trio.enrol(number, mailbox))
    signer = CountingSigner(trio.signer.state_dir, trio.signer.policy, journal=trio.signer.journal)
    return trio, signer, serials


def _approve(trio: Trio, number: str, mailbox: str, **kw: Any) -> str:
    trio.register(number, mailbox)
    req = trio.ra.submit(make_csr(rsa_key(), san=[mailbox]), number, actor="alice", **kw)
    trio.ra.approve(req.id, operator="bob")
    return req.id


def test_one_key_load_per_cycle_whatever_the_history(tmp_path: Path) -> None:
    trio, signer, serials = _history(tmp_path, 6)
    new = _approve(trio, "200000000", f"new@{DOMAIN}")
    outcomes = signer.issue_from_outbox(trio.outbox, actor="signer-cycle")
    assert signer.loads == 1
    by_id = {o.request_id: o for o in outcomes}
    assert by_id[new].new and by_id[new].serial in signer.index()["certs"]
    old = [o for o in outcomes if o.request_id != new]
    assert sorted(o.serial for o in old) == sorted(serials)
    assert not any(o.new or o.refused for o in old)
    # a cycle with nothing new: still one load (the key is checked), nothing issued
    signer.loads = 0
    again = signer.issue_from_outbox(trio.outbox, actor="signer-cycle")
    assert signer.loads == 1
    assert [(o.request_id, o.serial, o.new) for o in again] == [
        (o.request_id, o.serial, False) for o in outcomes
    ]
    assert len(signer.index()["certs"]) == 7


def test_several_new_requests_share_the_one_load(tmp_path: Path) -> None:
    trio, signer, _ = _history(tmp_path, 2)
    ids = [_approve(trio, f"30000000{i}", f"more{i}@{DOMAIN}") for i in range(3)]
    outcomes = signer.issue_from_outbox(trio.outbox, actor="signer-cycle")
    assert signer.loads == 1
    assert {o.request_id for o in outcomes if o.new} == set(ids)


def test_handled_requests_keep_their_outcome_refusals_included(tmp_path: Path) -> None:
    trio, signer, serials = _history(tmp_path, 1)
    # altered on the way from the RA: refused, and the refusal is final for that id
    rid = _approve(trio, "400000000", f"victim@{DOMAIN}")
    path = trio.outbox / f"{rid}.json"
    req = json.loads(path.read_text())
    req["mailbox"] = f"intruder@{DOMAIN}"
    path.write_text(json.dumps(req))
    first = {o.request_id: o for o in signer.issue_from_outbox(trio.outbox, actor="c")}
    assert first[rid].refused == "email-mismatch"
    # the RA now offers the unaltered request under the same id: still refused, never issued
    req["mailbox"] = f"victim@{DOMAIN}"
    path.write_text(json.dumps(req))
    second = {o.request_id: o for o in signer.issue_from_outbox(trio.outbox, actor="c")}
    assert second[rid].refused == "email-mismatch" and second[rid].serial is None
    assert second[rid].reason == first[rid].reason
    assert [c["mailbox"] for c in signer.index()["certs"].values()] == [f"praxis0@{DOMAIN}"]
    assert second[next(iter(second.keys() - {rid}))].serial == serials[0]


def test_a_world_readable_key_fails_a_cycle_of_handled_requests(tmp_path: Path) -> None:
    trio, signer, _ = _history(tmp_path, 2)
    os.chmod(signer.key_path, 0o644)
    with pytest.raises(CaError, match="readable by others"):
        signer.issue_from_outbox(trio.outbox, actor="signer-cycle")


def test_an_empty_outbox_loads_nothing(tmp_path: Path) -> None:
    trio = make_trio(tmp_path)
    trio.outbox.mkdir(parents=True)
    signer = CountingSigner(trio.signer.state_dir, trio.signer.policy)
    assert signer.issue_from_outbox(trio.outbox, actor="signer-cycle") == []
    assert signer.loads == 0


def test_a_bad_operator_name_is_refused_with_only_handled_requests(tmp_path: Path) -> None:
    trio, signer, _ = _history(tmp_path, 1)
    with pytest.raises(CaError):
        signer.issue_from_outbox(trio.outbox, actor="")


def test_lost_certificate_files_come_back_in_a_cycle_of_handled_requests(tmp_path: Path) -> None:
    trio, signer, serials = _history(tmp_path, 2)
    pem = (signer.issued_dir / f"{serials[1]}.pem").read_bytes()
    (signer.issued_dir / f"{serials[1]}.pem").unlink()
    signer.issue_from_outbox(trio.outbox, actor="signer-cycle")
    assert (signer.issued_dir / f"{serials[1]}.pem").read_bytes() == pem


def test_an_invalid_request_id_is_still_refused(tmp_path: Path) -> None:
    trio, signer, _ = _history(tmp_path, 1)
    (trio.outbox / "zz.json").write_text(json.dumps({"id": "../x", "state": "approved"}))
    with pytest.raises(CaError):
        signer.issue_from_outbox(trio.outbox, actor="signer-cycle")
