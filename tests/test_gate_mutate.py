"""The mutation run (safemail verify --mutate) without a lab: fake SSH runner, fake verify."""

from __future__ import annotations

import io
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from safemail.cli import main
from safemail.gate import mutate
from safemail.gate.catalogue import load_catalogue
from safemail.gate.mutate import (
    CAUGHT,
    ERROR,
    MISSED,
    UNTESTABLE,
    CommandResult,
    MutateOptions,
    Mutation,
    MutationError,
)
from safemail.gate.verify_run import VerifyOptions, VerifyResult
from safemail.inventory import Host

REPO = Path(__file__).resolve().parents[1]


def _mutation(mid: str = "gate-off", reqs: tuple[str, ...] = ("MAIL-03",), **kw: Any) -> Mutation:
    return Mutation(
        id=mid,
        title=f"{mid} breaks something",
        host=kw.pop("host", "relay1"),
        apply=kw.pop("apply", f"echo apply {mid}"),
        restore=kw.pop("restore", f"echo restore {mid}"),
        requirements=reqs,
        **kw,
    )


HOSTS = {
    "relay1": Host(
        "relay1",
        ("relay",),
        {
            "ansible_host": "198.18.0.16",
            "ansible_user": "root",
            "ansible_ssh_private_key_file": "/var/lib/safemail-lab/ssh/id_ed25519",
            "ansible_ssh_common_args": "-o UserKnownHostsFile=/k -o StrictHostKeyChecking=yes",
        },
    ),
    "auth1": Host("auth1", ("auth",), {"ansible_host": "198.18.0.10", "ansible_user": "admin"}),
}


def _report(statuses: dict[str, str], problems: list[str] | None = None) -> dict[str, Any]:
    rows = []
    for rid, status in statuses.items():
        outcome = {"fail": "failed", "pass": "passed"}.get(status)
        rows.append({"id": rid, "status": status,
                     "tests": [{"id": f"t_{rid}", "outcome": outcome}] if outcome else []})
    return {"requirements": rows, "problems": problems or []}


class Fake:
    """Records remote commands and verify runs; answers from scripted results."""

    def __init__(self, verdicts: list[dict[str, str]] | None = None,
                 rc: dict[str, int] | None = None, interrupt_on_verify: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.verdicts = list(verdicts or [])
        self.rc = rc or {}
        self.interrupt_on_verify = interrupt_on_verify

    def runner(self, host: Host, script: str, timeout: float) -> CommandResult:
        kind = "apply" if "apply" in script else "restore"
        self.calls.append((kind, host.name))
        for key, code in self.rc.items():
            if key in script:
                return CommandResult(code, f"{key} failed")
        return CommandResult(0, "")

    def verifier(self, opts: VerifyOptions, report_dir: Path) -> VerifyResult:
        self.calls.append(("verify", ",".join(opts.requirements) + f"|{opts.keyword}"))
        if self.interrupt_on_verify:
            raise KeyboardInterrupt
        report = _report(self.verdicts.pop(0))
        return VerifyResult(report_dir, report, "digest", 0)


def _run(tmp_path: Path, muts: list[Mutation], fake: Fake, tested: set[str] | None = None,
         **opts: Any) -> mutate.MutationRun:
    return mutate.run_mutations(
        tmp_path, muts, MutateOptions(**opts), tmp_path / "reports",
        hosts=HOSTS, runner=fake.runner, verifier=fake.verifier,
        tested=tested if tested is not None else {"MAIL-03", "MAIL-04", "SYS-03"},
        out=io.StringIO(),
    )


# --- catalogue ------------------------------------------------------------------------------


def test_the_real_catalogue_loads_against_the_requirement_catalogue():
    catalogue = load_catalogue(REPO / "verify" / "requirements.yml")
    muts = mutate.load_mutations(REPO / "verify" / "mutations.yml", catalogue)
    ids = {m.id for m in muts}
    # The list: gate off, open port, egress, volume, CA key, unknown recipient, password.
    assert {"smime-gate-off", "extra-open-port", "egress-allowed", "volume-unmounted",
            "ca-key-world-readable", "unknown-recipient-accepted",
            "admin-password-login"} <= ids
    by_id = {m.id: m for m in muts}
    assert by_id["extra-open-port"].requirements == ("NET-01",)
    assert by_id["egress-allowed"].requirements == ("NET-02",)
    assert by_id["volume-unmounted"].requirements == ("STORE-01",)
    for m in muts:
        assert m.restore.strip() and m.apply.strip()


def _entry(**over: Any) -> dict[str, Any]:
    base = {"id": "gate-off", "title": "gate off", "host": "relay1", "apply": "true",
            "restore": "true", "requirements": ["MAIL-03"]}
    base.update(over)
    return base


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nope": []}, "'mutations:' list"),
        ({"mutations": []}, "lists no mutation"),
        ({"mutations": [_entry(), _entry()]}, "duplicate id"),
        ({"mutations": [_entry(extra=1)]}, "unknown field(s) extra"),
        ({"mutations": [_entry(requirements=[])]}, "non-empty list"),
        ({"mutations": [_entry(requirements=["mail-3"])]}, "malformed requirement"),
        ({"mutations": [_entry(requirements=["XYZ-01"])]}, "not in the catalogue"),
        ({"mutations": [_entry(restore="  ")]}, "'restore' must be a non-empty string"),
        ({"mutations": [_entry(id="Gate Off")]}, "lower-case"),
        ({"mutations": [_entry(keyword="")]}, "-k expression"),
        ({"mutations": "x"}, "'mutations:' list"),
        ({"mutations": ["x"]}, "mutation #1: expected a mapping"),
        ({"mutations": [_entry(id=5)]}, "mutation #1: 'id' must be a non-empty string"),
        ({"mutations": [_entry(requirements="MAIL-03")]}, "non-empty list of ids"),
        ({"mutations": [_entry()], "extra": 1}, "unknown top-level key(s) extra"),
        ({"mutations": [_entry(host=" "), _entry(id="b-2", requirements=["X"])]},
         "'host' must be a non-empty string\n  m.yml: mutation b-2: malformed requirement id(s) X"),
    ],
)
def test_malformed_catalogue_is_refused_with_the_entry_named(data, message):
    with pytest.raises(MutationError) as err:
        mutate.parse_mutations(data, "m.yml", known_ids=["MAIL-03"])
    assert message in err.value.message


