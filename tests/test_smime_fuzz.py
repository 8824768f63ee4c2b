"""Fuzzing the S/MIME gate (bad input gets a clear answer; MAIL-03;
docs/architecture.md#quality-bars).

Properties: :func:`classify` never raises, always returns a Verdict with a one-line reason, and
never accepts a message unless an independent check (written here, separately from the
classifier) finds a single top-level application/(x-)pkcs7-mime part whose body decodes to a
complete enveloped CMS structure with at least one recipient.
"""

from __future__ import annotations

import base64
import binascii
import re

import pytest
from asn1crypto import cms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safemail.smime import samples
from safemail.smime.classify import Verdict, classify
from safemail.smime.policy import POLICY_CODES

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID = samples.smime_message(samples.enveloped_der(recipients=("issuer_serial", "subject_key_id")))
VALID_AUTH = samples.smime_message(samples.enveloped_der(auth=True))
HEAD, BODY = VALID.split(b"\r\n\r\n", 1)


def independent_oracle(raw: bytes) -> bool:
    """A second, simpler opinion: could this message be a genuine enveloped S/MIME mail?"""
    match = re.search(rb"\r?\n\r?\n", raw)
    if match is None:
        return False
    head, body = raw[: match.start()], raw[match.end() :]
    unfolded = re.sub(rb"\r?\n[ \t]", b" ", head)
    fields = [line.split(b":", 1) for line in re.split(rb"\r?\n", unfolded)]
    if any(len(f) != 2 for f in fields):
        return False
    ctypes = [v.strip().lower() for k, v in fields if k.strip().lower() == b"content-type"]
    ctes = [
        v.strip().lower() for k, v in fields if k.strip().lower() == b"content-transfer-encoding"
    ]
    if len(ctypes) != 1 or len(ctes) != 1 or ctes[0] != b"base64":
        return False
    if ctypes[0].split(b";")[0].strip() not in (
        b"application/pkcs7-mime",
        b"application/x-pkcs7-mime",
    ):
        return False
    try:
        der = base64.b64decode(re.sub(rb"\s", b"", body), validate=True)
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native not in ("enveloped_data", "authenticated_enveloped_data"):
            return False
        info.native  # full parse  # noqa: B018
        return len(info["content"]["recipient_infos"]) >= 1
    except (ValueError, TypeError, KeyError, IndexError, binascii.Error, OverflowError):
        return False


def check(raw: bytes) -> Verdict:
    verdict = classify(raw, max_size=2_000_000)
    assert isinstance(verdict, Verdict)
    assert isinstance(verdict.reason, str) and verdict.reason
    assert "\n" not in verdict.reason
    assert verdict.code != "internal_error", verdict.reason
    if verdict.accepted:
        assert independent_oracle(raw), "accepted a message the oracle rejects"
    return verdict


def test_oracle_agrees_on_the_samples() -> None:
    """The oracle is not vacuous: it accepts the valid messages and rejects the refused ones."""
    for sample in samples.accepted_samples():
        if sample.name != "binary_transfer_encoding":
            assert independent_oracle(sample.message), sample.name
    for sample in samples.refused_samples():
        if sample.code not in ("no_encrypted_content", "ambiguous_headers", *POLICY_CODES):
            assert not independent_oracle(sample.message), sample.name
    assert classify(VALID).accepted and classify(VALID_AUTH).accepted


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(raw: bytes) -> None:
    check(raw)


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_body_under_smime_headers(body: bytes) -> None:
    check(HEAD + b"\r\n\r\n" + body)


@FUZZ
@given(st.binary(min_size=1, max_size=1024))
def test_arbitrary_der_base64_encoded(der: bytes) -> None:
    check(samples.smime_message(der))


@FUZZ
@given(st.sampled_from([VALID, VALID_AUTH]), st.data())
def test_truncation_is_refused(valid: bytes, data: st.DataObject) -> None:
    """Cutting anything off the base64 content (not just trailing whitespace) is refused."""
    content_end = len(valid.rstrip())
    cut = data.draw(st.integers(min_value=0, max_value=content_end - 1))
    verdict = check(valid[:cut])
    assert not verdict.accepted


