"""The S/MIME gate's cryptographic policy (issue 17; MAIL-03): algorithms, sizes, readable data."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import certs
import pytest
from asn1crypto import algos, cms, core
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from safemail.participant import message as pmessage
from safemail.smime import policy, samples
from safemail.smime.classify import Verdict, classify
from safemail.smime.policy import (
    DEFAULT_POLICY,
    POLICY_CODES,
    CryptoPolicy,
    check_envelope,
    load_crypto_policy,
    looks_like_text,
    policy_from_mapping,
)

POLICY_REFUSED = samples.policy_refused_samples()
ROOT = Path(__file__).resolve().parents[1]


def verdict(der: bytes, crypto: CryptoPolicy | None = None) -> Verdict:
    return classify(samples.smime_message(der), policy=crypto)


def code(der: bytes, crypto: CryptoPolicy | None = None) -> str:
    return verdict(der, crypto).code


def rng(seed: int) -> random.Random:
    return random.Random(seed)


# --- every refusal code, with a complete message --------------------------------------------


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("sample", POLICY_REFUSED, ids=[s.name for s in POLICY_REFUSED])
def test_policy_refused_samples(sample: samples.Sample) -> None:
    result = classify(sample.message)
    assert (result.accepted, result.code) == (False, sample.code), result.reason
    assert result.reason.startswith("523 Encryption Needed: message is not S/MIME encrypted (")
    assert "\n" not in result.reason and len(result.reason) < 400


def test_every_policy_code_has_a_sample_in_the_verify_catalogue() -> None:
    assert {s.code for s in POLICY_REFUSED} == set(POLICY_CODES)
    assert set(POLICY_REFUSED) <= set(samples.refused_samples())
    assert len({s.name for s in samples.refused_samples()}) == len(samples.refused_samples())


def test_reason_names_the_algorithm_and_what_is_allowed() -> None:
    result = verdict(samples.enveloped_der(cipher_oid=samples.DES_CBC_OID))
    assert result.reason == (
        "523 Encryption Needed: message is not S/MIME encrypted (content encryption des_cbc is "
        "not allowed (allowed: AES-128/192/256 in CBC or GCM, BSI TR-02102-1))"
    )
    result = verdict(samples.enveloped_der(encrypted_key_size=256))
    assert "RSA key has 2048 bits, at least 3072 are required" in result.reason


def test_check_envelope_returns_code_and_detail() -> None:
    info = cms.ContentInfo.load(samples.enveloped_der(unprotected_attrs=True))
    found = check_envelope(info, DEFAULT_POLICY)
    assert found is not None and found[0] == "unprotected_attributes"
    assert check_envelope(cms.ContentInfo.load(samples.enveloped_der()), DEFAULT_POLICY) is None
    with pytest.raises(ValueError, match="needs enveloped data"):
        check_envelope(cms.ContentInfo.load(samples.data_der()), DEFAULT_POLICY)


def test_the_weakest_recipient_decides() -> None:
    """One good certificate recipient does not make a pre-shared-key recipient acceptable."""
    der = samples.enveloped_der(recipients=("issuer_serial", "kari", "issuer_serial"))
    assert verdict(der).accepted
    der = samples.enveloped_der(recipients=("kari", "issuer_serial"), encrypted_key_size=256)
    assert code(der) == "rsa_key_too_small"


def test_ecb_ofb_cfb_and_rc4_are_refused_as_weak() -> None:
    for name in ("aes256_ecb", "aes128_ofb", "aes192_cfb", "rc4"):
        der = samples.enveloped_der(cipher_oid=policy.CONTENT_CIPHERS[name].oid)
        assert code(der) == "weak_content_cipher", name


def _without_curve_name(der: bytes) -> bytes:
    """The envelope with the named curve left out of the sender's ECDH key (as OpenSSL does)."""
    info = cms.ContentInfo.load(der)
    sender_key = info["content"]["recipient_infos"][0].chosen["originator"].chosen
    sender_key["algorithm"]["parameters"] = None
    return info.dump(force=True)


