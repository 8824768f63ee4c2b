"""The streaming S/MIME classifier decides exactly as classify() on the whole message (issue 17).

Every comparison feeds a message to :class:`StreamClassifier` in pieces and compares its
verdict with :func:`classify` on the message the relay's milter would assemble from the same
pieces (``name: value`` lines with CRLF, an empty line, the body).
"""

from __future__ import annotations

import base64
import binascii
import random
import subprocess
import tracemalloc
from collections.abc import Iterable, Sequence
from pathlib import Path

import certs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safemail.smime import classify as classify_module
from safemail.smime import samples
from safemail.smime.classify import MAX_HEADER_BYTES, Verdict, classify
from safemail.smime.stream import MAX_CMS_METADATA, StreamClassifier, _Base64Decoder

CHUNK_SIZES = (1, 2, 3, 7, 64, 76, 1000, 65536)
ALL_SAMPLES = samples.accepted_samples() + samples.refused_samples()

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- feeding ----------------------------------------------------------------------------------


def split_fields(raw: bytes) -> tuple[list[tuple[str, str]], bytes] | None:
    """The header fields an MTA would pass for ``raw`` (value continuation lines joined with
    \\n), and the body; None if the milter's reassembly would not give ``raw`` back."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    fields: list[tuple[str, str]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + "\n" + line.decode("utf-8", "surrogateescape"))
            continue
        name, colon, value = line.partition(b": ")
        if not colon or b":" in name:
            return None
        fields.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )
    return fields, body


def assemble(fields: Iterable[tuple[str, str]], body: bytes) -> bytes:
    """The message the milter (MessageGate) assembles from header fields and body."""
    head = b"".join(
        name.encode("utf-8", "surrogateescape")
        + b": "
        + value.encode("utf-8", "surrogateescape").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        + b"\r\n"
        for name, value in fields
    )
    return head + b"\r\n" + body


def pieces(data: bytes, sizes: Sequence[int]) -> Iterable[memoryview]:
    view = memoryview(data)
    i = k = 0
    while i < len(view):
        size = sizes[k % len(sizes)]
        yield view[i : i + size]
        i += size
        k += 1


def stream_fields(fields: Sequence[tuple[str, str]], body: bytes, sizes: Sequence[int]) -> Verdict:
    gate = StreamClassifier()
    for name, value in fields:
        gate.add_header(name, value)
    gate.end_of_headers()
    for piece in pieces(body, sizes):
        gate.add_body(piece)
    return gate.finish()


def stream_raw(raw: bytes, sizes: Sequence[int], max_size: int = 50 * 1024 * 1024) -> Verdict:
    gate = StreamClassifier(max_size)
    for piece in pieces(raw, sizes):
        gate.feed(piece)
    return gate.finish()


def same(streamed: Verdict, whole: Verdict) -> None:
    assert (streamed.accepted, streamed.code) == (whole.accepted, whole.code), (streamed, whole)
    assert streamed.code != "internal_error", streamed.reason
    # Only this module's own bound has a reason of its own.
    if "outside the encrypted content exceeds" not in streamed.reason:
        assert streamed.reason == whole.reason, (streamed, whole)


def check_fields(fields: Sequence[tuple[str, str]], body: bytes, sizes: Sequence[int]) -> Verdict:
    whole = classify(assemble(fields, body))
    same(stream_fields(fields, body, sizes), whole)
    return whole


def check_raw(raw: bytes, sizes: Sequence[int], max_size: int = 50 * 1024 * 1024) -> Verdict:
    whole = classify(raw, max_size)
    same(stream_raw(raw, sizes, max_size), whole)
    return whole


# --- BER re-encoding (what openssl cms -stream and other streaming encoders send) --------------


class El:
    """A BER value: identifier, indefinite length or not, children (constructed) or contents."""

    def __init__(self, ident: int, indefinite: bool, kids: list[El] | None, content: bytes):
        self.ident, self.indefinite, self.kids, self.content = ident, indefinite, kids, content

    def encode(self) -> bytes:
        inner = self.content if self.kids is None else b"".join(k.encode() for k in self.kids)
        if self.indefinite:
            return bytes([self.ident]) + b"\x80" + inner + b"\x00\x00"
        return _definite(self.ident, inner)


class RawEl(El):
    """A value given by its encoding, however odd."""

    def __init__(self, encoding: bytes) -> None:
        super().__init__(encoding[0] if encoding else 0, False, None, b"")
        self.encoding = encoding

    def encode(self) -> bytes:
        return self.encoding


def parse_ber(data: bytes, pos: int = 0) -> tuple[El, int]:
    """Parse the (well-formed, low-tag-number) BER value at ``pos``; (value, end)."""
    ident, first = data[pos], data[pos + 1]
    pos += 2
    if first == 0x80:
        kids = []
        while data[pos : pos + 2] != b"\x00\x00":
            kid, pos = parse_ber(data, pos)
            kids.append(kid)
        return El(ident, True, kids, b""), pos + 2
    if first & 0x80:
        n = first & 0x7F
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    else:
        length = first
    content = data[pos : pos + length]
    if ident & 0x20:
        kids, i = [], 0
        while i < len(content):
            kid, i = parse_ber(content, i)
            kids.append(kid)
        return El(ident, False, kids, b""), pos + length
    return El(ident, False, None, content), pos + length


def _definite(ident: int, contents: bytes) -> bytes:
    return bytes([ident]) + samples._der_length(len(contents)) + contents


def _chunked(ident: int, contents: bytes, rng: random.Random, depth: int = 0) -> El:
    """``contents`` as a constructed, indefinite-length string of random chunks (some nested)."""
    kids, pos = [], 0
    while pos < len(contents) or (not kids and rng.random() < 0.3):
        size = rng.choice([1, 16, 1000, 4096, 70000])
        piece = contents[pos : pos + size]
        pos += size
        if depth < 3 and rng.random() < 0.1:
            kids.append(_chunked(0x04, piece, rng, depth + 1))
        else:
            kids.append(El(0x04, False, None, piece))
    return El(ident | 0x20, True, kids, b"")


def to_ber(der: bytes, rng: random.Random, everywhere: bool = False) -> bytes:
    """``der`` with indefinite lengths on the way to the encrypted content and that content
    chunked (as streaming encoders write it); ``everywhere``: at random on any element."""

    def walk(el: El, on_path: bool) -> El:
        if el.kids is not None:
            kids = [
                walk(kid, on_path and el.ident in (0x30, 0xA0) and kid.ident in (0x30, 0xA0, 0x80))
                for kid in el.kids
            ]
            indefinite = (on_path and rng.random() < 0.9) or (everywhere and rng.random() < 0.3)
            return El(el.ident, indefinite or el.indefinite, kids, b"")
        if el.ident in (0x04, 0x80) and ((on_path and rng.random() < 0.8) or everywhere):
            if rng.random() < (0.8 if on_path else 0.2):
                return _chunked(el.ident, el.content, rng)
        return el

    return walk(parse_ber(der)[0], True).encode()


def encrypted_content_of(root: El) -> El:
    """The encrypted content of a (DER or BER) ContentInfo made by samples.enveloped_der()."""
    envelope = root.kids[1].kids[0]  # type: ignore[index]
    eci = next(k for k in envelope.kids[2:] if k.ident == 0x30)  # type: ignore[index]
    return eci.kids[2]  # type: ignore[index]


# --- samples --------------------------------------------------------------------------------


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("sample", ALL_SAMPLES, ids=[s.name for s in ALL_SAMPLES])
def test_samples_header_by_header(sample: samples.Sample) -> None:
    """Every catalogue sample, fed as the MTA feeds the milter, in chunks of many sizes."""
    split = split_fields(sample.message)
    if sample.name == "broken_header_line":
        # "this is no header" ends the header section at the MTA: the milter sees a body.
        assert split is None
        lines = sample.message.split(b"\r\n")
        fields, body = [("From", "a@safenet.test")], b"\r\n".join(lines[1:])
    elif sample.name == "empty_message":
        assert split is None
        fields, body = [], b""
    else:
        assert split is not None, sample.name
        fields, body = split
        assert assemble(fields, body) == sample.message  # the same message, not a look-alike
    for size in CHUNK_SIZES:
        whole = check_fields(fields, body, [size])
    if assemble(fields, body) == sample.message:
        assert whole.code == sample.code


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("sample", ALL_SAMPLES, ids=[s.name for s in ALL_SAMPLES])
def test_samples_as_raw_bytes(sample: samples.Sample) -> None:
    for size in CHUNK_SIZES:
        assert check_raw(sample.message, [size]).code == sample.code


def test_lf_only_message() -> None:
    raw = samples.smime_message(samples.enveloped_der()).replace(b"\r\n", b"\n")
    for size in (1, 5, 1000):
        assert check_raw(raw, [size]).accepted


# --- header section ---------------------------------------------------------------------------

SMIME_FIELDS = [
    ("From", "praxis1@safenet.test"),
    ("Content-Type", samples.SMIME_ENVELOPED_TYPE),
    ("Content-Transfer-Encoding", "base64"),
]
SMIME_BODY = samples.base64_lines(samples.enveloped_der())


@pytest.mark.parametrize(
    "fields",
    [
        [],
        [("Subject", "a\n\nb"), *SMIME_FIELDS],  # an empty continuation line ends the headers
        [("Subject", "a\n"), *SMIME_FIELDS],
        [("Subject", "a\r\n b"), *SMIME_FIELDS],
        [("X\nY", "z"), *SMIME_FIELDS],
        [("\n", "x"), *SMIME_FIELDS],
        [("\r\nX", "x"), *SMIME_FIELDS],
        [("", ""), *SMIME_FIELDS],
        [("Subject", "\r"), *SMIME_FIELDS],
        [*SMIME_FIELDS, ("Content-Type", "text/plain")],
        [*SMIME_FIELDS, ("Content-Transfer-Encoding", "binary")],
        [("Content-Type", "application/pkcs7-mime"), ("Content-Transfer-Encoding", "binary")],
        [("Content-Type", "application/pkcs7-mime\n text/plain")],
        [("Subject", "x" * 5000), *SMIME_FIELDS],
    ],
)
def test_header_edge_cases(fields: list[tuple[str, str]]) -> None:
    for size in (1, 3, 64, 65536):
        check_fields(fields, SMIME_BODY, [size])


@pytest.mark.parametrize("delta", [-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 1000])
def test_header_section_bound_is_shared_with_classify(delta: int) -> None:
    """classify refuses a header section beyond MAX_HEADER_BYTES too; both agree at the edge."""
    fixed = assemble(SMIME_FIELDS, b"").rstrip(b"\r\n")
    padding = MAX_HEADER_BYTES + delta - len(fixed) - len(b"\r\nX-Pad: ")
    fields = [*SMIME_FIELDS, ("X-Pad", "p" * padding)]
    head = assemble(fields, b"").rstrip(b"\r\n")
    assert len(head) == MAX_HEADER_BYTES + delta
    whole = check_fields(fields, SMIME_BODY, [65536])
    assert whole.accepted is (delta <= 0)
    if delta > 0:
        assert whole.code == "malformed_headers"
        assert "larger than 256 KiB" in whole.reason


def test_header_section_without_end_is_bounded() -> None:
    """Header bytes without an empty line: refused at the bound, the rest not held."""
    raw = b"X-A: " + b"a" * (3 * MAX_HEADER_BYTES)
    assert check_raw(raw, [4096]).code == "malformed_headers"
    assert check_raw(b"From: a\r\n", [1]).code == "malformed_headers"  # a trailing CRLF
    assert check_raw(b"\r", [1]).code == "empty_body"


@PROPERTY
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=40))
def test_arbitrary_bytes(raw: bytes, size: int) -> None:
    check_raw(raw, [size])


@PROPERTY
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Subject", "Content-Type", "content-type", "X-Foo", "", "A\nB"]),
            st.text(alphabet="ab:; \t\r\n/=\x1d", max_size=12),
        ),
        max_size=4,
    ),
    st.integers(min_value=1, max_value=80),
)
def test_arbitrary_header_fields(extra: list[tuple[str, str]], size: int) -> None:
    check_fields([*SMIME_FIELDS, *extra], SMIME_BODY, [size])
    check_fields([*extra, *SMIME_FIELDS], SMIME_BODY, [size])


# --- base64 -------------------------------------------------------------------------------------


def _b64_whole(compact: bytes) -> bytes | None:
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([b"A", b"Q", b"/", b"+", b"=", b"!", b"AAAA", b"===="]), max_size=24),
    st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=5),
)
def test_base64_decoder_is_b64decode_validate(parts: list[bytes], sizes: list[int]) -> None:
    compact = b"".join(parts)
    decoder = _Base64Decoder()
    out = []
    for piece in pieces(compact, sizes):
        out += decoder.feed(bytes(piece))
    out.append(decoder.finish())
    expected = _b64_whole(compact)
    assert decoder.seen is bool(compact)
    if expected is None:
        assert decoder.failed, compact
    else:
        assert not decoder.failed, compact
        assert b"".join(out) == expected


@pytest.mark.parametrize(
    "tail",
    [b"", b"=", b"==", b"===", b"=" * 20, b"==A", b"=\r\n=", b"= =", b"\x0b", b"A=", b"AB==="],
)
def test_base64_padding_edges(tail: bytes) -> None:
    der = samples.enveloped_der()
    body = samples.base64_lines(der).rstrip(b"\r\n") + tail + b"\r\n"
    for size in (1, 2, 3, 4, 76, 65536):
        check_raw(samples.mime_message(body), [size])


# --- generated envelopes ----------------------------------------------------------------------

RECIPIENT_KINDS = ["issuer_serial", "subject_key_id", "kari", "kekri", "pwri", "ori"]


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    options: dict[str, object] = {
        "recipients": tuple(
            draw(st.lists(st.sampled_from(RECIPIENT_KINDS[:3] * 3 + RECIPIENT_KINDS), max_size=3))
        ),
        "auth": draw(st.booleans()),
        "seed": draw(st.integers(min_value=0, max_value=1000)),
    }
    size = draw(st.sampled_from([0, 1, 15, 16, 17, 4095, 4096, 4097, 65536, 70000]))
    content = draw(st.sampled_from(["random", "sized", "text", "none"]))
    if content == "random":
        options["encrypted_content"] = random.Random(size).randbytes(size)
    elif content == "text":
        options["encrypted_content"] = (b"Befund Erika Mustermann " * 3000)[:size]
    elif content == "sized":
        options["content_size"] = size
    else:
        options["with_content"] = False
    if draw(st.integers(min_value=0, max_value=5)) == 0:
        options["unprotected_attrs"] = True
    if draw(st.integers(min_value=0, max_value=7)) == 0:
        options["originator_info"] = True
    if options["auth"] and draw(st.booleans()):
        options["auth_attrs"] = True
        options["mac_size"] = draw(st.sampled_from([8, 12, 16]))
    return samples.enveloped_der(**options)  # type: ignore[arg-type]


def message_for(der: bytes, encoding: str, ending: bytes = b"\r\n") -> bytes:
    if encoding == "base64":
        return samples.smime_message(der)
    return samples.mime_message(der + ending, transfer_encoding="binary")


CHUNKS = st.lists(
    st.sampled_from([1, 2, 3, 7, 64, 76, 100, 1000, 4096, 65536, 70001]), min_size=1, max_size=4
)


@PROPERTY
@given(
    envelopes(),
    st.sampled_from(["base64", "binary"]),
    st.sampled_from(["der", "ber", "ber_everywhere"]),
    st.integers(min_value=0, max_value=10_000),
    CHUNKS,
)
def test_generated_envelopes(
    der: bytes, encoding: str, form: str, seed: int, sizes: list[int]
) -> None:
    if form != "der":
        der = to_ber(der, random.Random(seed), everywhere=form == "ber_everywhere")
    raw = message_for(der, encoding)
    fields, body = split_fields(raw)  # type: ignore[misc]
    check_fields(fields, body, sizes)


def _mutate_bytes(data: bytes, draw: st.DrawFn, garbage: st.SearchStrategy[bytes]) -> bytes:
    buf = bytearray(data)
    op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append", "set"]))
    pos = draw(st.integers(min_value=0, max_value=max(0, len(buf) - 1)))
    if op == "flip" and buf:
        buf[pos] ^= draw(st.integers(min_value=1, max_value=255))
    elif op == "set" and buf:
        buf[pos] = draw(st.sampled_from([0x00, 0x04, 0x24, 0x30, 0x80, 0x81, 0x84, 0xA0, 0xFF]))
    elif op == "insert":
        buf[pos:pos] = draw(garbage)
    elif op == "delete":
        del buf[pos : pos + draw(st.integers(min_value=1, max_value=8))]
    elif op == "truncate":
        del buf[pos:]
    else:
        buf += draw(garbage)
    return bytes(buf)


@PROPERTY
@given(
    envelopes(),
    st.sampled_from(["base64", "binary"]),
    st.sampled_from(["der", "ber"]),
    st.sampled_from(["der", "base64_text"]),
    st.integers(min_value=0, max_value=10_000),
    CHUNKS,
    st.data(),
)
def test_mutated_messages(
    der: bytes,
    encoding: str,
    form: str,
    where: str,
    seed: int,
    sizes: list[int],
    data: st.DataObject,
) -> None:
    if form == "ber":
        der = to_ber(der, random.Random(seed))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        if where == "der" or encoding == "binary":
            der = _mutate_bytes(der, data.draw, st.binary(min_size=1, max_size=8))
    raw = message_for(der, encoding, data.draw(st.sampled_from([b"\r\n", b"", b"\n", b"\r"])))
    if where == "base64_text" and encoding == "base64":
        head, body = raw.split(b"\r\n\r\n", 1)
        alphabet = st.binary(min_size=1, max_size=6).map(lambda b: base64.b64encode(b)[:5])
        body = _mutate_bytes(body, data.draw, st.one_of(alphabet, st.sampled_from([b"=", b" "])))
        raw = head + b"\r\n\r\n" + body
    fields, body = split_fields(raw)  # type: ignore[misc]
    check_fields(fields, body, sizes)


@st.composite
def ber_trees(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A random BER value from the identifiers the walker cares about."""
    ident = draw(st.sampled_from([0x04, 0x24, 0x30, 0xA0, 0x80, 0x02, 0x06, 0x00, 0x1F]))
    if ident == 0x1F:
        return draw(st.sampled_from([b"\x1f\x80\x01\x00", b"\x1f\x1f\x00", b"\x1f\x81\x00\x00"]))
    if ident & 0x20 and depth < 14 and draw(st.booleans()):
        kids = draw(st.lists(ber_trees(depth + 1), max_size=3))  # type: ignore[call-arg]
        if draw(st.booleans()):
            return bytes([ident]) + b"\x80" + b"".join(kids) + b"\x00\x00"
        return _definite(ident, b"".join(kids))
    content = draw(st.binary(max_size=6))
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        return bytes([ident]) + b"\x84" + len(content).to_bytes(4, "big") + content
    return _definite(ident, content)


