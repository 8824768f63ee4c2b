"""The CA signer's exchange cycle against the CA's history (issue 14, docs/PERFORMANCE.md 14).

The verify suite's CA and lifecycle tests got 2-3 times slower as the lab aged. This measures
one exchange cycle, as roles/ca_hosts' ``cycle`` script runs it, in-process on plain Python
with one temporary state directory per host (RA, signer, distribution), after a history of
N prior requests (each approved and issued; every 4th certificate then revoked, every 20th of
those with ``key-compromise`` on a key of its own) and with one new approved request waiting.

The cycle's parts, timed one by one (each is one ``safemail-ca`` step on the lab):

  * ``ra_bundle`` — the RA's ``bundle approved`` (its whole ``outbox/approved/``);
  * ``signer_unbundle`` — the signer's ``unbundle approved`` into ``exchange/approved``;
  * ``signer_issue`` — ``issue --from exchange/approved`` (one new request, N handled ones);
  * ``signer_crl`` — ``crl`` (what a revocation and the CRL timer run);
  * ``signer_bundle`` / ``dist_unbundle`` — the push of the signer's output;
  * ``dist_publish`` — ``publish --ldif`` (every signature checked against the CA);
  * ``published_copy`` — distribution's tree bundled and unbundled on the RA.

Rounds are paired: each round runs every N once, on a fresh copy of that N's state, in
alternating order (ascending in odd rounds, descending in even ones); the ratio to N=0 is taken
per round. Reported per N: median, min and max seconds of the whole cycle and of each part,
the median per-round ratio to the N=0 floor with its min and max, and (unless ``--no-profile``)
the top functions of one extra cProfile'd cycle. The lab's policy is used: an RSA 4096 CA,
RSA 3072 participant keys. The state lives on disk (``--dir``, default a temporary directory
under /var/tmp), since the steps fsync what they write.

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_ca_cycle.py [--sizes 0,50,200,500]
[--rounds 5] [--dir DIR] [--out DIR]``. JSON goes to stdout and to bench/results/.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _results
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID

from safemail.ca import exchange
from safemail.ca.dist import Distribution
from safemail.ca.journal import Journal, JournalKey
from safemail.ca.policy import CaPolicy
from safemail.ca.ra import RegistrationAuthority
from safemail.ca.signer import Signer

DOMAIN = "safemail.example"
DN_TEMPLATE = "uid={participant},ou=participants,dc=safemail,dc=example"
PARTS = (
    "ra_bundle",
    "signer_unbundle",
    "signer_issue",
    "signer_crl",
    "signer_bundle",
    "dist_unbundle",
    "dist_publish",
    "published_copy",
)
POLICY = CaPolicy.from_dict(
    {
        "ca_subject": {"C": "DE", "O": "SafeMail Bench Association", "CN": "SafeMail Bench CA"},
        "mail_domains": [DOMAIN],
        "crl_distribution_point": "http://ca-dist/crl.der",
        "ca_key_type": "rsa-4096",  # as inventories/test
        "participant_key_types": ["rsa"],
        "participant_rsa_min_bits": 3072,
    }
)
SPARE = "spare0001"


def _csr(key: rsa.RSAPrivateKey, mailbox: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Praxis Bench")]))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(mailbox)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _journal_key(root: Path) -> JournalKey:
    path = root / "journal-seal.key"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return JournalKey.load(path)


def _hosts(root: Path) -> tuple[RegistrationAuthority, Signer, Distribution]:
    key = _journal_key(root)

    def journal(host: str) -> Journal:
        return Journal(root / host / "journal.jsonl", host=host, key=key)

    ra = RegistrationAuthority(
        root / "ca-ra", POLICY, journal=journal("ca-ra"), published_dir=root / "ca-ra" / "published"
    )
    return (
        ra,
        Signer(root / "ca-signer", POLICY, journal=journal("ca-signer")),
        Distribution(root / "ca-dist", journal=journal("ca-dist")),
    )


class _SetupSigner(Signer):
    """Builds the history only (never timed): the CA key is parsed once, not per request."""

    _ca: Any = None

    def load_ca(self) -> Any:
        if self._ca is None:
            self._ca = super().load_ca()
        return self._ca


def build_history(root: Path, n: int, log: Callable[[str], None]) -> None:
    """A lab-like state after ``n`` prior requests, exchanged and published once (so every
    host holds its last transfer, as on the lab), with one spare participant registered (each
    round submits and approves its new request)."""
    ra, _signer, dist = _hosts(root)
    signer = _SetupSigner(root / "ca-signer", POLICY, journal=_signer.journal)
    signer.init(actor="bench")
    shared = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    for i in range(n):
        number, mailbox = f"p{i:08d}", f"praxis{i}@{DOMAIN}"
        ra.register_participant(number, "Praxis Bench", mailbox, "GP", actor="bench")
        compromised = i % 80 == 3
        key = (
            rsa.generate_private_key(public_exponent=65537, key_size=3072)
            if compromised
            else shared
        )
        csr = _csr(key, mailbox)
        req = ra.submit(csr, number, actor="bench")
        ra.approve(req.id, operator="bench")
        approved = ra.state_dir / "outbox" / "approved" / f"{req.id}.json"
        out = signer.issue(json.loads(approved.read_text()), actor="bench")
        assert out.serial, out
        if i % 4 == 3:
            signer.revoke(
                int(out.serial, 16),
                "key-compromise" if compromised else "cessation-of-operation",
                actor="bench",
            )
        if i and i % 100 == 0:
            log(f"  N={n}: {i} requests")
    ra.register_participant(SPARE, "Praxis Spare", f"spare@{DOMAIN}", "GP", actor="bench")
    signer.generate_crl(actor="bench")
    # the transfers of the last cycle, as the lab's hosts hold them
    exchange.unpack(
        exchange.pack(ra._dirs["approved"], exchange.APPROVED),
        signer.state_dir / "exchange" / "approved",
        exchange.APPROVED,
    )
    incoming = dist.state_dir / "incoming"
    exchange.unpack(
        exchange.pack(signer.state_dir, exchange.SIGNER_OUTPUT), incoming, exchange.SIGNER_OUTPUT
    )
    dist.publish(incoming, actor="bench", dn_template=DN_TEMPLATE)
    exchange.unpack(
        exchange.pack(dist.published, exchange.PUBLISHED), ra.published_dir, exchange.PUBLISHED
    )
    spare_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    (root / "spare.csr").write_bytes(_csr(spare_key, f"spare@{DOMAIN}"))


def one_cycle(root: Path) -> dict[str, float]:
    """Submit and approve the spare's request (not timed), then time the cycle's parts."""
    ra, signer, dist = _hosts(root)
    req = ra.submit((root / "spare.csr").read_bytes(), SPARE, actor="bench")
    ra.approve(req.id, operator="bench")
    took: dict[str, float] = {}

    def timed(part: str, func: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = func()
        took[part] = took.get(part, 0.0) + time.perf_counter() - start
        return result

    approved = timed("ra_bundle", lambda: exchange.pack(ra._dirs["approved"], exchange.APPROVED))
    x = signer.state_dir / "exchange"
    timed("signer_unbundle", lambda: exchange.unpack(approved, x / "approved", exchange.APPROVED))
    outcomes = timed(
        "signer_issue", lambda: signer.issue_from_outbox(x / "approved", actor="signer-cycle")
    )
    new = [o for o in outcomes if o.new]
    if len(new) != 1 or new[0].request_id != req.id:
        raise SystemExit(f"expected one new issuance ({req.id}), got {new}")
    timed("signer_crl", lambda: signer.generate_crl(actor="signer-crl-timer"))
    output = timed("signer_bundle", lambda: exchange.pack(signer.state_dir, exchange.SIGNER_OUTPUT))
    incoming = dist.state_dir / "incoming"
    timed("dist_unbundle", lambda: exchange.unpack(output, incoming, exchange.SIGNER_OUTPUT))

    def publish() -> None:
        report = dist.publish(incoming, actor="signer-push", dn_template=DN_TEMPLATE)
        ldif = dist.state_dir / "ldap" / "queue" / "bench.ldif"
        from safemail.ca import _fs

        _fs.atomic_write_bytes(ldif, "\n".join(u.to_ldif() for u in report.ldap).encode())

    timed("dist_publish", publish)
    timed(
        "published_copy",
        lambda: exchange.unpack(
            exchange.pack(dist.published, exchange.PUBLISHED), ra.published_dir, exchange.PUBLISHED
        ),
    )
    took["cycle"] = sum(took[p] for p in PARTS)
    return took


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def _profile(root: Path, top: int = 12) -> list[dict[str, Any]]:
    prof = cProfile.Profile()
    prof.enable()
    one_cycle(root)
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}:{func}",
                "calls": ncalls,
                "tottime": round(tottime, 4),
                "cumtime": round(cumtime, 4),
            }
        )
    rows.sort(key=lambda r: r["tottime"], reverse=True)
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0,50,200,500", help="history sizes N (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds (default %(default)s)")
    ap.add_argument("--dir", type=Path, help="work directory on disk (default: under /var/tmp)")
    ap.add_argument("--out", type=Path, default=_results.DEFAULT_DIR, help="results directory")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile'd cycle")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",")})
    except ValueError:
        ap.error(f"--sizes: give numbers separated by commas, not {args.sizes!r}")
    if any(s < 0 for s in sizes) or 0 not in sizes:
        ap.error("--sizes must be non-negative and include 0 (the floor)")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-ca-cycle-", dir=args.dir or "/var/tmp"))
    try:
        bases = {}
        for n in sizes:
            log(f"history N={n} ...")
            start = time.perf_counter()
            bases[n] = work / f"base-{n}"
            build_history(bases[n], n, log)
            log(f"  built in {time.perf_counter() - start:.1f} s")
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
        for r in range(args.rounds):
            order = sizes if r % 2 == 0 else list(reversed(sizes))
            for n in order:
                root = work / f"round-{r}-{n}"
                shutil.copytree(bases[n], root)
                runs[n].append(one_cycle(root))
                shutil.rmtree(root)
                log(f"round {r + 1} N={n}: cycle {runs[n][-1]['cycle']:.3f} s")
        result: dict[str, Any] = {
            "benchmark": "ca_cycle",
            "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "rounds": args.rounds,
            "policy": {"ca_key_type": POLICY.ca_key_type, "participant_rsa_min_bits": 3072},
            "sizes": {},
        }
        for n in sizes:
            ratios = [
                run["cycle"] / floor["cycle"] for run, floor in zip(runs[n], runs[0], strict=True)
            ]
            entry: dict[str, Any] = {
                "cycle_seconds": _stats([run["cycle"] for run in runs[n]]),
                "ratio_to_n0": _stats(ratios),
                "parts_seconds": {p: _stats([run[p] for run in runs[n]]) for p in PARTS},
            }
            if not args.no_profile:
                root = work / f"profile-{n}"
                shutil.copytree(bases[n], root)
                entry["profile_top_tottime"] = _profile(root)
            result["sizes"][str(n)] = entry
        _results.write(result, args.out)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
