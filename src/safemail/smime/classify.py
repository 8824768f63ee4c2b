"""Decide whether a raw mail may pass the relay's S/MIME gate (requirements MAIL-03, MAIL-04).

Only two things are decided here, both as pure functions:

* :func:`classify` — is this RFC 5322 message an S/MIME *enveloped* message, i.e. is its whole
  content encrypted for at least one recipient? Anything else (plain text, multipart of any kind,
  signed-only, compressed, a pkcs7 header over a body that is not a complete CMS structure) is
  refused with a machine code and a reason a person can act on. An envelope must also meet
  the cryptographic policy of :mod:`safemail.smime.policy` (ciphers, key sizes, nothing
  readable outside the encryption).
* :func:`check_subject` — does the (unencrypted) Subject header look like it carries patient
  identifiers? Patterns are data, passed in by the caller (group_vars on the relay); a default
  set is :data:`DEFAULT_SUBJECT_PATTERNS`.

This module runs on the relay under Debian's python3 with python3-asn1crypto: it may import
only the standard library and asn1crypto (never ``cryptography``). :func:`classify` never
raises: hostile input yields a refusal, and an unexpected failure of this code yields the
``internal_error`` verdict, which the milter turns into a temporary failure (fail closed).
"""

from __future__ import annotations

import base64
import binascii
import email.errors
import email.header
import email.message
import email.parser
import email.policy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from asn1crypto import cms

from safemail.smime.policy import (
    CODE_NOT_CIPHERTEXT,
    CODE_ORIGINATOR_INFO,
    CODE_RSA_KEY_TOO_SMALL,
    CODE_UNKNOWN_CONTENT_CIPHER,
    CODE_UNPROTECTED_ATTRIBUTES,
    CODE_UNSUPPORTED_RECIPIENT_KIND,
    CODE_WEAK_CONTENT_CIPHER,
    CODE_WEAK_KEY_AGREEMENT,
    CODE_WEAK_KEY_TRANSPORT,
    DEFAULT_POLICY,
    CryptoPolicy,
    check_envelope,
)

__all__ = [
    "ACCEPTED_CONTENT_TYPES",
    "CODE_NOT_CIPHERTEXT",
    "CODE_ORIGINATOR_INFO",
    "CODE_RSA_KEY_TOO_SMALL",
    "CODE_UNKNOWN_CONTENT_CIPHER",
    "CODE_UNPROTECTED_ATTRIBUTES",
    "CODE_UNSUPPORTED_RECIPIENT_KIND",
    "CODE_WEAK_CONTENT_CIPHER",
    "CODE_WEAK_KEY_AGREEMENT",
    "CODE_WEAK_KEY_TRANSPORT",
    "CryptoPolicy",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_SUBJECT_PATTERNS",
    "ENVELOPED_CONTENT_TYPES",
    "MAX_HEADER_BYTES",
    "SubjectMatch",
    "SubjectPattern",
    "Verdict",
    "check_subject",
    "classify",
    "compile_subject_patterns",
    "decode_subject",
]

#: Largest message classified, in bytes (headers + body as received). Larger mail is refused.
DEFAULT_MAX_SIZE = 50 * 1024 * 1024

#: Largest header section (up to the blank line) read; a longer one is refused as malformed.
#: Mail clients write a few KiB; the bound lets the streaming classifier
#: (:mod:`safemail.smime.stream`) hold the header section in bounded memory and still decide
#: exactly as :func:`classify` does.
MAX_HEADER_BYTES = 256 * 1024
# The longest OBJECT IDENTIFIER (content octets) the gate lets asn1crypto decode. Real ones are
# a few to about 20 bytes; asn1crypto turns each arc into a Python int one 7-bit group at a time,
# which is quadratic in the arc's length (measured: about 180 s of CPU for a 1 MiB arc, inside
# the 1 MiB of structure the streaming gate keeps), so a longer one is refused unread.
MAX_OID_BYTES = 64

#: Top-level media types that may carry an S/MIME enveloped message (RFC 8551 §3.2 and the
#: older x- form still sent by some clients). The smime-type parameter is not trusted: the
#: decision rests on the CMS content itself.
ACCEPTED_CONTENT_TYPES = frozenset({"application/pkcs7-mime", "application/x-pkcs7-mime"})

#: CMS content types that encrypt the content for recipients (RFC 5652 §6, RFC 5083).
ENVELOPED_CONTENT_TYPES = frozenset({"enveloped_data", "authenticated_enveloped_data"})

_REJECT_PREFIX = "523 Encryption Needed: "