def _replace_element(der: bytes, target: int, new: bytes) -> bytes:
    """``der`` with the ``target``-th value (pre-order) replaced by the encoding ``new``."""
    counter = [0]

    def walk(el: El) -> bytes:
        me = counter[0]
        counter[0] += 1
        if me == target:
            return new
        if el.kids is None:
            return el.encode()
        inner = b"".join(walk(kid) for kid in el.kids)
        if el.indefinite:
            return bytes([el.ident]) + b"\x80" + inner + b"\x00\x00"
        return _definite(el.ident, inner)

    return walk(parse_ber(der)[0])


@PROPERTY
@given(
    st.sampled_from([False, True]),
    st.integers(min_value=0, max_value=60),
    ber_trees(),
    st.integers(min_value=0, max_value=10_000),
    CHUNKS,
)
def test_element_replaced_by_random_ber(
    auth: bool, target: int, tree: bytes, seed: int, sizes: list[int]
) -> None:
    """Any element of an envelope (with the usual indefinite lengths or without) replaced by
    random BER: nesting limits, chunk types, lengths beyond their container."""
    der = samples.enveloped_der(auth=auth, content_size=64)
    if seed % 2:
        der = to_ber(der, random.Random(seed))
    check_raw(samples.smime_message(_replace_element(der, target, tree)), sizes)


