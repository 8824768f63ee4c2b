"""The container config watch: manifest, diff, log lines (names only, never contents)."""

from __future__ import annotations

import os

from safemail.ops import configwatch as cw


def test_manifest_and_diff(tmp_path):
    root = tmp_path / "postfix"
    root.mkdir()
    (root / "main.cf").write_text("relayhost =\n")
    (root / "sub").mkdir()
    (root / "sub" / "map").write_text("a b\n")
    before = cw.manifest([root, tmp_path / "missing"])
    assert str(tmp_path / "missing") not in before
    (root / "main.cf").write_text("relayhost = [evil]\n")
    (root / "sub" / "map").chmod(0o600)
    (root / "new.cf").write_text("x\n")
    (root / "sub" / "gone").write_text("")
    os.remove(root / "sub" / "gone")
    after = cw.manifest([root])
    changes = dict(cw.diff(before, after))
    # A directory's entry records only its own owner/mode: new files show as themselves.
    assert changes == {
        str(root / "main.cf"): "content changed",
        str(root / "new.cf"): "created",
        str(root / "sub" / "map"): "owner/mode changed",
    }
    (root / "new.cf").unlink()
    assert (str(root / "new.cf"), "removed") in cw.diff(after, cw.manifest([root]))


def test_lines_hold_names_not_contents(tmp_path):
    f = tmp_path / "secret.conf"
    f.write_text("password = hunter2 praxis.mueller@safemail.example\n")
    old = cw.manifest([tmp_path])
    f.write_text("password = other\n")
    out = cw.lines(cw.diff(old, cw.manifest([tmp_path])), first_run=False)
    assert out == [f"config change: {f} content changed"]
    assert "hunter2" not in " ".join(out) and "@" not in " ".join(out)


def test_first_run_records_a_baseline_only(tmp_path):
    assert cw.lines([("x", "created")], first_run=True) == ["config watch: baseline recorded"]


def test_main_persists_manifest(tmp_path, capsys):
    watched = tmp_path / "etc"
    watched.mkdir()
    state = tmp_path / "state.json"
    assert cw.main([str(watched), "--state", str(state), "--no-syslog"]) == 0
    assert "baseline" in capsys.readouterr().out
    (watched / "a.conf").write_text("1")
    assert cw.main([str(watched), "--state", str(state), "--no-syslog"]) == 0
    assert capsys.readouterr().out.strip() == f"config change: {watched / 'a.conf'} created"
    assert oct(state.stat().st_mode & 0o777) == "0o600"


def test_dropped_roots_are_not_reported_file_by_file(tmp_path):
    kept, dropped = tmp_path / "etc", tmp_path / "data"
    kept.mkdir()
    dropped.mkdir()
    (dropped / "praxis.mueller@safemail.example.pem").write_text("cert")
    old = cw.manifest([kept, dropped])
    new = cw.manifest([kept])
    assert cw.diff(cw.within(old, [kept]), new) == []
    assert cw.within({str(tmp_path / "etc2"): {}}, [kept]) == {}
