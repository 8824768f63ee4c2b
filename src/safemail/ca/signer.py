"""Certification: the CA key, certificate issuance, revocation and CRLs.

Runs on the signer host (core segment), which accepts no inbound connection: it pulls approved
requests from the RA (``outbox/approved/*.json``) and pushes its public output to distribution.
State directory layout::

    private/ca.key        the CA private key (mode 0600 in a 0700 directory); never leaves
    ca.pem                the self-signed CA certificate
    index.json            certificate index: serial -> mailbox, participant, status, not_after,
                          revocation, the certificate; request id -> serial (or refusal);
                          the CRL number; the register of mailbox owners (below). Written
                          atomically; the single source of truth.
    issued/<serial>.pem   issued certificates (re-created from the index if missing)
    crl.pem, crl.der      the current CRL
    journal.jsonl         the signer's hash-chained journal
    signer.lock           serialises all changes

Everything under the directory except ``private/`` is public and may be pushed to distribution.

The register (``index["register"]``: mailbox -> participant number, public key, serial) is the
signer's own record of who owns a mailbox. Only an issuance the signer checked writes it (and
``release``, a signer operator's step). Against it the signer refuses, whatever the RA
approved: a second participant number for an owned mailbox (``mailbox-owned``), a second
mailbox for a participant (``participant-has-mailbox``), and a new key for an owned mailbox
without the participant's confirmation signed with the registered key
(``key-change-unconfirmed`` / ``key-change-confirmation-invalid``, see
:mod:`safemail.ca.keychange`). A participant who lost the key: the signer operator revokes
(``key-compromise``) and releases the mailbox for the participant's new key, whose SHA-256 the
operator got out of band (``safemail ca release --expect-key``); the next enrolment with that
key is then treated as new, any other key is refused (``key-not-expected``). Any revocation
locks the mailbox until such a release (``mailbox-revoked``); a key revoked as compromised is
never certified again (``key-compromised``). The register also binds the practice name (the
CN; ``name-change-unconfirmed`` unless the operator's ``release --name``), and a renewal with
the registered key is issued only within the policy's ``renewal_window_days`` of the current
certificate's expiry (``renewal-too-early``): the RA alone cannot supersede a certificate.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from safemail.ca import _fs, keychange
from safemail.ca.csrcheck import check_csr, load_csr
from safemail.ca.errors import CaError, IssueRefused, RefusedError
from safemail.ca.journal import Journal
from safemail.ca.policy import SUBJECT_ATTRS, CaPolicy
from safemail.ca.ra import validate_mailbox, validate_operator, validate_request_id

# Certificates start slightly in the past so that a participant whose clock is a few minutes
# behind does not see a "not yet valid" certificate.
BACKDATE = timedelta(minutes=5)

REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "affiliation-changed": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
    "privilege-withdrawn": x509.ReasonFlags.privilege_withdrawn,
}
_SERIAL_RE = re.compile(r"^[0-9a-f]{1,40}$")


def serial_hex(serial: int) -> str:
    return f"{serial:032x}"


def parse_serial(text: str) -> int:
    """Parse a serial as shown by the tools: hex, optionally with 0x prefix or colons."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not _SERIAL_RE.match(cleaned):
        raise CaError(
            f"{text!r} is not a certificate serial number",
            "give the serial in hex as shown by 'safemail ca list --certs'",
        )
    return int(cleaned, 16)


_KEY_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def parse_key_sha256(text: str) -> str:
    """A public key's SPKI SHA-256 as given by an operator: hex, optional SHA256: and colons."""
    cleaned = text.strip().lower().replace(":", "")
    cleaned = cleaned.removeprefix("sha256")
    if not _KEY_SHA256_RE.match(cleaned):
        raise CaError(
            f"{text!r} is not a key's SHA-256 (64 hex digits)",
            "the participant reads it from 'safemail participant key-id --key KEY' (or "
            "'openssl pkey -in KEY -pubout -outform DER | sha256sum') and tells the signer "
            "operator out of band",
        )
    return cleaned