def test_select_keeps_catalogue_order_and_refuses_unknown_ids():
    muts = [_mutation("a-1"), _mutation("b-2"), _mutation("c-3")]
    assert [m.id for m in mutate.select(muts, ["c-3", "a-1"])] == ["a-1", "c-3"]
    assert mutate.select(muts, []) == muts
    with pytest.raises(MutationError, match="unknown mutation id"):
        mutate.select(muts, ["zz-9"])


def test_tested_requirements_reads_the_markers(tmp_path):
    (tmp_path / "test_a.py").write_text(
        '@pytest.mark.req("MAIL-03")\ndef test_x(): pass\n'
        '@pytest.mark.req("SYS-04", "SYS-02")\ndef test_y(): pass\n')
    (tmp_path / "helper.py").write_text('@pytest.mark.req("NET-01")\n')
    assert mutate.tested_requirements(tmp_path) == {"MAIL-03", "SYS-04", "SYS-02"}


# --- remote commands ------------------------------------------------------------------------


def test_ssh_command_connects_as_the_inventory_says():
    cmd = mutate.ssh_command(HOSTS["relay1"], "echo hi")
    assert cmd[:3] == ["ssh", "-o", "BatchMode=yes"]
    assert "UserKnownHostsFile=/k" in cmd and "StrictHostKeyChecking=yes" in cmd
    assert cmd[cmd.index("-i") + 1] == "/var/lib/safemail-lab/ssh/id_ed25519"
    assert cmd[-2] == "root@198.18.0.16"
    assert shlex.split(cmd[-1]) == ["sh", "-c", "echo hi"]
    other = mutate.ssh_command(HOSTS["auth1"], "id")
    assert other[-2] == "admin@198.18.0.10"
    assert shlex.split(other[-1]) == ["sudo", "-n", "sh", "-c", "id"]


def test_ssh_runs_in_its_own_session(monkeypatch):
    seen: dict[str, Any] = {}

    def fake_run(cmd, **kw):
        seen.update(kw, cmd=cmd)

        class Done:
            returncode, stdout, stderr = 0, "ok\n", ""

        return Done()

    monkeypatch.setattr(mutate.subprocess, "run", fake_run)
    assert mutate.ssh_runner(HOSTS["relay1"], "true", 5) == CommandResult(0, "ok")
    # A Ctrl-C in the terminal reaches only safemail, which restores before it stops.
    assert seen["start_new_session"] is True and seen["timeout"] == 5


def test_remote_script_sets_the_state_dir_and_fails_early():
    m = _mutation("ca-key")
    script = mutate.remote_script(m, "chmod 0644 k")
    assert script.startswith("set -eu\nM=/run/safemail-mutate/ca-key\n")
    assert "chmod 0644 k" in script and 'rm -rf "$M"' not in script
    cleanup = mutate.remote_script(m, "x", cleanup=True)
    assert 'rm -rf "$M"\nrmdir /run/safemail-mutate 2>/dev/null || true' in cleanup


# --- judging ----------------------------------------------------------------------------------