# Verdict codes. Stable: the milter logs them and the verify suite matches on them.
ACCEPTED = "accepted"
CODE_TOO_LARGE = "too_large"
CODE_MALFORMED_HEADERS = "malformed_headers"
CODE_AMBIGUOUS_HEADERS = "ambiguous_headers"
CODE_PLAINTEXT = "plaintext"
CODE_MULTIPART = "multipart"
CODE_NOT_SMIME = "not_smime"
CODE_BAD_TRANSFER_ENCODING = "bad_transfer_encoding"
CODE_EMPTY_BODY = "empty_body"
CODE_BAD_BASE64 = "bad_base64"
CODE_MALFORMED_CMS = "malformed_cms"
CODE_SIGNED_ONLY = "signed_only"
CODE_COMPRESSED = "compressed"
CODE_NOT_ENVELOPED = "not_enveloped"
CODE_NO_RECIPIENTS = "no_recipients"
CODE_NO_ENCRYPTED_CONTENT = "no_encrypted_content"
CODE_INTERNAL_ERROR = "internal_error"
# The cryptographic policy's codes (weak_content_cipher, rsa_key_too_small, ...) are defined
# in safemail.smime.policy and re-exported here.

# CMS content types that are not encryption, with the words used in the reason.
_NOT_ENCRYPTED_CMS: dict[str, tuple[str, str]] = {
    "signed_data": (CODE_SIGNED_ONLY, "signed but not encrypted: CMS signed-data"),
    "compressed_data": (CODE_COMPRESSED, "compressed but not encrypted: CMS compressed-data"),
    "data": (CODE_NOT_ENVELOPED, "plain CMS data, not encrypted"),
    "digested_data": (CODE_NOT_ENVELOPED, "digested but not encrypted: CMS digested-data"),
    "authenticated_data": (
        CODE_NOT_ENVELOPED,
        "authenticated but not encrypted: CMS authenticated-data",
    ),
    "encrypted_data": (
        CODE_NOT_ENVELOPED,
        "CMS encrypted-data has no recipients, so no one can decrypt it",
    ),
}

_HEADER_BODY_SEPARATOR = re.compile(rb"\r?\n\r?\n")
_BASE64_WHITESPACE = b" \t\r\n"
# RFC 5322 folding whitespace only: str.strip() would also drop control characters such as
# \x1c-\x1f, which no mail client reads as whitespace.
_HEADER_WHITESPACE = " \t\r\n"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The gate's decision about one message.

    ``code`` is a stable machine code (``accepted`` or a refusal reason such as ``plaintext``);
    ``reason`` is one sentence for the sender, suitable as SMTP reply text.
    """

    accepted: bool
    code: str
    reason: str


def _refuse(code: str, detail: str) -> Verdict:
    return Verdict(False, code, f"{_REJECT_PREFIX}message is not S/MIME encrypted ({detail})")


def classify(
    raw: bytes, max_size: int = DEFAULT_MAX_SIZE, policy: CryptoPolicy | None = None
) -> Verdict:
    """Classify one raw RFC 5322 message (headers and body, as bytes).

    Accepts only a message whose top-level Content-Type is application/(x-)pkcs7-mime, with
    Content-Transfer-Encoding base64 (or binary), whose decoded body is exactly one CMS
    ContentInfo of type enveloped-data or authenticated-enveloped-data with at least one
    RecipientInfo and encrypted content, made as ``policy`` requires (None: the default
    :data:`~safemail.smime.policy.DEFAULT_POLICY`). Never raises.
    """
    try:
        return _classify(raw, max_size, DEFAULT_POLICY if policy is None else policy)
    except Exception as exc:  # noqa: BLE001 - the gate must answer; fail closed (TEMPFAIL)
        return _internal_error(exc)


def _internal_error(exc: BaseException) -> Verdict:
    """The verdict for a failure of the gate's own code: a temporary failure, never a pass."""
    return Verdict(
        False,
        CODE_INTERNAL_ERROR,
        "451 Temporary failure: the S/MIME gate could not check this message "
        f"({type(exc).__name__}); please try again later",
    )


def _too_large(size: int, max_size: int) -> Verdict:
    return _refuse(CODE_TOO_LARGE, f"message of {size} bytes exceeds the limit of {max_size} bytes")


