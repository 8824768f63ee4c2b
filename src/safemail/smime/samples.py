"""Sample messages for the S/MIME gate: synthetic CMS structures and the MIME around them.

The unit tests, the fuzz tests, the benchmark and the verify suite (which sends these at the
relay to prove MAIL-03 from outside) share one catalogue here. The enveloped samples are
structurally valid CMS but synthetic: their "encrypted" bytes are seeded pseudo-random data
that no key decrypts. Real, decryptable mail comes from ``safemail.participant``.

Standard library and asn1crypto only, like :mod:`safemail.smime.classify`.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Sequence
from dataclasses import dataclass

from asn1crypto import algos, cms, core, x509

__all__ = [
    "SMIME_ENVELOPED_TYPE",
    "Sample",
    "accepted_samples",
    "base64_lines",
    "compressed_der",
    "data_der",
    "enveloped_der",
    "mime_message",
    "refused_samples",
    "signed_der",
    "smime_message",
]

SMIME_ENVELOPED_TYPE = 'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"'
_AES256_GCM_OID = "2.16.840.1.101.3.4.1.46"
_INNER = b'Content-Type: text/plain; charset="utf-8"\r\n\r\nBefund folgt.\r\n'


def _rng(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - deterministic filler bytes, not secrets


def _recipient(kind: str, index: int, rng: random.Random) -> cms.RecipientInfo:
    if kind == "issuer_serial":
        rid = cms.RecipientIdentifier(
            name="issuer_and_serial_number",
            value=cms.IssuerAndSerialNumber(
                {
                    "issuer": x509.Name.build({"common_name": "SafeMail Test CA"}),
                    "serial_number": 1000 + index,
                }
            ),
        )
        version = "v0"
    elif kind == "subject_key_id":
        rid = cms.RecipientIdentifier(name="subject_key_identifier", value=rng.randbytes(20))
        version = "v2"
    else:
        raise ValueError(f"unknown recipient id form {kind!r}")
    return cms.RecipientInfo(
        name="ktri",
        value=cms.KeyTransRecipientInfo(
            {
                "version": version,
                "rid": rid,
                "key_encryption_algorithm": {"algorithm": "rsaes_pkcs1v15"},
                "encrypted_key": rng.randbytes(384),
            }
        ),
    )


def enveloped_der(
    *,
    recipients: Sequence[str] = ("issuer_serial",),
    auth: bool = False,
    content_size: int = 256,
    with_content: bool = True,
    seed: int = 1,
) -> bytes:
    """A synthetic enveloped-data (or authenticated-enveloped-data) ContentInfo, as DER.

    ``recipients`` lists one recipient id form per recipient: ``issuer_serial`` or
    ``subject_key_id``. An empty list gives the (invalid) zero-recipient envelope.
    """
    rng = _rng(seed)
    infos = [_recipient(kind, i, rng) for i, kind in enumerate(recipients)]
    version = "v2" if any(k == "subject_key_id" for k in recipients) else "v0"
    if auth:
        # Build the parameters SEQUENCE { aes-nonce OCTET STRING, aes-ICVlen INTEGER } by hand:
        # asn1crypto 1.5 has no GCM parameter type.
        params_body = core.OctetString(rng.randbytes(12)).dump() + core.Integer(16).dump()
        params = core.Any.load(b"\x30" + _der_length(len(params_body)) + params_body)
        algorithm = algos.EncryptionAlgorithm({"algorithm": _AES256_GCM_OID, "parameters": params})
    else:
        algorithm = algos.EncryptionAlgorithm(
            {"algorithm": "aes256_cbc", "parameters": rng.randbytes(16)}
        )
    content_info: dict[str, object] = {
        "content_type": "data",
        "content_encryption_algorithm": algorithm,
    }
    if with_content:
        content_info["encrypted_content"] = rng.randbytes(max(16, content_size - content_size % 16))
    if auth:
        envelope: core.Sequence = cms.AuthEnvelopedData(
            {
                "version": "v0",
                "recipient_infos": infos,
                "auth_encrypted_content_info": content_info,
                "mac": rng.randbytes(16),
            }
        )
        content_type = "authenticated_enveloped_data"
    else:
        envelope = cms.EnvelopedData(
            {"version": version, "recipient_infos": infos, "encrypted_content_info": content_info}
        )
        content_type = "enveloped_data"
    return cms.ContentInfo({"content_type": content_type, "content": envelope}).dump()


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def signed_der(content: bytes = _INNER) -> bytes:
    """An opaque signed-data ContentInfo (no signers needed to show it is not encrypted)."""
    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [{"algorithm": "sha256"}],
            "encap_content_info": {"content_type": "data", "content": content},
            "signer_infos": [],
        }
    )
    return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()


def compressed_der(content: bytes = _INNER) -> bytes:
    """A compressed-data ContentInfo (RFC 3274), zlib."""
    import zlib

    compressed = cms.CompressedData(
        {
            "version": "v0",
            "compression_algorithm": {"algorithm": "zlib"},
            "encap_content_info": {"content_type": "data", "content": zlib.compress(content)},
        }
    )
    return cms.ContentInfo({"content_type": "compressed_data", "content": compressed}).dump()


def data_der(content: bytes = _INNER) -> bytes:
    """A plain data ContentInfo: CMS-shaped, not encrypted."""
    return cms.ContentInfo({"content_type": "data", "content": content}).dump()


def base64_lines(der: bytes, width: int = 76) -> bytes:
    """Base64 with CRLF line breaks every ``width`` characters, as MIME writes it."""
    encoded = base64.b64encode(der)
    return b"".join(encoded[i : i + width] + b"\r\n" for i in range(0, len(encoded), width))


def mime_message(
    body: bytes,
    *,
    content_type: str | None = SMIME_ENVELOPED_TYPE,
    transfer_encoding: str | None = "base64",
    subject: str = "Befund",
    extra_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """An RFC 5322 message with the given top-level headers and (already encoded) body."""
    headers = [
        ("From", "praxis1@safenet.test"),
        ("To", "praxis2@safenet.test"),
        ("Subject", subject),
        ("Date", "Mon, 03 Mar 2025 10:00:00 +0100"),
        ("Message-ID", "<sample@safenet.test>"),
        ("MIME-Version", "1.0"),
    ]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    if transfer_encoding is not None:
        headers.append(("Content-Transfer-Encoding", transfer_encoding))
    headers.extend(extra_headers)
    head = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    return head + b"\r\n" + body


def smime_message(der: bytes, **kwargs: object) -> bytes:
    """``der`` base64-encoded inside a top-level application/pkcs7-mime message."""
    return mime_message(base64_lines(der), **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Sample:
    """One sample message and the verdict code the gate must give it."""

    name: str
    message: bytes
    code: str


def accepted_samples() -> list[Sample]:
    """Messages the gate must accept (synthetic envelopes, every accepted form)."""
    x_type = SMIME_ENVELOPED_TYPE.replace("application/", "application/x-")
    return [
        Sample("enveloped_issuer_serial", smime_message(enveloped_der()), "accepted"),
        Sample(
            "enveloped_subject_key_id",
            smime_message(enveloped_der(recipients=("subject_key_id",))),
            "accepted",
        ),
        Sample(
            "enveloped_two_recipients",
            smime_message(enveloped_der(recipients=("issuer_serial", "subject_key_id"))),
            "accepted",
        ),
        Sample("auth_enveloped", smime_message(enveloped_der(auth=True)), "accepted"),
        Sample("x_pkcs7_mime", smime_message(enveloped_der(), content_type=x_type), "accepted"),
        Sample(
            "smime_type_missing",
            smime_message(enveloped_der(), content_type="application/pkcs7-mime"),
            "accepted",
        ),
        Sample(
            "binary_transfer_encoding",
            mime_message(enveloped_der() + b"\r\n", transfer_encoding="binary"),
            "accepted",
        ),
    ]


def refused_samples() -> list[Sample]:
    """Messages the gate must refuse, each with the expected verdict code (MAIL-03)."""
    env = enveloped_der()
    b64 = base64_lines(env)
    text = b"Sehr geehrte Kollegin,\r\nanbei der Befund.\r\n"
    multipart_mixed = (
        b"--b1\r\n"
        + f"Content-Type: {SMIME_ENVELOPED_TYPE}\r\n".encode()
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64
        + b"--b1\r\nContent-Type: text/plain\r\n\r\n"
        + text
        + b"--b1--\r\n"
    )
    return [
        Sample("empty_message", b"", "empty_body"),
        Sample("plaintext_no_content_type", mime_message(text, content_type=None), "plaintext"),
        Sample("plaintext_text_plain", mime_message(text, content_type="text/plain"), "plaintext"),
        Sample("html", mime_message(text, content_type="text/html; charset=utf-8"), "plaintext"),
        Sample(
            "multipart_mixed_with_smime_part",
            mime_message(multipart_mixed, content_type='multipart/mixed; boundary="b1"'),
            "multipart",
        ),
        Sample(
            "multipart_signed",
            mime_message(
                b"--s\r\nContent-Type: text/plain\r\n\r\n" + text + b"--s--\r\n",
                content_type='multipart/signed; protocol="application/pkcs7-signature"; '
                'micalg=sha-256; boundary="s"',
            ),
            "multipart",
        ),
        Sample(
            "opaque_signed",
            smime_message(
                signed_der(),
                content_type='application/pkcs7-mime; smime-type=signed-data; name="smime.p7m"',
            ),
            "signed_only",
        ),
        Sample("signed_claiming_enveloped", smime_message(signed_der()), "signed_only"),
        Sample(
            "compressed",
            smime_message(
                compressed_der(),
                content_type='application/pkcs7-mime; smime-type=compressed-data; name="smime.p7z"',
            ),
            "compressed",
        ),
        Sample("cms_data", smime_message(data_der()), "not_enveloped"),
        Sample("zero_recipients", smime_message(enveloped_der(recipients=())), "no_recipients"),
        Sample(
            "detached_content",
            smime_message(enveloped_der(with_content=False)),
            "no_encrypted_content",
        ),
        Sample("pkcs7_header_over_text", mime_message(text), "bad_base64"),
        Sample(
            "pkcs7_header_over_base64_text",
            mime_message(base64_lines(text)),
            "malformed_cms",
        ),
        Sample("truncated_cms", smime_message(env[: len(env) // 2]), "malformed_cms"),
        Sample("trailing_garbage", smime_message(env + b"\x00garbage"), "malformed_cms"),
        Sample("bad_base64", mime_message(b64[:-3] + b"!!\r\n"), "bad_base64"),
        Sample("bad_base64_padding", mime_message(b64.rstrip()[:-1] + b"\r\n"), "bad_base64"),
        Sample("empty_body", mime_message(b""), "empty_body"),
        Sample("whitespace_body", mime_message(b"\r\n \r\n"), "empty_body"),
        Sample(
            "seven_bit_transfer_encoding",
            mime_message(b64, transfer_encoding=None),
            "bad_transfer_encoding",
        ),
        Sample(
            "quoted_printable",
            mime_message(b64, transfer_encoding="quoted-printable"),
            "bad_transfer_encoding",
        ),
        Sample(
            "two_content_types",
            mime_message(b64, extra_headers=[("Content-Type", "text/plain")]),
            "ambiguous_headers",
        ),
        Sample(
            "two_transfer_encodings",
            mime_message(b64, extra_headers=[("Content-Transfer-Encoding", "7bit")]),
            "ambiguous_headers",
        ),
        Sample(
            "pkcs7_signature_part",
            smime_message(signed_der(), content_type="application/pkcs7-signature"),
            "not_smime",
        ),
        Sample(
            "octet_stream", smime_message(env, content_type="application/octet-stream"), "not_smime"
        ),
        Sample(
            "broken_header_line",
            b"From: a@safenet.test\r\nthis is no header\r\n"
            + f"Content-Type: {SMIME_ENVELOPED_TYPE}\r\n".encode()
            + b"Content-Transfer-Encoding: base64\r\n\r\n"
            + b64,
            "malformed_headers",
        ),
    ]