def test_judge_caught_only_when_every_requirement_fails():
    m = _mutation(reqs=("MAIL-03", "MAIL-04"))
    assert mutate.judge(m, _report({"MAIL-03": "fail", "MAIL-04": "fail"}))[0] == CAUGHT
    status, detail, _ = mutate.judge(m, _report({"MAIL-03": "fail", "MAIL-04": "pass"}))
    assert status == MISSED and "MAIL-04 pass" in detail
    # No test ran for the id (deselected by -k): not caught.
    assert mutate.judge(m, _report({"MAIL-03": "fail", "MAIL-04": "untested"}))[0] == MISSED
    broken = _report({"MAIL-03": "fail", "MAIL-04": "fail"}, problems=["pytest stopped early"])
    assert mutate.judge(m, broken)[0] == ERROR


# --- the run ----------------------------------------------------------------------------------


def test_caught_mutation_applies_verifies_restores_in_order(tmp_path):
    fake = Fake(verdicts=[{"MAIL-03": "fail"}])
    m = _mutation(keyword="gate_refuses")
    run = _run(tmp_path, [m], fake)
    assert [c[0] for c in fake.calls] == ["apply", "verify", "restore"]
    assert fake.calls[1][1] == "MAIL-03|gate_refuses"
    assert run.outcomes[0].status == CAUGHT and run.outcomes[0].restored
    assert run.all_caught and run.score().startswith("1/1 caught")
    saved = json.loads((tmp_path / "reports" / "mutate.json").read_text())
    assert saved["score"] == {"caught": 1, "applied": 1} and saved["all_caught"]


def test_missed_mutation_fails_the_run(tmp_path):
    fake = Fake(verdicts=[{"MAIL-03": "fail"}, {"SYS-03": "pass"}])
    run = _run(tmp_path, [_mutation("a-1"), _mutation("b-2", ("SYS-03",), host="auth1")], fake)
    assert [o.status for o in run.outcomes] == [CAUGHT, MISSED]
    assert not run.all_caught and run.score().startswith("1/2 caught")
    assert "NOT every mutation was caught" in mutate.format_summary(run)


def test_failed_apply_is_an_error_and_still_restores(tmp_path):
    fake = Fake(rc={"apply": 1})
    run = _run(tmp_path, [_mutation()], fake)
    assert [c[0] for c in fake.calls] == ["apply", "restore"]
    assert run.outcomes[0].status == ERROR and "apply failed" in run.outcomes[0].detail
    assert not run.all_caught


def test_verify_that_cannot_run_is_an_error_and_still_restores(tmp_path):
    class Broken(Fake):
        def verifier(self, opts, report_dir):
            self.calls.append(("verify", ""))
            raise mutate.SafeMailError("inventory inventories/test does not exist")

    fake = Broken()
    run = _run(tmp_path, [_mutation()], fake)
    assert [c[0] for c in fake.calls] == ["apply", "verify", "restore"]
    assert run.outcomes[0].status == ERROR and "could not run" in run.outcomes[0].detail


def test_interrupt_during_verify_restores_and_stops(tmp_path):
    fake = Fake(interrupt_on_verify=True)
    run = _run(tmp_path, [_mutation("a-1"), _mutation("b-2")], fake)
    assert [c[0] for c in fake.calls] == ["apply", "verify", "restore"]
    assert run.interrupted and not run.all_caught
    assert [(o.mutation.id, o.status) for o in run.outcomes] == [("a-1", ERROR)]
    assert json.loads((tmp_path / "reports" / "mutate.json").read_text())["interrupted"]


def test_failed_restore_stops_the_run_and_names_the_host(tmp_path):
    fake = Fake(verdicts=[{"MAIL-03": "fail"}], rc={"restore a-1": 1})
    with pytest.raises(MutationError) as err:
        _run(tmp_path, [_mutation("a-1"), _mutation("b-2")], fake)
    assert "RESTORE FAILED" in err.value.message and "relay1" in err.value.message
    assert ("apply", "relay1") in fake.calls and len(fake.calls) == 3  # b-2 never applied


def test_untestable_mutation_is_not_applied(tmp_path):
    fake = Fake()
    run = _run(tmp_path, [_mutation("open-port", ("NET-01",))], fake, tested={"MAIL-03"})
    assert fake.calls == []
    assert run.outcomes[0].status == UNTESTABLE and not run.all_caught
    assert run.score().startswith("0/0")


