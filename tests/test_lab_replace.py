"""`safemail lab replace HOST`: a brand-new machine in place of a lab host (AV-01 restore
drills), and the per-host machine creation it shares with `lab up`.

No lab is needed and none is touched: every system command goes to a fake `runner.run`, the
machine starts are fakes that record what they were given, the state lives in a temporary
directory and the SSH wait asks a fake. Only the committed test inventory is read (the plan).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from safemail.errors import SafeMailError
from safemail.lab import image as image_mod
from safemail.lab import stage
from safemail.lab.config import LabPaths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A 'running' default lab in tmp_path: state, known_hosts, machine directories."""
    paths = LabPaths(state=tmp_path / "lab", images=tmp_path / "images")
    st = stage.Stage(paths, ROOT)
    plan = st.plan(redundant=False)
    ran: list[list[str]] = []
    started: list[tuple] = []
    stopped: list[tuple] = []
    info: list[str] = []
    alive: set[int] = set()

    def run(cmd, **kwargs):
        ran.append(list(cmd))
        if cmd[0] == "ssh-keygen":  # the new host key
            key = Path(cmd[cmd.index("-f") + 1])
            key.write_text("private")
            key.with_suffix(".pub").write_text(f"ssh-ed25519 NEW-{cmd[cmd.index('-C') + 1]}\n")
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    def start_nspawn(host, img, mdir):
        started.append(("nspawn", host.name, None, mdir))
        alive.add(5000 + len(started))
        return 5000 + len(started)

    def start_qemu(host, img, mdir, index, bridge_ns):
        started.append(("qemu", host.name, index, mdir, bridge_ns))
        alive.add(5000 + len(started))
        return 5000 + len(started)

    def stop_process(pid, marker):
        stopped.append((pid, marker))
        alive.discard(pid)

    img = image_mod.Image(base=paths.images / "base-x", debs_dir=paths.images / "debs-x",
                          vms={}, wheels=paths.images / "wheels-x", packages=())
    monkeypatch.setattr(stage.runner, "require_root", lambda: None)
    monkeypatch.setattr(stage.runner, "require_tools", lambda *tools: None)
    monkeypatch.setattr(stage.runner, "run", run)
    monkeypatch.setattr(stage.runner, "info", info.append)
    monkeypatch.setattr(stage.machines.runner, "run", run)
    monkeypatch.setattr(stage.machines, "start_nspawn", start_nspawn)
    monkeypatch.setattr(stage.machines, "start_qemu", start_qemu)
    monkeypatch.setattr(stage.machines, "stop_process", stop_process)
    monkeypatch.setattr(stage.machines, "process_alive", lambda pid, marker: pid in alive)
    monkeypatch.setattr(stage.image_mod, "image_for", lambda *a, **k: img)
    monkeypatch.setattr(stage.image_mod, "is_built", lambda image: True)
    monkeypatch.setattr(stage, "NETNS_DIR", tmp_path / "netns")
    monkeypatch.setattr(stage, "NSPAWN_PROPAGATE_DIR", tmp_path / "propagate")
    answered: list[str] = []
    monkeypatch.setattr(st, "answers", lambda address: answered.append(address) or True)
    # What `lab up` left: a process per host, its machine directory, known_hosts, netns.
    processes = {}
    for i, h in enumerate(plan.hosts):
        mdir = paths.machines / h.name
        (mdir / "upper" / "var").mkdir(parents=True)
        (mdir / "upper" / "var" / "old-state").write_text("converged")
        if h.spec.hypervisor == "qemu":
            (mdir / "data.raw").write_text("LUKS")
        processes[h.name] = {"pid": 100 + i, "marker": str(mdir)}
        alive.add(100 + i)
        (tmp_path / "netns" / f"smlab-{h.name}").mkdir(parents=True)
    processes["mirror"] = {"pid": 99, "marker": "safemail.lab.services mirror"}
    alive.add(99)
    paths.ssh_dir.mkdir(parents=True)
    paths.key_file.with_suffix(".pub").write_text("ssh-ed25519 AAAA safemail-lab\n")
    paths.known_hosts.write_text("".join(f"{h.mgmt.address},{h.name} ssh-ed25519 OLD-{h.name}\n"
                                         for h in plan.hosts))
    st.save_state({"complete": True, "all_vms": False, "redundant": False,
                   "namespaces": [f"smlab-{h.name}" for h in plan.hosts], "processes": processes,
                   "root_links": [], "root_routes": [], "image": [p.name for p in img.parts()]})
    ran.clear()
    return SimpleNamespace(stage=st, plan=plan, paths=paths, ran=ran, started=started,
                           stopped=stopped, info=info, alive=alive, answered=answered, img=img)


