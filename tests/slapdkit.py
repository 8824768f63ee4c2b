"""A real OpenLDAP server (Debian's slapd) for the unit tests, in a temporary directory.

:class:`Slapd` writes a minimal slapd.conf (mdb database, the participants' schema, TLS with
a certificate the test made, the lab's rule that nothing but StartTLS works without TLS),
loads entries with slapadd, starts slapd in the foreground on 127.0.0.1 at free ports
(``ldap://`` and ``ldaps://``) and stops it by its PID. slapd's statistics log (``-d 256``)
goes to a file, so a test can see which operations reached the server (:meth:`binds`).

slapd comes from `make setup` (scripts/setup-host.sh); it runs as the user running the tests.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

SUFFIX = "dc=safemail,dc=example"
START_SECONDS = 15  # slapd is up in well under a second here
SCHEMAS = ("core", "cosine", "inetorgperson")


def slapd_binary() -> str:
    found = shutil.which("slapd", path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))
    if found is None:
        raise RuntimeError("slapd is not installed: run `make setup` (Debian package slapd)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ldif_entry(dn: str, attrs: dict[str, list[str | bytes]]) -> str:
    lines = [f"dn: {dn}"]
    for name, values in attrs.items():
        for value in values:
            if isinstance(value, bytes):
                lines.append(f"{name}:: {base64.b64encode(value).decode()}")
            else:
                lines.append(f"{name}: {value}")
    return "\n".join(lines) + "\n"


class Slapd:
    """slapd on 127.0.0.1 with the given entries below ``SUFFIX``; a context manager."""

    def __init__(self, root: Path, entries: list[tuple[str, dict]], *,
                 cert_pem: bytes | None, key_pem: bytes | None) -> None:
        self.root = root
        self.port, self.tls_port = free_port(), free_port()
        self.log = root / "slapd.log"
        root.mkdir(parents=True, exist_ok=True)
        (root / "db").mkdir()
        tls = ""
        if cert_pem is not None and key_pem is not None:
            (root / "server.crt").write_bytes(cert_pem)
            (root / "server.key").write_bytes(key_pem)
            (root / "server.key").chmod(0o600)
            tls = (f"TLSCertificateFile {root}/server.crt\n"
                   f"TLSCertificateKeyFile {root}/server.key\n")
        schemas = "".join(f"include /etc/ldap/schema/{s}.schema\n" for s in SCHEMAS)
        (root / "slapd.conf").write_text(
            schemas
            + f"pidfile {root}/slapd.pid\nargsfile {root}/slapd.args\n"
            + "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
            + tls
            # As roles/auth: every operation but StartTLS needs TLS (plain ldap:// has ssf 0).
            + "security ssf=71\n"
            + "sizelimit 500\n"
            + f'database mdb\nsuffix "{SUFFIX}"\ndirectory {root}/db\nmaxsize 10485760\n'
            + "access to attrs=userPassword by anonymous auth by * none\n"
            + "access to * by users read by * none\n"
        )
        base = [
            (SUFFIX, {"objectClass": ["dcObject", "organization"], "dc": ["safemail"],
                      "o": ["SafeMail"]}),
            (f"ou=participants,{SUFFIX}", {"objectClass": ["organizationalUnit"],
                                           "ou": ["participants"]}),
        ]
        (root / "data.ldif").write_text(
            "\n".join(ldif_entry(dn, attrs) for dn, attrs in [*base, *entries]))
        self._proc: subprocess.Popen | None = None
        self._binary = slapd_binary()
        subprocess.run([self._binary, "-T", "add", "-q", "-f", str(root / "slapd.conf"),
                        "-l", str(root / "data.ldif")], check=True, capture_output=True,
                       timeout=30)

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def start(self) -> Slapd:
        urls = f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/"
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [self._binary, "-d", "256", "-h", urls, "-f", str(self.root / "slapd.conf")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"slapd exited with {self._proc.returncode}: "
                                   + self.log.read_text()[-2000:])
            try:
                for port in (self.port, self.tls_port):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"slapd did not listen within {START_SECONDS} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()  # this slapd's own PID
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def __enter__(self) -> Slapd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def settle(self, timeout: float = 10) -> None:
        """Wait until slapd has logged the end of every connection it accepted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self._lines()
            opened = sum(" ACCEPT from " in line for line in lines)
            closed = sum(" closed" in line for line in lines)
            if opened and closed >= opened:
                return
            time.sleep(0.05)
        raise AssertionError("slapd still has open connections:\n" + "\n".join(self._lines()[-20:]))

    def binds(self) -> list[str]:
        """The bind requests that arrived (statistics log: ``BIND dn="..." method=128``)."""
        self.settle()
        return [line for line in self._lines() if " BIND dn=" in line and " method=" in line]

    def search_results(self) -> list[str]:
        """The ends of searches (``SEARCH RESULT tag=101 err=N ... nentries=N``)."""
        self.settle()
        return [line for line in self._lines() if " SEARCH RESULT " in line]

    def bound(self) -> list[str]:
        """The binds slapd accepted, with their security strength (``... ssf=256``)."""
        self.settle()
        return [line for line in self._lines() if " BIND dn=" in line and " mech=" in line]


@contextlib.contextmanager
def running(root: Path, entries: list[tuple[str, dict]], *, cert_pem: bytes | None,
            key_pem: bytes | None) -> Iterator[Slapd]:
    with Slapd(root, entries, cert_pem=cert_pem, key_pem=key_pem) as server:
        yield server
