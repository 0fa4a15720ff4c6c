"""A TLS terminator: HTTPS on --listen, plain TCP to --to (an Orthanc's HTTP on 127.0.0.1), bytes as they come.

    python tlsproxy.py --listen 127.10.2.2:8043 --cert server.pem --to 127.0.0.1:8042 [--ready FILE]

Stands in for Orthanc's own HTTPS server, which crashes on Debian 12 (see orthanc.py). A stream
proxy: no request buffering, each chunk forwarded as soon as it is read, TCP_NODELAY on both
sockets; the connection ends when the server closes its side. TLS 1.2 minimum (TLS 1.3 negotiated
with current clients). Only the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import ssl
import sys
from pathlib import Path

CHUNK = 256 * 1024


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, ssl.SSLError, OSError):
        pass


async def _serve(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.cert)
    host, port = args.to.rsplit(":", 1)

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        _nodelay(client_w)
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        _nodelay(server_w)
        upstream = asyncio.create_task(_pump(client_r, server_w))
        # The server's end of the response ends the connection: a TLS stream has no half-close, and a
        # response delimited by the close (no Content-Length, "Connection: close") must reach the client.
        await _pump(server_r, client_w)
        upstream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upstream
        for w in (client_w, server_w):
            with contextlib.suppress(Exception):
                w.close()

    listen_host, listen_port = args.listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, listen_host, int(listen_port), ssl=context, reuse_address=True)
    if args.ready:
        await asyncio.to_thread(Path(args.ready).write_text, "ready\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True)
    p.add_argument("--cert", required=True, help="PEM with the certificate chain and the private key")
    p.add_argument("--to", required=True)
    p.add_argument("--ready", help="file written once listening")
    asyncio.run(_serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
