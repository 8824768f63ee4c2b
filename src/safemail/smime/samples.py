"""Sample messages for the S/MIME gate: synthetic CMS structures and the MIME around them.

The unit tests, the fuzz tests, the benchmark and the verify suite (which sends these at the
relay to prove MAIL-03 from outside) share one catalogue here. The enveloped samples are
structurally valid CMS but synthetic: their "encrypted" bytes are seeded pseudo-random data
that no key decrypts. Real, decryptable mail comes from ``safemail.participant``. Keyword
options of :func:`enveloped_der` build the envelopes the cryptographic policy
(:mod:`safemail.smime.policy`) refuses: weak or unknown ciphers, small RSA keys, weak ECDH,
other recipient kinds, readable data outside the encryption, content that is no ciphertext.

Standard library and asn1crypto only, like :mod:`safemail.smime.classify`.
"""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from asn1crypto import algos, cms, core, keys, x509

from safemail.smime.policy import CURVES

__all__ = [
    "SMIME_ENVELOPED_TYPE",
    "Sample",
    "accepted_samples",
    "base64_lines",
    "compressed_der",
    "data_der",
    "enveloped_der",
    "mime_message",
    "policy_refused_samples",
    "refused_samples",
    "signed_der",
    "smime_message",
    "with_from",
]

SMIME_ENVELOPED_TYPE = 'application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"'
_INNER = b'Content-Type: text/plain; charset="utf-8"\r\n\r\nBefund folgt.\r\n'
# Readable data where only ciphertext belongs (a fictitious patient).
_READABLE = "Befund Erika Mustermann, geb. 01.02.1960: Blutbild ohne Befund."

# OIDs the options of enveloped_der take; the policy's catalogue has the full list.
AES256_CBC_OID = "2.16.840.1.101.3.4.1.42"
AES256_GCM_OID = "2.16.840.1.101.3.4.1.46"
AES256_CCM_OID = "2.16.840.1.101.3.4.1.47"
DES_CBC_OID = "1.3.14.3.2.7"
DES_EDE3_CBC_OID = "1.2.840.113549.3.7"
RC2_CBC_OID = "1.2.840.113549.3.2"
CAMELLIA256_CBC_OID = "1.2.392.200011.61.1.1.1.4"  # sound, but not in the gate's catalogue
RSA_PKCS1V15_OID = "1.2.840.113549.1.1.1"
RSAES_OAEP_OID = "1.2.840.113549.1.1.7"
RSASSA_PSS_OID = "1.2.840.113549.1.1.10"  # a signature algorithm, no key transport
ECDH_SHA256KDF_OID = "1.3.132.1.11.1"
ECDH_SHA1KDF_OID = "1.3.133.16.840.63.0.2"
AES256_WRAP_OID = "2.16.840.1.101.3.4.1.45"
DES_EDE3_WRAP_OID = "1.2.840.113549.1.9.16.3.6"
P256_OID = "1.2.840.10045.3.1.7"
P224_OID = "1.3.132.0.33"
_PWRI_KEK_OID = "1.2.840.113549.1.9.16.3.9"
_EXAMPLE_OID = "2.999.1"  # ITU-T X.660's arc for examples: an "other" format nobody defines

_AEAD_OIDS = frozenset(f"2.16.840.1.101.3.4.1.{arc}" for arc in (6, 26, 46, 7, 27, 47))
_CCM_OIDS = frozenset(f"2.16.840.1.101.3.4.1.{arc}" for arc in (7, 27, 47))
_ECB_OIDS = frozenset(f"2.16.840.1.101.3.4.1.{arc}" for arc in (1, 21, 41))
_CURVE_BITS = {curve.oid: curve.bits for curve in CURVES.values()}


