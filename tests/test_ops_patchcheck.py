"""The host-side patch checker: parsing apt's simulation, status records, the log line."""

from __future__ import annotations

import ast
import datetime as dt
import json
import sys
from pathlib import Path

import pytest

from safemail.ops import patchcheck as pc

NOW = dt.datetime(2026, 11, 28, 15, 0, tzinfo=dt.UTC)

# Real shapes of `LC_ALL=C apt-get -s upgrade --with-new-pkgs` on bookworm.
SIMULATION = """\
Reading package lists...
Building dependency tree...
Reading state information...
Calculating upgrade...
The following packages will be upgraded:
  libc-bin libc6 lsb-base
3 upgraded, 1 newly installed, 0 to remove and 0 not upgraded.
Inst libc6 [2.36-9+deb12u4] (2.36-9+deb12u7 {SEC} [amd64]) []
Inst libc-bin [2.36-9+deb12u4] (2.36-9+deb12u7 {SEC} [amd64])
Inst lsb-base [11.6] (11.6+safemail1 SafeMail lab mirror:bookworm/bookworm [all])
Inst linux-image-6.1.0-99-cloud-amd64 (6.1.999-1 Debian:12.7/stable [amd64])
Conf libc6 (2.36-9+deb12u7 {SEC} [amd64])
Conf lsb-base (11.6+safemail1 SafeMail lab mirror:bookworm/bookworm [all])
""".format(SEC="Debian:12.7/stable, Debian-Security:12/stable-security")


def test_parse_simulation_security_first_with_versions():
    pending = pc.parse_simulation(SIMULATION)
    assert [p.package for p in pending] == [
        "libc-bin", "libc6", "linux-image-6.1.0-99-cloud-amd64", "lsb-base"]
    libc = next(p for p in pending if p.package == "libc6")
    assert (libc.installed, libc.candidate, libc.security, libc.arch) == (
        "2.36-9+deb12u4", "2.36-9+deb12u7", True, "amd64")
    assert libc.origins == ("Debian:12.7/stable", "Debian-Security:12/stable-security")
    lsb = next(p for p in pending if p.package == "lsb-base")
    assert (lsb.installed, lsb.candidate, lsb.security) == ("11.6", "11.6+safemail1", False)
    new = next(p for p in pending if p.package.startswith("linux-image"))
    assert new.installed is None and new.candidate == "6.1.999-1"


def test_nothing_pending():
    out = ("Reading package lists...\n"
           "0 upgraded, 0 newly installed, 0 to remove and 0 not upgraded.\n")
    assert pc.parse_simulation(out) == []


def test_unparseable_inst_line_is_an_error_not_a_short_list():
    with pytest.raises(ValueError, match="unexpected"):
        pc.parse_simulation("Inst weird-line-without-parens\n")


@pytest.mark.parametrize("origins,expected", [
    (("Debian-Security:12/stable-security",), True),
    (("Debian:12.7/stable",), False),
    (("SafeMail lab mirror:/bookworm-security",), True),
    ((), False),
])
def test_is_security(origins, expected):
    assert pc.is_security(origins) is expected


def test_status_roundtrip_and_counts():
    status = pc.build_status("relay1", NOW, SIMULATION, reboot_flag=True,
                             reboot_pkgs="libc6\nlinux-image-cloud-amd64\nlibc6\n")
    data = status.to_json()
    assert data["schema"] == 1 and data["ok"] is True
    assert data["checked_at"] == "2026-11-28T15:00:00Z"
    assert data["pending_count"] == 4 and data["security_count"] == 2
    assert data["reboot_packages"] == ["libc6", "linux-image-cloud-amd64"]
    again = pc.load_status(json.loads(json.dumps(data)))
    assert again == status


def test_failed_check_is_recorded_not_hidden():
    status = pc.build_status("auth1", NOW, None, reboot_flag=False, error="apt-get update failed")
    assert status.ok is False and status.pending == []
    assert pc.summary_line(status) == "patch check failed: apt-get update failed"
    bad = pc.build_status("auth1", NOW, "Inst ???\n", reboot_flag=False)
    assert bad.ok is False and "unexpected" in bad.error


def test_load_status_rejects_unknown_schema():
    with pytest.raises(ValueError, match="schema"):
        pc.load_status({"schema": 99})


def test_summary_line_names_packages_only():
    status = pc.build_status("h", NOW, SIMULATION, reboot_flag=False)
    line = pc.summary_line(status)
    assert line.startswith("patch check: pending=4 security=2 reboot_required=no")
    assert "security_packages=libc-bin,libc6" in line
    assert "other_packages=linux-image-6.1.0-99-cloud-amd64,lsb-base" in line


def test_write_status_is_atomic_and_world_readable(tmp_path):
    target = tmp_path / "sub" / "patch-status.json"
    pc.write_status(pc.build_status("h", NOW, SIMULATION, reboot_flag=False), target)
    assert json.loads(target.read_text())["pending_count"] == 4
    assert oct(target.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in target.parent.iterdir()] == ["patch-status.json"]


def test_main_writes_status_with_fake_apt(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_apt(args, timeout):
        calls.append(args)
        return SIMULATION if "-s" in args else ""

    monkeypatch.setattr(pc, "_apt", fake_apt)
    target = tmp_path / "status.json"
    assert pc.main(["--status-file", str(target), "--no-syslog"]) == 0
    assert calls[0] == ["-q", "update"] and "-s" in calls[1]
    assert "pending=4" in capsys.readouterr().out
    def failing_apt(args, timeout):
        raise pc.CheckError("E: boom")

    monkeypatch.setattr(pc, "_apt", failing_apt)
    assert pc.main(["--status-file", str(target), "--no-syslog"]) == 1
    assert json.loads(target.read_text())["error"] == "E: boom"


def top_level_imports(path: Path) -> set[str]:
    """The top-level package of every absolute import in the Python file ``path``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", ["patchcheck", "configwatch"])
def test_host_side_scripts_use_only_the_standard_library(module):
    """They run on hosts as standalone scripts with Debian's python3 (no safemail package)."""
    names = top_level_imports(Path(pc.__file__).with_name(f"{module}.py"))
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