def _classify(raw: bytes, max_size: int, policy: CryptoPolicy) -> Verdict:
    if not isinstance(raw, bytes | bytearray | memoryview):
        return _refuse(CODE_MALFORMED_HEADERS, "input is not a byte string")
    raw = bytes(raw)
    if not raw.strip():
        return _refuse(CODE_EMPTY_BODY, "the message is empty")
    if len(raw) > max_size:
        return _too_large(len(raw), max_size)

    head_end, body_start = _split_point(raw)
    found = _header_verdict(raw[:head_end])
    if isinstance(found, Verdict):
        return found
    body = raw[body_start:]
    if found == "base64":
        compact = body.translate(None, _BASE64_WHITESPACE)
        if not compact:
            return _refuse(CODE_EMPTY_BODY, "the S/MIME body is empty")
        try:
            der = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            return _refuse(CODE_BAD_BASE64, "the S/MIME body is not valid base64")
    else:
        # binary: only the line break that ends the message body may follow the DER structure.
        der = body[:-2] if body.endswith(b"\r\n") else body[:-1] if body.endswith(b"\n") else body
    if not der:
        return _refuse(CODE_EMPTY_BODY, "the S/MIME body is empty")
    return _classify_cms(der, policy)


def _split_point(raw: bytes | bytearray) -> tuple[int, int]:
    """Where the header section ends and the body starts: (head_end, body_start).

    The first empty line (CRLF or LF) separates them; a message that starts with an empty line
    has no header section; one without an empty line is all headers.
    """
    if raw.startswith((b"\r\n", b"\n")):
        return 0, raw.index(b"\n") + 1
    match = _HEADER_BODY_SEPARATOR.search(raw)
    if match is None:
        return len(raw), len(raw)
    return match.start(), match.end()


def _parse_header_section(head: bytes) -> email.message.Message | None:
    """Parsed headers of a header section (without the empty line); None if it is broken."""
    if not head:
        return email.message.Message()
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    headers = parser.parsebytes(head + b"\n\n")
    # A line that is no header makes the parser start the body early, and a first line that is
    # a continuation has no header to belong to: the header section is then not what every
    # mail client would read, so refuse it rather than guess.
    if headers.get_payload() or headers.defects:
        return None
    return headers


def _header_verdict(head: bytes | bytearray) -> Verdict | str:
    """Judge the header section: a refusal, or the transfer encoding ("base64" or "binary")
    under which the body must then be judged."""
    if len(head) > MAX_HEADER_BYTES:
        return _refuse(
            CODE_MALFORMED_HEADERS,
            f"the header section is larger than {MAX_HEADER_BYTES // 1024} KiB",
        )
    headers = _parse_header_section(bytes(head))
    if headers is None:
        return _refuse(CODE_MALFORMED_HEADERS, "the header section is malformed")

    content_types = headers.get_all("Content-Type") or []
    if not content_types:
        return _refuse(CODE_PLAINTEXT, "no Content-Type header, so the mail is plain text")
    if len(content_types) > 1:
        return _refuse(CODE_AMBIGUOUS_HEADERS, "more than one Content-Type header")
    ctype = _media_type(str(content_types[0]))
    if ctype is None:
        return _refuse(CODE_MALFORMED_HEADERS, "the Content-Type header cannot be read")
    if ctype not in ACCEPTED_CONTENT_TYPES:
        return _refuse_media_type(ctype)

    encodings = headers.get_all("Content-Transfer-Encoding") or []
    if len(encodings) > 1:
        return _refuse(CODE_AMBIGUOUS_HEADERS, "more than one Content-Transfer-Encoding header")
    cte = str(encodings[0]).strip(_HEADER_WHITESPACE).lower() if encodings else "7bit"
    if cte in ("base64", "binary"):
        return cte
    return _refuse(
        CODE_BAD_TRANSFER_ENCODING,
        f"Content-Transfer-Encoding {cte[:40]!r} cannot carry S/MIME; use base64",
    )


