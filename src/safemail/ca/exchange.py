"""Signer-initiated exchange between the CA hosts: files travel as one JSON bundle.

The signer accepts no inbound connection. It starts every transfer over SSH to a restricted
account on the RA or distribution host, whose forced command either writes a bundle to stdout
(``safemail ca bundle``) or reads one from stdin (``safemail ca unbundle``)::

    RA -> signer     outbox/approved/*.json                      (approved requests)
    signer -> dist   ca.pem crl.pem crl.der index.json issued/*.pem
    dist -> signer -> RA   ca.pem crl.pem crl.der certs/*.pem     (the published tree)

A bundle is ``{"version": 1, "files": {"<relative path>": "<base64>"}}``: regular files only,
no links, no modes, no owners. The receiver accepts only names that match its own list of
patterns component by component (no ``..``, no hidden files, no absolute paths) and replaces
the target directory as a whole, so a half-received bundle never shows. A file the target
already holds with the same bytes (a plain 0644 file) is hard-linked into the new tree instead
of written and fsynced again: the signer's output and the RA's outbox carry the CA's whole
history, and only what changed since the last transfer costs a write (issue 14).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import shutil
import stat
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from safemail.ca import _fs
from safemail.ca.errors import CaError

BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9@+_-][A-Za-z0-9@+._-]{0,199}$")

# What each transfer may carry (the receiver's list is the one that counts).
APPROVED = ("*.json",)
SIGNER_OUTPUT = ("ca.pem", "crl.pem", "crl.der", "index.json", "issued/*.pem")
PUBLISHED = ("ca.pem", "crl.pem", "crl.der", "certs/*.pem")
KINDS = {"approved": APPROVED, "signer-output": SIGNER_OUTPUT, "published": PUBLISHED}


def _matches(name: str, patterns: Sequence[str]) -> bool:
    parts = PurePosixPath(name).parts
    for pattern in patterns:
        pparts = PurePosixPath(pattern).parts
        if len(pparts) == len(parts) and all(
            fnmatchcase(p, q) for p, q in zip(parts, pparts, strict=True)
        ):
            return True
    return False


def valid_name(name: str) -> bool:
    """A relative path of safe components (no empty, hidden, ``..`` or absolute parts)."""
    if not name or name.startswith("/") or "\\" in name:
        return False
    return all(_COMPONENT_RE.match(part) for part in name.split("/"))


def pack(root: Path, patterns: Sequence[str]) -> bytes:
    """Bundle the regular files under ``root`` that match ``patterns`` (links are skipped)."""
    files: dict[str, str] = {}
    if root.is_dir():
        for pattern in patterns:
            for path in sorted(root.glob(pattern)):
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode):
                    continue
                name = path.relative_to(root).as_posix()
                if not valid_name(name) or not _matches(name, patterns):
                    continue
                files[name] = base64.b64encode(path.read_bytes()).decode()
    return json.dumps({"version": BUNDLE_VERSION, "files": files}, sort_keys=True).encode()


def parse(data: bytes, patterns: Sequence[str]) -> dict[str, bytes]:
    """Check a bundle and return its files; refuse it whole if any part is wrong."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise CaError(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes; refused")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CaError(
            "the received bundle is not valid JSON; nothing was written",
            "check the sending host's forced command and its journal",
        ) from exc
    if not isinstance(doc, dict) or doc.get("version") != BUNDLE_VERSION:
        raise CaError(f"the received bundle is not a version {BUNDLE_VERSION} bundle")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise CaError("the received bundle has no file list")
    out: dict[str, bytes] = {}
    for name, encoded in files.items():
        if not isinstance(name, str) or not valid_name(name) or not _matches(name, patterns):
            raise CaError(
                f"the received bundle holds an unexpected file {name!r}; nothing was written",
                f"this transfer accepts only {', '.join(patterns)}",
            )
        try:
            out[name] = base64.b64decode(str(encoded), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CaError(f"the received bundle's file {name!r} is not valid base64") from exc
    return out


def unpack(data: bytes, dest: Path, patterns: Sequence[str]) -> list[str]:
    """Replace ``dest`` with the bundle's files; return their names.

    The files go to a fresh sibling directory first; ``dest`` is swapped only when all of them
    are written, so readers see the old tree or the new one.
    """
    files = parse(data, patterns)
    staging = dest.with_name(f".{dest.name}.new")
    old = dest.with_name(f".{dest.name}.old")
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    staging.mkdir(parents=True, mode=0o750)
    try:
        dirs = {staging}
        for name, content in sorted(files.items()):
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            dirs.add(target.parent)
            if not _reuse(dest / name, target, content):
                _fs.atomic_write_bytes(target, content, 0o644)
        for directory in sorted(dirs, reverse=True):  # linked names reach the disk too
            _fs._fsync_dir(directory)
        if dest.exists():
            os.rename(dest, old)
        os.rename(staging, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
        if old.exists() and not dest.exists():
            os.rename(old, dest)
        raise
    if old.exists():
        shutil.rmtree(old)
    return sorted(files)


def _reuse(current: Path, target: Path, content: bytes) -> bool:
    """Hard-link ``current`` (the receiver's file from the last transfer) as ``target`` if it
    is a regular 0644 file with one name and exactly ``content``; return whether it did.

    The signer's output and the RA's outbox carry every certificate and every approved
    request ever made, and a fresh file costs two fsyncs: writing only what changed keeps a
    transfer's cost from growing with the CA's history (issue 14). The bytes are compared, so
    a changed, truncated or replaced file is always written anew.
    """
    try:
        fd = os.open(current, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or stat.S_IMODE(st.st_mode) != 0o644
            or st.st_nlink != 1  # shared with a name outside the tree: never adopt it
            or st.st_size != len(content)
        ):
            return False
        with os.fdopen(os.dup(fd), "rb") as fh:
            if fh.read(len(content) + 1) != content:
                return False
        os.link(current, target, follow_symlinks=False)
        linked = os.lstat(target)
        if (linked.st_dev, linked.st_ino) != (st.st_dev, st.st_ino):  # swapped meanwhile
            os.unlink(target)
            return False
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