@pytest.mark.parametrize("levels", [9, 10, 11, 12])
@pytest.mark.parametrize("outer_indefinite", [False, True])
def test_nesting_limit_of_chunked_content(levels: int, outer_indefinite: bool) -> None:
    """asn1crypto refuses more than 10 nested indefinite lengths: chunks count, from the
    nearest definite length on."""
    root = parse_ber(samples.enveloped_der(content_size=32))[0]
    content = _chunked(0x04, b"\x01" * 32, random.Random(1))
    for _ in range(levels):
        content = El(0x24, True, [content], b"")
    target = encrypted_content_of(root)
    assert target.ident == 0x80
    target.ident, target.indefinite, target.kids = 0xA0, True, [content]
    der = root.encode()
    if outer_indefinite:
        der = to_ber(der, random.Random(2))
    for size in (7, 65536):
        check_raw(samples.smime_message(der), [size])


ODD_VALUES = [
    b"\xbf\x80\x01\x00",  # high tag number form, non-minimal (leading 0x80)
    b"\x9f\x1e\x00",  # high tag number form for a low tag number
    b"\x9f\x81\x00\x00",  # a valid high tag number
    b"\x04\x80\x00\x00",  # indefinite length on a primitive value
    b"\xa0\x05\x04\x03abc",  # constructed [0] with a definite length
    b"\x24\x05\x04\x03abc",  # constructed OCTET STRING with a definite length
    b"\x24\x80\x04\x03abc\x00\x00",
    b"\x05\x00",  # NULL
    b"\x00\x00",  # end-of-contents where a value belongs
    b"\x04\x84\x00\x00\x00\x03abc",  # long form length
    b"\x04\x89\x01\x00\x00\x00\x00\x00\x00\x00\x00",  # a length beyond everything
]