def _media_type(value: str) -> str | None:
    """The lower-cased type/subtype of a Content-Type value, or None if it has no such form."""
    main = value.split(";", 1)[0].strip(_HEADER_WHITESPACE).lower()
    # RFC 2045 token characters on both sides of exactly one slash.
    if re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9a-z]+/[!#$%&'*+\-.^_`|~0-9a-z]+", main) is None:
        return None
    return main


def _refuse_media_type(ctype: str) -> Verdict:
    if ctype == "multipart/signed":
        return _refuse(CODE_MULTIPART, "found multipart/signed: signed but not encrypted")
    if ctype.startswith("multipart/"):
        return _refuse(
            CODE_MULTIPART,
            f"found {ctype}: the whole message must be one encrypted application/pkcs7-mime part",
        )
    if ctype.startswith("text/"):
        return _refuse(CODE_PLAINTEXT, f"found {ctype}")
    return _refuse(CODE_NOT_SMIME, f"found {ctype[:80]}, expected application/pkcs7-mime")


def find_long_oid(der: bytes, limit: int = MAX_OID_BYTES) -> str | None:
    """Where ``der`` holds an OBJECT IDENTIFIER longer than ``limit`` content bytes:
    "content_type" (the first value inside the outer SEQUENCE), "inner" (anywhere else in its
    constructed values), or None. Reads tag and length headers only, never an OID's value;
    an encoding it cannot follow ends the search (asn1crypto then judges it as before)."""
    pos, size = 0, len(der)
    ends: list[int | None] = []  # enclosing constructed values; None: indefinite length
    first_child = True  # the next header at depth 1 is the content type's
    while pos < size:
        while ends and ends[-1] is not None and pos >= ends[-1]:
            ends.pop()
        ident = der[pos]
        pos += 1
        if ident & 0x1F == 0x1F:  # a tag number in further bytes
            while pos < size and der[pos] & 0x80:
                pos += 1
            pos += 1
        if pos >= size:
            return None
        first = der[pos]
        pos += 1
        length: int | None
        if first == 0x80:
            length = None
        elif first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count > 8 or pos + count > size:
                return None
            length = int.from_bytes(der[pos : pos + count], "big")
            pos += count
        depth = len(ends)
        if ident == 0 and length == 0:  # end of an indefinite-length value
            if not ends or ends[-1] is not None:
                return None
            ends.pop()
            continue
        if depth == 1:
            where, first_child = ("content_type" if first_child else "inner"), False
        else:
            where = "inner"
        if ident & 0x20:  # constructed: read its children
            if length is None:
                ends.append(None)
            else:
                ends.append(pos + length)
            continue
        if length is None:
            return None  # a primitive value cannot have an indefinite length
        if ident == 0x06 and length > limit:
            return where
        pos += length
    return None


def _refuse_content_type(content_type: object) -> Verdict:
    """The refusal for a CMS content type that is not enveloped."""
    code, detail = _NOT_ENCRYPTED_CMS.get(
        content_type,  # type: ignore[arg-type]
        (CODE_NOT_ENVELOPED, "the CMS content type is not enveloped-data"),
    )
    return _refuse(code, detail)


def _classify_cms(
    der: bytes, policy: CryptoPolicy, ciphertext: tuple[int, bytes] | None = None
) -> Verdict:
    """Judge the CMS structure ``der``. ``ciphertext`` (length, first bytes) gives the real
    encrypted content when ``der`` carries only a stand-in for it (the streaming classifier)."""
    long_oid = find_long_oid(der)
    if long_oid == "content_type":  # as if asn1crypto failed reading the content type
        return _refuse(CODE_MALFORMED_CMS, "the body is not a complete CMS structure")
    try:
        info = cms.ContentInfo.load(der, strict=True)
        content_type = info["content_type"].native
    except Exception:  # noqa: BLE001 - asn1crypto raises many types on hostile input
        return _refuse(CODE_MALFORMED_CMS, "the body is not a complete CMS structure")

    if content_type not in ENVELOPED_CONTENT_TYPES:
        return _refuse_content_type(content_type)
    if long_oid is not None:  # as if the full parse failed on it, without spending the CPU
        return _refuse(CODE_MALFORMED_CMS, "the CMS enveloped-data structure is corrupt")

    try:
        # Force a full parse of every nested value so that corrupt inner structures are
        # refused here rather than trusted.
        _ = info.native
        envelope = info["content"]
        recipients = envelope["recipient_infos"]
        recipient_count = len(recipients)
        info_field = (
            "encrypted_content_info"
            if content_type == "enveloped_data"
            else "auth_encrypted_content_info"
        )
        encrypted = envelope[info_field]["encrypted_content"].native
        if encrypted is None:
            has_content = False
        else:
            has_content = (len(encrypted) if ciphertext is None else ciphertext[0]) > 0
    except Exception:  # noqa: BLE001 - see above
        return _refuse(CODE_MALFORMED_CMS, "the CMS enveloped-data structure is corrupt")

    if recipient_count < 1:
        return _refuse(CODE_NO_RECIPIENTS, "the CMS envelope has no recipients")
    if not has_content:
        return _refuse(CODE_NO_ENCRYPTED_CONTENT, "the CMS envelope carries no encrypted content")
    # Structure first, so every existing refusal keeps its code; then how it is encrypted.
    violation = check_envelope(info, policy, ciphertext=ciphertext)
    if violation is not None:
        return _refuse(*violation)
    kind = "authEnveloped" if content_type == "authenticated_enveloped_data" else "enveloped"
    return Verdict(True, ACCEPTED, f"S/MIME {kind} message for {recipient_count} recipient(s)")


# --------------------------------------------------------------------------------------------
# Subject policy (MAIL-04)
# --------------------------------------------------------------------------------------------

#: Default patterns for patient identifiers in the unencrypted Subject header. Sites override
#: them in group_vars as a list of ``{name, regex}`` mappings (Python ``re`` syntax).
DEFAULT_SUBJECT_PATTERNS: tuple[Mapping[str, str], ...] = (
    # Krankenversichertennummer (eGK): one capital letter and nine digits, e.g. A123456789.
    {"name": "kvnr", "regex": r"(?<![A-Za-z0-9])[A-Z][0-9]{9}(?![0-9])"},
    # An insurance number announced as such, whatever its form.
    {
        "name": "insurance_number_label",
        "regex": r"(?i)\b(?:kvnr|versichertennr\.?|versichertennummer|vers\.?-?nr\.?)\s*:?\s*\w",
    },
    # A date of birth announced as such: "geb. 1.2.1960", "geboren am 01.02.60", "DOB: 1960-02-01",
    # "* 01.02.1960".
    {
        "name": "date_of_birth",
        "regex": (
            r"(?i)(?:\bgeb(?:\.|oren)?(?:\s+am)?|\bdob|\bborn|\bgeburtsdatum|\*)\s*:?\s*"
            r"(?:\d{1,2}\.\s?\d{1,2}\.\s?\d{2,4}|\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}/\d{2,4})"
        ),
    },
    # A full date in the 20th century is almost always a date of birth in this service.
    {
        "name": "date_19xx",
        "regex": r"(?<!\d)(?:0?[1-9]|[12]\d|3[01])\.\s?(?:0?[1-9]|1[0-2])\.\s?19\d{2}(?!\d)",
    },
    # "Patient: Müller", "Patientin: Erika Muster", "Pat.: M.", "Name: ...".
    {
        "name": "patient_name",
        "regex": r"(?i)(?:\bpatient(?:in)?|\bpat\.|\bname)\s*:\s*\S",
    },
)

#: Longest decoded subject examined; longer subjects are cut (RFC 5322 lines are 998 octets).
MAX_SUBJECT_LENGTH = 4096


@dataclass(frozen=True, slots=True)
class SubjectPattern:
    """One compiled subject pattern, named for the log and the SMTP reply."""

    name: str
    regex: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class SubjectMatch:
    """Result of :func:`check_subject`: ``pattern`` names the first matching pattern."""

    matched: bool
    pattern: str | None = None


def compile_subject_patterns(
    items: Iterable[Mapping[str, str]] = DEFAULT_SUBJECT_PATTERNS,
) -> tuple[SubjectPattern, ...]:
    """Compile ``{name, regex}`` mappings; raise ValueError naming the entry that is wrong."""
    compiled: list[SubjectPattern] = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"subject pattern #{index + 1} is not a mapping with name and regex")
        name, regex = item.get("name"), item.get("regex")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"subject pattern #{index + 1} has no name")
        if not isinstance(regex, str) or not regex:
            raise ValueError(f"subject pattern {name!r} has no regex")
        try:
            compiled.append(SubjectPattern(name.strip(), re.compile(regex)))
        except re.error as exc:
            raise ValueError(f"subject pattern {name!r} is not a valid regex: {exc}") from exc
    return tuple(compiled)


def decode_subject(value: str | bytes | None) -> str:
    """Decode RFC 2047 encoded words and unfold a raw Subject value; never raises."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = value[: MAX_SUBJECT_LENGTH * 4]
    try:
        text = str(email.header.make_header(email.header.decode_header(value)))
    except Exception:  # noqa: BLE001 - malformed encoded words: fall back to the raw text
        text = value
    return re.sub(r"\s+", " ", text).strip()[:MAX_SUBJECT_LENGTH]


def check_subject(subject: str | bytes | None, patterns: Iterable[SubjectPattern]) -> SubjectMatch:
    """Return whether the (decoded) subject matches any pattern, and the first one's name.

    Both the decoded text and the raw value are checked, so encoded words cannot hide an
    identifier and a failed decode cannot either.
    """
    if subject is None:
        return SubjectMatch(False)
    raw = subject.decode("utf-8", "replace") if isinstance(subject, bytes) else subject
    candidates = (decode_subject(raw), raw[:MAX_SUBJECT_LENGTH])
    for pattern in patterns:
        for text in candidates:
            if pattern.regex.search(text):
                return SubjectMatch(True, pattern.name)
    return SubjectMatch(False)
