"""Registration authority: participant register, CSR intake, approval queue.

Runs on the RA host (front segment). State directory layout::

    participants.json          the participant register (number -> practice, mailbox, group)
    queue/pending/<id>.json    requests waiting for an operator
    queue/rejected/<id>.json   refused by an operator (with reason and operator name)
    outbox/approved/<id>.json  approved; the signer pulls these (it accepts no connection)
    published/                 optional read-only copy of the distribution tree (ca.pem,
                               crl.pem, certs/) used to see who already holds a valid cert
    journal.jsonl              the RA's hash-chained journal
    ra.lock                    serialises all changes

Every write is atomic (temporary file + rename). A refused request leaves no file behind; the
refusal itself is recorded in the journal (reason code only, never the CSR).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from safemail.ca import _fs, dist, keychange
from safemail.ca.csrcheck import check_csr, load_csr
from safemail.ca.errors import CaError, CsrRefused, RefusedError, RegistrationRefused
from safemail.ca.journal import Journal
from safemail.ca.policy import CaPolicy

STATES = ("pending", "approved", "rejected")
_REQUEST_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_LOCAL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._+-]{0,62}[a-z0-9])?$")
_OPERATOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Participant:
    number: str
    practice_name: str
    mailbox: str
    specialty: str
    registered_at: str = ""


@dataclass
class Request:
    id: str
    state: str
    participant: str
    practice_name: str
    mailbox: str
    specialty: str
    renewal: bool
    csr_pem: str
    csr_sha256: str
    submitted_at: str
    submitted_by: str
    decided_at: str | None = None
    operator: str | None = None
    reason: str | None = None
    # The participant's confirmation of a new key, signed with the registered key (JSON text,
    # safemail.ca.keychange); checked by the signer, which alone knows the registered key.
    key_change: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Request:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_request_id(request_id: str) -> str:
    if not _REQUEST_ID_RE.match(request_id):
        raise CaError(
            f"{request_id!r} is not a request id",
            "request ids are 16 hex characters; see 'safemail ca list'",
        )
    return request_id


def validate_operator(name: str) -> str:
    if not name or not _OPERATOR_RE.match(name):
        raise CaError(
            f"operator name {name!r} is not valid",
            "give your login or name (letters, digits, space, . _ @ -; up to 64 characters)",
        )
    return name


def validate_mailbox(mailbox: str, policy: CaPolicy) -> str:
    local, at, domain = mailbox.partition("@")
    if not at or not _LOCAL_RE.match(local) or ".." in local:
        raise RegistrationRefused(
            "bad-mailbox",
            f"{mailbox!r} is not a valid mailbox address",
            "use lower-case letters, digits and . _ + - before the @, e.g. "
            "praxis.mueller@" + policy.mail_domains[0],
        )
    if domain not in policy.mail_domains:
        raise RegistrationRefused(
            "mailbox-domain",
            f"the mailbox {mailbox} is not in a SafeMail domain ({', '.join(policy.mail_domains)})",
        )
    return mailbox


class RegistrationAuthority:
    """The RA's operations on its state directory."""

    def __init__(
        self,
        state_dir: Path,
        policy: CaPolicy,
        *,
        journal: Journal | None = None,
        published_dir: Path | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.policy = policy
        self.journal = journal or Journal(state_dir / "journal.jsonl")
        self.published_dir = published_dir or state_dir / "published"
        self.register_path = state_dir / "participants.json"
        self._dirs = {
            "pending": state_dir / "queue" / "pending",
            "rejected": state_dir / "queue" / "rejected",
            "approved": state_dir / "outbox" / "approved",
        }
        self._lock = state_dir / "ra.lock"

    # ------------------------------------------------------------ participant register
    def participants(self) -> dict[str, Participant]:
        if not self.register_path.exists():
            return {}
        try:
            data = _fs.read_json(self.register_path)
            return {n: Participant(number=n, **p) for n, p in data["participants"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise CaError(
                f"participant register {self.register_path} is damaged: {exc}",
                "restore it from the backup",
            ) from exc

    def register_participant(
        self,
        number: str,
        practice_name: str,
        mailbox: str,
        specialty: str,
        *,
        actor: str,
        update: bool = False,
    ) -> Participant:
        """Add (or with ``update`` change) a participant; refuse bad or conflicting data."""
        validate_operator(actor)
        try:
            participant = self._validated_participant(number, practice_name, mailbox, specialty)
            with _fs.locked(self._lock):
                current = self.participants()
                if number in current and not update:
                    raise RegistrationRefused(
                        "already-registered",
                        f"participant {number} is already registered ({current[number].mailbox})",
                        "use --update to change the entry",
                    )
                if update and number not in current:
                    raise RegistrationRefused(
                        "unknown-participant", f"participant {number} is not registered"
                    )
                for other in current.values():
                    if other.mailbox == mailbox and other.number != number:
                        raise RegistrationRefused(
                            "mailbox-taken",
                            f"the mailbox {mailbox} already belongs to participant {other.number}",
                        )
                current[number] = participant
                self._write_register(current)
        except RefusedError as exc:
            self._journal_refusal("register-refused", actor, exc, participant=number)
            raise
        self.journal.record(
            "register-update" if update else "register",
            actor,
            participant=number,
            mailbox=mailbox,
        )
        return participant

    def _validated_participant(
        self, number: str, practice_name: str, mailbox: str, specialty: str
    ) -> Participant:
        if not self.policy.participant_number_valid(number):
            raise RegistrationRefused(
                "bad-participant-number",
                f"{number!r} is not a valid participant number",
                f"it must match {self.policy.participant_number_pattern}",
            )
        name = practice_name.strip()
        if not name or len(name) > 64 or any(ord(c) < 32 for c in name):
            raise RegistrationRefused(
                "bad-practice-name",
                "the practice name must be 1 to 64 printable characters",
            )
        validate_mailbox(mailbox, self.policy)
        if specialty not in self.policy.specialty_groups:
            raise RegistrationRefused(
                "unknown-specialty",
                f"specialty group {specialty!r} is not one of the policy's groups",
                f"choose one of {', '.join(self.policy.specialty_groups)}",
            )
        return Participant(number, name, mailbox, specialty, _now())

    def _write_register(self, participants: dict[str, Participant]) -> None:
        data = {
            "version": 1,
            "participants": {
                n: {k: v for k, v in asdict(p).items() if k != "number"}
                for n, p in sorted(participants.items())
            },
        }
        _fs.atomic_write_json(self.register_path, data, 0o640)

    def import_register(self, path: Path, *, actor: str) -> int:
        """Register every participant of a YAML/JSON list file; return how many were added."""
        try:
            rows = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise CaError(f"cannot read participant list {path}: {exc}") from exc
        if isinstance(rows, dict):
            rows = rows.get("participants")
        if not isinstance(rows, list):
            raise CaError(
                f"{path} must hold a list of participants",
                "each item: {number: ..., practice_name: ..., mailbox: ..., specialty: ...}",
            )
        added = 0
        known = self.participants()
        for row in rows:
            if not isinstance(row, dict):
                raise CaError(f"{path}: every participant must be a mapping")
            number = str(row.get("number", ""))
            if number in known:
                continue
            self.register_participant(
                number,
                str(row.get("practice_name", "")),
                str(row.get("mailbox", "")),
                str(row.get("specialty", "")),
                actor=actor,
            )
            added += 1
        return added

    # ------------------------------------------------------------ requests
    def _path(self, state: str, request_id: str) -> Path:
        return self._dirs[state] / f"{request_id}.json"

    def list(self, state: str | None = None) -> list[Request]:
        states = STATES if state is None else (state,)
        seen: set[str] = set()
        out: list[Request] = []
        # Decided states first: a crash between writing the decision and removing the
        # pending file leaves both; the decision wins.
        for st in ("approved", "rejected", "pending"):
            d = self._dirs[st]
            if not d.is_dir():
                continue
            for f in sorted(d.glob("*.json")):
                rid = f.stem
                if rid in seen or not _REQUEST_ID_RE.match(rid):
                    continue
                seen.add(rid)
                if st in states:
                    out.append(Request.from_dict(_fs.read_json(f)))
        return sorted(out, key=lambda r: (r.submitted_at, r.id))

    def get(self, request_id: str) -> Request:
        validate_request_id(request_id)
        for st in ("approved", "rejected", "pending"):
            p = self._path(st, request_id)
            if p.exists():
                return Request.from_dict(_fs.read_json(p))
        raise CaError(f"no request {request_id}", "see 'safemail ca list'")

    def submit(
        self,
        csr_data: bytes,
        participant_number: str,
        *,
        actor: str,
        renewal: bool = False,
        key_change: str | None = None,
    ) -> Request:
        """Check a CSR for a registered participant and queue it as pending.

        Raises :class:`CsrRefused` with a specific code and reason; nothing is stored then.
        """
        validate_operator(actor)
        try:
            with _fs.locked(self._lock):
                req = self._checked_request(csr_data, participant_number, actor, renewal)
                if key_change is not None:
                    if len(key_change) > keychange.MAX_BYTES:
                        raise CsrRefused(
                            "bad-key-change", "the key-change confirmation is too long"
                        )
                    req.key_change = key_change
                path = self._path("pending", req.id)
                _fs.atomic_write_json(path, req.to_dict(), 0o640)
                try:
                    self.journal.record(
                        "submit",
                        actor,
                        participant=req.participant,
                        mailbox=req.mailbox,
                        request=req.id,
                        detail=" ".join(
                            w for w, on in (("renewal", renewal), ("key-change", key_change)) if on
                        )
                        or None,
                    )
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
                return req
        except RefusedError as exc:
            number = (
                participant_number
                if self.policy.participant_number_valid(participant_number)
                else None
            )
            self._journal_refusal("submit-refused", actor, exc, participant=number)
            raise

    def _checked_request(self, csr_data: bytes, number: str, actor: str, renewal: bool) -> Request:
        participant = self.participants().get(number)
        if participant is None:
            raise CsrRefused(
                "unknown-participant",
                f"participant {number!r} is not in the participant register",
                "register the participant first: safemail ca register",
            )
        csr = load_csr(csr_data)
        check_csr(csr, self.policy, participant.mailbox)
        self._check_no_open_request(number)
        if not renewal:
            self._check_no_valid_cert(participant)
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        return Request(
            id=secrets.token_hex(8),
            state="pending",
            participant=number,
            practice_name=participant.practice_name,
            mailbox=participant.mailbox,
            specialty=participant.specialty,
            renewal=renewal,
            csr_pem=pem,
            csr_sha256=hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest(),
            submitted_at=_now(),
            submitted_by=actor,
        )

    def _check_no_open_request(self, number: str) -> None:
        for req in self.list("pending"):
            if req.participant == number:
                raise CsrRefused(
                    "request-pending",
                    f"participant {number} already has a pending request {req.id}",
                    f"approve or reject {req.id} first",
                )

    def _check_no_valid_cert(self, participant: Participant) -> None:
        held = dist.current_certificate(self.published_dir, participant.mailbox)
        if held is not None:
            raise CsrRefused(
                "already-certified",
                f"participant {participant.number} already holds a valid certificate for "
                f"{participant.mailbox} (serial {held.serial_number:032x}, valid until "
                f"{held.not_valid_after_utc:%Y-%m-%d})",
                "submit with --renewal to replace it, or revoke it first",
            )

    def approve(self, request_id: str, *, operator: str) -> Request:
        """Move a pending request to the outbox for the signer, after re-checking it."""
        validate_operator(operator)
        with _fs.locked(self._lock):
            req = self._pending(request_id)
            participant = self.participants().get(req.participant)
            if participant is None or participant.mailbox != req.mailbox:
                raise CsrRefused(
                    "register-changed",
                    f"participant {req.participant} was removed or its mailbox changed since "
                    "the request was submitted",
                    f"reject {request_id} and submit a new request",
                )
            check_csr(load_csr(req.csr_pem.encode()), self.policy, req.mailbox)
            if not req.renewal:
                self._check_no_valid_cert(participant)
            return self._decide(req, "approved", operator, None)

    def reject(self, request_id: str, *, reason: str, operator: str) -> Request:
        validate_operator(operator)
        reason = reason.strip()
        if not reason or len(reason) > 200 or "\n" in reason:
            raise CaError("give a reason of one line (up to 200 characters) for the rejection")
        with _fs.locked(self._lock):
            return self._decide(self._pending(request_id), "rejected", operator, reason)

    def _pending(self, request_id: str) -> Request:
        req = self.get(request_id)
        if req.state != "pending":
            raise CaError(
                f"request {request_id} is already {req.state}",
                "only pending requests can be approved or rejected",
            )
        return req

    def _decide(self, req: Request, state: str, operator: str, reason: str | None) -> Request:
        req.state = state
        req.decided_at = _now()
        req.operator = operator
        req.reason = reason
        target = self._path(state, req.id)
        _fs.atomic_write_json(target, req.to_dict(), 0o640)
        try:
            self.journal.record(
                "approve" if state == "approved" else "reject",
                operator,
                participant=req.participant,
                mailbox=req.mailbox,
                request=req.id,
                detail=reason,
            )
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        self._path("pending", req.id).unlink(missing_ok=True)
        return req

    def _journal_refusal(self, action: str, actor: str, exc: RefusedError, **subject: Any) -> None:
        # A refusal is recorded by its code only; a journal failure must not hide the refusal.
        with contextlib.suppress(CaError, OSError):
            self.journal.record(action, actor, detail=exc.code, **subject)
