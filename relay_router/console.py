"""The router's read-only web console: devices, associations, recent errors and where each is explained.

Served by aiohttp on the router's own event loop at `[console] listen` (off unless set; a loopback
address such as 127.0.0.1:9466 is the intended use). On loopback it needs no password: whoever can reach
it can already read the status file. Bound anywhere else it asks for HTTP Basic credentials, the
password read from `[console] password_file`. The page refreshes itself; it has no button and no script.
Each recent error links to its entry in docs/operations.md ("Troubleshooting by symptom"), kept on the
console's own /help page so the link works without internet access.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay_common.config import parse_host_port
from relay_common.console import environment, is_loopback, render
from relay_common.console.server import ConsoleServer, security_headers
from relay_common.console.troubleshooting import NOT_SIGNED_ON, entry_for, sections
from relay_router.status import remote_devices

if TYPE_CHECKING:
    from relay_router.service import RouterService

log = logging.getLogger("relay_router.console")
SHOW_RECENT = 50
USER = "admin"


class RouterConsole:
    def __init__(self, service: RouterService) -> None:
        self.service = service
        self.env = environment()
        self.password: str | None = None
        app = web.Application(middlewares=[security_headers], client_max_size=4096)
        app.add_routes([web.get("/", self.overview), web.get("/help", self.help)])
        self.server = ConsoleServer(app, "router console")

    async def start(self) -> bool:
        section = self.service.config.console
        if not section.listen:
            return False
        host, _ = parse_host_port(section.listen)
        if not is_loopback(host):
            assert section.password_file is not None  # the configuration requires it (RouterConfig)
            try:
                self.password = section.password_file.read_text().strip()
            except OSError as exc:
                self.password = ""
                log.error("router console disabled: cannot read %s: %s", section.password_file, exc)
            if not self.password:
                self.server.error = f"no password in {section.password_file}"
                log.error("router console disabled: %s", self.server.error)
                return False
        return await self.server.start(section.listen)

    async def stop(self) -> None:
        await self.server.stop()

    def _authorized(self, request: web.Request) -> bool:
        if self.password is None:
            return True
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            user, _, given = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return scheme == "Basic" and hmac.compare_digest(f"{user}:{given}".encode(), f"{USER}:{self.password}".encode())

    def _page(self, request: web.Request, name: str, **context: Any) -> web.Response:
        if self.password is None and not is_loopback(request.url.host or ""):
            # Without a password the console answers only to loopback names: a web page the operator
            # visits cannot read it through a DNS name rebound to 127.0.0.1.
            raise web.HTTPMisdirectedRequest(text="use http://127.0.0.1:PORT/ (this console serves loopback only)")
        if not self._authorized(request):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="relay-router console"'})
        html = render(self.env, name, docs_url=self.service.config.console.docs_url, **context)
        return web.Response(text=html, content_type="text/html")

    async def overview(self, request: web.Request) -> web.StreamResponse:
        return self._page(request, "router.html", title=f"relay-router {self.service.config.router.name}",
                          refresh=True, **router_view(self.service))  # fmt: skip

    async def help(self, request: web.Request) -> web.StreamResponse:
        return self._page(request, "help.html", title="Troubleshooting", refresh=False, sections=sections())


def _association(outcome: Any, now: float) -> dict[str, Any]:
    ended = outcome.ended or now
    return {
        "id": outcome.association_id,
        "direction": outcome.direction,
        "site": outcome.site,
        "calling_ae": outcome.calling_ae,
        "called_ae": outcome.called_ae,
        "result": str(outcome.result),
        "reason": str(outcome.reason) if outcome.reason else "",
        "security": outcome.security,
        "detail": outcome.detail,
        "to_remote": outcome.bytes_to_remote,
        "to_local": outcome.bytes_to_local,
        "bytes": outcome.bytes_to_remote + outcome.bytes_to_local,
        "started": outcome.started,
        "ended": outcome.ended,
        "seconds": max(0.001, ended - outcome.started),
        "help": entry_for(outcome.reason),
    }


def router_view(service: RouterService) -> dict[str, Any]:
    """What the page shows, read from the running service (on the event loop)."""
    now = time.time()
    status = service.status()
    active = [_association(o, now) for o in sorted(service.active.values(), key=lambda o: o.started)]
    history = [_association(o, now) for o in reversed(service.history)][:SHOW_RECENT]
    return {
        "site": service.config.router.name,
        "bridge": service.config.bridge.address,
        "connected": bool(status.get("connected")),
        "connected_since": status.get("connected_since"),
        "last_error": status.get("last_error") or "",
        "not_signed_on": NOT_SIGNED_ON,
        "dicom_port": service.port,
        "shared": list(service.config.shared),
        "remote": remote_devices(status),
        "active": active,
        "history": history,
        "errors": [a for a in history if a["reason"]],
    }
