"""``safemail ca``: the CA commands, one per step of the RA -> signer -> distribution flow.

Each command works on the state directory of the host it runs on (``--state-dir``, default
``$SAFEMAIL_CA_DIR`` or /var/lib/safemail-ca) and reads the CA policy from ``--policy``
(default ``$SAFEMAIL_CA_POLICY`` or ``<state-dir>/policy.yml``).

Exit codes: 0 done; 1 error (message and hint on stderr); 2 bad command line;
3 refused by policy (the reason is printed); 4 journal verification found a broken entry.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safemail.ca import exchange
from safemail.ca import journal as journal_mod
from safemail.ca.dist import Distribution
from safemail.ca.errors import CaError, RefusedError
from safemail.ca.journal import Journal, JournalKey
from safemail.ca.policy import CaPolicy, load_policy
from safemail.ca.ra import STATES, RegistrationAuthority
from safemail.ca.signer import REVOCATION_REASONS, Signer, parse_serial

DEFAULT_STATE_DIR = "/var/lib/safemail-ca"
EXIT_REFUSED = 3
EXIT_JOURNAL_BROKEN = 4


# ------------------------------------------------------------------ shared plumbing
def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or os.environ.get("SAFEMAIL_CA_DIR") or DEFAULT_STATE_DIR)


def _policy(args: argparse.Namespace) -> CaPolicy:
    path = args.policy or os.environ.get("SAFEMAIL_CA_POLICY")
    return load_policy(Path(path) if path else _state_dir(args) / "policy.yml")


def _journal(args: argparse.Namespace) -> Journal:
    """The host's journal, sealed by the sealer when one is configured (the CA hosts), else
    signed with a journal key on this host (--journal-key), else unsigned."""
    sealer = getattr(args, "journal_sealer", None) or os.environ.get("SAFEMAIL_CA_JOURNAL_SEALER")
    if sealer:
        from safemail.ca.seal import SocketSealer

        return Journal(_state_dir(args) / "journal.jsonl", key=SocketSealer(Path(sealer)))
    key_path = args.journal_key or os.environ.get("SAFEMAIL_CA_JOURNAL_KEY")
    key = JournalKey.load(Path(key_path)) if key_path else None
    return Journal(_state_dir(args) / "journal.jsonl", key=key)


def _actor(args: argparse.Namespace) -> str:
    return str(getattr(args, "operator", None) or getpass.getuser())


def _ra(args: argparse.Namespace) -> RegistrationAuthority:
    published = getattr(args, "published_dir", None)
    return RegistrationAuthority(
        _state_dir(args),
        _policy(args),
        journal=_journal(args),
        published_dir=Path(published) if published else None,
    )


def _signer(args: argparse.Namespace) -> Signer:
    return Signer(_state_dir(args), _policy(args), journal=_journal(args))


def _refused(exc: RefusedError) -> int:
    print(f"refused ({exc.code}): {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    return EXIT_REFUSED


def _add_common(p: argparse.ArgumentParser, *, policy: bool = True) -> None:
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"this host's CA state directory (default: $SAFEMAIL_CA_DIR or {DEFAULT_STATE_DIR})",
    )
    if policy:
        p.add_argument(
            "--policy",
            metavar="FILE",
            help="CA policy YAML (default: $SAFEMAIL_CA_POLICY or <state-dir>/policy.yml)",
        )
    p.add_argument(
        "--journal-key",
        metavar="FILE",
        help="host journal key: hex HMAC secret or Ed25519 PEM (default: "
        "$SAFEMAIL_CA_JOURNAL_KEY; unsigned if unset and no sealer)",
    )
    p.add_argument(
        "--journal-sealer",
        metavar="SOCKET",
        help="seal journal entries through the sealer's socket (default: "
        "$SAFEMAIL_CA_JOURNAL_SEALER); takes precedence over --journal-key",
    )


def _add_operator(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument(
        "--operator",
        metavar="NAME",
        required=required,
        help="who does this (recorded in the journal)"
        + ("" if required else "; default: the login name"),
    )


# ------------------------------------------------------------------ commands
def cmd_init(args: argparse.Namespace) -> int:
    cert, created = _signer(args).init(actor=_actor(args))
    state = "created" if created else "exists (loaded, not regenerated)"
    print(f"CA {state}: {cert.subject.rfc4514_string()}")
    print(f"serial {cert.serial_number:032x}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    ra = _ra(args)
    try:
        if args.from_file:
            added = ra.import_register(Path(args.from_file), actor=_actor(args))
            print(f"{added} participant(s) added")
            return 0
        missing = [o for o in ("number", "name", "mailbox", "specialty") if not getattr(args, o)]
        if missing:
            raise CaError(
                f"missing {', '.join(missing)}",
                "give NUMBER --name --mailbox --specialty, or --from-file FILE",
            )
        p = ra.register_participant(
            args.number,
            args.name,
            args.mailbox,
            args.specialty,
            actor=_actor(args),
            update=args.update,
        )
    except RefusedError as exc:
        return _refused(exc)
    print(f"participant {p.number} registered: {p.practice_name} <{p.mailbox}> ({p.specialty})")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        data = Path(args.csr).read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read {args.csr}: {exc.strerror}") from exc
    key_change = None
    if args.key_change:
        try:
            key_change = Path(args.key_change).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CaError(f"cannot read the key-change confirmation {args.key_change}") from exc
    try:
        req = _ra(args).submit(
            data,
            args.participant,
            actor=_actor(args),
            renewal=args.renewal,
            key_change=key_change,
        )
    except RefusedError as exc:
        return _refused(exc)
    print(req.id)
    print(f"pending: {req.mailbox} (participant {req.participant})", file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.owners:
        register = Signer(_state_dir(args), _policy(args)).register()
        rows_o = [
            {"mailbox": m, **{k: v for k, v in e.items() if k != "public_key"}}
            for m, e in sorted(register.items())
        ]
        if args.json:
            print(json.dumps(rows_o, indent=2))
            return 0
        for r in rows_o:
            extra = ""
            if r["status"] == "released":
                extra = (
                    f" released for {r['released_for']} key {r.get('expected_key')}: "
                    f"{r['release_reason']}"
                )
            elif r["status"] == "revoked":
                extra = f" revoked ({r.get('revoked_reason')}): release needed"
            print(
                f"{r['mailbox']}  {r['participant']:>12}  {r['name']!r}  {r['status']:8} key "
                f"{r['key_sha256'][:16]}  serial {r['serial']}{extra}"
            )
        return 0
    if args.certs:
        index = Signer(_state_dir(args), _policy(args)).index()
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        for serial, e in sorted(index["certs"].items(), key=lambda kv: kv[1]["not_before"]):
            status = e["status"]
            if status == "valid" and datetime.fromisoformat(e["not_after"]) <= now:
                status = "expired"
            rows.append(
                {
                    "serial": serial,
                    "status": status,
                    **{
                        k: e[k]
                        for k in ("participant", "mailbox", "not_after", "revoked_at", "reason")
                    },
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in [] if args.json else rows:
            extra = f" revoked {r['revoked_at']} ({r['reason']})" if r["revoked_at"] else ""
            print(
                f"{r['serial']}  {r['status']:8} {r['participant']:>12}  {r['mailbox']}  "
                f"until {r['not_after'][:10]}{extra}"
            )
        return 0
    reqs = _ra(args).list(args.state)
    if args.json:
        print(
            json.dumps(
                [{k: v for k, v in r.to_dict().items() if k != "csr_pem"} for r in reqs], indent=2
            )
        )
        return 0
    for r in reqs:
        extra = f" by {r.operator}" if r.operator else ""
        extra += f": {r.reason}" if r.reason else ""
        renewal = " renewal" if r.renewal else ""
        print(
            f"{r.id}  {r.state:8} {r.participant:>12}  {r.mailbox}{renewal}  "
            f"{r.submitted_at}{extra}"
        )
    if not reqs:
        print("no requests", file=sys.stderr)
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    try:
        req = _ra(args).approve(args.id, operator=args.operator)
    except RefusedError as exc:
        return _refused(exc)
    print(f"{req.id} approved by {req.operator}: {req.mailbox} (participant {req.participant})")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    req = _ra(args).reject(args.id, reason=args.reason, operator=args.operator)
    print(f"{req.id} rejected by {req.operator}: {req.reason}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    outcomes = _signer(args).issue_from_outbox(Path(args.source), actor=_actor(args))
    refused = 0
    for o in outcomes:
        if o.refused:
            refused += 1
            print(f"{o.request_id}  refused ({o.refused}): {o.reason}")
        else:
            print(f"{o.request_id}  {'issued' if o.new else 'already issued'}  serial {o.serial}")
    if not outcomes:
        print("no approved requests", file=sys.stderr)
    return EXIT_REFUSED if refused else 0


def cmd_revoke(args: argparse.Namespace) -> int:
    signer = _signer(args)
    if bool(args.serial) == bool(args.mailbox):
        raise CaError("give either a SERIAL or --mailbox", "see 'safemail ca list --certs'")
    if args.serial:
        serials = [parse_serial(args.serial)]
    else:
        serials = [int(s, 16) for s in signer.serials_for_mailbox(args.mailbox)]
        if not serials:
            raise CaError(f"{args.mailbox} holds no valid certificate from this CA")
    for serial in serials:
        print(f"revoked {signer.revoke(serial, args.reason, actor=_actor(args))}")
    if not args.no_crl:
        crl = signer.generate_crl(actor=_actor(args))
        print(f"CRL {_crl_line(crl)} written; push it to distribution now")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    owner = _signer(args).release(
        args.mailbox,
        reason=args.reason,
        actor=args.operator,
        expect_key=args.expect_key,
        participant=args.participant,
        name=args.name,
    )
    print(
        f"{args.mailbox} released (was participant {owner['participant']}, key "
        f"{owner['key_sha256'][:16]}); the next enrolment of participant "
        f"{owner['released_for']} with key {owner['expected_key']} and name "
        f"{owner['expected_name']!r} is treated as new, any other key or name is refused"
    )
    return 0


def cmd_key_id(args: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from safemail.ca import keychange
    from safemail.ca.csrcheck import load_csr

    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    pub: Any
    if b"PRIVATE KEY-----" in data:
        try:
            pub = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise CaError(
                f"{path} is not an unencrypted PEM private key",
                "give the CSR or the certificate instead (same key id)",
            ) from exc
    elif b"CERTIFICATE-----" in data and b"REQUEST" not in data:
        pub = x509.load_pem_x509_certificate(data).public_key()
    else:
        pub = load_csr(data).public_key()
    print(keychange.spki_sha256(pub))
    return 0


def cmd_confirm_key_change(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from safemail.ca import keychange
    from safemail.ca.csrcheck import load_csr

    try:
        key_data = Path(args.key).read_bytes()
        csr_data = Path(args.csr).read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        raise CaError(
            f"{args.key} is not an unencrypted PEM private key",
            "give the participant's CURRENT key (the one the valid certificate holds)",
        ) from exc
    csr = load_csr(csr_data)
    doc = keychange.make(
        key, args.participant, args.mailbox, csr.public_bytes(serialization.Encoding.DER)
    )
    if args.out:
        from safemail.ca import _fs

        _fs.atomic_write_bytes(Path(args.out), doc.encode() + b"\n", 0o644)
        print(f"confirmation written to {args.out}; hand it to the RA with the new CSR")
    else:
        print(doc)
    return 0


def _crl_line(crl: Any) -> str:
    from safemail.ca.dist import _crl_number

    return (
        f"number {_crl_number(crl)}, {len(crl)} revoked, next update "
        f"{crl.next_update_utc:%Y-%m-%d %H:%M}Z"
    )


def cmd_crl(args: argparse.Namespace) -> int:
    signer = _signer(args)
    if args.show:
        crl = signer.current_crl()
        print(f"CRL {_crl_line(crl)}, last update {crl.last_update_utc:%Y-%m-%d %H:%M}Z")
        for rc in crl:
            print(f"  {rc.serial_number:032x}  {rc.revocation_date_utc:%Y-%m-%d %H:%M}Z")
        return 0
    crl = signer.generate_crl(actor=_actor(args))
    print(f"CRL {_crl_line(crl)} written to {signer.crl_pem_path} and {signer.crl_der_path}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    if args.ldif and not args.ldap_dn_template:
        raise CaError("--ldif needs --ldap-dn-template (e.g. 'uid={participant},ou=people,...')")
    dist = Distribution(_state_dir(args), journal=_journal(args))
    report = dist.publish(
        Path(args.source),
        actor=_actor(args),
        dn_template=args.ldap_dn_template,
        accept_new_ca=args.accept_new_ca,
    )
    print(f"published {len(report.published)} certificate(s), CRL number {report.crl_number}")
    for mailbox in report.withdrawn:
        print(f"withdrawn {mailbox}")
    if args.ldif:
        from safemail.ca import _fs

        _fs.atomic_write_bytes(
            Path(args.ldif), "\n".join(u.to_ldif() for u in report.ldap).encode(), 0o640
        )
        print(f"{len(report.ldap)} LDAP change(s) written to {args.ldif}")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    sys.stdout.buffer.write(exchange.pack(Path(args.directory), exchange.KINDS[args.kind]))
    sys.stdout.buffer.flush()
    return 0


def cmd_unbundle(args: argparse.Namespace) -> int:
    names = exchange.unpack(
        sys.stdin.buffer.read(), Path(args.directory), exchange.KINDS[args.kind]
    )
    print(f"received {len(names)} file(s) into {args.directory}", file=sys.stderr)
    return 0


def cmd_journal_verify(args: argparse.Namespace) -> int:
    key = JournalKey.load(Path(args.key)) if args.key else None
    heads: list[journal_mod.Head] = []
    for name in args.heads or []:
        path = Path(name)
        if not path.exists() and args.remember and name == args.remember:
            if not args.first_use:
                raise CaError(
                    f"the heads store {name} does not exist",
                    "restore it (and the pinned seal key beside it) from the controller's "
                    "backup; only for the very first collection from this host give "
                    "--first-use (ca-journal-check.yml: -e ca_journal_first_use=true)",
                )
            continue  # the controller's store before the first collection
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise CaError(f"cannot read heads file {name}: {exc.strerror}") from exc
        heads += journal_mod.parse_heads(text, name)
    if args.host:
        heads = [h for h in heads if h.host in (None, "-", args.host)]
    result = journal_mod.check_heads(Path(args.path), heads, key)
    print(result)
    if heads:
        print(
            f"compared with {len(heads)} exported head(s); highest seq {max(h.seq for h in heads)}"
        )
    if result.ok and args.remember:
        _remember_head(Path(args.path), Path(args.remember))
    return 0 if result.ok else EXIT_JOURNAL_BROKEN


def _remember_head(journal_path: Path, store: Path) -> None:
    """Append the verified journal's head to the controller's store (kept for next time)."""
    raw = journal_path.read_bytes().splitlines()
    if not raw:
        return
    last = json.loads(raw[-1])
    head = journal_mod.Head(int(last["seq"]), str(last["hash"]), last.get("sig"), last.get("host"))
    known = store.read_text(encoding="utf-8") if store.exists() else ""
    if any(
        h.seq == head.seq and h.hash == head.hash
        for h in journal_mod.parse_heads(known, str(store))
    ):
        return
    store.parent.mkdir(parents=True, exist_ok=True)
    with store.open("a", encoding="utf-8") as fh:
        fh.write(head.to_json() + "\n")
    print(f"head seq {head.seq} added to {store}")


def cmd_journal_start_sealing(args: argparse.Namespace) -> int:
    j = _journal(args)
    if not j.key or not hasattr(j.key, "path"):
        raise CaError("no journal sealer configured", "give --journal-sealer SOCKET")
    entry = j.record("journal-sealed", _actor(args), detail="entries sealed from here on")
    print(f"journal {j.path}: seq {entry['seq']} sealed; later entries are sealed too")
    return 0


def cmd_seal_keygen(args: argparse.Namespace) -> int:
    from safemail.ca.seal import Sealer

    created = Sealer(Path(args.state)).keygen(Path(args.public) if args.public else None)
    print(f"seal key {'created' if created else 'exists'} in {args.state}")
    return 0


def cmd_seal_serve(args: argparse.Namespace) -> int:
    from safemail.ca.seal import Sealer, serve

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    return serve(Sealer(Path(args.state), log=log), sys.stdin.buffer, sys.stdout.buffer)


def cmd_journal_keygen(args: argparse.Namespace) -> int:
    try:
        journal_mod.generate_hmac_key(Path(args.path))
    except FileExistsError as exc:
        raise CaError(f"{args.path} exists; a journal key is never overwritten") from exc
    print(f"journal key written to {args.path} (mode 0600)")
    return 0


# ------------------------------------------------------------------ registration
def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``safemail ca`` and its subcommands to the top-level parser."""
    ca = sub.add_parser(
        "ca",
        help="certificate authority: register, submit, approve, issue, revoke, publish",
        description="Run one step of the CA flow on this host: RA (register, submit, list, "
        "approve, reject), signer (init, issue, revoke, crl) or distribution (publish).",
        epilog="exit codes: 0 done, 1 error, 2 usage, 3 refused by policy, 4 journal broken",
    )
    cs = ca.add_subparsers(dest="ca_command", metavar="STEP")
    cs.required = True

    p = cs.add_parser("init", help="signer: create the CA key and certificate (idempotent)")
    _add_common(p)
    _add_operator(p)
    p.set_defaults(func=cmd_init)

    p = cs.add_parser("register", help="RA: add a participant to the participant register")
    p.add_argument("number", nargs="?", help="participant number")
    p.add_argument("--name", help="practice name (as in the certificate, up to 64 characters)")
    p.add_argument("--mailbox", help="the participant's SafeMail address")
    p.add_argument("--specialty", help="specialty group from the policy (GP, ENT, LAB, ...)")
    p.add_argument("--update", action="store_true", help="change an existing participant")
    p.add_argument(
        "--from-file",
        metavar="FILE",
        help="add every participant listed in a YAML/JSON file (existing skipped)",
    )
    _add_common(p)
    _add_operator(p)
    p.set_defaults(func=cmd_register)

    p = cs.add_parser("submit", help="RA: check a participant's CSR and queue it (pending)")
    p.add_argument("csr", metavar="CSR_FILE", help="the participant's CSR (PEM or DER)")
    p.add_argument("--participant", required=True, metavar="NUMBER", help="participant number")
    p.add_argument(
        "--renewal",
        action="store_true",
        help="replace the participant's valid certificate (old one is superseded)",
    )
    p.add_argument(
        "--key-change",
        metavar="FILE",
        help="the participant's confirmation of a new key, signed with the current key "
        "('safemail ca confirm-key-change'); the signer refuses a new key without it",
    )
    p.add_argument(
        "--published-dir",
        metavar="DIR",
        help="copy of the distribution tree (default: <state-dir>/published)",
    )
    _add_common(p)
    _add_operator(p)
    p.set_defaults(func=cmd_submit)

    p = cs.add_parser("list", help="RA: list requests; signer: list certificates (--certs)")
    p.add_argument("--state", choices=STATES, help="only requests in this state")
    p.add_argument("--certs", action="store_true", help="list the signer's certificate index")
    p.add_argument(
        "--owners", action="store_true", help="list the signer's register of mailbox owners"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_common(p)
    p.set_defaults(func=cmd_list)

    p = cs.add_parser("approve", help="RA: approve a pending request for the signer")
    p.add_argument("id", help="request id (from submit or list)")
    _add_operator(p, required=True)
    _add_common(p)
    p.set_defaults(func=cmd_approve)

    p = cs.add_parser("reject", help="RA: reject a pending request, with a reason")
    p.add_argument("id", help="request id")
    p.add_argument("--reason", required=True, help="why (one line, shown to the participant)")
    _add_operator(p, required=True)
    _add_common(p)
    p.set_defaults(func=cmd_reject)

    p = cs.add_parser("issue", help="signer: issue certificates for approved requests")
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="DIR",
        help="the approved requests pulled from the RA (its outbox/approved)",
    )
    _add_common(p)
    _add_operator(p)
    p.set_defaults(func=cmd_issue)

    p = cs.add_parser("revoke", help="signer: revoke a certificate and write a new CRL")
    p.add_argument("serial", nargs="?", help="certificate serial (hex)")
    p.add_argument("--mailbox", help="revoke every valid certificate of this mailbox")
    p.add_argument("--reason", required=True, choices=sorted(REVOCATION_REASONS))
    p.add_argument("--no-crl", action="store_true", help="do not write a new CRL now")
    _add_common(p)
    _add_operator(p)
    p.set_defaults(func=cmd_revoke)

    p = cs.add_parser(
        "release",
        help="signer: release a mailbox from its owner and key (lost key, change of hands)",
        description="Release MAILBOX in the signer's register, so that the next approved "
        "request for it (from --participant, default the previous owner) with the key named by "
        "--expect-key is treated as a new enrolment, without a confirmation from the old key; "
        "every other key is refused. Every certificate of the mailbox must be revoked first. "
        "Signer operator only; recorded in the journal.",
    )
    p.add_argument("--mailbox", required=True, help="the mailbox to release")
    p.add_argument("--reason", required=True, help="why (one line, kept in the journal)")
    p.add_argument(
        "--participant",
        metavar="NUMBER",
        help="participant number that may enrol the mailbox next (default: the previous owner)",
    )
    p.add_argument(
        "--expect-key",
        required=True,
        metavar="SHA256",
        help="SHA-256 of the new key (SPKI, 64 hex digits) as the participant reads it out of "
        "band ('safemail ca key-id'); only that key is issued for the mailbox",
    )
    p.add_argument(
        "--name",
        help="the practice name the next enrolment must carry (a change of name; default: "
        "the registered name)",
    )
    _add_operator(p, required=True)
    _add_common(p)
    p.set_defaults(func=cmd_release)

    p = cs.add_parser(
        "key-id",
        help="participant: print a key's SHA-256 (SPKI) for 'release --expect-key'",
        description="Print the SHA-256 of the public key (DER SubjectPublicKeyInfo) in FILE: "
        "a private key (PEM, unencrypted), a CSR or a certificate. The participant reads it to "
        "the signer operator out of band (phone, in person), who releases the mailbox for "
        "exactly that key. Same value as 'openssl pkey -pubout -outform DER | sha256sum'.",
    )
    p.add_argument("file", metavar="FILE", help="private key, CSR or certificate (PEM)")
    p.set_defaults(func=cmd_key_id)

    p = cs.add_parser(
        "confirm-key-change",
        help="participant: confirm a new CSR with the CURRENT key (for a key change)",
        description="Sign the hash of NEW_CSR with the participant's current private key "
        "(run on the participant's host; the key never leaves it). The RA submits the "
        "confirmation with the CSR (--key-change); the signer checks it against the key it "
        "has registered for the mailbox.",
    )
    p.add_argument("--key", required=True, metavar="FILE", help="the CURRENT private key (PEM)")
    p.add_argument("--csr", required=True, metavar="NEW_CSR", help="the new CSR (PEM or DER)")
    p.add_argument("--participant", required=True, metavar="NUMBER", help="participant number")
    p.add_argument("--mailbox", required=True, help="the participant's mailbox")
    p.add_argument("--out", metavar="FILE", help="write the confirmation here (default: stdout)")
    p.set_defaults(func=cmd_confirm_key_change)

    p = cs.add_parser("crl", help="signer: generate a new CRL (or --show the current one)")
    p.add_argument("--show", action="store_true", help="show the current CRL, change nothing")
    _add_common(p)
    _add_operator(p)
    p.set_defaults(func=cmd_crl)

    p = cs.add_parser("publish", help="distribution: check and publish CA cert, CRL, certs")
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="DIR",
        help="the signer's pushed output (ca.pem, crl.pem, issued/, index.json)",
    )
    p.add_argument("--ldif", metavar="FILE", help="also write the LDAP changes as LDIF")
    p.add_argument(
        "--ldap-dn-template",
        metavar="TEMPLATE",
        help="participant entry DN, e.g. 'uid={participant},ou=participants,"
        "dc=safemail,dc=example' ({mailbox} also works)",
    )
    p.add_argument(
        "--accept-new-ca",
        action="store_true",
        help="allow a different CA certificate (planned CA rollover only)",
    )
    _add_common(p, policy=False)
    _add_operator(p)
    p.set_defaults(func=cmd_publish)

    kinds = ", ".join(f"{k} ({' '.join(v)})" for k, v in exchange.KINDS.items())
    p = cs.add_parser(
        "bundle",
        help="exchange: write a directory's files of one kind as a bundle to stdout",
        description="Write the regular files of DIR that belong to KIND as one JSON bundle "
        f"to stdout (the signer's SSH exchange). Kinds: {kinds}.",
    )
    p.add_argument("kind", choices=sorted(exchange.KINDS), metavar="KIND")
    p.add_argument("directory", metavar="DIR")
    p.set_defaults(func=cmd_bundle)

    p = cs.add_parser(
        "unbundle",
        help="exchange: replace a directory with a bundle read from stdin",
        description="Read a bundle from stdin, refuse it whole if it holds any file that does "
        f"not belong to KIND, and replace DIR with its files. Kinds: {kinds}.",
    )
    p.add_argument("kind", choices=sorted(exchange.KINDS), metavar="KIND")
    p.add_argument("directory", metavar="DIR")
    p.set_defaults(func=cmd_unbundle)

    p = cs.add_parser("journal", help="verify a CA journal or create a journal key")
    js = p.add_subparsers(dest="journal_command", metavar="ACTION")
    js.required = True
    v = js.add_parser(
        "verify",
        help="check the hash chain (and seals with --key, exported heads with --heads)",
    )
    _add_verify_args(v)
    k = js.add_parser("keygen", help="create a random HMAC journal key (mode 0600)")
    k.add_argument("path", help="where to write the key")
    k.set_defaults(func=cmd_journal_keygen)
    k = js.add_parser(
        "start-sealing",
        help="record a sealed entry now (first seal of a journal written before sealing)",
        description="Append a 'journal-sealed' entry through the sealer, so that the journal "
        "has a sealed head from now on (the ca_hosts role runs it once per host).",
    )
    _add_common(k, policy=False)
    _add_operator(k)
    k.set_defaults(func=cmd_journal_start_sealing)
    k = js.add_parser(
        "seal-keygen",
        help="sealer: create the Ed25519 seal key once, write its public key",
        description="Run as the sealer user. Never replaces an existing seal key.",
    )
    k.add_argument("--state", required=True, metavar="DIR", help="the sealer's state directory")
    k.add_argument("--public", metavar="FILE", help="write the public key here (PEM)")
    k.set_defaults(func=cmd_seal_keygen)
    k = js.add_parser(
        "seal-serve",
        help="sealer: seal one entry read from stdin (socket-activated)",
        description="Read one journal entry (JSON line) on stdin, seal it if it continues the "
        "last sealed head, answer one JSON line. Run by safemail-ca-seal@.service.",
    )
    k.add_argument("--state", required=True, metavar="DIR", help="the sealer's state directory")
    k.set_defaults(func=cmd_seal_serve)

    v = cs.add_parser(
        "verify-journal",
        help="verify a journal against the heads exported off its host (controller)",
        description="Same as 'journal verify': check the chain and seals, then compare the "
        "journal with every exported head (truncated or rewritten journals fail).",
        epilog="exit codes: 0 intact, 1 error, 4 broken, truncated or rewritten",
    )
    _add_verify_args(v)


def _add_verify_args(v: argparse.ArgumentParser) -> None:
    v.set_defaults(func=cmd_journal_verify)
    v.add_argument("path", help="journal file (journal.jsonl)")
    v.add_argument(
        "--key",
        metavar="FILE",
        help="seal public key (journal-seal.pub), or HMAC secret / Ed25519 key to check signatures",
    )
    v.add_argument(
        "--heads",
        action="append",
        metavar="FILE",
        help="exported heads to compare with (head.json, heads.jsonl, the controller's store, "
        "admin-log lines of safemail-ca-seal); repeatable",
    )
    v.add_argument("--host", help="use only heads of this journal host (admin logs mix hosts)")
    v.add_argument(
        "--remember",
        metavar="STORE",
        help="after a successful check, add the journal's head to STORE (the controller's "
        "heads store; give it as --heads too). A missing STORE is refused unless --first-use",
    )
    v.add_argument(
        "--first-use",
        action="store_true",
        help="the first collection from this host: accept a missing --remember STORE (a lost "
        "store otherwise looks the same and would drop the earlier heads unnoticed)",
    )