@pytest.mark.parametrize("value", ODD_VALUES, ids=[v.hex() for v in ODD_VALUES])
@pytest.mark.parametrize(
    "where", ["content", "chunk", "after_content", "recipients", "after_envelope", "top"]
)
@pytest.mark.parametrize("form", ["der", "ber"])
def test_odd_values_anywhere_in_the_envelope(value: bytes, where: str, form: str) -> None:
    der = samples.enveloped_der(content_size=48, auth=where == "after_envelope")
    if form == "ber":
        der = to_ber(der, random.Random(4))
    root = parse_ber(der)[0]
    wrapper = root.kids[1]  # type: ignore[index]
    envelope = wrapper.kids[0]  # type: ignore[index]
    eci = next(k for k in envelope.kids[2:] if k.ident == 0x30)  # type: ignore[index]
    odd = RawEl(value)
    if where == "content":
        eci.kids[2] = odd  # type: ignore[index]
    elif where == "chunk":
        content = eci.kids[2]  # type: ignore[index]
        chunks = [El(0x04, False, None, b"\x01" * 16), odd, El(0x04, False, None, b"\x02" * 16)]
        eci.kids[2] = El(0xA0, True, chunks, b"")  # type: ignore[index]
        assert content.ident in (0x80, 0xA0)
    elif where == "after_content":
        eci.kids.append(odd)  # type: ignore[union-attr]
    elif where == "recipients":
        envelope.kids[1].kids.insert(0, odd)  # type: ignore[index,union-attr]
    elif where == "after_envelope":
        envelope.kids.append(odd)  # type: ignore[union-attr]
        wrapper.kids.append(odd)  # type: ignore[union-attr]
    else:
        root.kids.append(odd)  # type: ignore[union-attr]
    for size in (1, 65536):
        check_raw(samples.smime_message(root.encode()), [size])


