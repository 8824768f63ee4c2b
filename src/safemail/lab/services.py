"""Small lab-only servers, run inside lab namespaces by `safemail lab up`.

- ``mirror``: serves the lab apt repository over HTTP and answers NTP (SNTP, RFC 4330)
  with the machine's clock, so hosts install and sync time from inside the lab.
- ``sink``: the `internet` host. Listens on SMTP, HTTP(S), DNS and a high port and records
  every contact as a JSON line, so "no egress" tests have a real, reachable target and the
  lab can show who reached it.

Run as ``python -m safemail.lab.services mirror|sink ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import json
import socket
import struct
import threading
import time
from pathlib import Path

NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 to 1970-01-01
SINK_TCP_PORTS = (25, 53, 80, 443, 8080, 40000)


def _ntp_timestamp(t: float) -> bytes:
    secs = int(t) + NTP_EPOCH_OFFSET
    frac = int((t % 1) * 2**32)
    return struct.pack("!II", secs, frac)


def ntp_reply(request: bytes, now: float) -> bytes | None:
    """An SNTP server reply (stratum 2, reference 'LAB') for a client request, else None."""
    if len(request) < 48:
        return None
    mode = request[0] & 0x7
    version = (request[0] >> 3) & 0x7
    if mode != 3 or version not in (3, 4):
        return None
    header = bytes([(0 << 6) | (version << 3) | 4, 2, request[2], 0xEC])
    root = struct.pack("!II", 0, 0x100) + b"LAB\0"
    ref = _ntp_timestamp(now)
    originate = request[40:48]
    return header + root + ref + originate + _ntp_timestamp(now) + _ntp_timestamp(time.time())


class _NtpProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        reply = ntp_reply(data, time.time())
        if reply:
            self.transport.sendto(reply, addr)  # type: ignore[attr-defined]


def run_mirror(root: Path, bind: str, port: int) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer((bind, port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    async def ntp() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(_NtpProtocol, local_addr=(bind, 123))
        await asyncio.Event().wait()

    asyncio.run(ntp())


class Sink:
    """Accepts anything on a fixed set of ports and records who came."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def record(self, proto: str, port: int, peer: str, note: str = "") -> None:
        line = {"time": time.time(), "proto": proto, "port": port, "peer": peer, "note": note}
        with self.log.open("a") as fh:
            fh.write(json.dumps(line) + "\n")

    async def handle(self, port: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        self.record("tcp", port, peer)
        try:
            if port == 25:
                writer.write(b"220 internet-sink ESMTP lab sink\r\n")
                await writer.drain()
                while line := await asyncio.wait_for(reader.readline(), 30):
                    cmd = line.strip().upper()
                    if cmd.startswith(b"QUIT"):
                        writer.write(b"221 bye\r\n")
                        break
                    if cmd == b"DATA":
                        writer.write(b"354 go ahead\r\n")
                        await writer.drain()
                        while (body := await asyncio.wait_for(reader.readline(), 30)) not in (
                                b".\r\n", b""):
                            pass
                        self.record("tcp", port, peer, "smtp message accepted")
                        writer.write(b"250 accepted by the internet sink\r\n")
                    else:
                        writer.write(b"250 ok\r\n")
                    await writer.drain()
            else:
                await asyncio.wait_for(reader.read(1024), 5)
                body = b"internet sink\n"
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def serve(self, bind: str) -> None:
        for port in SINK_TCP_PORTS:
            await asyncio.start_server(functools.partial(self.handle, port), bind, port)
        sink = self

        class Udp(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple) -> None:
                sink.record("udp", 53, addr[0])

        await asyncio.get_running_loop().create_datagram_endpoint(Udp, local_addr=(bind, 53))
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safemail.lab.services")
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mirror", help="serve the lab apt repository (HTTP) and time (NTP)")
    m.add_argument("--root", type=Path, required=True)
    m.add_argument("--bind", required=True)
    m.add_argument("--port", type=int, default=80)
    s = sub.add_parser("sink", help="the lab's internet sink")
    s.add_argument("--bind", required=True)
    s.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    socket.setdefaulttimeout(30)
    if args.what == "mirror":
        run_mirror(args.root, args.bind, args.port)
    else:
        asyncio.run(Sink(args.log).serve(args.bind))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
