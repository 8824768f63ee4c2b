"""CA-06 key search (safemail.ca.keyscan): every form of a copy is found by content, and a
different key in the same forms is not."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_ca_support import rsa_key

from safemail.ca import keyscan

CA_KEY = ec.generate_private_key(ec.SECP384R1())
OTHER = ec.generate_private_key(ec.SECP384R1())
NOENC = serialization.NoEncryption()
E, F = serialization.Encoding, serialization.PrivateFormat


def forms(key) -> dict[str, bytes]:
    pkcs8_der = key.private_bytes(E.DER, F.PKCS8, NOENC)
    return {
        "pem-pkcs8": key.private_bytes(E.PEM, F.PKCS8, NOENC),
        "pem-traditional": key.private_bytes(E.PEM, F.TraditionalOpenSSL, NOENC),
        "der-pkcs8": pkcs8_der,
        "der-traditional": key.private_bytes(E.DER, F.TraditionalOpenSSL, NOENC),
        "base64-one-line.json": json.dumps({"k": base64.b64encode(pkcs8_der).decode()}).encode(),
        "in-a-tar.tar": _tar("ca.key", key.private_bytes(E.PEM, F.PKCS8, NOENC)),
        "der-in-a-tar.tar": _tar("ca.der", pkcs8_der),
        "hex.txt": pkcs8_der.hex().encode(),
    }


def _tar(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("form", sorted(forms(CA_KEY)))
def test_every_form_of_a_copy_is_found(tmp_path: Path, form: str) -> None:
    (tmp_path / "backups").mkdir()
    (tmp_path / "backups" / "innocent-name.bak").write_bytes(forms(CA_KEY)[form])
    (tmp_path / "other").write_bytes(forms(OTHER)[form])  # a different key: not a hit
    res = keyscan.scan([str(tmp_path)], CA_KEY)
    assert res.complete
    assert [h["path"] for h in res.hits] == [str(tmp_path / "backups" / "innocent-name.bak")]


def test_rsa_key_and_public_key_only(tmp_path: Path) -> None:
    key = rsa_key(3072, 5)
    (tmp_path / "pub.pem").write_bytes(
        key.public_key().public_bytes(E.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )  # public: fine
    assert keyscan.scan([str(tmp_path)], key).hits == []
    (tmp_path / "k.der").write_bytes(key.private_bytes(E.DER, F.PKCS8, NOENC))
    [hit] = keyscan.scan([str(tmp_path)], key).hits
    assert "DER private key" in hit["forms"]


def test_encrypted_copy_is_listed_and_time_limit_is_incomplete(tmp_path: Path) -> None:
    (tmp_path / "enc.pem").write_bytes(
        CA_KEY.private_bytes(E.PEM, F.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    )
    res = keyscan.scan([str(tmp_path)], CA_KEY)
    assert res.hits == [] and res.encrypted == [str(tmp_path / "enc.pem")]
    assert keyscan.scan([str(tmp_path)], CA_KEY, time_limit=-1).complete is False


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "private" / "ca.key"
    key.parent.mkdir()
    key.write_bytes(forms(CA_KEY)["pem-pkcs8"])
    base = [str(tmp_path), "--key", str(key), "--allow", str(key), "--json"]
    assert keyscan.main(base) == 0
    assert json.loads(capsys.readouterr()[0])["hits"][0]["path"] == str(key)
    (tmp_path / "copy").write_bytes(forms(CA_KEY)["der-traditional"])
    assert keyscan.main(base) == 1
    assert json.loads(capsys.readouterr()[0])["copies"][0]["path"] == str(tmp_path / "copy")


def test_public_key_mode_for_hosts_that_must_not_see_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(CA_KEY.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(CA_KEY, hashes.SHA256())
    )
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert.public_bytes(E.PEM))
    (tmp_path / "d").mkdir()
    base = [str(tmp_path / "d"), "--cert", str(ca), "--json"]
    assert keyscan.main(base) == 0
    capsys.readouterr()
    (tmp_path / "d" / "x.der").write_bytes(forms(CA_KEY)["der-pkcs8"])
    assert keyscan.main(base) == 1
    assert "DER private key" in json.loads(capsys.readouterr()[0])["copies"][0]["forms"]


# A PKCS#8 key of an algorithm cryptography cannot load (GOST R 34.10-2012, as in test data
# some Debian packages ship): found on the lab's signer, it stopped the whole search.
GOST_PEM = (b"-----BEGIN PRIVATE KEY-----\n"
            b"MDMCAQAwCgYIKoUDBwEBAQIEIgQgAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n"
            b"-----END PRIVATE KEY-----\n")


def test_a_key_of_an_unknown_algorithm_does_not_stop_the_search(tmp_path: Path) -> None:
    (tmp_path / "gost.pem").write_bytes(GOST_PEM)
    (tmp_path / "gost.der").write_bytes(base64.b64decode(GOST_PEM.split(b"\n")[1]))
    (tmp_path / "copy.pem").write_bytes(forms(CA_KEY)["pem-pkcs8"])
    res = keyscan.scan([str(tmp_path)], CA_KEY)
    assert res.complete
    assert [h["path"] for h in res.hits] == [str(tmp_path / "copy.pem")]
