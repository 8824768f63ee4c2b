"""The CA policy: what the CA is and what it may issue.

Loaded from a plain dict (the ``ca_policy`` YAML in group_vars, rendered to a file on each CA
host). Unknown keys are refused so that a typo never silently falls back to a default.

Participant keys default to RSA only: the S/MIME tooling of this project (``cryptography``'s
``PKCS7EnvelopeBuilder``) encrypts to RSA recipients only, so an EC participant certificate
could be issued but nobody could encrypt to it. EC P-256/P-384 can be enabled by policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from safemail.ca.errors import PolicyError

CA_KEY_TYPES = ("rsa-4096", "ec-p384")
PARTICIPANT_KEY_TYPES = ("rsa", "ec")
EC_CURVES = ("P-256", "P-384")
RSA_ABSOLUTE_MIN_BITS = 2048

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

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_SPECIALTY_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")


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
        """Validate ``data`` and return a policy; raise :class:`PolicyError` naming the field."""
        if not isinstance(data, dict):
            raise PolicyError("the CA policy must be a mapping of settings")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(
                f"unknown CA policy setting(s): {', '.join(unknown)}",
                f"allowed settings: {', '.join(sorted(known))}",
            )
        for required in ("ca_subject", "mail_domains", "crl_distribution_point"):
            if data.get(required) in (None, "", [], {}):
                raise PolicyError(
                    f"CA policy setting '{required}' is required and has no default",
                    "set it in the ca_policy of the inventory (group_vars)",
                )
        kw: dict[str, Any] = {}
        kw["ca_subject"] = _subject(data["ca_subject"])
        kw["mail_domains"] = _domains(data["mail_domains"])
        kw["crl_distribution_point"] = _url(data["crl_distribution_point"])
        if "ca_key_type" in data:
            kw["ca_key_type"] = _choice("ca_key_type", data["ca_key_type"], CA_KEY_TYPES)
        if "ca_validity_days" in data:
            kw["ca_validity_days"] = _int("ca_validity_days", data["ca_validity_days"], 365, 10950)
        if "ca_path_length" in data:
            if data["ca_path_length"] != 0 or isinstance(data["ca_path_length"], bool):
                raise PolicyError(
                    f"ca_path_length must be 0, got {data['ca_path_length']!r}",
                    "this CA issues participant certificates only, never sub-CAs",
                )
            kw["ca_path_length"] = 0
        ca_days = kw.get("ca_validity_days", cls.ca_validity_days)
        if "ee_validity_days" in data:
            kw["ee_validity_days"] = _int("ee_validity_days", data["ee_validity_days"], 1, 1095)
        if kw.get("ee_validity_days", cls.ee_validity_days) >= ca_days:
            raise PolicyError(
                "ee_validity_days must be shorter than ca_validity_days "
                f"({kw.get('ee_validity_days', cls.ee_validity_days)} >= {ca_days})"
            )
        if "renewal_window_days" in data:
            ee_days = kw.get("ee_validity_days", cls.ee_validity_days)
            kw["renewal_window_days"] = _int(
                "renewal_window_days", data["renewal_window_days"], 1, ee_days
            )
        if "participant_key_types" in data:
            kw["participant_key_types"] = _choices(
                "participant_key_types", data["participant_key_types"], PARTICIPANT_KEY_TYPES
            )
        if "participant_rsa_min_bits" in data:
            bits = _int("participant_rsa_min_bits", data["participant_rsa_min_bits"], 0, 16384)
            if bits < RSA_ABSOLUTE_MIN_BITS:
                raise PolicyError(
                    f"participant_rsa_min_bits must be at least {RSA_ABSOLUTE_MIN_BITS}, "
                    f"got {bits}",
                    "RSA keys below 2048 bits are not safe for confidentiality",
                )
            kw["participant_rsa_min_bits"] = bits
        if "participant_ec_curves" in data:
            kw["participant_ec_curves"] = _choices(
                "participant_ec_curves", data["participant_ec_curves"], EC_CURVES
            )
        if "crl_validity_hours" in data:
            kw["crl_validity_hours"] = _int(
                "crl_validity_hours", data["crl_validity_hours"], 1, 24 * 31
            )
        if "specialty_groups" in data:
            groups = data["specialty_groups"]
            if not isinstance(groups, list) or not groups:
                raise PolicyError("specialty_groups must be a non-empty list of group codes")
            for g in groups:
                if not isinstance(g, str) or not _SPECIALTY_RE.match(g):
                    raise PolicyError(
                        f"specialty group {g!r} is not a valid code",
                        "use upper-case codes such as GP, ENT, LAB, HOSPITAL",
                    )
            if len(set(groups)) != len(groups):
                raise PolicyError("specialty_groups lists a group twice")
            kw["specialty_groups"] = tuple(groups)
        if "participant_number_pattern" in data:
            pattern = data["participant_number_pattern"]
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise PolicyError(
                    f"participant_number_pattern is not a valid regular expression: {exc}"
                ) from exc
            if not (pattern.startswith("^") and pattern.endswith("$")):
                raise PolicyError("participant_number_pattern must be anchored with ^ and $")
            kw["participant_number_pattern"] = pattern
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


# --------------------------------------------------------------------- validators
def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise PolicyError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise PolicyError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _choices(name: str, value: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise PolicyError(f"{name} must be a non-empty list drawn from {', '.join(allowed)}")
    return tuple(_choice(name, v, allowed) for v in value)


def _subject(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise PolicyError(
            "ca_subject must be a mapping such as {C: DE, O: Example Association, CN: SafeMail CA}"
        )
    out: list[tuple[str, str]] = []
    for key, val in value.items():
        if key not in SUBJECT_ATTRS:
            raise PolicyError(
                f"ca_subject attribute {key!r} is not supported",
                f"use {', '.join(SUBJECT_ATTRS)}",
            )
        if not isinstance(val, str) or not val.strip() or len(val) > 64:
            raise PolicyError(f"ca_subject {key} must be a non-empty text of at most 64 characters")
        if key == "C" and not re.fullmatch(r"[A-Z]{2}", val):
            raise PolicyError(f"ca_subject C must be a two-letter country code, got {val!r}")
        out.append((key, val))
    if "CN" not in value:
        raise PolicyError("ca_subject must contain a CN (the CA's name)")
    return tuple(out)


def _domains(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise PolicyError("mail_domains must be a non-empty list of domain names")
    for d in value:
        if not isinstance(d, str) or not _DOMAIN_RE.match(d):
            raise PolicyError(
                f"mail domain {d!r} is not a valid lower-case domain name",
                "write domains in lower case without a trailing dot, e.g. safemail.example",
            )
    return tuple(value)


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise PolicyError("crl_distribution_point must be a URL")
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "ldap") or not parsed.netloc:
        raise PolicyError(
            f"crl_distribution_point must be an http:// or ldap:// URL, got {value!r}",
            "CRLs are signed, so they are fetched over plain http/ldap (RFC 5280 4.2.1.13)",
        )
    return value