def test_check_restore_runs_the_tests_again(tmp_path):
    fake = Fake(verdicts=[{"MAIL-03": "fail"}, {"MAIL-03": "pass"}])
    run = _run(tmp_path, [_mutation()], fake, check_restore=True)
    assert [c[0] for c in fake.calls] == ["apply", "verify", "restore", "verify"]
    assert run.outcomes[0].restore_checked and run.all_caught

    still = Fake(verdicts=[{"MAIL-03": "fail"}, {"MAIL-03": "fail"}])
    with pytest.raises(MutationError, match="after restore the tests do not pass"):
        _run(tmp_path, [_mutation()], still, check_restore=True)


def test_baseline_runs_first_and_a_failing_baseline_is_not_applied(tmp_path):
    fake = Fake(verdicts=[{"MAIL-03": "pass"}, {"MAIL-03": "fail"}])
    run = _run(tmp_path, [_mutation()], fake, baseline=True)
    assert [c[0] for c in fake.calls] == ["verify", "apply", "verify", "restore"]
    assert run.all_caught

    failing = Fake(verdicts=[{"MAIL-03": "fail"}])
    run = _run(tmp_path, [_mutation()], failing, baseline=True)
    assert [c[0] for c in failing.calls] == ["verify"]  # never applied, nothing to restore
    assert run.outcomes[0].status == ERROR
    assert "tests fail before the mutation" in run.outcomes[0].detail


def test_only_the_test_stage_is_mutated(tmp_path):
    with pytest.raises(MutationError, match="test stage only"):
        _run(tmp_path, [_mutation()], Fake(), stage="production")


def test_unknown_host_is_refused_before_anything_runs(tmp_path):
    fake = Fake()
    with pytest.raises(MutationError, match="not in the test inventory"):
        _run(tmp_path, [_mutation(host="relay9")], fake)
    assert fake.calls == []


def test_a_redundant_lab_mutation_is_left_out_where_its_host_is_missing_and_said_so(tmp_path):
    fake = Fake(verdicts=[{"MAIL-03": "fail"}])
    muts = [_mutation("gate-off"), _mutation("relay2-gate-off", host="relay2", redundant=True)]
    run = _run(tmp_path, muts, fake, baseline=False)
    assert [o.mutation.id for o in run.outcomes] == ["gate-off"]
    assert run.left_out == ["relay2-gate-off"] and run.all_caught
    assert ("apply", "relay2") not in fake.calls
    written = json.loads((tmp_path / "reports" / "mutate.json").read_text())
    assert written["left_out_no_host"] == ["relay2-gate-off"]
    assert "1 left out (redundant lab only: relay2-gate-off)" in mutate.format_summary(run)


def test_a_run_of_only_redundant_lab_mutations_needs_the_redundant_lab(tmp_path):
    fake = Fake()
    with pytest.raises(MutationError, match="need host.*relay2") as info:
        _run(tmp_path, [_mutation("relay2-gate-off", host="relay2", redundant=True)], fake)
    assert "lab up --redundant" in info.value.hint
    assert fake.calls == []


def test_an_unknown_host_without_the_redundant_flag_is_still_refused(tmp_path):
    muts = [_mutation("a"), _mutation("b", host="relay2")]
    with pytest.raises(MutationError, match="relay2 of the mutation catalogue"):
        _run(tmp_path, muts, Fake())


def test_the_catalogue_marks_the_redundant_lab_mutations():
    catalogue = load_catalogue(REPO / "verify" / "requirements.yml")
    muts = {m.id: m for m in mutate.load_mutations(REPO / "verify" / "mutations.yml", catalogue)}
    for mid, host in (("replica-not-replicating", "auth2"), ("second-relay-gate-off", "relay2")):
        assert muts[mid].redundant and muts[mid].host == host
    assert not muts["smime-gate-off"].redundant


# --- command line ---------------------------------------------------------------------------


def test_cli_lists_the_catalogue(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["verify", "--mutate", "--list"]) == 0
    out = capsys.readouterr().out
    assert "smime-gate-off" in out and "relay1" in out and "MAIL-03" in out
    assert main(["verify", "--mutate", "--list", "--mutations", "ca-key-world-readable"]) == 0
    assert "smime-gate-off" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["verify", "--mutations", "smime-gate-off"], "only go with --mutate"),
        (["verify", "--list"], "only go with --mutate"),
        (["verify", "--baseline"], "only go with --mutate"),
        (["verify", "--mutate", "--stage", "production"], "only --stage test"),
        (["verify", "--mutate", "-k", "relay"], "--mutate chooses the tests"),
        (["verify", "--mutate", "--requirements", "MAIL-03"], "--mutate chooses the tests"),
        (["verify", "--mutate", "--mutations", "no-such"], "unknown mutation id"),
    ],
)
def test_cli_refuses_bad_combinations(monkeypatch, capsys, argv, message):
    monkeypatch.chdir(REPO)
    assert main(argv) != 0
    assert message in capsys.readouterr().err
