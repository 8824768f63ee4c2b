"""Find copies of a private key anywhere on a host (CA-06: the signing key exists only once).

Run as root on the signer by the verification suite::

    python3 -m safemail.ca.keyscan --key /var/lib/safemail-ca/private/ca.key --json /

Two ways of finding a copy, neither relying on file names:

* key-shaped content is parsed and its public key compared with the CA key's: every PEM
  block (PKCS#8, traditional RSA/EC; encrypted ones are listed as such), and every small file
  that loads as a DER private key (PKCS#8 or traditional);
* the key's secret number (the EC private value, or the RSA prime p) is searched as bytes in
  every file, raw, hex, and base64 at each of the three alignments: this finds the key inside
  a tar archive, a JSON bundle or a database page too.

Bounded in time (``--time-limit``): a scan that runs out of time says so and counts as
incomplete. Pseudo file systems (/proc, /sys, /dev) are skipped; nothing of the key is ever
printed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

SKIP = ("/proc", "/sys", "/dev")
# Directories searched first, so that a time limit hits the least likely places last.
FIRST = (
    "/root",
    "/home",
    "/tmp",
    "/var/tmp",
    "/var/backups",
    "/srv",
    "/opt",
    "/mnt",
    "/media",
    "/var",
    "/etc",
    "/usr/local",
    "/run",
)
MAX_FILE = 256 * 1024 * 1024
DER_MAX = 16 * 1024
CHUNK = 4 * 1024 * 1024
_PEM_RE = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.S)


@dataclass
class ScanResult:
    hits: list[dict[str, str]] = field(default_factory=list)
    encrypted: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    complete: bool = True
    seconds: float = 0.0
    errors: int = 0


def secret_bytes(key: Any) -> bytes:
    """The key's secret number as big-endian bytes (what every encoding of it contains)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = (key.curve.key_size + 7) // 8
        return key.private_numbers().private_value.to_bytes(size, "big")
    if isinstance(key, rsa.RSAPrivateKey):
        p = key.private_numbers().p
        return p.to_bytes((p.bit_length() + 7) // 8, "big")
    raise ValueError("only RSA and EC keys are supported")


def needles(secret: bytes) -> dict[str, bytes]:
    """Byte strings that appear in a file holding the secret raw, as hex or as base64."""
    out = {"raw": secret, "hex": secret.hex().encode(), "HEX": secret.hex().upper().encode()}
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + secret)
        # drop the characters that depend on the neighbouring bytes
        out[f"base64/{shift}"] = enc[4:-4]
    return out