def _known(lab) -> list[str]:
    return lab.paths.known_hosts.read_text().splitlines()


def _state(lab) -> dict:
    return json.loads(lab.paths.state_file.read_text())


def test_replacing_an_nspawn_host_gives_a_new_machine_on_the_same_namespace(lab):
    host = lab.plan.host("ca-signer")
    index = lab.plan.hosts.index(host)
    before = _state(lab)
    assert lab.stage.replace(["ca-signer"]) == 0
    mdir = lab.paths.machines / "ca-signer"
    # only its process, by its recorded pid and marker
    assert lab.stopped == [(100 + index, str(mdir))]
    # its machine directory was removed: the converged state is gone, the identity is new
    assert not (mdir / "upper" / "var" / "old-state").exists()
    assert (mdir / "upper" / "etc" / "hostname").read_text() == "ca-signer\n"
    assert [s[:2] for s in lab.started] == [("nspawn", "ca-signer")]
    # the namespace and veths of `lab up` are reused: no netns, veth or tap is made
    assert not [c for c in lab.ran if c[0] == "ip"], lab.ran
    # known_hosts: its line replaced in place, every other line kept
    line = f"{host.mgmt.address},ca-signer ssh-ed25519 NEW-ca-signer"
    known = _known(lab)
    assert known[index] == line
    assert len(known) == len(lab.plan.hosts)
    assert all(f"OLD-{h.name}" in known[i] for i, h in enumerate(lab.plan.hosts)
               if h.name != "ca-signer")
    # the state names the new process; the others and the rest of the state are unchanged
    after = _state(lab)
    assert after["processes"]["ca-signer"] == {"pid": 5001, "marker": str(mdir)}
    assert {n: p for n, p in after["processes"].items() if n != "ca-signer"} == {
        n: p for n, p in before["processes"].items() if n != "ca-signer"}
    assert after["namespaces"] == before["namespaces"] and after["complete"] is True
    # waited for that host only, on its management address
    assert set(lab.answered) == {str(host.mgmt.address)}
    assert any("replacing ca-signer" in m for m in lab.info)


def test_replacing_a_vm_removes_its_data_disk_and_reuses_its_taps_by_index(lab):
    host = lab.plan.host("store1")
    index = lab.plan.hosts.index(host)
    assert host.spec.hypervisor == "qemu"
    assert lab.stage.replace(["store1"]) == 0
    mdir = lab.paths.machines / "store1"
    assert lab.stopped == [(100 + index, str(mdir))]
    # the old data disk (its LUKS volume) is gone: start_qemu makes a blank one
    assert not (mdir / "data.raw").exists()
    assert not (mdir / "upper" / "var" / "old-state").exists()
    # the VM's network by MAC and boot settings are written again
    assert (mdir / "upper/etc/systemd/network/10-mgmt0.link").read_text().count(host.mgmt.mac)
    [(kind, name, used_index, used_dir, bridge_ns)] = lab.started
    assert (kind, name, used_dir, bridge_ns) == ("qemu", "store1", mdir, stage.NET_NS)
    # the same index as `lab up` gave it: its tap devices tqNNm/tqNNd, which are checked, not
    # made again
    assert used_index == index
    taps = stage.machines.tap_names(index)
    assert [c for c in lab.ran if c[0] == "ip"] == [
        ["ip", "-n", stage.NET_NS, "link", "show", tap] for tap in taps]
    assert _known(lab)[index] == f"{host.mgmt.address},store1 ssh-ed25519 NEW-store1"
    assert _state(lab)["processes"]["store1"]["pid"] == 5001