def _with_cipher_parameters(der: bytes, parameters: bytes) -> bytes:
    """The envelope with the content-encryption parameters replaced by ``parameters`` (DER)."""
    info = cms.ContentInfo.load(der)
    auth = info["content_type"].native == "authenticated_enveloped_data"
    content = info["content"]["auth_encrypted_content_info" if auth else "encrypted_content_info"]
    old = content["content_encryption_algorithm"]
    body = old["algorithm"].dump() + parameters
    content["content_encryption_algorithm"] = algos.EncryptionAlgorithm.load(
        b"\x30" + bytes([len(body)]) + body
    )
    return info.dump()


def test_curve_is_judged_by_size_when_the_sender_does_not_name_it() -> None:
    """OpenSSL leaves the curve out (RFC 5753 allows it); the point's length still shows it."""
    assert verdict(samples.enveloped_der(recipients=("kari",), curve_oid=None)).accepted
    p224 = samples.enveloped_der(recipients=("kari",), curve_oid=samples.P224_OID)
    result = verdict(_without_curve_name(p224))
    assert result.code == "weak_key_agreement" and "unnamed 224-bit curve" in result.reason


# --- everything the default policy allows is accepted ----------------------------------------


@pytest.mark.req("MAIL-03")
@pytest.mark.parametrize("name", DEFAULT_POLICY.content_ciphers)
def test_default_content_ciphers_are_accepted(name: str) -> None:
    cipher = policy.CONTENT_CIPHERS[name]
    der = samples.enveloped_der(cipher_oid=cipher.oid, auth=cipher.mode == "gcm")
    assert verdict(der).accepted


@pytest.mark.parametrize("name", DEFAULT_POLICY.key_transport)
@pytest.mark.parametrize("key_bytes", [384, 512, 1024])
def test_default_key_transport_is_accepted(name: str, key_bytes: int) -> None:
    oid = policy.KEY_TRANSPORT[name].oid
    der = samples.enveloped_der(key_transport_oid=oid, encrypted_key_size=key_bytes)
    assert verdict(der).accepted


@pytest.mark.parametrize("name", DEFAULT_POLICY.key_agreement)
def test_default_key_agreement_is_accepted(name: str) -> None:
    oid = policy.KEY_AGREEMENT[name].oid
    assert verdict(samples.enveloped_der(recipients=("kari",), key_agreement_oid=oid)).accepted


@pytest.mark.parametrize("name", DEFAULT_POLICY.key_wrap)
def test_default_key_wraps_are_accepted(name: str) -> None:
    oid = policy.KEY_WRAP[name].oid
    assert verdict(samples.enveloped_der(recipients=("kari",), key_wrap_oid=oid)).accepted


@pytest.mark.parametrize("name", DEFAULT_POLICY.curves)
@pytest.mark.parametrize("named", [True, False])
def test_default_curves_are_accepted(name: str, named: bool) -> None:
    oid = policy.CURVES[name].oid
    der = samples.enveloped_der(recipients=("kari",), curve_oid=oid)
    if not named:
        der = _without_curve_name(der)
    assert verdict(der).accepted


def test_permitted_algorithms_outside_the_default_need_the_policy() -> None:
    ccm = samples.enveloped_der(auth=True, cipher_oid=samples.AES256_CCM_OID)
    sha224 = samples.enveloped_der(
        recipients=("kari",), key_agreement_oid=policy.KEY_AGREEMENT["ecdh_std_sha224kdf"].oid
    )
    assert code(ccm) == "weak_content_cipher" and code(sha224) == "weak_key_agreement"
    wider = dataclasses.replace(
        DEFAULT_POLICY,
        content_ciphers=(*DEFAULT_POLICY.content_ciphers, "aes256_ccm"),
        key_agreement=(*DEFAULT_POLICY.key_agreement, "ecdh_std_sha224kdf"),
    )
    assert verdict(ccm, wider).accepted and verdict(sha224, wider).accepted


def test_a_narrower_policy_refuses_what_the_default_allows() -> None:
    narrow = CryptoPolicy(
        content_ciphers=("aes256_gcm",),
        key_transport=("rsaes_oaep",),
        key_agreement=("ecdh_std_sha384kdf",),
    )
    result = verdict(samples.enveloped_der(key_transport_oid=samples.RSAES_OAEP_OID), narrow)
    assert result.code == "weak_content_cipher" and "allowed: AES-256 in GCM" in result.reason
    oaep = samples.enveloped_der(auth=True, key_transport_oid=samples.RSAES_OAEP_OID)
    assert verdict(oaep, narrow).accepted
    assert code(samples.enveloped_der(auth=True), narrow) == "weak_key_transport"
    assert code(samples.enveloped_der(recipients=("kari",), auth=True), narrow) == (
        "weak_key_agreement"
    )


