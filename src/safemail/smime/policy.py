"""The cryptographic policy of the relay's S/MIME gate (issue 17; MAIL-03).

:mod:`safemail.smime.classify` decides whether a message *is* a CMS envelope. This module
decides whether the envelope is made "nach aktuellem Stand der Technik", i.e. with what BSI
TR-02102-1 (version 2024-01) recommends: AES with 128 bits or more in CBC or GCM, RSA keys of
3000 bits or more, ECDH on P-256/384/521 or the brainpool curves, never DES, 3DES or RC2. And
it refuses envelopes that carry readable data outside the encryption (unprotected attributes,
originator info) or whose "encrypted" content is plainly not ciphertext.

The gate sees only what the envelope shows in the clear: algorithm identifiers, their
parameters, the sizes of wrapped keys and of the ciphertext, and the unencrypted parts of the
structure. It cannot see which RSA padding was actually used inside an encrypted key, nor the
real key of an ECDH recipient (only the sender's ephemeral key: its curve by name if the sender
names it, else only the curve's size). docs/mail.md, "Cryptographic policy", says what follows.

The policy is data (:class:`CryptoPolicy`, loadable from YAML or JSON) with hard floors that
no configuration can lower. Standard library and asn1crypto only, like classify.py: this runs
on the relay under Debian's python3-asn1crypto.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from asn1crypto import algos, cms, core

__all__ = [
    "CODE_NOT_CIPHERTEXT",
    "CODE_ORIGINATOR_INFO",
    "CODE_RSA_KEY_TOO_SMALL",
    "CODE_UNKNOWN_CONTENT_CIPHER",
    "CODE_UNPROTECTED_ATTRIBUTES",
    "CODE_UNSUPPORTED_RECIPIENT_KIND",
    "CODE_WEAK_CONTENT_CIPHER",
    "CODE_WEAK_KEY_AGREEMENT",
    "CODE_WEAK_KEY_TRANSPORT",
    "CONTENT_CIPHERS",
    "CURVES",
    "CryptoPolicy",
    "DEFAULT_POLICY",
    "KEY_AGREEMENT",
    "KEY_TRANSPORT",
    "KEY_WRAP",
    "POLICY_CODES",
    "RSA_FLOOR_BITS",
    "Algorithm",
    "check_envelope",
    "load_crypto_policy",
    "looks_like_text",
    "policy_from_mapping",
]

# Refusal codes. Stable, like classify's: the milter logs them and the verify suite matches.
CODE_WEAK_CONTENT_CIPHER = "weak_content_cipher"
CODE_UNKNOWN_CONTENT_CIPHER = "unknown_content_cipher"
CODE_WEAK_KEY_TRANSPORT = "weak_key_transport"
CODE_RSA_KEY_TOO_SMALL = "rsa_key_too_small"
CODE_WEAK_KEY_AGREEMENT = "weak_key_agreement"
CODE_UNSUPPORTED_RECIPIENT_KIND = "unsupported_recipient_kind"
CODE_UNPROTECTED_ATTRIBUTES = "unprotected_attributes"
CODE_ORIGINATOR_INFO = "originator_info"
CODE_NOT_CIPHERTEXT = "not_ciphertext"
POLICY_CODES = (
    CODE_WEAK_CONTENT_CIPHER,
    CODE_UNKNOWN_CONTENT_CIPHER,
    CODE_WEAK_KEY_TRANSPORT,
    CODE_RSA_KEY_TOO_SMALL,
    CODE_WEAK_KEY_AGREEMENT,
    CODE_UNSUPPORTED_RECIPIENT_KIND,
    CODE_UNPROTECTED_ATTRIBUTES,
    CODE_ORIGINATOR_INFO,
    CODE_NOT_CIPHERTEXT,
)
# The code classify.py gives structure it cannot read; used here for cipher parameters that do
# not parse, which is the same kind of fault.
_MALFORMED_CMS = "malformed_cms"

_TR = "BSI TR-02102-1"


# --------------------------------------------------------------------------------------------
# The algorithm catalogue: every algorithm the gate can name. ``permitted`` is the hard floor:
# a policy may allow only permitted algorithms, whatever its file says.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Algorithm:
    """One algorithm the gate knows: policy name, OID, a label for people, floor, details."""

    name: str
    oid: str
    label: str
    permitted: bool
    mode: str = ""  # content ciphers: "cbc", "gcm", "ccm", or "" for the refused rest
    bits: int = 0  # content ciphers: key size


def _aes(bits: int, mode: str, arc: int, permitted: bool = True) -> Algorithm:
    oid = f"2.16.840.1.101.3.4.1.{arc}"
    return Algorithm(f"aes{bits}_{mode}", oid, f"AES-{bits}-{mode.upper()}", permitted, mode, bits)


def _table(items: Iterable[Algorithm]) -> dict[str, Algorithm]:
    return {item.name: item for item in items}


CONTENT_CIPHERS = _table(
    [
        *(_aes(bits, "cbc", arc) for bits, arc in ((128, 2), (192, 22), (256, 42))),
        *(_aes(bits, "gcm", arc) for bits, arc in ((128, 6), (192, 26), (256, 46))),
        *(_aes(bits, "ccm", arc) for bits, arc in ((128, 7), (192, 27), (256, 47))),
        # ECB leaks patterns; OFB and CFB are no S/MIME modes and give no integrity either.
        *(_aes(bits, "ecb", arc, False) for bits, arc in ((128, 1), (192, 21), (256, 41))),
        *(_aes(bits, "ofb", arc, False) for bits, arc in ((128, 3), (192, 23), (256, 43))),
        *(_aes(bits, "cfb", arc, False) for bits, arc in ((128, 4), (192, 24), (256, 44))),
        Algorithm("des_cbc", "1.3.14.3.2.7", "DES-CBC", False),
        Algorithm("des_ede3_cbc", "1.2.840.113549.3.7", "3DES-CBC", False),
        Algorithm("rc2_cbc", "1.2.840.113549.3.2", "RC2-CBC", False),
        Algorithm("rc4", "1.2.840.113549.3.4", "RC4", False),
        Algorithm("rc5_cbc", "1.2.840.113549.3.9", "RC5-CBC", False),
    ]
)

KEY_TRANSPORT = _table(
    [
        Algorithm("rsaes_pkcs1v15", "1.2.840.113549.1.1.1", "RSA PKCS#1 v1.5", True),
        Algorithm("rsaes_oaep", "1.2.840.113549.1.1.7", "RSAES-OAEP", True),
    ]
)


def _ecdh(name: str, oid: str, permitted: bool = True) -> Algorithm:
    """``ecdh_std_sha256kdf`` is labelled ``dhSinglePass-stdDH-sha256kdf-scheme`` (the RFC's)."""
    _, dh, kdf = name.split("_", 2)
    kdf = kdf.replace("_", "-")
    return Algorithm(name, oid, f"dhSinglePass-{dh}DH-{kdf}-scheme", permitted)


KEY_AGREEMENT = _table(
    [
        # RFC 5753 (ECDH in CMS, ANSI X9.63 KDF): SEC 1's secg-scheme arc 1.3.132.1.
        _ecdh("ecdh_std_sha224kdf", "1.3.132.1.11.0"),
        _ecdh("ecdh_std_sha256kdf", "1.3.132.1.11.1"),
        _ecdh("ecdh_std_sha384kdf", "1.3.132.1.11.2"),
        _ecdh("ecdh_std_sha512kdf", "1.3.132.1.11.3"),
        _ecdh("ecdh_cofactor_sha224kdf", "1.3.132.1.14.0"),
        _ecdh("ecdh_cofactor_sha256kdf", "1.3.132.1.14.1"),
        _ecdh("ecdh_cofactor_sha384kdf", "1.3.132.1.14.2"),
        _ecdh("ecdh_cofactor_sha512kdf", "1.3.132.1.14.3"),
        # RFC 8418 (X25519 and X448 in CMS, HKDF).
        _ecdh("ecdh_std_hkdf_sha256", "1.2.840.113549.1.9.16.3.19"),
        _ecdh("ecdh_std_hkdf_sha384", "1.2.840.113549.1.9.16.3.20"),
        _ecdh("ecdh_std_hkdf_sha512", "1.2.840.113549.1.9.16.3.21"),
        # SHA-1 in the KDF (X9.63 arc): what OpenSSL sends unless told otherwise.
        _ecdh("ecdh_std_sha1kdf", "1.3.133.16.840.63.0.2", False),
        _ecdh("ecdh_cofactor_sha1kdf", "1.3.133.16.840.63.0.3", False),
    ]
)

KEY_WRAP = _table(
    [
        Algorithm("aes128_wrap", "2.16.840.1.101.3.4.1.5", "AES-128 key wrap", True),
        Algorithm("aes192_wrap", "2.16.840.1.101.3.4.1.25", "AES-192 key wrap", True),
        Algorithm("aes256_wrap", "2.16.840.1.101.3.4.1.45", "AES-256 key wrap", True),
        # RFC 5649, with padding: sound, but no S/MIME client we know sends it.
        Algorithm("aes128_wrap_pad", "2.16.840.1.101.3.4.1.8", "AES-128 key wrap/pad", True),
        Algorithm("aes192_wrap_pad", "2.16.840.1.101.3.4.1.28", "AES-192 key wrap/pad", True),
        Algorithm("aes256_wrap_pad", "2.16.840.1.101.3.4.1.48", "AES-256 key wrap/pad", True),
        Algorithm("des_ede3_wrap", "1.2.840.113549.1.9.16.3.6", "3DES key wrap", False),
        Algorithm("rc2_wrap", "1.2.840.113549.1.9.16.3.7", "RC2 key wrap", False),
    ]
)


def _curve(name: str, oid: str, label: str, bits: int, permitted: bool = True) -> Algorithm:
    """A named curve of id-ecPublicKey (mode "ec"); ``bits`` is its field size."""
    return Algorithm(name, oid, label, permitted, "ec", bits)


# Named curves of id-ecPublicKey, and the two RFC 8418 key types, which name their curve.
CURVES = _table(
    [
        _curve("secp256r1", "1.2.840.10045.3.1.7", "P-256", 256),
        _curve("secp384r1", "1.3.132.0.34", "P-384", 384),
        _curve("secp521r1", "1.3.132.0.35", "P-521", 521),
        _curve("brainpoolP256r1", "1.3.36.3.3.2.8.1.1.7", "brainpoolP256r1", 256),
        _curve("brainpoolP384r1", "1.3.36.3.3.2.8.1.1.11", "brainpoolP384r1", 384),
        _curve("brainpoolP512r1", "1.3.36.3.3.2.8.1.1.13", "brainpoolP512r1", 512),
        Algorithm("x25519", "1.3.101.110", "X25519", True),
        Algorithm("x448", "1.3.101.111", "X448", True),
        # Below 128 bits of security.
        _curve("secp192r1", "1.2.840.10045.3.1.1", "P-192", 192, False),
        _curve("secp224r1", "1.3.132.0.33", "P-224", 224, False),
        _curve("brainpoolP224r1", "1.3.36.3.3.2.8.1.1.5", "brainpoolP224r1", 224, False),
    ]
)

_BY_OID = {
    table_name: {item.oid: item for item in table.values()}
    for table_name, table in (
        ("content_ciphers", CONTENT_CIPHERS),
        ("key_transport", KEY_TRANSPORT),
        ("key_agreement", KEY_AGREEMENT),
        ("key_wrap", KEY_WRAP),
        ("curves", CURVES),
    )
}
_ID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"

#: No policy may accept RSA keys below this (the CA's absolute floor, src/safemail/ca/policy.py).
RSA_FLOOR_BITS = 2048
_RSA_MAX_BITS = 16384  # a typo guard: nobody has larger keys, and 30720 would refuse all mail

#: AES-GCM/CCM tag lengths accepted (RFC 5084 allows 12..16 for GCM; shorter tags are weak).
MAC_MIN_BYTES, MAC_MAX_BYTES = 12, 16


# --------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CryptoPolicy:
    """What the gate accepts in an envelope. Every field is plain data (YAML: docs/mail.md).

    The defaults follow BSI TR-02102-1 (2024-01). Construction checks the hard floors, so no
    policy object can allow DES, 3DES, RC2, SHA-1 key derivation or RSA keys below 2048 bits.
    """

    #: Content encryption, names from :data:`CONTENT_CIPHERS`. CBC is accepted only in
    #: enveloped-data, GCM and CCM only in authenticated-enveloped-data (RFC 5083/5084).
    content_ciphers: tuple[str, ...] = (
        "aes128_cbc", "aes192_cbc", "aes256_cbc", "aes128_gcm", "aes192_gcm", "aes256_gcm",
    )  # fmt: skip
    #: RSA key transport (KeyTransRecipientInfo), names from :data:`KEY_TRANSPORT`.
    key_transport: tuple[str, ...] = ("rsaes_pkcs1v15", "rsaes_oaep")
    #: Smallest RSA modulus, in bits, judged from the size of each wrapped key.
    rsa_min_bits: int = 3072
    #: ECDH key agreement (KeyAgreeRecipientInfo), names from :data:`KEY_AGREEMENT`. The
    #: SHA-224 KDFs are permitted but not default: TR-02102-1 no longer lists SHA-224.
    key_agreement: tuple[str, ...] = (
        "ecdh_std_sha256kdf", "ecdh_std_sha384kdf", "ecdh_std_sha512kdf",
        "ecdh_cofactor_sha256kdf", "ecdh_cofactor_sha384kdf", "ecdh_cofactor_sha512kdf",
    )  # fmt: skip
    #: The key wrap inside ECDH key agreement, names from :data:`KEY_WRAP`.
    key_wrap: tuple[str, ...] = ("aes128_wrap", "aes192_wrap", "aes256_wrap")
    #: Curves of the sender's ECDH key where the envelope names one, from :data:`CURVES`.
    curves: tuple[str, ...] = (
        "secp256r1", "secp384r1", "secp521r1",
        "brainpoolP256r1", "brainpoolP384r1", "brainpoolP512r1",
    )  # fmt: skip
    #: unprotectedAttrs (enveloped-data) and unauthAttrs (authEnveloped-data) travel in clear.
    allow_unprotected_attributes: bool = False
    #: authAttrs of authEnveloped-data are authenticated but not encrypted: readable as well.
    allow_authenticated_attributes: bool = False
    #: originatorInfo carries certificates and CRLs in clear, which can hold any data.
    allow_originator_info: bool = False

    def __post_init__(self) -> None:
        for key, table in _NAME_FIELDS.items():
            _check_names(key, getattr(self, key), table)
        if not self.content_ciphers:
            raise ValueError("content_ciphers: allow at least one cipher")
        if not self.key_transport and not self.key_agreement:
            raise ValueError("key_transport, key_agreement: allow at least one of them")
        if self.key_agreement and not (self.key_wrap and self.curves):
            raise ValueError("key_wrap, curves: key agreement needs at least one of each")
        if type(self.rsa_min_bits) is not int:
            raise ValueError(f"rsa_min_bits: must be an integer, not {self.rsa_min_bits!r}")
        if not RSA_FLOOR_BITS <= self.rsa_min_bits <= _RSA_MAX_BITS:
            raise ValueError(
                f"rsa_min_bits: must be between {RSA_FLOOR_BITS} and {_RSA_MAX_BITS}, "
                f"not {self.rsa_min_bits}"
            )
        for key in _BOOL_FIELDS:
            if type(getattr(self, key)) is not bool:
                raise ValueError(f"{key}: must be true or false, not {getattr(self, key)!r}")


_NAME_FIELDS: dict[str, Mapping[str, Algorithm]] = {
    "content_ciphers": CONTENT_CIPHERS,
    "key_transport": KEY_TRANSPORT,
    "key_agreement": KEY_AGREEMENT,
    "key_wrap": KEY_WRAP,
    "curves": CURVES,
}
_BOOL_FIELDS = (
    "allow_unprotected_attributes",
    "allow_authenticated_attributes",
    "allow_originator_info",
)


def _check_names(key: str, names: object, table: Mapping[str, Algorithm]) -> None:
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{key}: must be a list of algorithm names, not {names!r}")
    for name in names:
        entry = table.get(name)
        if entry is None:
            known = ", ".join(n for n, a in table.items() if a.permitted)
            raise ValueError(f"{key}: unknown name {name!r} (choose from: {known})")
        if not entry.permitted:
            raise ValueError(
                f"{key}: {name} ({entry.label}) is below the hard floor and cannot be allowed "
                f"({_TR})"
            )


DEFAULT_POLICY = CryptoPolicy()


def policy_from_mapping(data: object) -> CryptoPolicy:
    """Build a policy from a mapping (parsed YAML/JSON); missing keys keep their defaults.

    Raises ValueError naming the key for unknown keys, wrong types and values below a floor.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"the crypto policy must be a mapping, not {type(data).__name__}")
    known = [f.name for f in fields(CryptoPolicy)]
    values: dict[str, object] = {}
    for key, value in data.items():
        if key not in known:
            raise ValueError(
                f"unknown key {key!r} in the crypto policy (known: {', '.join(known)})"
            )
        if key in _NAME_FIELDS:
            # YAML gives lists; a bare string would otherwise be read as a list of letters.
            if not isinstance(value, list | tuple):
                raise ValueError(f"{key}: must be a list of algorithm names, not {value!r}")
            value = tuple(value)
        values[key] = value
    return CryptoPolicy(**values)  # type: ignore[arg-type]


def load_crypto_policy(path: str | os.PathLike[str]) -> CryptoPolicy:
    """Load a policy file: YAML if python3-yaml is installed, else JSON (which YAML reads too).

    Raises ValueError naming the file and the key that is wrong; OSError if it cannot be read.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        return policy_from_mapping(_parse(text))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _parse(text: str) -> object:
    try:
        import yaml
    except ImportError:  # the relay may lack python3-yaml; JSON needs only the stdlib
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON (python3-yaml is not installed): {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Ciphertext plausibility
# --------------------------------------------------------------------------------------------

#: Bytes of the encrypted content the text check reads: enough to judge, cheap on 50 MB.
TEXT_SAMPLE_BYTES = 4096
#: Content of at least this many bytes that is printable throughout is text. Each byte of
#: ciphertext is printable (0x20-0x7e, TAB, CR, LF: 98 of 256 values) with p = 0.383, so 16
#: printable bytes in a row happen by chance with p**16 = 2.1e-7, 32 with 4.5e-14.
TEXT_ALL_PRINTABLE_MIN = 16
#: From this many bytes on, a printable share of TEXT_PRINTABLE_PERCENT or more is text
#: (so that a few binary bytes cannot hide a text). For random bytes the binomial tail
#: P(X >= 0.9 n) with p = 0.383 is largest at n = 32, 1.0e-9, and falls fast (n = 64: 3e-18).
TEXT_RATIO_MIN_BYTES = 32
TEXT_PRINTABLE_PERCENT = 90
_PRINTABLE = bytes(range(0x20, 0x7F)) + b"\t\r\n"


def looks_like_text(data: bytes) -> bool:
    """Whether ``data`` (encrypted content) reads as text rather than ciphertext."""
    sample = bytes(data[:TEXT_SAMPLE_BYTES])
    size = len(sample)
    printable = size - len(sample.translate(None, _PRINTABLE))
    if size >= TEXT_ALL_PRINTABLE_MIN and printable == size:
        return True
    return size >= TEXT_RATIO_MIN_BYTES and printable * 100 >= TEXT_PRINTABLE_PERCENT * size


class _AeadParameters(core.Sequence):
    """GCMParameters and CCMParameters (RFC 5084 §3): asn1crypto 1.5 has no GCM type."""

    _fields = [("aes_nonce", core.OctetString), ("aes_icvlen", core.Integer, {"default": 12})]


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------

Violation = tuple[str, str]


def check_envelope(
    info: cms.ContentInfo,
    policy: CryptoPolicy = DEFAULT_POLICY,
    *,
    ciphertext: tuple[int, bytes] | None = None,
) -> Violation | None:
    """The first policy violation of an enveloped or authEnveloped ContentInfo, or None.

    Returns ``(code, detail)``: a code from :data:`POLICY_CODES` (or ``malformed_cms`` for
    cipher parameters that do not parse) and one sentence a sender can act on. ``info`` must
    have passed classify's structural checks (fully parsed, enveloped, with recipients).

    ``ciphertext`` is ``(length, first bytes)`` of the real encrypted content, for a caller
    that did not keep it whole (the streaming classifier): ``info`` then carries only a
    stand-in, and the checks on the content use these instead. At least the first
    :data:`TEXT_SAMPLE_BYTES` bytes (all of a shorter content) are needed.
    """
    kind = info["content_type"].native
    if kind not in ("enveloped_data", "authenticated_enveloped_data"):
        raise ValueError(f"check_envelope needs enveloped data, got {kind}")
    auth = kind == "authenticated_enveloped_data"
    envelope = info["content"]
    content = envelope["auth_encrypted_content_info" if auth else "encrypted_content_info"]
    return (
        _check_recipients(envelope["recipient_infos"], policy)
        or _check_content_cipher(content["content_encryption_algorithm"], auth, policy)
        or _check_ciphertext(envelope, content, auth, ciphertext)
        or _check_attributes(envelope, auth, policy)
        or _check_originator_info(envelope, policy)
    )


def _allowed(names: Iterable[str], table: Mapping[str, Algorithm]) -> str:
    return ", ".join(table[name].label for name in names)


def _describe_ciphers(names: Iterable[str]) -> str:
    """Say "AES-128/192/256 in CBC or GCM" for the default; list them when sizes differ."""
    by_mode: dict[str, list[int]] = {}
    for name in names:
        entry = CONTENT_CIPHERS[name]
        by_mode.setdefault(entry.mode.upper(), []).append(entry.bits)
    groups = {mode: "/".join(str(b) for b in sorted(bits)) for mode, bits in by_mode.items()}
    if len(set(groups.values())) == 1:
        return f"AES-{next(iter(groups.values()))} in {' or '.join(groups)}"
    return ", ".join(f"AES-{sizes}-{mode}" for mode, sizes in groups.items())


# --- recipients ------------------------------------------------------------------------------

_OTHER_KINDS = {
    "kekri": "a pre-shared key (KEKRecipientInfo)",
    "pwri": "a password (PasswordRecipientInfo)",
    "ori": "another recipient info type (OtherRecipientInfo)",
}


def _check_recipients(recipients: cms.RecipientInfos, policy: CryptoPolicy) -> Violation | None:
    # Every recipient info wraps the same content key, so the weakest one decides.
    for recipient in recipients:
        if recipient.name == "ktri":
            found = _check_ktri(recipient.chosen, policy)
        elif recipient.name == "kari":
            found = _check_kari(recipient.chosen, policy)
        else:
            found = (
                CODE_UNSUPPORTED_RECIPIENT_KIND,
                f"a recipient is reached through {_OTHER_KINDS.get(recipient.name, recipient.name)}"
                ", which this service does not use; encrypt to the recipient's certificate",
            )
        if found:
            return found
    return None


def _check_ktri(ktri: cms.KeyTransRecipientInfo, policy: CryptoPolicy) -> Violation | None:
    oid = ktri["key_encryption_algorithm"]["algorithm"].dotted
    entry = _BY_OID["key_transport"].get(oid)
    if entry is None or entry.name not in policy.key_transport:
        return (
            CODE_WEAK_KEY_TRANSPORT,
            f"key transport {entry.label if entry else oid} is not allowed "
            f"(allowed: {_allowed(policy.key_transport, KEY_TRANSPORT)})",
        )
    # An RSA-encrypted key is exactly as long as the modulus (RFC 8017 I2OSP), so its length
    # shows the recipient key's size, rounded up to whole bytes.
    key_bits = len(ktri["encrypted_key"].native) * 8
    if key_bits < -(-policy.rsa_min_bits // 8) * 8:
        return (
            CODE_RSA_KEY_TOO_SMALL,
            f"a recipient's RSA key has {key_bits} bits, at least {policy.rsa_min_bits} are "
            f"required ({_TR}); that recipient needs a new certificate",
        )
    return None


def _check_kari(kari: cms.KeyAgreeRecipientInfo, policy: CryptoPolicy) -> Violation | None:
    algorithm = kari["key_encryption_algorithm"]
    oid = algorithm["algorithm"].dotted
    entry = _BY_OID["key_agreement"].get(oid)
    if entry is None or entry.name not in policy.key_agreement:
        return (
            CODE_WEAK_KEY_AGREEMENT,
            f"key agreement {entry.label if entry else oid} is not allowed "
            f"(allowed: {', '.join(policy.key_agreement)})",
        )
    return _check_key_wrap(algorithm["parameters"], policy) or _check_originator_key(
        kari["originator"], policy
    )


def _check_key_wrap(parameters: core.Asn1Value, policy: CryptoPolicy) -> Violation | None:
    # RFC 5753: the key agreement algorithm's parameters are the key wrap AlgorithmIdentifier.
    try:
        wrap = algos.AnyAlgorithmIdentifier.load(parameters.dump(), strict=True)
        oid = wrap["algorithm"].dotted
    except Exception:  # noqa: BLE001 - asn1crypto raises many types on hostile input
        return (CODE_WEAK_KEY_AGREEMENT, "the ECDH key agreement names no readable key wrap")
    entry = _BY_OID["key_wrap"].get(oid)
    if entry is None or entry.name not in policy.key_wrap:
        return (
            CODE_WEAK_KEY_AGREEMENT,
            f"key wrap {entry.label if entry else oid} is not allowed "
            f"(allowed: {_allowed(policy.key_wrap, KEY_WRAP)})",
        )
    return None


def _check_originator_key(
    originator: cms.OriginatorIdentifierOrKey, policy: CryptoPolicy
) -> Violation | None:
    # Only an ephemeral originatorKey shows its curve; a static sender key (named by issuer and
    # serial or key id) shows nothing.
    if originator.name != "originator_key":
        return None
    algorithm = originator.chosen["algorithm"]
    oid = algorithm["algorithm"].dotted
    if oid == _ID_EC_PUBLIC_KEY:
        parameters = algorithm["parameters"]
        if isinstance(parameters, core.Void) or parameters.name == "implicit_ca":
            return _check_point_size(originator.chosen["public_key"], policy)
        if parameters.name != "named":
            return (
                CODE_WEAK_KEY_AGREEMENT,
                "the sender's ECDH key has explicit curve parameters; use a named curve "
                f"(allowed: {_allowed(policy.curves, CURVES)})",
            )
        oid = parameters.chosen.dotted
    entry = _BY_OID["curves"].get(oid)
    if entry is None or entry.name not in policy.curves:
        return (
            CODE_WEAK_KEY_AGREEMENT,
            f"the sender's ECDH key is on curve {entry.label if entry else oid}, which is not "
            f"allowed (allowed: {_allowed(policy.curves, CURVES)})",
        )
    return None


def _check_point_size(public_key: core.Asn1Value, policy: CryptoPolicy) -> Violation | None:
    """Without a named curve (RFC 5753 lets the sender leave it out, and OpenSSL does), the
    point's length still shows the curve's size: refuse sizes no allowed curve has. P-256 and
    brainpoolP256r1, say, cannot be told apart this way."""
    point = bytes(public_key.native or b"")
    if point[:1] == b"\x04" and len(point) % 2:
        field_bytes = (len(point) - 1) // 2  # uncompressed: 04 || X || Y
    elif point[:1] in (b"\x02", b"\x03"):
        field_bytes = len(point) - 1  # compressed: 02/03 || X
    else:
        return (CODE_WEAK_KEY_AGREEMENT, "the sender's ECDH key is no readable EC point")
    sizes = {-(-CURVES[n].bits // 8) for n in policy.curves if CURVES[n].mode == "ec"}
    if field_bytes not in sizes:
        return (
            CODE_WEAK_KEY_AGREEMENT,
            f"the sender's ECDH key is on an unnamed {field_bytes * 8}-bit curve, which is not "
            f"allowed (allowed: {_allowed(policy.curves, CURVES)})",
        )
    return None


# --- content encryption ----------------------------------------------------------------------


def _check_content_cipher(
    algorithm: algos.EncryptionAlgorithm, auth: bool, policy: CryptoPolicy
) -> Violation | None:
    oid = algorithm["algorithm"].dotted
    entry = _BY_OID["content_ciphers"].get(oid)
    allowed = f"allowed: {_describe_ciphers(policy.content_ciphers)}, {_TR}"
    if entry is None:
        return (
            CODE_UNKNOWN_CONTENT_CIPHER,
            f"content encryption with the unknown algorithm {oid} is not allowed ({allowed})",
        )
    if entry.name not in policy.content_ciphers:
        return (
            CODE_WEAK_CONTENT_CIPHER,
            f"content encryption {entry.name} is not allowed ({allowed})",
        )
    # GCM/CCM outside authEnveloped-data lose their tag (EnvelopedData has no mac field); CBC
    # inside it claims an authentication it does not give. RFC 5083/5084 define neither.
    if entry.mode == "cbc" and auth:
        return (
            CODE_WEAK_CONTENT_CIPHER,
            f"authenticated-enveloped-data needs AES-GCM, not {entry.label} (RFC 5083)",
        )
    if entry.mode != "cbc" and not auth:
        return (
            CODE_WEAK_CONTENT_CIPHER,
            f"{entry.label} is only valid in authenticated-enveloped-data (RFC 5084), "
            "plain enveloped-data drops its authentication tag",
        )
    return _check_cipher_parameters(algorithm, entry)


def _check_cipher_parameters(
    algorithm: algos.EncryptionAlgorithm, entry: Algorithm
) -> Violation | None:
    parameters = algorithm["parameters"]
    if entry.mode == "cbc":
        if not isinstance(parameters, core.OctetString) or len(parameters.native) != 16:
            return (_MALFORMED_CMS, f"the {entry.label} parameters are not a 16-byte IV")
        return None
    if _aead_parameters(parameters) is None:
        return (_MALFORMED_CMS, f"the {entry.label} parameters (nonce, tag length) are corrupt")
    return None


def _aead_parameters(parameters: core.Asn1Value) -> tuple[bytes, int] | None:
    """(nonce, tag length) of GCM/CCM parameters, or None if they do not parse or are empty."""
    try:
        values = _AeadParameters.load(parameters.dump(), strict=True).native
    except Exception:  # noqa: BLE001 - asn1crypto raises many types on hostile input
        return None
    # asn1crypto keeps elements it has no field for (an OCTET STRING where the INTEGER belongs
    # even reads as "ICV length left out, 12"): only exactly these two fields are valid.
    if list(values) != ["aes_nonce", "aes_icvlen"] or not values["aes_nonce"]:
        return None
    return values["aes_nonce"], values["aes_icvlen"]


# --- ciphertext, attributes, originator info -------------------------------------------------


def _check_ciphertext(
    envelope: core.Sequence,
    content: cms.EncryptedContentInfo,
    auth: bool,
    ciphertext: tuple[int, bytes] | None = None,
) -> Violation | None:
    """Only called for an allowed cipher with valid parameters (checked before)."""
    if ciphertext is None:
        data = content["encrypted_content"].native or b""  # classify refuses a missing one first
        size = len(data)
    else:
        size, data = ciphertext
    if not auth and size % 16:
        return (
            CODE_NOT_CIPHERTEXT,
            f"the encrypted content has {size} bytes, which AES-CBC cannot produce "
            "(it gives whole 16-byte blocks)",
        )
    if auth:
        found = _check_mac(envelope, content)
        if found:
            return found
    if looks_like_text(data):
        return (
            CODE_NOT_CIPHERTEXT,
            "the encrypted content is readable text, not ciphertext; encrypt the message",
        )
    return None


def _check_mac(envelope: core.Sequence, content: cms.EncryptedContentInfo) -> Violation | None:
    mac_len = len(envelope["mac"].native)
    if not MAC_MIN_BYTES <= mac_len <= MAC_MAX_BYTES:
        return (
            CODE_NOT_CIPHERTEXT,
            f"the authentication tag has {mac_len} bytes; "
            f"{MAC_MIN_BYTES} to {MAC_MAX_BYTES} are required",
        )
    parsed = _aead_parameters(content["content_encryption_algorithm"]["parameters"])
    if parsed is not None and parsed[1] != mac_len:
        return (
            CODE_NOT_CIPHERTEXT,
            f"the authentication tag has {mac_len} bytes but the cipher parameters "
            f"announce {parsed[1]}",
        )
    return None


def _present(envelope: core.Sequence, field: str) -> bool:
    return not isinstance(envelope[field], core.Void)


def _check_attributes(
    envelope: core.Sequence, auth: bool, policy: CryptoPolicy
) -> Violation | None:
    unprotected = "unauth_attrs" if auth else "unprotected_attrs"
    if not policy.allow_unprotected_attributes and _present(envelope, unprotected):
        return (
            CODE_UNPROTECTED_ATTRIBUTES,
            "the envelope carries unprotected attributes, which travel unencrypted; "
            "send without them",
        )
    if auth and not policy.allow_authenticated_attributes and _present(envelope, "auth_attrs"):
        return (
            CODE_UNPROTECTED_ATTRIBUTES,
            "the envelope carries authenticated attributes, which are readable by anyone; "
            "send without them",
        )
    return None


def _check_originator_info(envelope: core.Sequence, policy: CryptoPolicy) -> Violation | None:
    if not policy.allow_originator_info and _present(envelope, "originator_info"):
        return (
            CODE_ORIGINATOR_INFO,
            "the envelope carries originator info (certificates or CRLs outside the "
            "encryption); send without it",
        )
    return None
