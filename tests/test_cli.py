"""The safemail command line: help, argument errors, operator errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from safemail import cli


def test_help_lists_the_lab(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "lab" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["lab"], ["lab", "frobnicate"], ["nosuch"]])
def test_bad_arguments_exit_2_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_lab_ssh_to_unknown_host_names_the_known_ones(capsys):
    rc = cli.main(["lab", "ssh", "nosuchhost", "true"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "no lab host named 'nosuchhost'" in err
    assert "relay" in err


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "safemail.cli", "lab", "--help"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert "status" in proc.stdout