def test_rsa_minimum_follows_the_policy_with_byte_rounding() -> None:
    der_2048 = samples.enveloped_der(encrypted_key_size=256)
    assert code(der_2048) == "rsa_key_too_small"
    assert verdict(der_2048, CryptoPolicy(rsa_min_bits=2048)).accepted
    # 3000 bits round up to 375 bytes: a 3000-bit key passes, one byte less does not.
    at_3000 = CryptoPolicy(rsa_min_bits=3000)
    assert verdict(samples.enveloped_der(encrypted_key_size=375), at_3000).accepted
    assert code(samples.enveloped_der(encrypted_key_size=374), at_3000) == "rsa_key_too_small"
    assert code(samples.enveloped_der(encrypted_key_size=383)) == "rsa_key_too_small"


@pytest.mark.parametrize(
    ("options", "switch"),
    [
        ({"unprotected_attrs": True}, "allow_unprotected_attributes"),
        ({"auth": True, "unprotected_attrs": True}, "allow_unprotected_attributes"),
        ({"auth": True, "auth_attrs": True}, "allow_authenticated_attributes"),
        ({"originator_info": True}, "allow_originator_info"),
    ],
)
def test_readable_extras_pass_only_when_the_policy_allows_them(
    options: dict[str, object], switch: str
) -> None:
    der = samples.enveloped_der(**options)  # type: ignore[arg-type]
    assert not verdict(der).accepted
    assert verdict(der, dataclasses.replace(DEFAULT_POLICY, **{switch: True})).accepted


# --- ciphertext plausibility, at the edges -----------------------------------------------------

_TEXT = b"Befund: Blutbild unauffaellig, bitte Kontrolle in 4 Wochen. " * 80


def mixed(size: int, printable: int) -> bytes:
    """``size`` bytes of which the first ``printable`` are text and the rest binary."""
    return (_TEXT[:printable] + bytes([0x00, 0x81, 0xFF, 0x1B]) * size)[:size]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_TEXT[:15], False),  # too short to judge
        (_TEXT[:16], True),  # all printable from 16 bytes on
        (mixed(16, 15), False),
        (mixed(31, 30), False),  # below 32 bytes only "all printable" counts
        (mixed(32, 29), True),  # 90.6 %
        (mixed(32, 28), False),  # 87.5 %
        (mixed(40, 36), True),  # exactly 90 %
        (mixed(40, 35), False),
        (b"\t\r\n" * 6, True),  # whitespace is text
        (b"\x0b" * 16, False),  # vertical tab is not
        (b"\x7f" * 16, False),
        ("Grüße aus der Praxis, ".encode() * 2, False),  # 8-bit bytes are not printable ASCII
        (bytes(4096) + _TEXT, False),  # only the first 4096 bytes are read
        (_TEXT[:4096] + bytes(100_000), True),
        (b"", False),
    ],
)
def test_looks_like_text_thresholds(data: bytes, expected: bool) -> None:
    assert looks_like_text(data) is expected


def test_threshold_constants_are_what_the_docs_say() -> None:
    assert policy.TEXT_SAMPLE_BYTES == 4096
    assert (policy.TEXT_ALL_PRINTABLE_MIN, policy.TEXT_RATIO_MIN_BYTES) == (16, 32)
    assert policy.TEXT_PRINTABLE_PERCENT == 90


@pytest.mark.parametrize("seed", range(40))
def test_random_ciphertext_is_never_text(seed: int) -> None:
    """Property over fixed seeds: random bytes of any size from 16 to 4096 are not text."""
    gen = rng(seed)
    sizes = [*range(16, 80), *(gen.randint(16, 4096) for _ in range(200))]
    for size in sizes:
        data = gen.randbytes(size)
        assert not looks_like_text(data), (seed, size, data[:40])


def test_random_ciphertext_envelopes_are_accepted() -> None:
    for seed in range(200):
        size = 16 * rng(seed).randint(1, 256)
        for auth in (False, True):
            der = samples.enveloped_der(content_size=size, auth=auth, seed=seed)
            assert verdict(der).accepted, (seed, size, auth)


