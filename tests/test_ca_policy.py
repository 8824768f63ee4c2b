from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_ca_support import policy_dict

from safemail import schemacheck
from safemail.ca.errors import PolicyError
from safemail.ca.policy import POLICY_SCHEMA, CaPolicy, load_policy


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
        ({"ca_key_type": "rsa-2048"}, "ca_policy.ca_key_type: 'rsa-2048' is not one of"),
        ({"participant_rsa_min_bits": 1024},
         "ca_policy.participant_rsa_min_bits: must be a whole number of bits from 2048"),
        ({"ca_path_length": 1}, "ca_policy.ca_path_length: must be 0"),
        ({"ee_validity_days": 4000, "ca_validity_days": 3650},
         "ca_policy.ee_validity_days: 4000 is above 1095"),
        ({"ca_validity_days": 300}, "ca_policy.ca_validity_days: 300 is below 365"),
        ({"ee_validity_days": 1000, "ca_validity_days": 900}, "shorter than ca_validity_days"),
        ({"participant_key_types": ["dsa"]},
         "ca_policy.participant_key_types[0]: 'dsa' is not one of"),
        ({"participant_ec_curves": ["P-521"]},
         "ca_policy.participant_ec_curves[0]: 'P-521' is not one of"),
        ({"crl_validity_hours": 0}, "ca_policy.crl_validity_hours: 0 is below 1"),
        ({"renewal_window_days": 0}, "ca_policy.renewal_window_days: 0 is below 1"),
        ({"ee_validity_days": 20, "renewal_window_days": 21}, "between 1 and 20"),
        ({"crl_validity_hours": "48"}, "ca_policy.crl_validity_hours: expected integer, got str"),
        ({"mail_domains": ["Safemail.Example"]},
         "ca_policy.mail_domains: must be a lower-case domain name"),
        ({"mail_domains": []}, "ca_policy.mail_domains: must be a lower-case domain name"),
        ({"crl_distribution_point": "ftp://x/crl"},
         "ca_policy.crl_distribution_point: must be an http:// or ldap:// URL"),
        ({"ca_subject": {"O": "x"}}, "ca_policy.ca_subject: missing key 'CN'"),
        ({"ca_subject": {"CN": "x", "C": "Germany"}},
         "ca_policy.ca_subject.C: must be a two-letter country code"),
        ({"ca_subject": {"CN": "x", "E": "a@b"}}, "ca_policy.ca_subject: unexpected key 'E'"),
        ({"specialty_groups": ["GP", "gp"]},
         "ca_policy.specialty_groups[1]: must be an upper-case group code"),
        ({"specialty_groups": ["GP", "GP"]},
         "ca_policy.specialty_groups: ['GP', 'GP'] has non-unique elements"),
        ({"participant_number_pattern": "^[0-9+$"}, "not a valid regular expression"),
        ({"ca_validity_days": True}, "ca_policy.ca_validity_days: expected integer, got bool"),
        ({"ca_subject": {"CN": " "}}, "ca_policy.ca_subject.CN: must be a non-empty text"),
        ({"crl_distribution_point": "http:///crl"}, "must be an http:// or ldap:// URL"),
        ({"participant_number_pattern": "[0-9]+"},
         "ca_policy.participant_number_pattern: must be a regular expression anchored"),
        ({"crl_validty_hours": 24}, "ca_policy: unexpected key 'crl_validty_hours'"),
    ],
)
def test_invalid_policy_is_refused_with_a_clear_reason(overrides: dict, fragment: str) -> None:
    with pytest.raises(PolicyError) as exc:
        CaPolicy.from_dict(policy_dict(**overrides))
    assert fragment in exc.value.message


def test_required_field_without_default() -> None:
    data = policy_dict()
    del data["ca_subject"]
    with pytest.raises(PolicyError, match="ca_policy: missing key 'ca_subject'"):
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


def test_unknown_setting_names_the_allowed_ones() -> None:
    with pytest.raises(PolicyError) as exc:
        CaPolicy.from_dict(policy_dict(crl_validty_hours=24))
    assert exc.value.hint and "crl_validity_hours" in exc.value.hint


def test_every_violation_is_named_at_once() -> None:
    with pytest.raises(PolicyError) as exc:
        CaPolicy.from_dict(policy_dict(ca_validity_days=10, crl_validity_hours="x"))
    assert "ca_policy.ca_validity_days" in exc.value.message
    assert "ca_policy.crl_validity_hours" in exc.value.message


def test_the_schema_knows_exactly_the_policy_settings() -> None:
    schema = schemacheck.load("safemail.ca", POLICY_SCHEMA)
    init_fields = {f.name for f in dataclasses.fields(CaPolicy) if f.init}
    assert set(schema["properties"]) == init_fields


# The CA hosts check the policy with Debian bookworm's python3-jsonschema 4.10 (ca/policy.py):
# the schema may use only what that release knows. Keywords of draft 2020-12 that 4.10 does
# not know or that behave differently between releases are refused here.
KNOWN_TO_4_10 = {
    "$schema", "$id", "$ref", "$defs", "title", "description", "type", "enum", "const",
    "pattern", "minimum", "maximum", "minLength", "maxLength", "items", "minItems",
    "uniqueItems", "required", "properties", "additionalProperties", "anyOf", "x-must-be",
}


def _keywords(node: object, inside_properties: bool = False) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if not inside_properties:
                found.add(key)
            found |= _keywords(value, key in ("properties", "$defs") and not inside_properties)
    elif isinstance(node, list):
        for item in node:
            found |= _keywords(item)
    return found


def test_the_policy_schema_keeps_to_what_hosts_can_check() -> None:
    schema = schemacheck.load("safemail.ca", POLICY_SCHEMA)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert _keywords(schema) <= KNOWN_TO_4_10, _keywords(schema) - KNOWN_TO_4_10