def test_up_and_replace_make_the_machine_the_same_way(lab):
    """`lab up`'s _machines and `lab replace` share the per-host creation: up also makes the
    links (netns + veths, taps) with the same index replace reuses."""
    state = _state(lab)
    lab.stage._machines(lab.plan, lab.img, state)
    by_name = {s[1]: s for s in lab.started}
    for i, h in enumerate(lab.plan.hosts):
        if h.spec.hypervisor == "qemu":
            assert by_name[h.name][2] == i
            tap_m, tap_d = stage.machines.tap_names(i)
            assert ["ip", "-n", stage.NET_NS, "tuntap", "add", "dev", tap_m, "mode",
                    "tap"] in lab.ran
            assert ["ip", "-n", stage.NET_NS, "link", "set", tap_d, "master",
                    f"br-{h.data.segment}", "up"] in lab.ran
        else:
            assert ["ip", "netns", "add", f"smlab-{h.name}"] in lab.ran
            assert ["ip", "-n", stage.NET_NS, "link", "add", f"h{i:02d}m", "type", "veth",
                    "peer", "name", f"h{i:02d}mx"] in lab.ran
    assert _known(lab) == [f"{h.mgmt.address},{h.name} ssh-ed25519 NEW-{h.name}"
                           for h in lab.plan.hosts]


def test_two_hosts_at_once_and_a_dead_machine_is_replaced_too(lab):
    lab.alive.discard(100 + lab.plan.hosts.index(lab.plan.host("relay1")))
    assert lab.stage.replace(["relay1", "auth1", "relay1"]) == 0
    assert [s[1] for s in lab.started] == ["relay1", "auth1"]
    assert [m for _, m in lab.stopped] == [str(lab.paths.machines / "auth1")]
    known = _known(lab)
    assert sum("NEW-" in line for line in known) == 2 and len(known) == len(lab.plan.hosts)


def test_unknown_host_is_refused_with_the_valid_names(lab):
    with pytest.raises(SafeMailError) as err:
        lab.stage.replace(["store9"])
    assert "store9" in str(err.value)
    assert "store1" in err.value.hint and "ca-signer" in err.value.hint
    assert lab.stopped == [] and lab.started == []


def test_a_lab_that_is_not_up_or_not_complete_is_refused(lab):
    state = _state(lab)
    state["complete"] = False
    lab.stage.save_state(state)
    with pytest.raises(SafeMailError, match="not complete"):
        lab.stage.replace(["store1"])
    lab.paths.state_file.unlink()
    with pytest.raises(SafeMailError, match="not up") as err:
        lab.stage.replace(["store1"])
    assert "lab up" in err.value.hint
    assert lab.stopped == [] and lab.started == []


def test_missing_links_or_another_image_are_refused_before_anything_stops(lab, monkeypatch):
    (stage.NETNS_DIR / "smlab-auth1").rmdir()
    with pytest.raises(SafeMailError, match="smlab-auth1 is missing"):
        lab.stage.replace(["auth1"])
    monkeypatch.setattr(stage.image_mod, "is_built", lambda image: False)
    with pytest.raises(SafeMailError, match="golden image"):
        lab.stage.replace(["store1"])
    assert lab.stopped == [] and lab.started == []


def test_replace_needs_root(lab, monkeypatch):
    def not_root():
        raise SafeMailError("the lab needs root")

    monkeypatch.setattr(stage.runner, "require_root", not_root)
    with pytest.raises(SafeMailError, match="root"):
        lab.stage.replace(["store1"])
    assert lab.stopped == []


def test_replace_takes_the_lab_lock(lab):
    with lab.stage.locked(), pytest.raises(SafeMailError, match="another lab command"):
        lab.stage.replace(["store1"])
    assert lab.stopped == []


def test_replace_follows_a_redundant_lab(lab):
    state = _state(lab)
    state["redundant"] = True
    lab.stage.save_state(state)
    plan = lab.stage.plan()
    relay2 = plan.host("relay2")
    (stage.NETNS_DIR / "smlab-relay2").mkdir(exist_ok=True)
    assert lab.stage.replace(["relay2"]) == 0
    [(_, name, index, _, _)] = lab.started
    assert (name, index) == ("relay2", plan.hosts.index(relay2))
    assert lab.answered == [str(relay2.mgmt.address)]


def test_cli_has_the_replace_action():
    from safemail.cli import build_parser

    args = build_parser().parse_args(["lab", "replace", "store1", "relay1"])
    assert args.hosts == ["store1", "relay1"]