@pytest.mark.parametrize("auth", [False, True])
def test_readable_content_is_refused_in_both_envelope_kinds(auth: bool) -> None:
    der = samples.enveloped_der(auth=auth, encrypted_content=_TEXT[:320])
    assert code(der) == "not_ciphertext"


@pytest.mark.parametrize(("size", "ok"), [(16, True), (32, True), (4096, True), (17, False)])
def test_cbc_content_must_be_whole_blocks(size: int, ok: bool) -> None:
    content = rng(size).randbytes(size)
    assert verdict(samples.enveloped_der(encrypted_content=content)).accepted is ok


def test_gcm_content_can_have_any_length() -> None:
    content = rng(5).randbytes(21)
    assert verdict(samples.enveloped_der(auth=True, encrypted_content=content)).accepted


@pytest.mark.parametrize(
    ("mac", "icv", "ok"),
    [(11, 11, False), (12, 12, True), (14, 14, True), (16, 16, True), (17, 17, False),
     (16, 12, False), (12, 16, False)],
)  # fmt: skip
def test_gcm_tag_length(mac: int, icv: int, ok: bool) -> None:
    der = samples.enveloped_der(auth=True, mac_size=mac, icv_len=icv)
    result = verdict(der)
    assert result.accepted is ok, result.reason
    if not ok:
        assert result.code == "not_ciphertext"


_NONCE = core.OctetString(bytes(range(12))).dump()


def test_gcm_icv_length_defaults_to_12_when_left_out() -> None:
    """GCMParameters' aes-ICVlen has DEFAULT 12 (RFC 5084), so DER leaves it out for 12."""
    no_icv = b"\x30\x0e" + _NONCE
    assert verdict(
        _with_cipher_parameters(samples.enveloped_der(auth=True, mac_size=12), no_icv)
    ).accepted
    assert code(_with_cipher_parameters(samples.enveloped_der(auth=True), no_icv)) == (
        "not_ciphertext"
    )


@pytest.mark.parametrize(
    ("auth", "parameters"),
    [
        (False, core.OctetString(bytes(8)).dump()),  # an 8-byte IV for AES-CBC
        (False, core.Null().dump()),
        (True, b"\x30\x02\x04\x00"),  # empty nonce
        (True, core.OctetString(bytes(12)).dump()),  # not a SEQUENCE
        (True, b"\x30\x13" + _NONCE + core.Integer(16).dump() + b"\x05\x00"),  # extra element
        (True, b"\x30\x11" + _NONCE + b"\x04\x01\x10"),  # ICV length as OCTET STRING
    ],
)
def test_corrupt_cipher_parameters_are_malformed(auth: bool, parameters: bytes) -> None:
    der = _with_cipher_parameters(samples.enveloped_der(auth=auth), parameters)
    assert code(der) == "malformed_cms"


def test_mutated_policy_samples_never_raise() -> None:
    """Bytes flipped inside every policy sample's DER: always a verdict, never internal_error."""
    gen = rng(17)
    for sample in POLICY_REFUSED + samples.accepted_samples()[-2:]:
        body = sample.message.split(b"\r\n\r\n", 1)[1]
        der = base64.b64decode(b"".join(body.split()))
        for _ in range(40):
            mutated = bytearray(der)
            mutated[gen.randrange(len(mutated))] ^= 1 << gen.randrange(8)
            result = verdict(bytes(mutated))
            assert result.code != "internal_error", (sample.name, result.reason)


# --- the policy as data ------------------------------------------------------------------------


