"""``safemail participant``: the lab participant client (keygen, send, fetch).

Runs on the participant hosts. Keys are generated there and never leave them (CA-02); only the
CSR is written out. Mail is encrypted before it leaves the host and decrypted after it arrives.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization

from safemail.errors import SafeMailError, UsageError
from safemail.participant import directory, keys, message, probe, transport

KEY_PASSPHRASE_ENV = "SAFEMAIL_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
DIRECTORY_ENV = "SAFEMAIL_DIRECTORY"
DIRECTORY_BIND_DN_ENV = "SAFEMAIL_DIRECTORY_BIND_DN"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``participant`` with its ``keygen``, ``send`` and ``fetch`` subcommands."""
    parser = sub.add_parser(
        "participant",
        help="lab participant client: make a key and CSR, send and read encrypted mail",
        description="Lab participant client: generate a key and CSR locally, send S/MIME "
        "encrypted mail, fetch and decrypt received mail.",
    )
    actions = parser.add_subparsers(dest="participant_command", metavar="ACTION")
    actions.required = True
    _add_keygen(actions)
    _add_send(actions)
    _add_fetch(actions)
    _add_lookup(actions)
    probe.register(actions)


def _add_keygen(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "keygen",
        help="generate a private key (mode 0600) and print its CSR",
        description="Generate a private key on this host (written with mode 0600, never "
        "printed) and a CSR naming the mailbox (subject CN and emailAddress, rfc822Name SAN). "
        "Only the CSR goes to the registration authority.",
    )
    p.add_argument("--mailbox", required=True, help="the participant's address, local@domain")
    p.add_argument("--key", required=True, type=Path, help="where to write the new private key")
    p.add_argument("--csr", type=Path, help="write the CSR here (PEM); default: print it")
    p.add_argument("--name", help="subject common name (default: the mailbox)")
    p.add_argument(
        "--type",
        choices=("rsa", "ec"),
        default="rsa",
        help="key type (default rsa). Note: S/MIME encryption to you needs an RSA key",
    )
    p.add_argument("--rsa-bits", type=int, default=keys.RSA_MIN_BITS, help="RSA size (3072)")
    p.add_argument("--curve", choices=sorted(keys.EC_CURVES), default="secp256r1")
    p.add_argument(
        "--passphrase-file",
        type=Path,
        help=f"encrypt the key with the passphrase in this file (or set {KEY_PASSPHRASE_ENV})",
    )
    p.set_defaults(func=cmd_keygen)


