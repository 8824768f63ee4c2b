"""Enrolment through the real CA path, shared by the verify modules beside it (test_ca.py for
CA-03/CA-04, test_lifecycle.py for the participant lifecycle).

The participant makes its key and CSR on its own host, the RA takes the CSR and approves it,
the signer's exchange cycle issues the certificate and hands it to distribution. Hosts are
testinfra hosts; nothing here chooses them.
"""

from __future__ import annotations

import base64

CA = "/usr/local/sbin/safemail-ca"
SAFEMAIL = "/opt/safemail/venv/bin/safemail"


def put(host, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on ``host`` (mode 0644)."""
    b64 = base64.b64encode(data).decode()
    host.run_test(f"echo {b64} | base64 -d > {path} && chmod 0644 {path}")


def cycle(signer) -> None:
    """Run the signer's exchange cycle (twice: the second start is always a fresh run)."""
    for _ in range(2):
        signer.run_test("systemctl start safemail-ca-cycle.service")
    out = signer.run("systemctl is-failed safemail-ca-cycle.service")
    assert out.stdout.strip() != "failed", signer.run(
        "journalctl -u safemail-ca-cycle -n 30 --no-pager").stdout


def submit(participant, ra, signer, number: str, csr: str, *options: str) -> str:
    """The CSR file ``csr`` on ``participant`` submitted at ``ra`` for ``number`` (with the
    submit ``options``, e.g. ``--renewal``), approved, and the signer's cycle run; the
    request id."""
    put(ra, f"/tmp/{number}.csr", participant.file(csr).content)
    rid = ra.check_output(f"{CA} submit /tmp/{number}.csr --participant {number} "
                          f"--operator verify {' '.join(options)}").split()[0]
    ra.run_expect([0], f"{CA} approve {rid} --operator verify")
    ra.run(f"rm -f /tmp/{number}.csr")
    cycle(signer)
    return rid


def enrol(participant, ra, signer, number: str, mailbox: str, key_dir: str) -> str:
    """Enrol the registered participant ``number``: key and CSR in ``key_dir`` (made anew,
    0700) on ``participant``, submitted and approved at ``ra``, issued by ``signer``; the
    request id."""
    participant.run_test(f"rm -rf {key_dir} && mkdir -m 0700 {key_dir}")
    participant.run_expect([0], f"{SAFEMAIL} participant keygen --mailbox {mailbox} "
                                f"--key {key_dir}/key.pem --csr {key_dir}/csr.pem")
    return submit(participant, ra, signer, number, f"{key_dir}/csr.pem")
