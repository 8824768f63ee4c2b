"""The relay's S/MIME gate decision, made while the message streams in (issue 17; MAIL-03).

:func:`safemail.smime.classify.classify` judges a whole message held in memory: a 50 MB mail
costs several times its size, and the ciphertext is copied again and again. A
:class:`StreamClassifier` is fed the same message piece by piece (headers as the MTA passes
them, then body chunks of any size) and gives, at :meth:`~StreamClassifier.finish`, the verdict
``classify`` gives for the whole message: the same ``accepted`` and ``code`` for every input,
and the same reason text except for the few refusals only this module makes (its own bounds,
below). Its memory is bounded by a small constant, whatever the size of the message.

How it works:

* Size, and whether the message is all whitespace, are counted as bytes arrive. Beyond
  ``max_size`` everything else stops; :meth:`~StreamClassifier.finish` answers ``too_large``.
* The header section is buffered up to the first empty line (at most
  :data:`~safemail.smime.classify.MAX_HEADER_BYTES`, which ``classify`` enforces as well) and
  judged by classify's own code.
* A base64 body is decoded piece by piece: whitespace removed, complete four-character
  groups decoded strictly, the up-to-three characters left over carried to the next piece.
  From the first ``=`` on only padding may follow; that tail is judged at the end together
  with a stand-in group, so the answer is that of ``base64.b64decode(validate=True)`` on the
  whole body. Inside the encrypted content, once its first bytes are kept, whole groups are
  not decoded at all: their characters are checked against the alphabet and counted (strict
  decoding refuses nothing else there). A ``binary`` body is used as it comes, holding back
  its last two bytes until the end (the final line break is not part of the DER).
* The DER is walked incrementally, as asn1crypto would parse it (tag and length headers,
  indefinite lengths, the nesting limit of ``asn1crypto.parser``, no trailing data).
  Everything up to the encrypted content (ContentInfo, the envelope's version, originator
  info, recipient infos, the content type and cipher) and everything after it (attributes,
  mac) is kept verbatim, at most :data:`MAX_CMS_METADATA` bytes. The encrypted content itself
  (a primitive OCTET STRING or BER's constructed, indefinite-length form of chunks) is only
  counted and its first :data:`~safemail.smime.policy.TEXT_SAMPLE_BYTES` bytes kept. At the
  end, a small ContentInfo with the real metadata and a stand-in holding those first bytes
  goes through classify's own CMS checks, which are told the real length of the content.
  Other content types (signed-data, compressed-data, ...) are refused by their type without
  keeping anything.

Refusals of this module's own (``classify`` would judge these inputs but has no such bound):
metadata around the encrypted content beyond :data:`MAX_CMS_METADATA` (``malformed_cms``).

Standard library and asn1crypto only, like classify.py: this runs on the relay under Debian's
python3-asn1crypto. :meth:`StreamClassifier.finish` never raises: a failure of this code gives
classify's ``internal_error`` verdict (fail closed).
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Generator
from typing import Any

from asn1crypto import cms

from safemail.smime.classify import (
    CODE_BAD_BASE64,
    CODE_EMPTY_BODY,
    CODE_MALFORMED_CMS,
    DEFAULT_MAX_SIZE,
    ENVELOPED_CONTENT_TYPES,
    MAX_HEADER_BYTES,
    MAX_OID_BYTES,
    Verdict,
    _classify_cms,
    _header_verdict,
    _internal_error,
    _refuse,
    _refuse_content_type,
    _split_point,
    _too_large,
)
from safemail.smime.policy import DEFAULT_POLICY, TEXT_SAMPLE_BYTES, CryptoPolicy

__all__ = ["MAX_CMS_METADATA", "StreamClassifier"]

#: Most bytes of CMS structure kept around the encrypted content (recipient infos, attributes,
#: mac, ...). Real envelopes have a few KiB; beyond this the message is refused.
MAX_CMS_METADATA = 1024 * 1024

# Input is processed in pieces of at most this size, so that the copies made while decoding
# stay small whatever chunk size the caller uses.
_PIECE = 64 * 1024
# bytes.strip() whitespace: classify refuses a message that is nothing else as empty.
_NOT_BLANK = re.compile(rb"[^ \t\n\r\x0b\x0c]")
_BASE64_WHITESPACE = b" \t\r\n"
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# Fewest base64 characters worth counting instead of decoding (below this, decoding is as cheap).
_MIN_COUNTED = 4096
_PAD = 0x3D  # "="
# asn1crypto.parser._MAX_DEPTH: deeper nesting of indefinite-length values is refused.
_MAX_DEPTH = 10
_BIG_TAG = 1 << 64


def _as_bytes(value: str | bytes) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    # pymilter hands header values over as str decoded with surrogateescape; undo that exactly.
    return value.encode("utf-8", "surrogateescape")


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


class StreamClassifier:
    """Decides about one message fed in pieces, exactly as :func:`classify` on the whole.

    Feed the header fields with :meth:`add_header` (as the MTA passes them), then
    :meth:`end_of_headers`, then the body with :meth:`add_body`; or the raw message bytes with
    :meth:`feed`. The message judged is the one the relay's milter assembles: ``name: value``
    lines (value line breaks as CRLF), an empty line, the body. :meth:`finish` returns the
    :class:`~safemail.smime.classify.Verdict`; the object is spent afterwards.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE, policy: CryptoPolicy | None = None):
        self._max_size = max_size
        self._policy = DEFAULT_POLICY if policy is None else policy
        self._size = 0
        self._blank = True
        self._failure: BaseException | None = None
        self._spent = False
        self._head: bytearray | None = bytearray()
        self._scan_from = 0
        self._verdict: Verdict | None = None
        self._body: _Base64Body | _BinaryBody | None = None

    @property
    def size(self) -> int:
        """Bytes of the message so far (headers as assembled, empty line, body)."""
        return self._size

    def add_header(self, name: str | bytes, value: str | bytes) -> None:
        """One header field as the MTA passes it (name without colon, unfolded value or with
        ``\\n`` continuation lines)."""
        try:
            raw_value = _as_bytes(value).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            line = _as_bytes(name) + b": " + raw_value + b"\r\n"
        except Exception as exc:  # noqa: BLE001 - remembered; finish() answers internal_error
            self._fail(exc)
            return
        self.feed(line)

    def end_of_headers(self) -> None:
        """The empty line between header section and body."""
        self.feed(b"\r\n")

    def add_body(self, chunk: bytes | bytearray | memoryview) -> None:
        """A piece of the body, any size (CRLF line endings, as the MTA sends it)."""
        self.feed(chunk)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Raw message bytes, continuing what was fed before."""
        if self._spent or self._failure is not None:
            return
        try:
            self._feed(data)
        except Exception as exc:  # noqa: BLE001 - remembered; finish() answers internal_error
            self._fail(exc)

    def finish(self) -> Verdict:
        """The verdict for the message fed so far. Never raises."""
        try:
            if self._failure is not None:
                return _internal_error(self._failure)
            if self._spent:
                raise RuntimeError("StreamClassifier.finish() called twice")
            return self._finish()
        except Exception as exc:  # noqa: BLE001 - the gate must answer; fail closed (TEMPFAIL)
            return _internal_error(exc)
        finally:
            self._spent = True
            self._drop()

    # --- internals ----------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._drop()

    def _drop(self) -> None:
        self._head = None
        self._body = None

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        if isinstance(data, bytes) and len(data) <= _PIECE:
            if data:
                self._feed_piece(data)
            return
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _PIECE):
            self._feed_piece(bytes(view[start : start + _PIECE]))

    def _feed_piece(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._blank and _NOT_BLANK.search(piece):
            self._blank = False
        if self._size > self._max_size:
            self._drop()  # stop holding anything of a message that is refused anyway
            return
        if self._head is not None:
            self._feed_head(piece)
        elif self._body is not None:
            self._body.feed(piece)

    def _feed_head(self, piece: bytes) -> None:
        head = self._head
        assert head is not None
        head += piece
        split = self._find_split(final=False)
        if split is None:
            if len(head) >= MAX_HEADER_BYTES + 4:
                # The empty line, wherever it comes, starts beyond the bound.
                verdict = _header_verdict(head)
                assert isinstance(verdict, Verdict)
                self._verdict = verdict
                self._head = None
            return
        self._end_head(*split)

    def _find_split(self, final: bool) -> tuple[int, int] | None:
        """classify's split of header section and body, once the bytes seen decide it."""
        head = self._head
        assert head is not None
        if head.startswith((b"\r\n", b"\n")) or final:
            return _split_point(head)
        if len(head) < 2:
            return None  # "\r" may still become "\r\n"
        # A match that starts 4 bytes or more before the end cannot be preceded by a match
        # that more bytes would complete (a separator is at most 4 bytes long).
        match = _SEPARATOR.search(head, self._scan_from)
        if match is not None and match.start() < len(head) - 3:
            return match.start(), match.end()
        self._scan_from = max(0, len(head) - 3)
        return None

    def _end_head(self, head_end: int, body_start: int) -> None:
        head = self._head
        assert head is not None
        self._head = None
        found = _header_verdict(head[:head_end])
        if isinstance(found, Verdict):
            self._verdict = found
            return
        walker = _DerWalker()
        self._body = _Base64Body(walker) if found == "base64" else _BinaryBody(walker)
        rest = bytes(head[body_start:])
        del head
        if rest:
            self._body.feed(rest)

    def _finish(self) -> Verdict:
        if self._blank:
            return _refuse(CODE_EMPTY_BODY, "the message is empty")
        if self._size > self._max_size:
            return _too_large(self._size, self._max_size)
        if self._head is not None:
            split = self._find_split(final=True)
            assert split is not None
            self._end_head(*split)
        if self._verdict is not None:
            return self._verdict
        assert self._body is not None
        return self._body.finish(self._policy)