def _public_der(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def classify(data: bytes, target_pub: bytes) -> tuple[list[str], bool]:
    """Forms in which ``data`` holds the key whose public DER is ``target_pub``; and whether it
    holds an encrypted private key (which cannot be compared)."""
    forms: list[str] = []
    encrypted = False
    for m in _PEM_RE.finditer(data):
        label = m.group(1).decode()
        if "PRIVATE KEY" not in label:
            continue
        if "ENCRYPTED" in label or b"Proc-Type: 4,ENCRYPTED" in m.group(2):
            encrypted = True
            continue
        try:
            key = serialization.load_pem_private_key(m.group(0), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # Not loadable here (damaged, or an algorithm cryptography lacks, such as the
            # GOST test keys some packages ship): not the CA key, which loads.
            continue
        if _public_der(key) == target_pub:
            forms.append(f"PEM {label}")
    if len(data) <= DER_MAX and not forms:
        try:
            key = serialization.load_der_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if key is not None and _public_der(key) == target_pub:
            forms.append("DER private key")
    return forms, encrypted


def _walk(roots: list[str]) -> Iterator[str]:
    seen: set[str] = set()
    ordered = [
        r for r in FIRST if any(r == x or r.startswith(x.rstrip("/") + "/") for x in roots)
    ] + roots
    for root in ordered:
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath in seen or dirpath.startswith(SKIP) and dirpath not in roots:
                dirnames[:] = []
                continue
            seen.add(dirpath)
            dirnames[:] = [
                d
                for d in dirnames
                if os.path.join(dirpath, d) not in seen
                and not os.path.join(dirpath, d).startswith(SKIP)
            ]
            for name in filenames:
                yield os.path.join(dirpath, name)


def scan(
    roots: list[str],
    key: Any = None,
    time_limit: float = 300.0,
    *,
    public_der: bytes | None = None,
) -> ScanResult:
    """Search ``roots`` for copies of ``key``. With only ``public_der`` (a host that must not
    see the key, e.g. not the signer) key-shaped content is compared by public key, and the
    secret-number search is left out."""
    started = time.monotonic()
    res = ScanResult()
    if key is not None:
        target_pub = _public_der(key)
        found = needles(secret_bytes(key))
    elif public_der is not None:
        target_pub, found = public_der, {}
    else:
        raise ValueError("give the key or its public key")
    overlap = max((len(n) for n in found.values()), default=0)
    for path in _walk(roots):
        if time.monotonic() - started > time_limit:
            res.complete = False
            break
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                continue
            if st.st_size > MAX_FILE:
                res.errors += 1
                continue
            forms: set[str] = set()
            with open(path, "rb") as fh:
                head = fh.read(DER_MAX + 1)
                pem_forms, enc = classify(head if len(head) <= DER_MAX else b"", target_pub)
                forms.update(pem_forms)
                fh.seek(0)
                tail = b""
                while chunk := fh.read(CHUNK):
                    buf = tail + chunk
                    for m in _PEM_RE.finditer(buf) if b"-----BEGIN" in buf else ():
                        more, more_enc = classify(m.group(0), target_pub)
                        forms.update(more)
                        enc = enc or more_enc
                    forms.update(f"secret {n}" for n, b in found.items() if b in buf)
                    tail = buf[-max(overlap, 8192) :]
            res.files += 1
            res.bytes += st.st_size
        except OSError:
            res.errors += 1
            continue
        if forms:
            res.hits.append({"path": path, "forms": ", ".join(sorted(forms))})
        if enc:
            res.encrypted.append(path)
    res.seconds = round(time.monotonic() - started, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m safemail.ca.keyscan",
        description="Find copies of a private key (PEM, DER, PKCS#8, raw/hex/base64 secret) "
        "under the given directories; exit 0 if only --allow holds it, 1 if copies exist, "
        "2 if the scan was incomplete.",
    )
    parser.add_argument("roots", nargs="+", help="directories to search, e.g. /")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--key", help="the key to look for (PEM, unencrypted)")
    what.add_argument(
        "--cert",
        help="look for the private key of this certificate (PEM; compares public keys only)",
    )
    parser.add_argument("--allow", action="append", default=[], help="a path allowed to hold it")
    parser.add_argument("--time-limit", type=float, default=300.0, metavar="SECONDS")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.key:
        key = serialization.load_pem_private_key(Path(args.key).read_bytes(), password=None)
        res = scan(args.roots, key, args.time_limit)
    else:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(Path(args.cert).read_bytes())
        pub = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        res = scan(args.roots, None, args.time_limit, public_der=pub)
    copies = [h for h in res.hits if h["path"] not in args.allow]
    if args.json:
        print(json.dumps(asdict(res) | {"copies": copies}))
    else:
        for h in res.hits:
            print(f"{h['path']}: {h['forms']}{' (allowed)' if h['path'] in args.allow else ''}")
        print(
            f"{res.files} files, {res.bytes} bytes in {res.seconds} s; "
            f"{'complete' if res.complete else 'INCOMPLETE (time limit)'}",
            file=sys.stderr,
        )
    if not res.complete:
        return 2
    return 1 if copies else 0


if __name__ == "__main__":
    sys.exit(main())