def _rng(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 - deterministic filler bytes, not secrets


@dataclass(frozen=True)
class _RecipientOptions:
    key_transport_oid: str = RSA_PKCS1V15_OID
    encrypted_key_size: int = 384
    key_agreement_oid: str = ECDH_SHA256KDF_OID
    key_wrap_oid: str = AES256_WRAP_OID
    curve_oid: str | None = P256_OID


def _issuer_serial(index: int) -> cms.IssuerAndSerialNumber:
    return cms.IssuerAndSerialNumber(
        {
            "issuer": x509.Name.build({"common_name": "SafeMail Test CA"}),
            "serial_number": 1000 + index,
        }
    )


def _recipient(
    kind: str, index: int, rng: random.Random, options: _RecipientOptions
) -> cms.RecipientInfo:
    if kind in ("issuer_serial", "subject_key_id"):
        return _ktri(kind, index, rng, options)
    if kind == "kari":
        return cms.RecipientInfo(name="kari", value=_kari(index, rng, options))
    if kind == "kekri":
        kekri = {
            "version": "v4",
            "kekid": {"key_identifier": rng.randbytes(8)},
            "key_encryption_algorithm": {"algorithm": "aes256_wrap"},
            "encrypted_key": rng.randbytes(40),
        }
        return cms.RecipientInfo(name="kekri", value=cms.KEKRecipientInfo(kekri))
    if kind == "pwri":
        kek = {"algorithm": "aes256_cbc", "parameters": core.OctetString(rng.randbytes(16))}
        pwri = {
            "version": "v0",
            "key_encryption_algorithm": {
                "algorithm": _PWRI_KEK_OID,
                "parameters": algos.EncryptionAlgorithm(kek),
            },
            "encrypted_key": rng.randbytes(48),
        }
        return cms.RecipientInfo(name="pwri", value=cms.PasswordRecipientInfo(pwri))
    if kind == "ori":
        ori = {"ori_type": _EXAMPLE_OID, "ori_value": core.OctetString(rng.randbytes(32))}
        return cms.RecipientInfo(name="ori", value=cms.OtherRecipientInfo(ori))
    raise ValueError(f"unknown recipient kind {kind!r}")


def _ktri(
    kind: str, index: int, rng: random.Random, options: _RecipientOptions
) -> cms.RecipientInfo:
    if kind == "issuer_serial":
        rid = cms.RecipientIdentifier(name="issuer_and_serial_number", value=_issuer_serial(index))
        version = "v0"
    else:
        rid = cms.RecipientIdentifier(name="subject_key_identifier", value=rng.randbytes(20))
        version = "v2"
    return cms.RecipientInfo(
        name="ktri",
        value=cms.KeyTransRecipientInfo(
            {
                "version": version,
                "rid": rid,
                "key_encryption_algorithm": {"algorithm": options.key_transport_oid},
                # An RSA-encrypted key is as long as the recipient's modulus: 384 = 3072 bits.
                "encrypted_key": rng.randbytes(options.encrypted_key_size),
            }
        ),
    )


def _kari(index: int, rng: random.Random, options: _RecipientOptions) -> cms.KeyAgreeRecipientInfo:
    """ECDH (RFC 5753) with an ephemeral sender key on ``curve_oid`` (None: curve not named)."""
    field_bytes = -(-_CURVE_BITS.get(options.curve_oid or P256_OID, 256) // 8)
    algorithm: dict[str, object] = {"algorithm": "ec"}
    if options.curve_oid is not None:
        algorithm["parameters"] = keys.ECDomainParameters(name="named", value=options.curve_oid)
    sender_key = keys.PublicKeyInfo(
        {"algorithm": algorithm, "public_key": b"\x04" + rng.randbytes(2 * field_bytes)}
    )
    wrap = cms.KeyEncryptionAlgorithm({"algorithm": options.key_wrap_oid})
    return cms.KeyAgreeRecipientInfo(
        {
            "version": "v3",
            "originator": cms.OriginatorIdentifierOrKey(name="originator_key", value=sender_key),
            "key_encryption_algorithm": {
                "algorithm": options.key_agreement_oid,
                "parameters": wrap,
            },
            "recipient_encrypted_keys": [
                {
                    "rid": cms.KeyAgreementRecipientIdentifier(
                        name="issuer_and_serial_number", value=_issuer_serial(index)
                    ),
                    "encrypted_key": rng.randbytes(40),  # AES key wrap of a 256-bit key
                }
            ],
        }
    )


def _content_algorithm(
    cipher_oid: str, rng: random.Random, icv_len: int
) -> algos.EncryptionAlgorithm:
    """The content-encryption AlgorithmIdentifier, with parameters of the right shape."""
    parameters: core.Asn1Value | None
    if cipher_oid in _AEAD_OIDS:
        # SEQUENCE { aes-nonce OCTET STRING, aes-ICVlen INTEGER } (RFC 5084), built by hand:
        # asn1crypto 1.5 has no GCM parameter type (its CCM type has the same shape).
        body = core.OctetString(rng.randbytes(12)).dump() + core.Integer(icv_len).dump()
        der = b"\x30" + _der_length(len(body)) + body
        parameters = algos.CcmParams.load(der) if cipher_oid in _CCM_OIDS else core.Any.load(der)
    elif cipher_oid in _ECB_OIDS:
        parameters = None
    elif cipher_oid == RC2_CBC_OID:
        # RC2 with 40 effective key bits (rc2ParameterVersion 160, RFC 8018 B.2.3).
        parameters = algos.Rc2Params({"rc2_parameter_version": 160, "iv": rng.randbytes(8)})
    elif cipher_oid in (DES_CBC_OID, DES_EDE3_CBC_OID):
        parameters = core.OctetString(rng.randbytes(8))
    else:
        parameters = core.OctetString(rng.randbytes(16))
    fields: dict[str, object] = {"algorithm": cipher_oid}
    if parameters is not None:
        fields["parameters"] = parameters
    return algos.EncryptionAlgorithm(fields)


def _attributes(*, readable: bool) -> cms.CMSAttributes:
    """Readable text in an attribute of an example type, or the content-type attribute."""
    if readable:
        return cms.CMSAttributes([{"type": _EXAMPLE_OID, "values": [core.UTF8String(_READABLE)]}])
    return cms.CMSAttributes([{"type": "content_type", "values": ["data"]}])


def _originator_info() -> cms.OriginatorInfo:
    """Originator info whose "certificate" is readable text (RFC 5652 allows other formats)."""
    other = {"other_cert_format": _EXAMPLE_OID, "other_cert": core.UTF8String(_READABLE)}
    return cms.OriginatorInfo({"certs": [cms.CertificateChoices(name="other", value=other)]})


def _envelope_version(kinds: Sequence[str], originator_info: bool, attrs: bool) -> str:
    """EnvelopedData's version, as RFC 5652 §6.1 derives it."""
    if originator_info:  # with an "other" certificate format
        return "v4"
    if {"pwri", "ori"} & set(kinds):
        return "v3"
    if not attrs and all(kind == "issuer_serial" for kind in kinds):
        return "v0"
    return "v2"


def enveloped_der(
    *,
    recipients: Sequence[str] = ("issuer_serial",),
    auth: bool = False,
    content_size: int = 256,
    with_content: bool = True,
    seed: int = 1,
    cipher_oid: str | None = None,
    encrypted_content: bytes | None = None,
    mac_size: int = 16,
    icv_len: int | None = None,
    key_transport_oid: str = RSA_PKCS1V15_OID,
    encrypted_key_size: int = 384,
    key_agreement_oid: str = ECDH_SHA256KDF_OID,
    key_wrap_oid: str = AES256_WRAP_OID,
    curve_oid: str | None = P256_OID,
    unprotected_attrs: bool = False,
    auth_attrs: bool = False,
    originator_info: bool = False,
) -> bytes:
    """A synthetic enveloped-data (or authenticated-enveloped-data) ContentInfo, as DER.

    ``recipients`` lists one recipient per entry: ``issuer_serial`` or ``subject_key_id`` (RSA
    key transport with ``key_transport_oid`` and an ``encrypted_key_size``-byte wrapped key),
    ``kari`` (ECDH with ``key_agreement_oid``, ``key_wrap_oid`` and a sender key on
    ``curve_oid``, None for a curve not named), or ``kekri``, ``pwri``, ``ori``. An empty list
    gives the (invalid) zero-recipient envelope.

    The content is AES-256-CBC, or AES-256-GCM with ``auth``, unless ``cipher_oid`` names
    another cipher; ``encrypted_content`` replaces the random ciphertext. With ``auth``, the
    mac has ``mac_size`` bytes and the GCM parameters announce ``icv_len`` (default: the same).
    ``unprotected_attrs`` adds readable unprotectedAttrs (unauthAttrs with ``auth``),
    ``auth_attrs`` a content-type authAttr (``auth`` only), ``originator_info`` originator
    info with a readable "certificate".
    """
    rng = _rng(seed)
    options = _RecipientOptions(
        key_transport_oid, encrypted_key_size, key_agreement_oid, key_wrap_oid, curve_oid
    )
    infos = [_recipient(kind, i, rng, options) for i, kind in enumerate(recipients)]
    default_cipher = AES256_GCM_OID if auth else AES256_CBC_OID
    algorithm = _content_algorithm(
        cipher_oid or default_cipher, rng, mac_size if icv_len is None else icv_len
    )
    content_info: dict[str, object] = {
        "content_type": "data",
        "content_encryption_algorithm": algorithm,
    }
    if encrypted_content is not None:
        content_info["encrypted_content"] = encrypted_content
    elif with_content:
        content_info["encrypted_content"] = rng.randbytes(max(16, content_size - content_size % 16))
    extra: dict[str, object] = {}
    if originator_info:
        extra["originator_info"] = _originator_info()
    if auth:
        if auth_attrs:
            extra["auth_attrs"] = _attributes(readable=False)
        if unprotected_attrs:
            extra["unauth_attrs"] = _attributes(readable=True)
        envelope: core.Sequence = cms.AuthEnvelopedData(
            {
                "version": "v0",
                "recipient_infos": infos,
                "auth_encrypted_content_info": content_info,
                "mac": rng.randbytes(mac_size),
                **extra,
            }
        )
        content_type = "authenticated_enveloped_data"
    else:
        if unprotected_attrs:
            extra["unprotected_attrs"] = _attributes(readable=True)
        version = _envelope_version(recipients, originator_info, unprotected_attrs)
        envelope = cms.EnvelopedData(
            {
                "version": version,
                "recipient_infos": infos,
                "encrypted_content_info": content_info,
                **extra,
            }
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
    message_id: str | None = None,
) -> bytes:
    """An RFC 5322 message with the given top-level headers and (already encoded) body.

    The Message-ID (unless `message_id` sets one) is derived from everything else, so a sample
    is the same bytes every time and two different messages never share one: the store keeps
    one copy of a mail delivered twice with the same Message-ID from the same sender
    (roles/mailstore, the duplicate filter), so a fixed one would make every test mail after
    the first disappear."""
    headers = [
        ("From", "praxis1@safenet.test"),
        ("To", "praxis2@safenet.test"),
        ("Subject", subject),
        ("Date", "Mon, 03 Mar 2025 10:00:00 +0100"),
        ("Message-ID", message_id or "<sample-{}@safenet.test>"),
        ("MIME-Version", "1.0"),
    ]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    if transfer_encoding is not None:
        headers.append(("Content-Transfer-Encoding", transfer_encoding))
    headers.extend(extra_headers)
    head = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    if message_id is None:
        digest = hashlib.sha256(head + b"\r\n" + body).hexdigest()[:24]
        head = head.replace(b"<sample-{}@", f"<sample-{digest}@".encode(), 1)
    return head + b"\r\n" + body


def with_from(message: bytes, address: str) -> bytes:
    """``message`` with its (first) From header replaced by ``address``: the gate requires the
    From of a participant's mail to be the participant's own mailbox (its SASL login)."""
    head, sep, body = message.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(b"from:"):
            lines[i] = b"From: " + address.encode()
            break
    else:
        lines.insert(0, b"From: " + address.encode())
    return b"\r\n".join(lines) + sep + body


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
        Sample(
            "enveloped_ecdh_p256", smime_message(enveloped_der(recipients=("kari",))), "accepted"
        ),
        Sample(
            "enveloped_rsa_oaep",
            smime_message(enveloped_der(key_transport_oid=RSAES_OAEP_OID)),
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
        *policy_refused_samples(),
    ]


def _policy_sample(name: str, code: str, **options: object) -> Sample:
    return Sample(name, smime_message(enveloped_der(**options)), code)  # type: ignore[arg-type]


def policy_refused_samples() -> list[Sample]:
    """Complete envelopes the cryptographic policy refuses (issue 17), with their codes.

    Part of :func:`refused_samples`; separate so tests can tell structure from policy.
    """
    weak, unknown = "weak_content_cipher", "unknown_content_cipher"
    ecdh, kind = "weak_key_agreement", "unsupported_recipient_kind"
    text = _READABLE.encode()
    readable = text + b" " * (-len(text) % 16)  # whole AES blocks, so only the text check fires
    return [
        _policy_sample("des_cbc", weak, cipher_oid=DES_CBC_OID),
        _policy_sample("des_ede3_cbc", weak, cipher_oid=DES_EDE3_CBC_OID),
        _policy_sample("rc2_40", weak, cipher_oid=RC2_CBC_OID),
        _policy_sample("aes256_ccm", weak, auth=True, cipher_oid=AES256_CCM_OID),
        _policy_sample("gcm_in_enveloped_data", weak, cipher_oid=AES256_GCM_OID),
        _policy_sample("cbc_in_auth_enveloped_data", weak, auth=True, cipher_oid=AES256_CBC_OID),
        _policy_sample("unknown_content_cipher", unknown, cipher_oid=CAMELLIA256_CBC_OID),
        _policy_sample(
            "unknown_key_transport", "weak_key_transport", key_transport_oid=RSASSA_PSS_OID
        ),
        _policy_sample("rsa_2048", "rsa_key_too_small", encrypted_key_size=256),
        _policy_sample("rsa_1024", "rsa_key_too_small", encrypted_key_size=128),
        _policy_sample(
            "ecdh_sha1_kdf", ecdh, recipients=("kari",), key_agreement_oid=ECDH_SHA1KDF_OID
        ),
        _policy_sample(
            "ecdh_3des_key_wrap", ecdh, recipients=("kari",), key_wrap_oid=DES_EDE3_WRAP_OID
        ),
        _policy_sample("ecdh_p224", ecdh, recipients=("kari",), curve_oid=P224_OID),
        _policy_sample("kekri_recipient", kind, recipients=("kekri",)),
        _policy_sample("pwri_recipient", kind, recipients=("pwri",)),
        _policy_sample("ori_recipient", kind, recipients=("ori",)),
        _policy_sample("kekri_beside_certificate", kind, recipients=("issuer_serial", "kekri")),
        _policy_sample("unprotected_attributes", "unprotected_attributes", unprotected_attrs=True),
        _policy_sample(
            "unauth_attributes", "unprotected_attributes", auth=True, unprotected_attrs=True
        ),
        _policy_sample("auth_attributes", "unprotected_attributes", auth=True, auth_attrs=True),
        _policy_sample("originator_info", "originator_info", originator_info=True),
        _policy_sample("readable_encrypted_content", "not_ciphertext", encrypted_content=readable),
        _policy_sample("cbc_partial_block", "not_ciphertext", encrypted_content=bytes(range(100))),
        _policy_sample("gcm_short_tag", "not_ciphertext", auth=True, mac_size=8),
        _policy_sample("gcm_tag_length_mismatch", "not_ciphertext", auth=True, icv_len=12),
    ]