def _add_password(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument(
        "--password-file", type=Path,
        help=f"{note}file whose first line is the password (never argv)",
    )
    p.add_argument(
        "--password-env",
        default=transport.DEFAULT_PASSWORD_ENV,
        help=f"{note}environment variable holding the password "
        f"(default {transport.DEFAULT_PASSWORD_ENV})",
    )


def _add_connection(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", help="relay host name (as in its TLS certificate)")
    p.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")
    p.add_argument("--cafile", type=Path, help="CA certificate(s) to verify the server (PEM)")
    p.add_argument("--user", help="login name (default: the mailbox)")
    _add_password(p)
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")


def _add_directory(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "directory",
        "where recipient certificates come from: the SafeMail CA's distribution point "
        "(--directory http://HOST/, the participant default; every certificate is checked "
        "against --smime-ca and the CA's CRL), or, for service hosts, the LDAP directory "
        "(--directory ldap://HOST, StartTLS verified with --cafile, bound with "
        "--directory-bind-dn and the mail password)",
    )
    g.add_argument(
        "--directory",
        default=os.environ.get(DIRECTORY_ENV),
        metavar="URI",
        help="http://HOST/ (CA distribution point; needs --smime-ca), or ldap://HOST "
        f"(StartTLS) / ldaps://HOST (default ${DIRECTORY_ENV})",
    )
    g.add_argument(
        "--directory-bind-dn",
        default=os.environ.get(DIRECTORY_BIND_DN_ENV),
        metavar="DN",
        help="LDAP only: your entry, uid=NUMBER,ou=participants,... "
        f"(default ${DIRECTORY_BIND_DN_ENV})",
    )
    g.add_argument(
        "--directory-base",
        metavar="DN",
        help="LDAP only: where participants are (default: the parent of --directory-bind-dn)",
    )
    g.add_argument(
        "--smime-ca",
        type=Path,
        help="the SafeMail CA certificate: use only certificates it signed (required with an "
        "http:// directory, where it also checks the CRL)",
    )


def _add_lookup(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "lookup",
        help="print a participant's certificate from the distribution point or directory (PEM)",
        description="Look a mailbox up at the SafeMail CA's distribution point (or in the "
        "directory) and print the certificates published for it that pass the checks (signed "
        "by --smime-ca, naming the mailbox; from the distribution point also valid now and "
        "not revoked).",
    )
    p.add_argument("--mailbox", required=True, help="the participant to look up")
    _add_directory(p)
    p.add_argument("--cafile", type=Path,
                   help="CA certificate(s) to verify an ldap:// or https:// server (PEM; "
                   "required for ldap://)")
    _add_password(p, note="LDAP only: ")
    p.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    p.set_defaults(func=cmd_lookup)


def _add_send(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "send",
        help="encrypt a message for its recipients and submit it (SMTP, STARTTLS, AUTH)",
        description="Build an S/MIME enveloped message (AES-256) for each recipient's "
        "certificate, fetched from the SafeMail CA's distribution point (or directory) and "
        "checked against the CA, and submit it. The subject is NOT encrypted: keep patient "
        "data out of it.",
    )
    p.add_argument("--from", dest="sender", required=True, help="your mailbox")
    p.add_argument("--to", action="append", required=True, help="recipient mailbox (repeatable)")
    p.add_argument("--subject", required=True, help="subject (sent unencrypted)")
    p.add_argument(
        "--body-file", type=Path, default=Path("-"), help="message text file (default: stdin)"
    )
    p.add_argument("--attach", action="append", type=Path, default=[], help="attach a file")
    p.add_argument(
        "--recipient-cert",
        action="append",
        type=Path,
        default=[],
        help="use this certificate file instead of the directory (repeatable; its SAN must "
        "name a --to mailbox). Whether it is still valid and unrevoked is then up to you",
    )
    _add_directory(p)
    p.add_argument(
        "--sender-cert",
        type=Path,
        help="your own certificate: also encrypt to it so you can read what you sent",
    )
    p.add_argument(
        "--build-only",
        action="store_true",
        help="write the encrypted message to stdout (or --out) instead of sending it",
    )
    p.add_argument("--out", type=Path, help="with --build-only: write the message here")
    _add_connection(p, 587)
    p.set_defaults(func=cmd_send)


def _add_fetch(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "fetch",
        help="list or fetch messages over IMAP (TLS) and decrypt them with your key",
        description="List the mailbox, or fetch one message (by UID, default the newest) and "
        "write its decrypted content to stdout or --out.",
    )
    p.add_argument("--mailbox", help="your mailbox (default login name)")
    p.add_argument("--folder", default="INBOX", help="IMAP folder (default INBOX)")
    p.add_argument("--list", action="store_true", help="list messages (UID, size, headers)")
    p.add_argument("--uid", help="fetch this message (default: the newest)")
    p.add_argument("--input", type=Path, help="decrypt this local message file, no IMAP")
    p.add_argument("--key", type=Path, help="your private key (PEM)")
    p.add_argument("--cert", type=Path, help="your certificate (PEM or DER)")
    p.add_argument(
        "--passphrase-file",
        type=Path,
        help=f"passphrase of an encrypted key (or set {KEY_PASSPHRASE_ENV})",
    )
    p.add_argument("--raw", action="store_true", help="write the message as received")
    p.add_argument("--out", type=Path, help="write here (mode 0600) instead of stdout")
    _add_connection(p, 993)
    p.set_defaults(func=cmd_fetch)


# --- helpers ------------------------------------------------------------------------------


def _read_input(path: Path) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SafeMailError(f"cannot read {path}: {exc.strerror}", "check the path") from exc


def _passphrase(path: Path | None) -> bytes | None:
    if path is not None:
        try:
            lines = path.read_bytes().splitlines()
        except OSError as exc:
            raise SafeMailError(
                f"cannot read passphrase file {path}: {exc.strerror}", "check --passphrase-file"
            ) from exc
        return lines[0] if lines and lines[0] else None
    value = os.environ.get(KEY_PASSPHRASE_ENV)
    return value.encode() if value else None


def _write_output(data: bytes, path: Path | None, private: bool = False) -> None:
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(path, flags, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as handle:
            if private:
                os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
    except OSError as exc:
        raise SafeMailError(f"cannot write {path}: {exc.strerror}", "check --out") from exc


def _directory(
    args: argparse.Namespace,
) -> directory.HttpCertificateDirectory | directory.LdapCertificateDirectory:
    """The certificate source --directory names: the distribution point (http) or LDAP."""
    if not args.directory:
        raise UsageError(
            "no directory to fetch recipient certificates from",
            f"pass --directory http://CA-DIST/ (the CA's distribution point) and --smime-ca "
            f"CA.pem (or set ${DIRECTORY_ENV}); --recipient-cert FILE uses a certificate "
            "file instead",
        )
    scheme = urlsplit(args.directory).scheme.lower()
    if scheme in directory.HTTP_SCHEMES:
        if args.smime_ca is None:
            raise UsageError(
                f"--directory {args.directory} needs --smime-ca",
                "certificates from the distribution point are trusted because the SafeMail "
                "CA signed them, not because of the way they came: give the CA certificate "
                "(on the lab participants /var/lib/safemail-participant/ca.pem)",
            )
        return directory.HttpCertificateDirectory(
            args.directory,
            message.load_certificate(args.smime_ca),
            timeout=args.timeout,
            cafile=args.cafile,
        )
    if scheme not in ("ldap", "ldaps"):
        raise UsageError(
            f"--directory {args.directory!r}: unknown kind of directory",
            "give the CA distribution point as http://HOST/ (or a directory as ldap://HOST)",
        )
    if not args.directory_bind_dn:
        raise UsageError(
            "an LDAP directory needs --directory-bind-dn",
            f"pass --directory-bind-dn uid=NUMBER,ou=participants,... (or set "
            f"${DIRECTORY_BIND_DN_ENV}); participants use --directory http://CA-DIST/ instead",
        )
    if args.cafile is None:
        raise UsageError(
            "an LDAP directory needs --cafile",
            "the directory's TLS certificate is always verified: give the service TLS CA "
            "(on service hosts /etc/safemail/tls/ca.crt)",
        )
    config = directory.DirectoryConfig(
        uri=args.directory,
        bind_dn=args.directory_bind_dn,
        password=transport.read_password(args.password_file, args.password_env),
        base=args.directory_base,
        cafile=args.cafile,
        timeout=args.timeout,
    )
    issuer = message.load_certificate(args.smime_ca) if args.smime_ca else None
    return directory.LdapCertificateDirectory(config, issuer)


def _recipient_certificates(args: argparse.Namespace) -> list:
    """One certificate per --to: from --recipient-cert files if given, else --directory."""
    if args.recipient_cert:
        return message.resolve_recipients(
            args.to, message.FileCertificateDirectory.from_paths(args.recipient_cert)
        )
    with _directory(args) as certs_from_directory:
        return message.resolve_recipients(args.to, certs_from_directory)


def _account(args: argparse.Namespace, default_user: str | None) -> transport.Account:
    if not args.host:
        raise UsageError("--host is required to connect", "or use --build-only / --input")
    user = args.user or default_user
    if not user:
        raise UsageError("no login name", "pass --user (or --mailbox)")
    return transport.Account(
        host=args.host,
        port=args.port,
        user=user,
        password=transport.read_password(args.password_file, args.password_env),
        cafile=args.cafile,
        timeout=args.timeout,
    )


# --- commands -----------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    keys.validate_mailbox(args.mailbox)
    key = keys.generate_key(args.type, rsa_bits=args.rsa_bits, curve=args.curve)
    csr = keys.build_csr(key, args.mailbox, args.name)
    keys.write_private_key(args.key, key, _passphrase(args.passphrase_file))
    pem = csr.public_bytes(serialization.Encoding.PEM)
    if args.csr is not None:
        _write_output(pem, args.csr)
        print(f"key written to {args.key} (mode 0600); CSR written to {args.csr}", file=sys.stderr)
    else:
        _write_output(pem, None)
        print(f"key written to {args.key} (mode 0600)", file=sys.stderr)
    if args.type == "ec":
        print(
            "note: this client encrypts only to RSA certificates; others cannot send you "
            "encrypted mail with an EC key",
            file=sys.stderr,
        )
    return 0


def _warn_subject(subject: str) -> None:
    # The relay applies the same kind of check (MAIL-04); warn before it refuses or flags.
    from safemail.smime.classify import check_subject, compile_subject_patterns

    hit = check_subject(subject, compile_subject_patterns())
    if hit.matched:
        print(
            f"warning: the subject looks like it contains patient data ({hit.pattern}); "
            "subjects are NOT encrypted — put patient data in the message text",
            file=sys.stderr,
        )


def cmd_send(args: argparse.Namespace) -> int:
    if args.out is not None and not args.build_only:
        raise UsageError("--out is only used with --build-only", "drop --out or add --build-only")
    certs = _recipient_certificates(args)
    if args.sender_cert is not None:
        certs.append(message.load_certificate(args.sender_cert))
    for cert in certs:
        message.check_recipient_certificate(cert)
    try:
        text = _read_input(args.body_file).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SafeMailError("the message text is not UTF-8", "convert it or attach it") from exc
    attachments = [message.Attachment(path.name, _read_input(path)) for path in args.attach]
    _warn_subject(args.subject)
    entity = message.build_inner_entity(text, attachments)
    raw = message.build_message(
        entity, certs, sender=args.sender, recipients=args.to, subject=args.subject
    )
    if args.build_only:
        _write_output(raw, args.out)
        return 0
    account = _account(args, args.sender)
    transport.submit(account, args.sender, args.to, raw)
    print(f"sent to {', '.join(args.to)}", file=sys.stderr)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    if args.list:
        account = _account(args, args.mailbox)
        for entry in transport.list_messages(account, args.folder):
            header = entry.header.decode("utf-8", "replace").strip().replace("\r\n", " | ")
            print(f"{entry.uid}\t{entry.size}\t{header}")
        return 0
    if args.input is not None:
        raw = _read_input(args.input)
    else:
        raw = transport.fetch_message(_account(args, args.mailbox), args.uid, args.folder)
    if args.raw:
        _write_output(raw, args.out, private=True)
        return 0
    if args.key is None or args.cert is None:
        raise UsageError("--key and --cert are needed to decrypt", "or pass --raw")
    key = keys.load_private_key(args.key, _passphrase(args.passphrase_file))
    cert = message.load_certificate(args.cert)
    _write_output(message.decrypt_message(raw, cert, key), args.out, private=True)
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    keys.validate_mailbox(args.mailbox)
    with _directory(args) as certs_from_directory:
        certs = certs_from_directory.certificates_for(args.mailbox)
    if not certs:
        raise SafeMailError(
            f"the directory holds no certificate for {args.mailbox}",
            "is the mailbox enrolled and its certificate published by the CA?",
        )
    for cert in certs:
        _write_output(cert.public_bytes(serialization.Encoding.PEM), None)
    return 0
