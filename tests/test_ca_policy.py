from __future__ import annotations

from pathlib import Path

import pytest
from test_ca_support import policy_dict

from safemail.ca.errors import PolicyError
from safemail.ca.policy import CaPolicy, load_policy


def test_minimal_policy_gets_safe_defaults() -> None:
    p = CaPolicy.from_dict(policy_dict(ca_key_type="rsa-4096"))
    assert p.ca_key_type == "rsa-4096"
    assert p.ca_path_length == 0
    assert p.participant_rsa_min_bits == 3072
    assert p.participant_key_types == ("rsa",)
    assert {"GP", "ENT", "LAB", "HOSPITAL"} <= set(p.specialty_groups)
    assert p.ca_name().rfc4514_string() == "CN=SafeMail Test CA,O=SafeMail Test Association,C=DE"
    assert p.mailbox_domain_allowed("a@safemail.example")
    assert not p.mailbox_domain_allowed("a@evil.example")


def test_ec_participants_can_be_enabled() -> None:
    p = CaPolicy.from_dict(
        policy_dict(participant_key_types=["rsa", "ec"], participant_ec_curves=["P-384"])
    )
    assert p.participant_key_types == ("rsa", "ec")
    assert p.participant_ec_curves == ("P-384",)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"ca_key_type": "rsa-2048"}, "ca_key_type must be one of rsa-4096, ec-p384"),
        ({"participant_rsa_min_bits": 1024}, "at least 2048"),
        ({"ca_path_length": 1}, "ca_path_length must be 0"),
        ({"ee_validity_days": 4000, "ca_validity_days": 3650}, "between 1 and 1095"),
        ({"ca_validity_days": 300}, "between 365 and 10950"),
        ({"ee_validity_days": 1000, "ca_validity_days": 900}, "shorter than ca_validity_days"),
        ({"participant_key_types": ["dsa"]}, "participant_key_types must be one of"),
        ({"participant_ec_curves": ["P-521"]}, "participant_ec_curves must be one of"),
        ({"crl_validity_hours": 0}, "crl_validity_hours must be between"),
        ({"renewal_window_days": 0}, "renewal_window_days must be between 1 and 730"),
        ({"ee_validity_days": 20, "renewal_window_days": 21}, "between 1 and 20"),
        ({"crl_validity_hours": "48"}, "must be a whole number"),
        ({"mail_domains": ["Safemail.Example"]}, "not a valid lower-case domain"),
        ({"mail_domains": []}, "'mail_domains' is required"),
        ({"crl_distribution_point": "ftp://x/crl"}, "http:// or ldap://"),
        ({"ca_subject": {"O": "x"}}, "must contain a CN"),
        ({"ca_subject": {"CN": "x", "C": "Germany"}}, "two-letter country code"),
        ({"ca_subject": {"CN": "x", "E": "a@b"}}, "attribute 'E' is not supported"),
        ({"specialty_groups": ["GP", "gp"]}, "is not a valid code"),
        ({"specialty_groups": ["GP", "GP"]}, "lists a group twice"),
        ({"participant_number_pattern": "[0-9]+"}, "anchored"),
        ({"crl_validty_hours": 24}, "unknown CA policy setting(s): crl_validty_hours"),
    ],
)
def test_invalid_policy_is_refused_with_a_clear_reason(overrides: dict, fragment: str) -> None:
    with pytest.raises(PolicyError) as exc:
        CaPolicy.from_dict(policy_dict(**overrides))
    assert fragment in exc.value.message


def test_required_field_without_default() -> None:
    data = policy_dict()
    del data["ca_subject"]
    with pytest.raises(PolicyError, match="'ca_subject' is required"):
        CaPolicy.from_dict(data)


def test_load_policy_from_group_vars_yaml(tmp_path: Path) -> None:
    f = tmp_path / "policy.yml"
    f.write_text(
        "ca_policy:\n"
        "  ca_subject: {C: DE, O: Assoc, CN: SafeMail CA}\n"
        "  mail_domains: [safemail.example]\n"
        "  crl_distribution_point: http://ca-dist/crl.der\n"
        "  crl_validity_hours: 24\n"
    )
    assert load_policy(f).crl_validity_hours == 24


def test_load_policy_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("ca_subject: [unclosed\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(bad)
    wrong = tmp_path / "wrong.yml"
    wrong.write_text("mail_domains: [x.example]\n")
    with pytest.raises(PolicyError, match=r"wrong\.yml: .*ca_subject"):
        load_policy(wrong)