def test_content_types_other_than_enveloped_are_named_without_keeping_them() -> None:
    """A large signed-data message is refused as signed_only, like classify does."""
    big = b"x" * 3_000_000
    for der in (samples.signed_der(big), samples.compressed_der(big[:1000]), samples.data_der(big)):
        for form in ("der", "ber"):
            value = der if form == "der" else to_ber(der, random.Random(3), everywhere=True)
            check_raw(samples.smime_message(value), [65536])


@pytest.fixture
def small_bound(monkeypatch: pytest.MonkeyPatch) -> int:
    """MAX_CMS_METADATA lowered to 4 KiB, so that tests of the bound stay quick."""
    from safemail.smime import stream

    assert MAX_CMS_METADATA == 1024 * 1024  # the real bound
    monkeypatch.setattr(stream, "MAX_CMS_METADATA", 4096)
    return 4096


@pytest.mark.parametrize("form", ["der", "ber"])
def test_metadata_beyond_the_bound_is_refused(form: str, small_bound: int) -> None:
    """This module's own bound: classify accepts these 12 recipients (4.7 KB of metadata)."""
    der = samples.enveloped_der(recipients=("issuer_serial",) * 12)
    if form == "ber":  # the bound is reached inside the indefinite-length recipient set
        root = parse_ber(to_ber(der, random.Random(6)))[0]
        recipients = root.kids[1].kids[0].kids[1]  # type: ignore[index]
        recipients.indefinite = True
        der = root.encode()
    assert small_bound < len(der) < 2 * small_bound
    raw = samples.smime_message(der)
    assert classify(raw).accepted
    verdict = stream_raw(raw, [100])
    assert (verdict.accepted, verdict.code) == (False, "malformed_cms")
    assert "outside the encrypted content exceeds 4 KiB" in verdict.reason
    # Beyond the bound, whatever loading already shows is still answered as classify does.
    check_raw(raw[: len(raw) * 3 // 4], [100])
    check_raw(samples.smime_message(der + b"\x00"), [100])
    check_raw(samples.smime_message(samples.signed_der(b"x" * 10_000)), [100])


def test_content_type_beyond_the_bound_is_refused(small_bound: int) -> None:
    """An object identifier beyond the bound: longer than MAX_OID_BYTES as well, so both refuse
    it unread, as a CMS structure that cannot be loaded."""
    oid = b"\x06" + samples._der_length(small_bound + 1) + b"\x01" * (small_bound + 1)
    raw = samples.smime_message(_definite(0x30, oid))
    verdict = check_raw(raw, [65536])
    assert (verdict.accepted, verdict.code) == (False, "malformed_cms")
    assert "not a complete CMS structure" in verdict.reason


@pytest.mark.parametrize("body", [b"", b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b"0"])
def test_binary_bodies_that_are_almost_empty(body: bytes) -> None:
    fields = [("Content-Type", "application/pkcs7-mime"), ("Content-Transfer-Encoding", "binary")]
    for size in (1, 2, 3):
        check_fields(fields, body, [size])


@pytest.mark.parametrize("oid", [b"\x06\x00", b"\x06\x01\x2a", b"\x06\x02\x2a\x86"])
def test_short_content_types(oid: bytes) -> None:
    for rest in (b"", b"\xa0\x00", b"\xa0\x80\x00\x00"):
        check_raw(samples.smime_message(_definite(0x30, oid + rest)), [1])


def test_content_type_that_cannot_be_read() -> None:
    """One arc of 3000 bytes: asn1crypto's number is too long for Python's str()."""
    oid = b"\x06" + samples._der_length(3001) + b"\x81" * 3000 + b"\x01"
    check_raw(samples.smime_message(_definite(0x30, oid + b"\xa0\x00")), [65536])


# --- size, failure ----------------------------------------------------------------------------


def test_too_large_is_counted_exactly() -> None:
    raw = samples.smime_message(samples.enveloped_der(content_size=4096))
    for limit in (len(raw) - 1, len(raw), 10):
        for size in (1, 1000, 65536):
            check_raw(raw, [size], max_size=limit)
    # Whitespace only: empty before too large, as in classify.
    check_raw(b"\r\n" + b" " * 5000, [100], max_size=1000)


def test_api_details() -> None:
    message = samples.accepted_samples()[0].message
    fields, body = split_fields(message)  # type: ignore[misc]
    gate = StreamClassifier()
    for name, value in fields:
        gate.add_header(name.encode(), value.encode())  # bytes, as pymilter may pass them
    gate.end_of_headers()
    gate.add_body(bytearray(body))
    assert gate.size == len(message)
    assert gate.finish().accepted
    gate.add_body(b"more")  # spent: ignored
    assert gate.finish().code == "internal_error"  # a second finish is a caller's bug
    broken = StreamClassifier()
    broken.add_header(None, "x")  # type: ignore[arg-type]
    assert broken.finish().code == "internal_error"


def test_internal_failure_gives_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from safemail.smime import stream

    def boom(*args: object) -> object:
        raise RuntimeError("bug")

    monkeypatch.setattr(stream, "_header_verdict", boom)
    gate = StreamClassifier()
    gate.feed(samples.accepted_samples()[0].message)
    verdict = gate.finish()
    assert (verdict.accepted, verdict.code) == (False, "internal_error")
    assert verdict.reason.startswith("451 ") and "RuntimeError" in verdict.reason
    assert gate.finish().code == "internal_error"  # spent, still no exception


# --- memory -------------------------------------------------------------------------------------


def test_memory_is_bounded_for_a_20_mb_envelope() -> None:
    """Streaming a 20 MB envelope in 64 KiB chunks holds well under 1 MiB.

    For comparison, classify() on the same whole message (27.4 MB) peaked at 174 MB of traced
    memory, 6.4x its size (tracemalloc, measured once; not repeated here to keep the test quick).
    bench/bench_smime_stream.py measures both for 10 KB, 1 MB and 10 MB.
    """
    raw = samples.smime_message(samples.enveloped_der(content_size=20_000_000))
    fields, body = split_fields(raw)  # type: ignore[misc]
    tracemalloc.start()
    try:
        gate = StreamClassifier()
        for name, value in fields:
            gate.add_header(name, value)
        gate.end_of_headers()
        for piece in pieces(body, [64 * 1024]):
            gate.add_body(piece)
        verdict = gate.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert verdict.accepted, verdict.reason
    assert peak < 1024 * 1024, (
        f"streaming peak {peak} bytes for a {len(raw)}-byte message "
        "(whole-message classify: 174 MB, measured once)"
    )


# --- a real streaming encoder -------------------------------------------------------------------


def _openssl() -> bool:
    try:
        subprocess.run(["openssl", "version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@pytest.fixture(scope="module")
def recipient_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    cert = certs.self_signed("praxis2@safenet.test", key, san=False)
    path = tmp_path_factory.mktemp("cert") / "c.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.skipif(not _openssl(), reason="openssl command not available")
@pytest.mark.parametrize("cipher", ["-aes256", "-aes-256-gcm"])
@pytest.mark.parametrize("stream", [True, False])
def test_openssl_output(tmp_path: Path, recipient_cert: Path, cipher: str, stream: bool) -> None:
    """OpenSSL's cms tool, with -stream writing indefinite-length BER in chunks."""
    (tmp_path / "m.txt").write_bytes(
        b"Content-Type: text/plain\r\n\r\n" + random.Random(5).randbytes(150_000).hex().encode()
    )
    cmd = ["openssl", "cms", "-encrypt", cipher, "-in", "m.txt", "-out", "m.eml"]
    cmd += ["-stream"] if stream else []
    subprocess.run([*cmd, str(recipient_cert)], cwd=tmp_path, check=True, capture_output=True)
    raw = (tmp_path / "m.eml").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    fields, body = split_fields(raw)  # type: ignore[misc]
    for size in (1000, 65536):
        assert check_fields(fields, body, [size]).accepted


# --- object identifiers too long to decode ---------------------------------------------------


def _long_arc(content_bytes: int) -> str:
    """A dotted OID whose encoding has about ``content_bytes`` bytes (one huge last arc)."""
    return "1.2." + str(1 << (7 * (content_bytes - 2)))


@pytest.fixture
def decoded_oids(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The content length of every OBJECT IDENTIFIER asn1crypto turns into dotted form."""
    from asn1crypto import core

    lengths: list[int] = []
    original = core.ObjectIdentifier.dotted

    def spy(self: core.ObjectIdentifier) -> str:
        lengths.append(len(self.contents or b""))
        return original.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(core.ObjectIdentifier, "dotted", property(spy))
    return lengths


def _refused_unread(raw: bytes, reason: str, decoded: list[int],
                    sizes: Sequence[Sequence[int]]) -> None:
    """classify and the stream refuse ``raw`` with ``reason``, and neither decodes an OID
    longer than MAX_OID_BYTES on the way (the quadratic cost is never paid)."""
    whole = classify(raw)
    assert whole.code == "malformed_cms" and whole.reason.endswith(f"({reason})"), whole
    for chunks in sizes:
        same(stream_raw(raw, chunks), whole)
    assert decoded and max(decoded) <= classify_module.MAX_OID_BYTES, max(decoded)


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("where", ["key_transport", "cipher", "key_wrap"])
def test_long_inner_oid_is_refused_unread_and_streams_the_same(
    where: str, decoded_oids: list[int]
) -> None:
    """asn1crypto decodes an arc in time quadratic in its length (about 180 s of CPU for a
    1 MiB one): an OID longer than MAX_OID_BYTES is refused without being decoded."""
    oid = _long_arc(600)  # decodable (str() refuses ints over 4300 digits), far over 64
    kwargs = {"key_transport": {"key_transport_oid": oid},
              "cipher": {"cipher_oid": oid},
              "key_wrap": {"recipients": ("kari",), "key_wrap_oid": oid}}[where]
    der = samples.enveloped_der(**kwargs)
    assert classify_module.find_long_oid(der) == "inner"
    decoded_oids.clear()  # building the sample decoded it; judging it must not
    _refused_unread(samples.smime_message(der), "the CMS enveloped-data structure is corrupt",
                    decoded_oids, ((7,), (4096,), (1 << 20,)))


@pytest.mark.req("MAIL-03")
def test_long_content_type_oid_is_refused_unread_and_streams_the_same(
    decoded_oids: list[int],
) -> None:
    oid_body = b"\x2a" + b"\x81" * 200_000 + b"\x01"  # 1.2.<a 1.4 million bit arc>
    der = _definite(0x30, _definite(0x06, oid_body) + _definite(0xA0, samples.enveloped_der()))
    assert classify_module.find_long_oid(der) == "content_type"
    decoded_oids.clear()
    decoded_oids.append(0)  # nothing at all may be decoded here: keep max() defined
    _refused_unread(samples.smime_message(der), "the body is not a complete CMS structure",
                    decoded_oids, ((7,), (65536,)))


@pytest.mark.parametrize("limit", [8, 9, 64])
def test_find_long_oid_reads_headers_only_and_counts_content_bytes(limit: int) -> None:
    der = samples.enveloped_der()  # its longest OIDs have 9 content bytes
    found = classify_module.find_long_oid(der, limit)
    assert found == ("content_type" if limit < 9 else None)  # enveloped-data: 9 bytes too
    assert classify_module.find_long_oid(b"\x30\x80\x06\x01\x2a\x00\x00") is None
    assert classify_module.find_long_oid(b"\x30\x05\x06\x83\xff") is None  # cut short: no answer


# --- the counted stretch of a base64 body -----------------------------------------------------
# Past the first TEXT_SAMPLE_BYTES of the encrypted content the base64 characters are checked
# and counted, not decoded (_Base64Body.feed). A wrong character there must be refused as
# b64decode(validate=True) refuses it, wherever it sits and however the body is cut.

_BIG = samples.smime_message(samples.enveloped_der(content_size=200_000))
_BIG_HEAD, _BIG_BODY = _BIG.split(b"\r\n\r\n", 1)
_BAD_CHARACTERS = [b"!", b"*", b"\x00", b"=", b"-", b"_", b"\xff", b".", b"A=", b"==="]


def _counted_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = _Base64Decoder.count

    def spy(self: _Base64Decoder, chars: bytes | memoryview) -> bool:
        calls.append(len(chars))
        return original(self, chars)

    monkeypatch.setattr(_Base64Decoder, "count", spy)
    return calls


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("sizes", [[1_000_000], [65536], [4096, 70001], [76], [1000, 3, 7]])
def test_counted_stretch_is_taken_for_a_large_envelope(
    sizes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _counted_calls(monkeypatch)
    assert check_raw(_BIG, sizes).accepted
    if min(sizes) >= 4096:
        assert sum(calls) > 0.9 * len(_BIG_BODY), calls  # nearly all counted, not decoded


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("bad", _BAD_CHARACTERS, ids=[b.hex() for b in _BAD_CHARACTERS])
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("sizes", [[1_000_000], [65536], [4096, 70001], [1000, 3, 7]])
def test_bad_character_in_the_counted_stretch(
    bad: bytes, where: float, sizes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _counted_calls(monkeypatch)
    pos = int(len(_BIG_BODY) * where)
    if _BIG_BODY[pos : pos + 1] in b"\r\n":
        pos -= 2
    body = _BIG_BODY[:pos] + bad + _BIG_BODY[pos + len(bad) :]
    verdict = check_raw(_BIG_HEAD + b"\r\n\r\n" + body, sizes)
    assert not verdict.accepted
    if where < 0.9 and max(sizes) >= 4096 and bad not in (b"=", b"A=", b"==="):
        assert calls, "the counted stretch was not used"


@PROPERTY
@given(
    st.integers(min_value=0, max_value=len(_BIG_BODY) - 1),
    st.sampled_from(_BAD_CHARACTERS + [b"A", b"/", b"+", b" ", b"\r\n", b""]),
    st.lists(st.sampled_from([1, 76, 4096, 65536, 70001, 1_000_000]), min_size=1, max_size=3),
)
def test_any_change_of_a_large_body_as_the_whole_classifier(
    pos: int, new: bytes, sizes: list[int]
) -> None:
    body = _BIG_BODY[:pos] + new + _BIG_BODY[pos + 1 :]
    check_raw(_BIG_HEAD + b"\r\n\r\n" + body, sizes)


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("cut", [13478, 20_001, 100_000, 150_002])
@pytest.mark.parametrize("sizes", [[70001], [65536], [1_000_000]])
def test_der_cut_short_inside_the_counted_content(cut: int, sizes: list[int]) -> None:
    """The envelope's DER ends inside the encrypted content: the content still claims its
    full length, so the body's final padding falls inside the counted stretch. Its verdict
    is the decoder's and the whole classifier's (found by test_mutated_messages)."""
    der = samples.enveloped_der(content_size=200_000)[:cut]
    for padding in range(3):  # lengths that end in "==", "=" and no padding
        raw = samples.smime_message(der[: len(der) - padding])
        assert not check_raw(raw, sizes).accepted