_SEPARATOR = re.compile(rb"\r?\n\r?\n")  # classify's _HEADER_BODY_SEPARATOR


# --------------------------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------------------------


class _Base64Decoder:
    """``base64.b64decode(body, validate=True)`` over a body fed in pieces (whitespace
    already removed), the same result or the same failure."""

    def __init__(self) -> None:
        self.seen = False  # any character at all
        self.failed = False
        self._carry = b""  # fewer than 4 characters of an incomplete group
        self._groups = False  # complete groups decoded before
        self._tail: bytes | None = None  # from the group holding the first "=": its characters
        self._pads = 0  # and how many "=" follow them

    def feed(self, compact: bytes) -> list[bytes]:
        """Decoded bytes of what is certain so far (maybe empty pieces)."""
        if not compact or self.failed:
            return []
        self.seen = True
        if self._tail is not None:
            # After "=" only more "=" can be valid.
            if compact.translate(None, b"="):
                self.failed = True
            else:
                self._pads += len(compact)
            return []
        pad = compact.find(b"=")
        if pad >= 0:
            out = self._groups_of(compact[:pad])
            rest = compact[pad:]
            if rest.translate(None, b"="):
                self.failed = True
                return []
            self._tail, self._carry, self._pads = self._carry, b"", len(rest)
            return out
        return self._groups_of(compact)

    def _groups_of(self, chars: bytes) -> list[bytes]:
        out: list[bytes] = []
        view = memoryview(chars)
        if self._carry:
            need = 4 - len(self._carry)
            if len(chars) < need:
                self._carry += chars
                return out
            out.append(self._decode(self._carry + bytes(view[:need])))
            view = view[need:]
            self._carry = b""
        whole = len(view) // 4 * 4
        if whole:
            out.append(self._decode(view[:whole]))
        self._carry = bytes(view[whole:])
        return out

    def missing(self) -> int:
        """Characters still missing from a group begun in an earlier piece (0: none)."""
        if self.failed or self._tail is not None or not self._carry:
            return 0
        return 4 - len(self._carry)

    def countable(self) -> bool:
        """Can complete groups be passed over (counted) now? Only between groups, before any
        "=" and while valid: then a run of groups without "=" is valid exactly when all its
        characters are in the alphabet (a2b_base64's strict mode refuses nothing else there)."""
        return not (self.failed or self._carry or self._tail is not None)

    def count(self, chars: bytes | memoryview) -> bool:
        """Pass over ``chars`` (complete groups, no "=", :meth:`countable` true) without
        decoding them; False, and ``failed``, if one is not a base64 character."""
        self.seen = True
        if bytes(chars).translate(None, _BASE64_ALPHABET):
            self.failed = True
            return False
        self._groups = True
        return True

    def _decode(self, data: bytes | memoryview) -> bytes:
        if self.failed:
            return b""
        try:
            decoded = binascii.a2b_base64(data, strict_mode=True)
        except binascii.Error:
            self.failed = True
            return b""
        self._groups = True
        return decoded

    def finish(self) -> bytes:
        """The last decoded bytes; sets ``failed`` if the whole body is not valid."""
        if self.failed:
            return b""
        if self._tail is None:
            if self._carry:
                self.failed = True  # a group left incomplete: never valid
            return b""
        # Only the end of the body decides here: a stand-in group before it (when there were
        # groups before) puts the decoder in the same state; "=" runs longer than 8 are judged
        # as 8 (beyond 3, more "=" never change the answer).
        lead = b"AAAA" if self._groups else b""
        text = lead + self._tail + b"=" * min(self._pads, 8)
        try:
            decoded = binascii.a2b_base64(text, strict_mode=True)
        except binascii.Error:
            self.failed = True
            return b""
        return decoded[3:] if lead else decoded