def test_defaults() -> None:
    assert DEFAULT_POLICY.rsa_min_bits == 3072
    assert set(DEFAULT_POLICY.content_ciphers) == {
        f"aes{bits}_{mode}" for bits in (128, 192, 256) for mode in ("cbc", "gcm")
    }
    assert DEFAULT_POLICY.key_transport == ("rsaes_pkcs1v15", "rsaes_oaep")
    assert not (
        DEFAULT_POLICY.allow_unprotected_attributes
        or DEFAULT_POLICY.allow_authenticated_attributes
        or DEFAULT_POLICY.allow_originator_info
    )
    assert policy_from_mapping(dataclasses.asdict(DEFAULT_POLICY)) == DEFAULT_POLICY
    assert policy_from_mapping({}) == DEFAULT_POLICY


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"ciphers": ["aes256_cbc"]}, "unknown key 'ciphers'"),
        ({"rsa_min_bits": "3072"}, "rsa_min_bits: must be an integer"),
        ({"rsa_min_bits": True}, "rsa_min_bits: must be an integer"),
        ({"rsa_min_bits": 1024}, "rsa_min_bits: must be between 2048"),
        ({"rsa_min_bits": 30720}, "rsa_min_bits: must be between 2048 and 16384"),
        ({"content_ciphers": "aes256_cbc"}, "content_ciphers: must be a list"),
        ({"content_ciphers": [256]}, "content_ciphers: must be a list of algorithm names"),
        ({"content_ciphers": []}, "content_ciphers: allow at least one"),
        ({"content_ciphers": ["des_cbc"]}, "content_ciphers: des_cbc .* hard floor"),
        ({"content_ciphers": ["des_ede3_cbc"]}, "content_ciphers: des_ede3_cbc .* hard floor"),
        ({"content_ciphers": ["rc2_cbc"]}, "content_ciphers: rc2_cbc .* hard floor"),
        ({"content_ciphers": ["aes256_ecb"]}, "content_ciphers: aes256_ecb .* hard floor"),
        ({"content_ciphers": ["chacha20"]}, "content_ciphers: unknown name 'chacha20'"),
        ({"key_transport": ["rsa"]}, "key_transport: unknown name 'rsa'"),
        ({"key_agreement": ["ecdh_std_sha1kdf"]}, "key_agreement: ecdh_std_sha1kdf .* floor"),
        ({"key_wrap": ["des_ede3_wrap"]}, "key_wrap: des_ede3_wrap .* floor"),
        ({"curves": ["secp224r1"]}, "curves: secp224r1 .* floor"),
        ({"curves": []}, "key_wrap, curves: key agreement needs"),
        ({"key_transport": [], "key_agreement": []}, "key_transport, key_agreement"),
        ({"allow_originator_info": "no"}, "allow_originator_info: must be true or false"),
        ({"allow_unprotected_attributes": 1}, "allow_unprotected_attributes: must be true"),
        (["aes256_cbc"], "must be a mapping"),
        (None, "must be a mapping"),
    ],
)
def test_loader_errors_name_the_key(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy_from_mapping(data)


def test_floors_hold_for_direct_construction_too() -> None:
    with pytest.raises(ValueError, match="content_ciphers: des_cbc"):
        CryptoPolicy(content_ciphers=("des_cbc",))
    with pytest.raises(ValueError, match="content_ciphers: must be a list"):
        CryptoPolicy(content_ciphers=["aes256_cbc"])  # type: ignore[arg-type]


def test_load_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "crypto.yml"
    path.write_text("rsa_min_bits: 4096\ncontent_ciphers: [aes256_gcm, aes256_cbc]\n")
    loaded = load_crypto_policy(path)
    assert loaded.rsa_min_bits == 4096 and loaded.content_ciphers == ("aes256_gcm", "aes256_cbc")
    assert loaded.key_transport == DEFAULT_POLICY.key_transport


def test_load_errors_name_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "crypto.yml"
    path.write_text("content_ciphers:\n  - aes256_cbc\n  - des_cbc\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: content_ciphers: des_cbc"):
        load_crypto_policy(path)
    path.write_text("content_ciphers: [aes256_cbc\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_crypto_policy(path)
    path.write_text("")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_crypto_policy(path)


def test_load_falls_back_to_json_without_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    path = tmp_path / "crypto.json"
    path.write_text(json.dumps({"rsa_min_bits": 4096, "allow_originator_info": False}))
    assert load_crypto_policy(path).rsa_min_bits == 4096
    path.write_text("rsa_min_bits: 4096\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_crypto_policy(path)


def test_documented_policy_is_the_default(tmp_path: Path) -> None:
    """docs/mail.md shows the defaults as YAML; that block must load to DEFAULT_POLICY."""
    text = (ROOT / "docs" / "mail.md").read_text()
    section = text.split("## Cryptographic policy", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    path = tmp_path / "crypto.yml"
    path.write_text(block.group(1))
    assert load_crypto_policy(path) == DEFAULT_POLICY
    for refusal in POLICY_CODES:
        assert f"`{refusal}`" in section, refusal


# --- real mail ---------------------------------------------------------------------------------


def _cert(mailbox: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return certs.self_signed(mailbox, key)


@pytest.fixture(scope="module")
def rsa3072() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return key, _cert("praxis2@safenet.test", key)


def _participant_message(cert: x509.Certificate) -> tuple[bytes, bytes]:
    entity = pmessage.build_inner_entity("Befund: alles gut.\n")
    raw = pmessage.build_message(
        entity,
        [cert],
        sender="praxis1@safenet.test",
        recipients=["praxis2@safenet.test"],
        subject="Befund",
    )
    return entity, raw


@pytest.mark.req("MAIL-03")
def test_participant_mail_to_a_3072_bit_key_is_accepted(
    rsa3072: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    """cryptography's PKCS7EnvelopeBuilder: AES-256-CBC, RSA PKCS#1 v1.5 (participant.message)."""
    key, cert = rsa3072
    entity, raw = _participant_message(cert)
    result = classify(raw)
    assert result.accepted, result.reason
    assert pmessage.decrypt_message(raw, cert, key) == entity


@pytest.mark.req("MAIL-03")
def test_participant_mail_to_a_2048_bit_key_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _, raw = _participant_message(_cert("praxis2@safenet.test", key))
    assert classify(raw).code == "rsa_key_too_small"
    assert classify(raw, policy=CryptoPolicy(rsa_min_bits=2048)).accepted


def _openssl() -> bool:
    try:
        subprocess.run(["openssl", "version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@pytest.mark.req("MAIL-03")
@pytest.mark.skipif(not _openssl(), reason="openssl command not available")
@pytest.mark.parametrize(
    ("curve", "cipher", "keyopt", "expected"),
    [
        (None, "-aes256", None, "accepted"),
        (None, "-aes-256-gcm", None, "accepted"),
        (None, "-aes128", "rsa_padding_mode:oaep", "accepted"),
        (None, "-des3", None, "weak_content_cipher"),
        (ec.SECP256R1(), "-aes256", "ecdh_kdf_md:sha256", "accepted"),
        (ec.SECP384R1(), "-aes-256-gcm", "ecdh_kdf_md:sha384", "accepted"),
        (ec.SECP256R1(), "-aes256", None, "weak_key_agreement"),  # OpenSSL's default: SHA-1 KDF
        (ec.SECP224R1(), "-aes256", "ecdh_kdf_md:sha256", "weak_key_agreement"),
    ],
    ids=["rsa-cbc", "rsa-gcm", "rsa-oaep", "3des", "ecdh-p256", "ecdh-p384-gcm",
         "ecdh-sha1-kdf", "ecdh-p224"],
)  # fmt: skip
def test_openssl_envelopes(
    tmp_path: Path,
    rsa3072: tuple[rsa.RSAPrivateKey, x509.Certificate],
    curve: ec.EllipticCurve | None,
    cipher: str,
    keyopt: str | None,
    expected: str,
) -> None:
    """Another implementation's envelopes, judged by the same policy."""
    cert = rsa3072[1] if curve is None else _cert("p@safenet.test", ec.generate_private_key(curve))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "m.txt").write_bytes(b"Content-Type: text/plain\r\n\r\nBefund\r\n")
    cmd = ["openssl", "cms", "-encrypt", cipher, "-in", "m.txt", "-out", "m.eml", "-recip", "c.pem"]
    cmd += ["-keyopt", keyopt] if keyopt else []
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    assert classify((tmp_path / "m.eml").read_bytes()).code == expected


@pytest.mark.req("MAIL-03")
@pytest.mark.skipif(not _openssl(), reason="openssl command not available")
@pytest.mark.parametrize(
    "args",
    [["-pwri_password", "geheim"], ["-secretkey", "000102030405060708090A0B0C0D0E0F",
                                    "-secretkeyid", "01"]],
    ids=["pwri", "kekri"],
)  # fmt: skip
def test_openssl_password_and_shared_key_envelopes_are_refused(
    tmp_path: Path, args: list[str]
) -> None:
    (tmp_path / "m.txt").write_bytes(b"Content-Type: text/plain\r\n\r\nBefund\r\n")
    cmd = ["openssl", "cms", "-encrypt", "-aes256", "-in", "m.txt", "-out", "m.eml", *args]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    assert classify((tmp_path / "m.eml").read_bytes()).code == "unsupported_recipient_kind"