@dataclass(frozen=True)
class IssueOutcome:
    request_id: str
    serial: str | None
    new: bool
    refused: str | None = None
    reason: str | None = None


class Signer:
    """The signer's operations on its state directory."""

    def __init__(self, state_dir: Path, policy: CaPolicy, *, journal: Journal | None = None):
        self.state_dir = state_dir
        self.policy = policy
        self.journal = journal or Journal(state_dir / "journal.jsonl")
        self.key_path = state_dir / "private" / "ca.key"
        self.cert_path = state_dir / "ca.pem"
        self.index_path = state_dir / "index.json"
        self.issued_dir = state_dir / "issued"
        self.crl_pem_path = state_dir / "crl.pem"
        self.crl_der_path = state_dir / "crl.der"
        self._lock = state_dir / "signer.lock"

    # ------------------------------------------------------------------ CA
    def init(self, *, actor: str, now: datetime | None = None) -> tuple[x509.Certificate, bool]:
        """Create the CA key and certificate, or load the existing ones (never regenerate).

        Returns (certificate, created).
        """
        validate_operator(actor)
        with _fs.locked(self._lock):
            if self.key_path.exists() or self.cert_path.exists():
                _key, cert = self.load_ca()
                if cert.subject != self.policy.ca_name():
                    raise CaError(
                        f"the existing CA is '{cert.subject.rfc4514_string()}' but the policy "
                        f"names '{self.policy.ca_name().rfc4514_string()}'",
                        "an existing CA is never regenerated; correct the policy's ca_subject",
                    )
                self.journal.record(
                    "ca-init",
                    actor,
                    serial=serial_hex(cert.serial_number),
                    detail="existing CA loaded",
                )
                return cert, False
            key = _generate_ca_key(self.policy.ca_key_type)
            cert = self._build_ca_cert(key, now or datetime.now(UTC))
            self.key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.key_path.parent, 0o700)
            _fs.create_exclusive(
                self.key_path,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                0o600,
            )
            _fs.atomic_write_bytes(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
            if not self.index_path.exists():
                _fs.atomic_write_json(self.index_path, _empty_index())
            self.journal.record(
                "ca-init", actor, serial=serial_hex(cert.serial_number), detail="CA created"
            )
            return cert, True

    def _build_ca_cert(
        self, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, now: datetime
    ) -> x509.Certificate:
        name = self.policy.ca_name()
        start = now - BACKDATE
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(_random_serial(set()))
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=self.policy.ca_validity_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, self.policy.signature_hash())
        )

    def load_ca(self) -> tuple[rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, x509.Certificate]:
        if not self.key_path.exists() or not self.cert_path.exists():
            missing = self.key_path if not self.key_path.exists() else self.cert_path
            raise CaError(
                f"the CA is incomplete or not created: {missing} is missing",
                "run 'safemail ca init' on the signer; if only one file is missing, restore "
                "it from the backup (init never replaces an existing key)",
            )
        mode = stat.S_IMODE(self.key_path.stat().st_mode)
        if mode & 0o077:
            raise CaError(
                f"the CA key {self.key_path} is readable by others (mode {mode:04o})",
                f"chmod 600 {self.key_path} and check who could have read it",
            )
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise CaError(f"{self.key_path} is not an RSA or EC key")
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        if cert.public_key() != key.public_key():
            raise CaError(
                f"the CA certificate {self.cert_path} does not belong to the key {self.key_path}",
                "restore the matching pair from the backup",
            )
        return key, cert

    # ------------------------------------------------------------------ index
    def index(self) -> dict[str, Any]:
        if not self.index_path.exists():
            return _empty_index()
        try:
            data = _fs.read_json(self.index_path)
        except ValueError as exc:
            raise CaError(
                f"certificate index {self.index_path} is damaged", "restore it from the backup"
            ) from exc
        return data  # type: ignore[no-any-return]

    def register(self, index: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """The mailbox register (mailbox -> owner entry) inside ``index``.

        An index from before the register existed is seeded from the signer's own certificate
        entries, oldest first: the first participant number seen for a mailbox owns it.
        """
        index = self.index() if index is None else index
        if "register" not in index:
            reg: dict[str, dict[str, Any]] = {}
            for serial, e in sorted(index["certs"].items(), key=lambda kv: kv[1]["not_before"]):
                owner = reg.get(e["mailbox"])
                if owner is not None and owner["participant"] != e["participant"]:
                    continue
                cert = x509.load_pem_x509_certificate(e["pem"].encode())
                reg[e["mailbox"]] = _owner(e["participant"], cert, serial, e["request"])
                if e["status"] == "revoked" and e.get("reason") != "superseded":
                    reg[e["mailbox"]].update(
                        status="revoked",
                        revoked_reason=e["reason"],
                        revoked_serial=serial,
                        revoked_at=e["revoked_at"],
                    )
            index["register"] = reg
        for owner in index["register"].values():
            current = index["certs"].get(owner["serial"]) or {}
            if (
                owner["status"] == "active"
                and current.get("status") == "revoked"
                and current.get("reason") != "superseded"
            ):  # revoked before revoke() locked the register entry: lock it now
                owner.update(
                    status="revoked",
                    revoked_reason=current["reason"],
                    revoked_serial=owner["serial"],
                    revoked_at=current["revoked_at"],
                )
            if "name" not in owner:  # a register from before names were bound
                entry = index["certs"].get(owner["serial"])
                owner["name"] = (
                    _common_name(x509.load_pem_x509_certificate(entry["pem"].encode()))
                    if entry
                    else ""
                )
        return index["register"]  # type: ignore[no-any-return]

    def compromised_keys(self, index: dict[str, Any] | None = None) -> dict[str, str]:
        """SPKI SHA-256 -> serial of every key revoked with reason key-compromise.

        Derived from the certificate entries themselves, so it cannot fall out of step with
        them (and an index from before this check is covered as it is).
        """
        index = self.index() if index is None else index
        keys: dict[str, str] = {}
        for serial, e in index["certs"].items():
            if e["status"] == "revoked" and e.get("reason") == "key-compromise":
                cert = x509.load_pem_x509_certificate(e["pem"].encode())
                keys[keychange.spki_sha256(cert.public_key())] = serial
        return keys

    def _write_index(self, index: dict[str, Any]) -> None:
        _fs.atomic_write_json(self.index_path, index)

    def valid_entries(
        self, index: dict[str, Any], participant: str, now: datetime
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for serial, entry in index["certs"].items():
            if (
                entry["participant"] == participant
                and entry["status"] == "valid"
                and datetime.fromisoformat(entry["not_after"]) > now
            ):
                yield serial, entry

    def _materialise(self, index: dict[str, Any]) -> None:
        for serial, entry in index["certs"].items():
            path = self.issued_dir / f"{serial}.pem"
            if not path.exists():
                _fs.atomic_write_bytes(path, entry["pem"].encode())

    # ------------------------------------------------------------------ issuance
    def issue_from_outbox(
        self, outbox: Path, *, actor: str, now: datetime | None = None
    ) -> list[IssueOutcome]:
        """Issue a certificate for every approved request in ``outbox`` not yet handled.

        The RA keeps every approved request in its outbox, so the outbox grows with the CA's
        history. A request the index already holds (issued or refused: final, never removed)
        is answered from one reading of the index, and the CA key is parsed once per call,
        not once per request (issue 14: an RSA 4096 key takes about half a second to load and
        check, so a cycle cost that much per request ever approved). The CA key is still
        loaded, and so checked, whenever the outbox holds a request.
        """
        validate_operator(actor)
        if not outbox.is_dir():
            raise CaError(
                f"RA outbox {outbox} does not exist",
                "give the directory the approved requests were pulled into (outbox/approved)",
            )
        outcomes: list[IssueOutcome] = []
        ca: tuple[Any, x509.Certificate] | None = None
        handled: dict[str, Any] = {}
        for path in sorted(outbox.glob("*.json")):
            try:
                request = _fs.read_json(path)
            except ValueError as exc:
                raise CaError(f"approved request {path} is not valid JSON") from exc
            if ca is None:
                ca = self.load_ca()
                with _fs.locked(self._lock):
                    index = self.index()
                    self._materialise(index)
                handled = index["requests"]
            done = handled.get(str(request.get("id", ""))) if isinstance(request, dict) else None
            if done is not None:
                outcomes.append(_handled_outcome(str(request["id"]), done))
                continue
            outcomes.append(self.issue(request, actor=actor, now=now, ca=ca))
        return outcomes

    def issue(
        self,
        request: dict[str, Any],
        *,
        actor: str,
        now: datetime | None = None,
        ca: tuple[Any, x509.Certificate] | None = None,
    ) -> IssueOutcome:
        """Issue the certificate for one approved request; idempotent per request id.

        A request that was already issued returns the existing certificate; one that was
        refused before stays refused. Refusals are recorded in the index and the journal.
        ``ca``: the (key, certificate) pair from :meth:`load_ca`, when the caller loaded it.
        """
        validate_operator(actor)
        now = now or datetime.now(UTC)
        rid = validate_request_id(str(request.get("id", "")))
        with _fs.locked(self._lock):
            key, ca_cert = ca if ca is not None else self.load_ca()
            index = self.index()
            self._materialise(index)
            done = index["requests"].get(rid)
            if done is not None:
                return _handled_outcome(rid, done)
            try:
                csr = self._checked_csr(request, index, now)
            except RefusedError as exc:
                index["requests"][rid] = {"refused": exc.code, "reason": exc.message}
                self._write_index(index)
                self.journal.record(
                    "issue-refused",
                    actor,
                    request=rid,
                    participant=self._loggable_number(request.get("participant")),
                    detail=exc.code,
                )
                return IssueOutcome(rid, None, False, exc.code, exc.message)
            cert = self._build_ee_cert(key, ca_cert, csr, request, index, now)
            serial = serial_hex(cert.serial_number)
            superseded = []
            if request.get("renewal"):
                for old_serial, entry in list(
                    self.valid_entries(index, request["participant"], now)
                ):
                    entry.update(status="revoked", revoked_at=_iso(now), reason="superseded")
                    superseded.append(old_serial)
            index["certs"][serial] = {
                "mailbox": request["mailbox"],
                "participant": request["participant"],
                "request": rid,
                "status": "valid",
                "not_before": _iso(cert.not_valid_before_utc),
                "not_after": _iso(cert.not_valid_after_utc),
                "revoked_at": None,
                "reason": None,
                "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
            }
            index["requests"][rid] = {"serial": serial}
            self.register(index)[request["mailbox"]] = _owner(
                request["participant"], cert, serial, rid
            )
            self._write_index(index)
            self._materialise(index)
            self.journal.record(
                "issue",
                actor,
                request=rid,
                participant=request["participant"],
                mailbox=request["mailbox"],
                serial=serial,
            )
            for old_serial in superseded:
                self.journal.record(
                    "revoke",
                    actor,
                    serial=old_serial,
                    participant=request["participant"],
                    detail="superseded",
                )
            return IssueOutcome(rid, serial, new=True)

    def _checked_csr(
        self, request: dict[str, Any], index: dict[str, Any], now: datetime
    ) -> x509.CertificateSigningRequest:
        if request.get("state") != "approved" or not request.get("operator"):
            raise IssueRefused(
                "not-approved", "the request was not approved by a named RA operator"
            )
        for fld in ("participant", "mailbox", "practice_name", "csr_pem"):
            if not isinstance(request.get(fld), str) or not request[fld]:
                raise IssueRefused("incomplete-request", f"the request has no {fld}")
        try:
            validate_mailbox(request["mailbox"], self.policy)
        except RefusedError as exc:
            raise IssueRefused(exc.code, exc.message) from exc
        if not self.policy.participant_number_valid(request["participant"]):
            raise IssueRefused("bad-participant-number", "the participant number is invalid")
        name = request["practice_name"]
        if len(name) > 64 or any(ord(c) < 32 for c in name):
            raise IssueRefused("bad-practice-name", "the practice name is not usable")
        csr = load_csr(request["csr_pem"].encode())
        check_csr(csr, self.policy, request["mailbox"])
        if not request.get("renewal"):
            held = next(self.valid_entries(index, request["participant"], now), None)
            if held is not None:
                raise IssueRefused(
                    "already-certified",
                    f"participant {request['participant']} already holds valid certificate "
                    f"{held[0]}",
                    "submit a renewal request, or revoke the certificate first",
                )
        self._check_ownership(request, csr, index, now)  # CA-03: the signer's register
        return csr

    def _check_ownership(
        self,
        request: dict[str, Any],
        csr: x509.CertificateSigningRequest,
        index: dict[str, Any],
        now: datetime,
    ) -> None:
        """Refuse what the RA cannot be trusted to decide: who owns a mailbox, its key and
        name, and when a participant's current certificate is superseded."""
        number, mailbox = request["participant"], request["mailbox"]
        register = self.register(index)
        new_key = keychange.spki_sha256(csr.public_key())
        compromised = self.compromised_keys(index)
        if new_key in compromised:
            raise IssueRefused(
                "key-compromised",
                f"the request's key was revoked as compromised (certificate "
                f"{compromised[new_key]}); it is never certified again",
                "the participant makes a new key ('safemail participant keygen')",
            )
        for other_mailbox, owner in register.items():
            if (
                other_mailbox != mailbox
                and owner["participant"] == number
                and owner["status"] in ("active", "revoked")
            ):
                raise IssueRefused(
                    "participant-has-mailbox",
                    f"participant {number} already owns mailbox {other_mailbox} at the signer",
                    "a change of mailbox needs the signer operator: revoke the old "
                    "certificate and 'safemail ca release' that mailbox first",
                )
        owner = register.get(mailbox)
        if owner is None:
            return
        if owner["status"] == "revoked":
            raise IssueRefused(
                "mailbox-revoked",
                f"the certificate of mailbox {mailbox} was revoked "
                f"({owner.get('revoked_reason')}); the signer issues nothing for it until the "
                "signer operator releases it",
                "signer operator: 'safemail-ca release --mailbox M --expect-key SHA256' with "
                "the new key's SHA-256 obtained from the participant out of band (docs/ca.md)",
            )
        if owner["status"] == "released":
            if owner.get("released_for") not in (None, number):
                raise IssueRefused(
                    "mailbox-released-for-other",
                    f"mailbox {mailbox} was released for participant {owner['released_for']}, "
                    f"not {number}",
                    "the signer operator releases a mailbox for one participant number",
                )
            if new_key != owner.get("expected_key"):
                raise IssueRefused(
                    "key-not-expected",
                    f"mailbox {mailbox} was released for the key {owner.get('expected_key')}, "
                    f"the request carries {new_key}",
                    "only the key the signer operator named in 'release --expect-key' is "
                    "issued; check the SHA-256 with the participant out of band",
                )
            if owner.get("expected_name", owner["name"]) != request["practice_name"]:
                raise IssueRefused(
                    "name-change-unconfirmed",
                    f"mailbox {mailbox} was released for the name "
                    f"{owner.get('expected_name', owner['name'])!r}, the request asks for "
                    f"{request['practice_name']!r}",
                    "a new name: the signer operator releases with --name NEW",
                )
            return
        if owner["participant"] != number:
            raise IssueRefused(
                "mailbox-owned",
                f"mailbox {mailbox} belongs to participant {owner['participant']} at the "
                f"signer; participant {number} cannot get a certificate for it",
                "if the mailbox really changes hands, the signer operator revokes the old "
                "certificate and runs 'safemail ca release --mailbox' first",
            )
        if new_key == owner["key_sha256"]:
            _check_name(request, owner)
            current = index["certs"].get(owner["serial"], {})
            if (
                request.get("renewal")
                and current.get("status") == "valid"
                and datetime.fromisoformat(current["not_after"])
                > now + timedelta(days=self.policy.renewal_window_days)
            ):
                raise IssueRefused(
                    "renewal-too-early",
                    f"the request renews certificate {owner['serial']} with the same key, "
                    f"valid until {current['not_after']}; a same-key renewal is issued only "
                    f"in the last {self.policy.renewal_window_days} days",
                    "nothing to renew yet; a new key is a key change (confirm-key-change), "
                    "a new name goes through the signer operator (docs/ca.md)",
                )
            return
        confirmation = request.get("key_change")
        if not confirmation:
            raise IssueRefused(
                "key-change-unconfirmed",
                f"the request puts a new key on mailbox {mailbox}, and the participant did not "
                "confirm it with the registered key",
                "the participant signs the new CSR with the current key "
                "('safemail ca confirm-key-change') and the RA submits it with --key-change; "
                "a lost key: revoke (key-compromise) and 'safemail ca release' on the signer",
            )
        current = serialization.load_pem_public_key(owner["public_key"].encode())
        problem = keychange.check(
            confirmation,
            current,
            number,
            mailbox,
            csr.public_bytes(serialization.Encoding.DER),
        )
        if problem:
            raise IssueRefused("key-change-confirmation-invalid", problem)
        _check_name(request, owner)  # the participant confirmed the key, not a name

    def _loggable_number(self, value: Any) -> str | None:
        if isinstance(value, str) and self.policy.participant_number_valid(value):
            return value
        return None

    def _build_ee_cert(
        self,
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        csr: x509.CertificateSigningRequest,
        request: dict[str, Any],
        index: dict[str, Any],
        now: datetime,
    ) -> x509.Certificate:
        start = now - BACKDATE
        end = start + timedelta(days=self.policy.ee_validity_days)
        if end > ca_cert.not_valid_after_utc:
            raise CaError(
                f"a certificate issued now would outlive the CA (CA valid until "
                f"{ca_cert.not_valid_after_utc:%Y-%m-%d})",
                "plan the CA rollover; the signer does not shorten participant certificates",
            )
        pub = csr.public_key()
        is_ec = isinstance(pub, ec.EllipticCurvePublicKey)
        attrs = [
            x509.NameAttribute(SUBJECT_ATTRS[k], v)
            for k, v in self.policy.ca_subject
            if k in ("C", "O")
        ]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, request["practice_name"]))
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(ca_cert.subject)
            .public_key(pub)  # type: ignore[arg-type]
            .serial_number(_random_serial({int(s, 16) for s in index["certs"]}))
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # RSA recipients get the content key encrypted to them (keyEncipherment);
                    # EC recipients agree on it (keyAgreement, RFC 5753/8550).
                    key_encipherment=not is_ec,
                    data_encipherment=False,
                    key_agreement=is_ec,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.RFC822Name(request["mailbox"])]),
                critical=False,
            )
            .add_extension(
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            full_name=[
                                x509.UniformResourceIdentifier(self.policy.crl_distribution_point)
                            ],
                            relative_name=None,
                            reasons=None,
                            crl_issuer=None,
                        )
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(key, self.policy.signature_hash())
        )

    def certificate(self, serial: str) -> x509.Certificate:
        entry = self.index()["certs"].get(serial)
        if entry is None:
            raise CaError(f"no certificate with serial {serial} in the index")
        return x509.load_pem_x509_certificate(entry["pem"].encode())

    # ------------------------------------------------------------------ revocation
    def revoke(self, serial: int, reason: str, *, actor: str, now: datetime | None = None) -> str:
        """Mark a certificate revoked in the index; regenerate the CRL to publish it."""
        validate_operator(actor)
        if reason not in REVOCATION_REASONS:
            raise CaError(
                f"unknown revocation reason {reason!r}",
                f"use one of {', '.join(REVOCATION_REASONS)}",
            )
        key = serial_hex(serial)
        with _fs.locked(self._lock):
            index = self.index()
            entry = index["certs"].get(key)
            if entry is None:
                raise CaError(
                    f"no certificate with serial {key} was issued by this CA",
                    "see 'safemail ca list --certs' on the signer",
                )
            if entry["status"] == "revoked":
                raise CaError(
                    f"certificate {key} is already revoked ({entry['reason']}, "
                    f"{entry['revoked_at']})"
                )
            at = _iso(now or datetime.now(UTC))
            entry.update(status="revoked", revoked_at=at, reason=reason)
            owner = self.register(index).get(entry["mailbox"])
            if owner is not None:
                # Any revocation locks the mailbox at the signer: no request (not even one
                # approved before, waiting in the RA outbox, nor a key change confirmed with
                # the revoked key) is issued until the signer operator releases it.
                # A key-compromise revocation also bars the key for good (compromised_keys).
                owner.update(
                    status="revoked", revoked_reason=reason, revoked_serial=key, revoked_at=at
                )
                for drop in ("expected_key", "expected_name", "released_for"):
                    owner.pop(drop, None)
            self._write_index(index)
            self.journal.record(
                "revoke",
                actor,
                serial=key,
                participant=entry["participant"],
                mailbox=entry["mailbox"],
                detail=reason,
            )
        return key

    def release(
        self,
        mailbox: str,
        *,
        reason: str,
        actor: str,
        expect_key: str,
        participant: str | None = None,
        name: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Release a mailbox from its registered owner and key (signer operator only).

        For a participant whose key is lost or compromised, or a mailbox that changes hands:
        every certificate of the mailbox must be revoked first. The next approved request for
        the mailbox from ``participant`` (default: the previous owner) carrying the key whose
        SPKI SHA-256 is ``expect_key`` (obtained from the participant out of band, never from
        the RA) is then treated as a new enrolment; any other key is refused
        (``key-not-expected``), so a compromised RA cannot race the owner. Recorded in the
        journal with the reason and the expected key. The registered practice name binds the
        next enrolment too, unless ``name`` gives the new one (a change of name).
        """
        expected = parse_key_sha256(expect_key)
        if name is not None and (
            not name.strip() or len(name) > 64 or any(ord(c) < 32 for c in name)
        ):
            raise CaError("give the new practice name as one line of up to 64 characters")
        validate_operator(actor)
        reason = reason.strip()
        if not reason or len(reason) > 200 or "\n" in reason:
            raise CaError("give a reason of one line (up to 200 characters) for the release")
        if participant is not None and not self.policy.participant_number_valid(participant):
            raise CaError(f"{participant!r} is not a valid participant number")
        now = now or datetime.now(UTC)
        with _fs.locked(self._lock):
            index = self.index()
            owner = self.register(index).get(mailbox)
            if owner is None:
                raise CaError(
                    f"mailbox {mailbox} has no registered owner at the signer",
                    "see 'safemail ca list --owners'; nothing to release",
                )
            valid = [
                s
                for s, e in index["certs"].items()
                if e["mailbox"] == mailbox
                and e["status"] == "valid"
                and datetime.fromisoformat(e["not_after"]) > now
            ]
            if valid:
                raise CaError(
                    f"mailbox {mailbox} still has valid certificate(s) {', '.join(valid)}",
                    f"revoke first: safemail ca revoke --mailbox {mailbox} --reason key-compromise",
                )
            compromised = self.compromised_keys(index)
            if expected in compromised:
                raise CaError(
                    f"the key {expected} was revoked as compromised (certificate "
                    f"{compromised[expected]})",
                    "the participant makes a new key; release the mailbox for that key",
                )
            owner.update(
                status="released",
                released_at=_iso(now),
                released_by=actor,
                released_for=participant or owner["participant"],
                release_reason=reason,
                expected_key=expected,
                expected_name=name if name is not None else owner["name"],
            )
            self._write_index(index)
            self.journal.record(
                "release",
                actor,
                mailbox=mailbox,
                participant=owner["released_for"],
                detail=f"{reason} (key {expected}, name {owner['expected_name']!r})",
            )
            return dict(owner)

    def serials_for_mailbox(self, mailbox: str) -> list[str]:
        return [
            s
            for s, e in self.index()["certs"].items()
            if e["mailbox"] == mailbox and e["status"] == "valid"
        ]

    def generate_crl(
        self, *, actor: str, now: datetime | None = None
    ) -> x509.CertificateRevocationList:
        """Sign a new CRL (number + 1) listing every revoked certificate; write PEM and DER."""
        validate_operator(actor)
        now = now or datetime.now(UTC)
        with _fs.locked(self._lock):
            key, ca_cert = self.load_ca()
            index = self.index()
            number = int(index.get("crl_number", 0)) + 1
            ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(ca_cert.subject)
                .last_update(now)
                .next_update(now + timedelta(hours=self.policy.crl_validity_hours))
                .add_extension(x509.CRLNumber(number), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                    critical=False,
                )
            )
            for serial, entry in sorted(index["certs"].items()):
                if entry["status"] != "revoked":
                    continue
                rb = (
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(serial, 16))
                    .revocation_date(datetime.fromisoformat(entry["revoked_at"]))
                )
                flag = REVOCATION_REASONS[entry["reason"]]
                if flag is not x509.ReasonFlags.unspecified:  # RFC 5280: omit if unspecified
                    rb = rb.add_extension(x509.CRLReason(flag), critical=False)
                builder = builder.add_revoked_certificate(rb.build())
            crl = builder.sign(key, self.policy.signature_hash())
            index["crl_number"] = number
            self._write_index(index)
            _fs.atomic_write_bytes(self.crl_der_path, crl.public_bytes(serialization.Encoding.DER))
            _fs.atomic_write_bytes(self.crl_pem_path, crl.public_bytes(serialization.Encoding.PEM))
            self.journal.record("crl", actor, serial=str(number), detail=f"{len(crl)} revoked")
            return crl

    def current_crl(self) -> x509.CertificateRevocationList:
        if not self.crl_pem_path.exists():
            raise CaError("no CRL has been generated yet", "run 'safemail ca crl'")
        return x509.load_pem_x509_crl(self.crl_pem_path.read_bytes())


def _handled_outcome(rid: str, done: dict[str, Any]) -> IssueOutcome:
    """The outcome of a request the index already holds (issued, or refused for good)."""
    if "serial" in done:
        return IssueOutcome(rid, done["serial"], new=False)
    return IssueOutcome(rid, None, False, done["refused"], done.get("reason"))


def _check_name(request: dict[str, Any], owner: dict[str, Any]) -> None:
    if request["practice_name"] != owner["name"]:
        raise IssueRefused(
            "name-change-unconfirmed",
            f"the signer registered the name {owner['name']!r} for mailbox "
            f"{request['mailbox']}; the request asks for {request['practice_name']!r}",
            "a change of name needs the signer operator: revoke (superseded) and "
            "'safemail-ca release --mailbox M --expect-key SHA256 --name NEW'",
        )


def _generate_ca_key(key_type: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if key_type == "rsa-4096":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    return ec.generate_private_key(ec.SECP384R1())


def _random_serial(taken: set[int]) -> int:
    """A random 128-bit serial (positive, non-zero, not used before)."""
    while True:
        serial = secrets.randbits(128)
        if serial >= 1 << 64 and serial not in taken:
            return serial


def _empty_index() -> dict[str, Any]:
    return {"version": 1, "crl_number": 0, "certs": {}, "requests": {}, "register": {}}


def _owner(participant: str, cert: x509.Certificate, serial: str, request: str) -> dict[str, Any]:
    pub = cert.public_key()
    return {
        "participant": participant,
        "name": _common_name(cert),
        "status": "active",
        "key_sha256": keychange.spki_sha256(pub),
        "public_key": pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode(),
        "serial": serial,
        "request": request,
        "since": _iso(cert.not_valid_before_utc),
    }


def _common_name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="seconds")