class _Base64Body:
    def __init__(self, walker: _DerWalker) -> None:
        self._decoder = _Base64Decoder()
        self._walker: _DerWalker | None = walker

    def feed(self, piece: bytes) -> None:
        decoder = self._decoder
        compact = piece.translate(None, _BASE64_WHITESPACE)
        while len(compact) >= _MIN_COUNTED and self._walker is not None:
            if self._walker.counting() < _MIN_COUNTED:
                # Not (yet) inside the counted part of the encrypted content: decode a step,
                # then look again, so a piece that reaches into the content is counted there.
                self._decode(compact[:_MIN_COUNTED])
                compact = compact[_MIN_COUNTED:]
                continue
            # Inside the encrypted content, past its kept first bytes, the walk only counts:
            # check and count the characters of whole groups instead of decoding them. A
            # group left incomplete by the piece before is completed (decoded) first.
            need = decoder.missing()
            if need:
                self._decode(compact[:need])
                compact = compact[need:]
            walker = self._walker
            if walker is None or not decoder.countable():
                break
            # Whole groups before any "=": the padding at the end of the body is the decoder's
            # to judge. (It can fall inside the content's declared length: a DER cut short
            # still claims its full length, and must get the decoder's verdict, not
            # count()'s refusal of "=" as a bad character.)
            groups = min(walker.counting() // 3, len(compact) // 4)
            pad = compact.find(b"=", 0, groups * 4)
            if pad >= 0:
                groups = pad // 4
            if not groups:
                break
            view = memoryview(compact)
            if not decoder.count(view[: groups * 4]):
                self._walker = None
                return
            walker.count(groups * 3)
            compact = bytes(view[groups * 4 :])
        self._decode(compact)

    def _decode(self, compact: bytes) -> None:
        decoder = self._decoder
        for out in decoder.feed(compact):
            if self._walker is not None and out:
                self._walker.feed(out)
        if decoder.failed:
            self._walker = None

    def finish(self, policy: CryptoPolicy) -> Verdict:
        last = self._decoder.finish()
        if not self._decoder.seen:
            return _refuse(CODE_EMPTY_BODY, "the S/MIME body is empty")
        if self._decoder.failed or self._walker is None:
            return _refuse(CODE_BAD_BASE64, "the S/MIME body is not valid base64")
        if last:
            self._walker.feed(last)
        return self._walker.finish(policy)


class _BinaryBody:
    """A ``binary`` body: the DER itself, up to the line break that ends the body."""

    def __init__(self, walker: _DerWalker) -> None:
        self._walker = walker
        self._held = b""  # the body's last (at most 2) bytes so far

    def feed(self, piece: bytes) -> None:
        if len(piece) >= 2:
            if self._held:
                self._walker.feed(self._held)
            self._walker.feed(memoryview(piece)[:-2])
            self._held = piece[-2:]
        else:
            both = self._held + piece
            self._walker.feed(both[:-2])
            self._held = both[-2:]

    def finish(self, policy: CryptoPolicy) -> Verdict:
        held = self._held
        if held.endswith(b"\r\n"):
            held = b""
        elif held.endswith(b"\n"):
            held = held[:-1]
        self._walker.feed(held)
        return self._walker.finish(policy)


# --------------------------------------------------------------------------------------------
# The DER walker
# --------------------------------------------------------------------------------------------

_READ = 0  # request: exactly n bytes, sent back to the walk
_SKIP = 1  # request: pass over n bytes into a sink
_CONTENT = object()  # sink: the encrypted content (counted, its first bytes kept)


class _Eof(Exception):
    """The DER ended (thrown into the walk at the end of the body)."""


class _Frame(Exception):
    """The encoding cannot be parsed here. ``load``: asn1crypto would find this already when
    loading the ContentInfo or reading its content type ("not a complete CMS structure"),
    not only when parsing everything ("corrupt")."""

    def __init__(self, load: bool) -> None:
        super().__init__(load)
        self.load = load


class _Head:
    """One tag-length header, as asn1crypto.parser._parse reads it."""

    __slots__ = ("ident", "cls", "tag", "indefinite", "end", "depth", "load", "child_load", "raw")

    def __init__(
        self,
        ident: int,
        tag: int,
        indefinite: bool,
        end: int | None,
        depth: int,
        load: bool,
        raw: bytes,
    ) -> None:
        self.ident = ident  # the first identifier octet
        self.cls = ident >> 6
        self.tag = tag
        self.indefinite = indefinite
        self.end = end  # absolute end of the contents, definite length only
        self.depth = depth  # nesting depth of indefinite lengths, as asn1crypto counts it
        self.load = load
        # Are the children checked on load (asn1crypto scans indefinite-length contents, and
        # reads every child of the ContentInfo for its content type)?
        self.child_load = load and indefinite
        self.raw = raw  # the header bytes, when kept


class _Node:
    """An element on the way to the encrypted content: rebuilt with a new length."""

    __slots__ = ("ident", "indefinite", "parts")

    def __init__(self, ident: int, indefinite: bool) -> None:
        self.ident = ident
        self.indefinite = indefinite
        self.parts: list[bytes | bytearray | _Node] = []

    def dump(self) -> bytes:
        content = b"".join(part.dump() if isinstance(part, _Node) else part for part in self.parts)
        if self.indefinite:
            return bytes([self.ident]) + b"\x80" + content + b"\x00\x00"
        return bytes([self.ident]) + _der_length(len(content)) + content


# The walk's generators: they yield requests, are sent bytes back (or None), return a value.
_Walk = Generator[tuple, Any, None]
_Bytes = Generator[tuple, Any, bytes]
_Header = Generator[tuple, Any, _Head]
_MaybeHeader = Generator[tuple, Any, _Head | None]


class _DerWalker:
    """Walks the DER of the body as it arrives (see the module docstring).

    The walk is a generator that asks for bytes: ``(_READ, n)`` for header bytes it needs to
    see, ``(_SKIP, n, sink)`` for contents it only passes over (dropped, kept verbatim, or
    counted as encrypted content). :meth:`feed` serves those requests from the pieces fed.
    """

    def __init__(self, cap: int | None = None) -> None:
        self.size = 0  # DER bytes fed
        self.pos = 0  # DER bytes the walk has consumed
        self.load_error = False
        self.corrupt = False
        self.over_cap = False
        self.content_type: object = None
        self.root: _Node | None = None
        self.has_content_field = False
        self.content_length = 0
        self.sample = bytearray()
        self._cap = MAX_CMS_METADATA if cap is None else cap
        self._kept = 0
        self._rbuf = bytearray()
        self._left = 0
        self._gen: _Walk | None = self._walk()
        self._req: tuple = next(self._gen)

    @property
    def keeping(self) -> bool:
        """Is the structure still being kept (to be checked at the end)?"""
        return not (self.corrupt or self.over_cap)

    # --- serving the walk ---------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        size = len(data)
        self.size += size
        if not size or self._gen is None:
            return
        view = memoryview(data)
        i = 0
        while i < size and self._gen is not None:
            request = self._req
            if request[0] == _READ:
                want = request[1] - len(self._rbuf)
                part = view[i : i + want]
                self._rbuf += part
                i += len(part)
                if len(self._rbuf) == request[1]:
                    got = bytes(self._rbuf)
                    self._rbuf.clear()
                    self._resume(got)
            else:
                take = min(self._left, size - i)
                sink = request[2]
                if sink is _CONTENT:
                    self._content(view[i : i + take])
                elif sink is not None:
                    self._keep(sink, view[i : i + take])
                i += take
                self._left -= take
                if not self._left:
                    self._resume(None)

    def counting(self) -> int:
        """How many of the next bytes the walk will only count (encrypted content after the
        kept sample); :meth:`count` takes them without the bytes themselves."""
        request = self._req
        if (
            self._gen is None
            or request[0] != _SKIP
            or request[2] is not _CONTENT
            or len(self.sample) < TEXT_SAMPLE_BYTES
        ):
            return 0
        return self._left

    def count(self, n: int) -> None:
        """What :meth:`feed` does with ``n`` bytes (at most :meth:`counting`) it only counts."""
        assert 0 < n <= self.counting()
        self.size += n
        self.content_length += n
        self._left -= n
        if not self._left:
            self._resume(None)

    def _resume(self, value: object) -> None:
        assert self._gen is not None
        try:
            self._req = self._gen.send(value)
        except StopIteration:
            self._gen = None
            return
        if self._req[0] == _SKIP:
            self._left = self._req[1]

    def _content(self, data: memoryview) -> None:
        self.content_length += len(data)
        missing = TEXT_SAMPLE_BYTES - len(self.sample)
        if missing > 0:
            self.sample += data[:missing]

    def _keep(self, sink: bytearray, data: bytes | memoryview) -> None:
        if not self.keeping:
            return
        self._kept += len(data)
        if self._kept > self._cap:
            self.over_cap = True
            self.root = None
            return
        sink += data

    def _sink(self, node: _Node) -> bytearray | None:
        """Where bytes kept verbatim inside ``node`` go next (None: not keeping)."""
        if not self.keeping:
            return None
        last = node.parts[-1] if node.parts else None
        if isinstance(last, bytearray):
            return last
        sink = bytearray()
        node.parts.append(sink)
        return sink

    def finish(self, policy: CryptoPolicy) -> Verdict:
        if self._gen is not None:
            try:
                self._gen.throw(_Eof())
            except StopIteration:
                pass
            else:
                raise RuntimeError("the DER walk did not end at the end of the body")
            self._gen = None
        if not self.size:
            return _refuse(CODE_EMPTY_BODY, "the S/MIME body is empty")
        if self.load_error:
            return _refuse(CODE_MALFORMED_CMS, "the body is not a complete CMS structure")
        if self.content_type is None:  # the content type alone exceeded the bound
            return self._too_much()
        if self.content_type not in ENVELOPED_CONTENT_TYPES:
            return _refuse_content_type(self.content_type)
        if self.corrupt:
            return _refuse(CODE_MALFORMED_CMS, "the CMS enveloped-data structure is corrupt")
        if self.over_cap or self.root is None:
            return self._too_much()
        ciphertext = None
        if self.has_content_field:
            ciphertext = (self.content_length, bytes(self.sample))
        return _classify_cms(self.root.dump(), policy, ciphertext)

    def _too_much(self) -> Verdict:
        return _refuse(
            CODE_MALFORMED_CMS,
            f"the CMS structure outside the encrypted content exceeds {self._cap // 1024} KiB",
        )

    @staticmethod
    def _end(head: _Head) -> int:
        assert head.end is not None, "only for a definite length"
        return head.end

    def _left_in(self, head: _Head) -> int:
        """Bytes left in the contents of ``head`` (definite length)."""
        return self._end(head) - self.pos

    # --- the walk: reading ---------------------------------------------------------------------

    def _read(self, n: int, bound: int | None, load: bool) -> _Bytes:
        if bound is not None and self.pos + n > bound:
            raise _Frame(load)
        if not n:
            return b""
        data = yield (_READ, n)
        self.pos += n
        return data

    def _skip(self, n: int, sink: object) -> _Walk:
        if n:
            yield (_SKIP, n, sink)
            self.pos += n

    def _header(
        self,
        bound: int | None,
        depth: int,
        load: bool,
        keep: bool,
        first: int | None = None,
        second: int | None = None,
    ) -> _Header:
        """One header, checked as asn1crypto.parser._parse checks it. ``first``/``second``:
        octets already read while looking for end-of-contents."""
        if depth > _MAX_DEPTH:
            raise _Frame(load)
        raw = bytearray()
        if first is None:
            first = (yield from self._read(1, bound, load))[0]
        raw.append(first)
        tag = first & 31
        if tag == 31:
            tag = 0
            while True:
                num = (yield from self._read(1, bound, load))[0]
                if keep:
                    raw.append(num)
                if num == 0x80 and tag == 0:
                    raise _Frame(load)  # non-minimal tag encoding
                tag = min(tag * 128 + (num & 127), _BIG_TAG)
                if num < 0x80:
                    break
            if tag < 31:
                raise _Frame(load)
        if second is None:
            second = (yield from self._read(1, bound, load))[0]
        raw.append(second)
        if second < 0x80:
            length: int | None = second
        elif second == 0x80:
            if not first & 0x20:
                raise _Frame(load)  # indefinite length needs a constructed value
            length = None
        else:
            octets = yield from self._read(second & 127, bound, load)
            if keep:
                raw += octets
            length = int.from_bytes(octets, "big")
        end = None if length is None else self.pos + length
        if end is not None and bound is not None and end > bound:
            raise _Frame(load)
        return _Head(first, tag, length is None, end, depth, load, bytes(raw) if keep else b"")

    def _child(self, parent: _Head, bound: int | None, keep: bool) -> _MaybeHeader:
        """The next child of ``parent``, or None at its end (its end-of-contents octets read).

        ``bound``: where the contents must end at the latest (the nearest definite length
        around an indefinite-length ``parent``; None: the end of the DER).
        """
        if not parent.indefinite:
            if self.pos >= self._end(parent):
                return None
            return (yield from self._header(self._end(parent), 0, parent.child_load, keep))
        load = parent.child_load
        first = (yield from self._read(1, bound, load))[0]
        second = None
        if first == 0:
            second = (yield from self._read(1, bound, load))[0]
            if second == 0:
                return None
        return (yield from self._header(bound, parent.depth + 1, load, keep, first, second))

    def _rest(self, head: _Head, bound: int | None, sink: bytearray | None) -> _Walk:
        """Pass over the contents of ``head`` (header read), kept into ``sink`` if given."""
        if not head.indefinite:
            yield from self._skip(self._left_in(head), sink)
            return
        while True:
            child = yield from self._child(head, bound, sink is not None)
            if sink is not None and not self.keeping:
                sink = None
            if child is None:
                if sink is not None:
                    self._keep(sink, b"\x00\x00")
                return
            if sink is not None:
                self._keep(sink, child.raw)
            yield from self._rest(child, bound, sink)

    def _guarded(self, head: _Head, walk: _Walk) -> _Walk:
        """Walk the contents of ``head``; with a definite length, a fault inside that loading
        does not see is noted as corruption and the rest of ``head`` passed over."""
        if head.indefinite:
            yield from walk
            return
        try:
            yield from walk
        except _Frame as exc:
            if exc.load:
                raise
            self.corrupt = True
            yield from self._skip(self._left_in(head), None)

    # --- the walk: structure ------------------------------------------------------------------

    def _walk(self) -> _Walk:
        try:
            yield from self._content_info()
        except (_Eof, _Frame):
            self.load_error = True
            return
        try:
            yield (_READ, 1)
        except _Eof:
            return
        self.load_error = True  # trailing data after the ContentInfo

    def _content_info(self) -> _Walk:
        top = yield from self._header(None, 0, True, False)
        if top.ident != 0x30:
            raise _Frame(True)  # no SEQUENCE: no ContentInfo
        top.child_load = True  # read for the content type
        bound = top.end
        first = yield from self._child(top, bound, True)
        if first is None or first.ident != 0x06:
            raise _Frame(True)  # the content type is missing or no OBJECT IDENTIFIER
        length = self._left_in(first)
        oid = None
        if length > MAX_OID_BYTES:
            raise _Frame(True)  # classify refuses it unread too (find_long_oid)
        if length > self._cap:
            self.over_cap = True
            yield from self._skip(length, None)
        else:
            oid = first.raw + (yield from self._read(length, bound, True))
            try:
                self.content_type = cms.ContentType.load(oid).native
            except Exception:  # noqa: BLE001 - asn1crypto raises many types on hostile input
                raise _Frame(True) from None
        enveloped = oid is not None and self.content_type in ENVELOPED_CONTENT_TYPES
        node = _Node(0x30, top.indefinite)
        if enveloped:
            self.root = node
            self._kept += len(oid)
            node.parts.append(oid)
        index = 1
        while True:
            keep = enveloped and self.keeping
            child = yield from self._child(top, bound, keep)
            if child is None:
                return
            index += 1
            yield from self._element(child, bound, node if keep else None, index == 2, "W")

    def _element(
        self, head: _Head, bound: int | None, node: _Node | None, candidate: bool, level: str
    ) -> _Walk:
        """A child in ``node`` (None: nothing kept): the next element on the way to the
        encrypted content if ``candidate`` and its identifier is what asn1crypto expects for
        ``level``, else kept verbatim."""
        expected = {"W": (0xA0,), "V": (0x30,), "ECI": (0x30,), "E": (0x80, 0xA0)}[level]
        if node is not None and candidate and head.ident in expected and self.keeping:
            if level == "E":
                yield from self._encrypted_content(head, bound, node)
                return
            sub = _Node(head.ident, head.indefinite)
            node.parts.append(sub)
            self._kept += 2
            yield from self._guarded(head, self._container(head, bound, sub, level))
            return
        sink = self._sink(node) if node is not None else None
        if sink is not None:
            self._keep(sink, head.raw)
        yield from self._rest(head, bound, sink)

    def _container(self, head: _Head, bound: int | None, node: _Node, level: str) -> _Walk:
        """The contents of W (the [0] around the envelope), V (Enveloped/AuthEnvelopedData)
        or ECI (EncryptedContentInfo), kept in ``node``."""
        inner = bound if head.indefinite else head.end
        # The child asn1crypto takes for the next field on the way: the envelope is W's first
        # (and only read) value; the EncryptedContentInfo follows version, [0] originatorInfo
        # if present, recipientInfos; the encrypted content is the third field of ECI.
        step = {"W": "V", "V": "ECI", "ECI": "E"}[level]
        wanted = 1 if level == "W" else 3
        index = 0
        while True:
            keep = self.keeping
            child = yield from self._child(head, bound, keep)
            if child is None:
                return
            index += 1
            if level == "V" and index == 2 and (child.cls, child.tag) == (2, 0):
                wanted = 4
            yield from self._element(
                child,
                inner,
                node if keep else None,
                index == wanted,
                step,
            )
            if index == wanted and not head.indefinite:
                # Behind it, a definite-length element is kept as it is: the rest of W is
                # never read, the rest of V and ECI is judged at the end.
                sink = self._sink(node)
                yield from self._skip(self._left_in(head), sink)
                return

    def _encrypted_content(self, head: _Head, bound: int | None, node: _Node) -> _Walk:
        """The encrypted content: counted, its first bytes kept; a stand-in is kept in its place."""
        self.has_content_field = True
        if head.ident == 0x80:  # primitive (a definite length, _header checked)
            yield from self._skip(self._left_in(head), _CONTENT)
            stand_in = b"\x80" + _der_length(len(self.sample)) + bytes(self.sample)
        elif not head.indefinite:
            # Constructed with a definite length: asn1crypto accepts the constructed form of
            # an OCTET STRING only with an indefinite length.
            self.corrupt = True
            yield from self._skip(self._left_in(head), None)
            return
        else:
            yield from self._chunks(head, bound)
            chunk = b""
            if self.content_length:
                chunk = b"\x04" + _der_length(len(self.sample)) + bytes(self.sample)
            stand_in = b"\xa0\x80" + chunk + b"\x00\x00"
        if self.keeping:
            self._kept += len(stand_in)
            node.parts.append(stand_in)

    def _chunks(self, head: _Head, bound: int | None) -> _Walk:
        """The chunks of a constructed, indefinite-length OCTET STRING, merged as asn1crypto
        merges them: each a primitive OCTET STRING or again constructed, indefinite-length."""
        while True:
            chunk = yield from self._child(head, bound, False)
            if chunk is None:
                return
            if chunk.ident == 0x04:
                yield from self._skip(self._left_in(chunk), _CONTENT)
            elif chunk.ident == 0x24 and chunk.indefinite:
                yield from self._chunks(chunk, bound)
            else:
                self.corrupt = True  # not an OCTET STRING chunk
                yield from self._rest(chunk, bound, None)
