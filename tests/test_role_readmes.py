"""roles/<role>/README.md carry the settings their meta/argument_specs.yml gives, now."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from safemail.cli import main
from safemail.docs import readmes
from safemail.docs.roles import read_role
from safemail.errors import SafeMailError

REPO = Path(__file__).resolve().parents[1]


def test_every_role_has_a_current_readme() -> None:
    found = readmes.readmes(REPO / "roles")
    assert {r.path.parent.name for r in found} == {
        d.name for d in (REPO / "roles").iterdir() if d.is_dir()}
    stale = [str(r.path.relative_to(REPO)) for r in found if not r.current]
    assert stale == [], "run `safemail docs readmes` and commit the READMEs"


def _copy_role(tmp_path: Path, name: str = "service_tls") -> Path:
    roles = tmp_path / "roles"
    shutil.copytree(REPO / "roles" / name, roles / name)
    return roles


def test_a_changed_spec_makes_the_readme_stale_and_check_fails(tmp_path, monkeypatch,
                                                               capsys) -> None:
    roles = _copy_role(tmp_path)
    (tmp_path / "ansible.cfg").write_text("[defaults]\n")
    (tmp_path / "inventories").mkdir()
    monkeypatch.setenv("SAFEMAIL_PROJECT", str(tmp_path))
    assert main(["docs", "readmes", "--check"]) == 0
    spec = roles / "service_tls" / "meta" / "argument_specs.yml"
    spec.write_text(spec.read_text().replace("default: 397", "default: 90"))
    assert main(["docs", "readmes", "--check"]) == 1
    assert "stale: roles/service_tls/README.md" in capsys.readouterr().out
    assert main(["docs", "readmes"]) == 0
    assert "| `service_tls_valid_days` | int | no | `90` |" in (
        roles / "service_tls" / "README.md").read_text()
    assert main(["docs", "readmes", "--check"]) == 0
    assert main(["docs", "all", "--check"]) == 2  # --check is for readmes only


def test_hand_written_text_around_the_part_is_kept(tmp_path) -> None:
    roles = _copy_role(tmp_path)
    role = read_role(roles / "service_tls")
    part = readmes.render_part(role)
    hand = f"# Mine\n\nIntro.\n\n{readmes.BEGIN}\nold settings\n{readmes.END}\n\n## Notes\n\nx\n"
    merged = readmes.merge(hand, role)
    assert merged.startswith("# Mine\n\nIntro.\n\n") and merged.endswith("\n\n## Notes\n\nx\n")
    assert "old settings" not in merged and part.rstrip("\n") in merged
    assert readmes.merge(merged, role) == merged  # idempotent
    appended = readmes.merge("# Mine\n", role)
    assert appended == "# Mine\n\n" + part
    with pytest.raises(SafeMailError, match="markers"):
        readmes.merge(f"{readmes.BEGIN}\nno end\n", role)
