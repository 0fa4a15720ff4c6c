"""The consoles' HTTP server: aiohttp on the daemon's event loop, with the headers every page gets."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from relay_common.config import parse_host_port

log = logging.getLogger("relay_common.console")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# No script, no frame, no foreign resource: the pages are plain HTML with inline CSS.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    return response


class ConsoleServer:
    """Serves one aiohttp application on `listen`; a failure to listen is logged, the daemon goes on."""

    def __init__(self, app: web.Application, name: str) -> None:
        self.app, self.name = app, name
        self.address: str | None = None  # "host:port" bound
        self.error: str | None = None
        self.tls = False
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int | None:
        return None if self.address is None else int(self.address.rpartition(":")[2])

    @property
    def url(self) -> str | None:
        return None if self.address is None else f"{'https' if self.tls else 'http'}://{self.address}/"

    async def start(self, listen: str, ssl_context: ssl.SSLContext | None = None) -> bool:
        if not listen:
            return False
        host, port = parse_host_port(listen)
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=64)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            self.error = f"cannot listen on {listen}: {exc.strerror or exc}"
            log.error("%s disabled: %s", self.name, self.error)
            return False
        self._runner, self.tls = runner, ssl_context is not None
        server = site._server  # aiohttp does not expose the bound port otherwise
        bound = server.sockets[0].getsockname() if server is not None and server.sockets else (host, port)  # type: ignore[attr-defined]
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        log.info("serving the %s on %s", self.name, self.url)
        return True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+ with the daemon's own certificate (BCP 195)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
