"""The CA policy: what the CA is and what it may issue.

Loaded from a plain dict (the ``ca_policy`` YAML in group_vars, rendered to a file on each CA
host) and checked against ``ca/schemas/policy.schema.json``. Unknown keys are refused so that
a typo never silently falls back to a default.

Participant keys default to RSA only: the S/MIME tooling of this project (``cryptography``'s
``PKCS7EnvelopeBuilder``) encrypts to RSA recipients only, so an EC participant certificate
could be issued but nobody could encrypt to it. EC P-256/P-384 can be enabled by policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from safemail import schemacheck
from safemail.ca.errors import PolicyError

EC_CURVES = ("P-256", "P-384")

DEFAULT_SPECIALTY_GROUPS = (
    "GP",
    "INTERNAL",
    "PEDIATRICS",
    "ENT",
    "EYE",
    "DERMATOLOGY",
    "GYNECOLOGY",
    "ORTHOPEDICS",
    "NEUROLOGY",
    "PSYCHIATRY",
    "RADIOLOGY",
    "SURGERY",
    "UROLOGY",
    "DENTAL",
    "LAB",
    "HOSPITAL",
    "OTHER",
)

# Subject attribute names accepted in ``ca_subject`` (order kept as written).
SUBJECT_ATTRS = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
}

# The schema of the policy file (package data of safemail.ca).
POLICY_SCHEMA = "schemas/policy.schema.json"


@dataclass(frozen=True)
class CaPolicy:
    """Validated CA policy. Build it with :meth:`from_dict` or :func:`load_policy`."""

    ca_subject: tuple[tuple[str, str], ...]
    mail_domains: tuple[str, ...]
    crl_distribution_point: str
    ca_key_type: str = "rsa-4096"
    ca_validity_days: int = 3650
    ca_path_length: int = 0
    ee_validity_days: int = 730
    # A same-key renewal is issued only this many days before the current certificate expires
    # (the signer refuses it earlier: renewal-too-early; docs/ca.md).
    renewal_window_days: int = 30
    participant_key_types: tuple[str, ...] = ("rsa",)
    participant_rsa_min_bits: int = 3072
    participant_ec_curves: tuple[str, ...] = EC_CURVES
    crl_validity_hours: int = 48
    specialty_groups: tuple[str, ...] = DEFAULT_SPECIALTY_GROUPS
    participant_number_pattern: str = r"^[0-9A-Za-z][0-9A-Za-z-]{2,31}$"
    _number_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_number_re", re.compile(self.participant_number_pattern))

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaPolicy:
        """Validate ``data`` and return a policy; raise :class:`PolicyError` naming the field.

        The schema file ``ca/schemas/policy.schema.json`` says what each setting may be; this
        method adds what a schema cannot say (one setting bounded by another, a pattern that
        compiles). The same check runs on the controller (tests, the role's ``validate:``
        input) and on the CA hosts, which load the policy file with Debian bookworm's
        python3-jsonschema 4.10 (roles/safemail_runtime installs it): the schema keeps to
        draft 2020-12 keywords that 4.10 knows (safemail/schemacheck.py).
        """
        if not isinstance(data, dict):
            raise PolicyError("the CA policy must be a mapping of settings")
        found = schemacheck.violations(__package__, POLICY_SCHEMA, data)
        if found:
            unknown = [v.key for v in found if v.kind == "additionalProperties" and not v.path]
            raise PolicyError(
                "CA policy refused: " + "; ".join(v.where("ca_policy") + ": " + v.what
                                                    for v in found),
                f"allowed settings: {', '.join(sorted(_SETTINGS))}" if unknown else
                "fix it in the ca_policy of the inventory (group_vars)",
            )
        kw: dict[str, Any] = {k: v for k, v in data.items() if k in _SETTINGS}
        kw["ca_subject"] = tuple((k, v) for k, v in data["ca_subject"].items())
        domains = data["mail_domains"]
        kw["mail_domains"] = (domains,) if isinstance(domains, str) else tuple(domains)
        for name in ("participant_key_types", "participant_ec_curves", "specialty_groups"):
            if name in kw:
                kw[name] = tuple(kw[name])
        ca_days = kw.get("ca_validity_days", cls.ca_validity_days)
        ee_days = kw.get("ee_validity_days", cls.ee_validity_days)
        if ee_days >= ca_days:
            raise PolicyError(
                f"ee_validity_days must be shorter than ca_validity_days ({ee_days} >= {ca_days})"
            )
        window = kw.get("renewal_window_days", cls.renewal_window_days)
        if window > ee_days:
            raise PolicyError(
                f"renewal_window_days must be between 1 and {ee_days} (ee_validity_days), "
                f"got {window}"
            )
        if "participant_number_pattern" in kw:
            try:
                re.compile(kw["participant_number_pattern"])
            except re.error as exc:
                raise PolicyError(
                    f"participant_number_pattern is not a valid regular expression: {exc}"
                ) from exc
        return cls(**kw)

    # ----------------------------------------------------------------- derived values
    def ca_name(self) -> x509.Name:
        return x509.Name([x509.NameAttribute(SUBJECT_ATTRS[k], v) for k, v in self.ca_subject])

    def signature_hash(self) -> hashes.HashAlgorithm:
        """SHA-384 for a P-384 CA (matching strength), SHA-256 for RSA."""
        return hashes.SHA384() if self.ca_key_type == "ec-p384" else hashes.SHA256()

    def mailbox_domain_allowed(self, mailbox: str) -> bool:
        return mailbox.rpartition("@")[2] in self.mail_domains

    def participant_number_valid(self, number: str) -> bool:
        return bool(self._number_re.match(number))


# The settings a policy may have: CaPolicy's fields (tests/test_ca_policy.py checks that the
# schema's properties are the same).
_SETTINGS = frozenset(f.name for f in fields(CaPolicy) if f.init)


def load_policy(path: Path) -> CaPolicy:
    """Read a policy file (YAML or JSON; a top-level ``ca_policy:`` key is unwrapped)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise PolicyError(
            f"CA policy file {path} does not exist",
            "pass --policy FILE or set SAFEMAIL_CA_POLICY; the ca_hosts role writes it",
        ) from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"CA policy file {path} is not valid YAML: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"ca_policy"}:
        data = data["ca_policy"]
    try:
        return CaPolicy.from_dict(data)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc.message}", exc.hint) from exc