@FUZZ
@given(st.sampled_from([VALID, VALID_AUTH]), st.data())
def test_bit_flips(valid: bytes, data: st.DataObject) -> None:
    raw = bytearray(valid)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        pos = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[pos] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    check(bytes(raw))


@FUZZ
@given(st.sampled_from([VALID, VALID_AUTH]), st.data())
def test_der_mutations(valid: bytes, data: st.DataObject) -> None:
    """Flip, drop or insert bytes inside the DER, then re-encode it correctly as base64."""
    der = bytearray(samples.enveloped_der(auth=valid is VALID_AUTH))
    op = data.draw(st.sampled_from(["flip", "drop", "insert", "truncate", "append"]))
    pos = data.draw(st.integers(min_value=0, max_value=len(der) - 1))
    if op == "flip":
        der[pos] ^= data.draw(st.integers(min_value=1, max_value=255))
    elif op == "drop":
        del der[pos : pos + data.draw(st.integers(min_value=1, max_value=8))]
    elif op == "insert":
        der[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    elif op == "truncate":
        del der[pos:]
    else:
        der += data.draw(st.binary(min_size=1, max_size=8))
    verdict = check(samples.smime_message(bytes(der)))
    if op in ("truncate", "append"):
        assert not verdict.accepted


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.+", min_size=1, max_size=12)
_MEDIA = st.one_of(
    st.sampled_from(
        [
            "application/pkcs7-mime",
            "application/x-pkcs7-mime",
            "APPLICATION/PKCS7-MIME",
            "application/pkcs7-signature",
            "application/octet-stream",
            "multipart/mixed",
            "multipart/signed",
            "text/plain",
            "text/html",
            "message/rfc822",
        ]
    ),
    st.builds(lambda a, b: f"{a}/{b}", _TOKEN, _TOKEN),
    st.text(max_size=30).filter(lambda s: "\r" not in s and "\n" not in s),
)
_PARAMS = st.lists(
    st.sampled_from(
        [
            "smime-type=enveloped-data",
            'smime-type="signed-data"',
            "smime-type=authEnveloped-data",
            "smime-type=compressed-data",
            'name="smime.p7m"',
            'boundary="xyz"',
            "charset=utf-8",
        ]
    ),
    max_size=3,
)


@FUZZ
@given(_MEDIA, _PARAMS, st.sampled_from(["base64", "BASE64", "7bit", "quoted-printable", "x"]))
def test_random_content_types(media: str, params: list[str], cte: str) -> None:
    """Accepted exactly when the media type is pkcs7-mime and the encoding is base64."""
    content_type = "; ".join([media, *params])
    raw = samples.mime_message(
        samples.base64_lines(samples.enveloped_der()),
        content_type=content_type,
        transfer_encoding=cte,
    )
    verdict = check(raw)
    expected = (
        media.strip().lower() in ("application/pkcs7-mime", "application/x-pkcs7-mime")
        and cte.lower() == "base64"
    )
    assert verdict.accepted is expected, (content_type, cte, verdict)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Subject", "Content-Type", "X-Foo", "Received", "MIME-Version"]),
            st.text(max_size=40).filter(lambda s: "\r" not in s and "\n" not in s),
        ),
        max_size=4,
    )
)
def test_extra_headers(extra: list[tuple[str, str]]) -> None:
    """Extra headers never make a refused message accepted; a second Content-Type refuses."""
    raw = samples.smime_message(samples.enveloped_der(), extra_headers=extra)
    verdict = check(raw)
    if any(name == "Content-Type" for name, _ in extra):
        assert not verdict.accepted


@pytest.mark.parametrize("depth", [10, 1000, 50_000])
def test_deeply_nested_ber_does_not_crash(depth: int) -> None:
    """Indefinite-length nesting that could exhaust the recursion limit is simply refused."""
    der = b"\x30\x80" * depth + b"\x00\x00" * depth
    assert not check(samples.smime_message(der)).accepted
