"""The bridge console's aiohttp application: sign-in, the overview page, sign-out. Read-only.

Served on `[console] listen` (off unless set); over TLS with the bridge's own certificate unless it listens
on loopback (the configuration refuses a non-loopback address without TLS). Sign-in failures count in
the same kind of throttle as router sign-ons (per account and per source address), are logged and
audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from relay_bridge.console.admins import AdminAccounts, default_path
from relay_bridge.console.auth import COOKIE, SessionSigner
from relay_bridge.console.events import EventRing
from relay_bridge.console.view import bridge_view
from relay_bridge.sessions import LoginThrottle, throttle_keys
from relay_common.config import parse_host_port
from relay_common.console import environment, is_loopback, render
from relay_common.console.server import ConsoleServer, security_headers, server_tls

if TYPE_CHECKING:
    from relay_bridge.state import BridgeState

log = logging.getLogger("relay_bridge.console")
MAX_FORM = 4096
TRACK_INTERVAL_S = 0.5


class BridgeConsole:
    def __init__(self, state: BridgeState, *, port: int | None = None) -> None:
        self.state = state
        config = state.config
        self.admins = AdminAccounts(config.console.admins_file or default_path(config.storage.local_path))
        self.signer = SessionSigner(config.console.session_hours * 3600)
        self.throttle = LoginThrottle(config.limits.login_failures, config.limits.login_window_s)
        self.events = EventRing()
        self.env = environment()
        self.port = port
        self.started = time.time()
        self.signed_off: dict[str, float] = {}  # when this console saw each site's session end
        self._on: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.secure = False
        app = web.Application(middlewares=[security_headers], client_max_size=MAX_FORM)
        app.add_routes(
            [
                web.get("/", self.overview),
                web.get("/login", self.login_form),
                web.post("/login", self.login),
                web.post("/logout", self.logout),
            ]
        )
        self.server = ConsoleServer(app, "bridge console")

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> bool:
        listen = self.state.config.console.listen
        if not listen:
            return False
        self.state.audit.observers.append(self.events.observe)
        self._track()
        self._task = asyncio.create_task(self._track_forever())
        host, _ = parse_host_port(listen)
        context = None
        server = self.state.config.server
        if not is_loopback(host) and server.tls_cert and server.tls_key:
            context = server_tls(str(server.tls_cert), str(server.tls_key))
        self.secure = context is not None
        if not self.admins.names():
            log.warning("the console has no admin account yet: relay-bridge admin add NAME")
        return await self.server.start(listen, context)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(ValueError):
            self.state.audit.observers.remove(self.events.observe)
        await self.server.stop()

    def _track(self) -> None:
        on = set(self.state.sessions)
        for name in self._on - on:
            self.signed_off[name] = time.time()
        for name in on:
            self.signed_off.pop(name, None)
        self._on = on

    async def _track_forever(self) -> None:
        while True:
            await asyncio.sleep(TRACK_INTERVAL_S)
            self._track()

    # -- handlers ---------------------------------------------------------------------------
    def _admin(self, request: web.Request) -> str | None:
        name = self.signer.verify(request.cookies.get(COOKIE))
        try:
            return name if name is not None and name in self.admins.names() else None
        except (OSError, ValueError) as exc:  # an unreadable accounts file signs everyone out, loudly
            log.error("cannot read the console's admin accounts %s: %s", self.admins.path, exc)
            return None

    async def overview(self, request: web.Request) -> web.StreamResponse:
        admin = self._admin(request)
        if admin is None:
            raise web.HTTPSeeOther("/login")
        self._track()
        view = await bridge_view(
            self.state, signed_off=self.signed_off, events=self.events, started=self.started, port=self.port
        )
        html = render(self.env, "bridge.html", title="dicom-relay bridge", refresh=True, admin=admin, **view)
        return web.Response(text=html, content_type="text/html")

    def _login_page(self, error: str = "", status: int = 200) -> web.Response:
        html = render(self.env, "login.html", title="Sign in - dicom-relay bridge", refresh=False, error=error)
        return web.Response(text=html, content_type="text/html", status=status)

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if self._admin(request) is not None:
            raise web.HTTPSeeOther("/")
        return self._login_page()

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        name, password = str(form.get("name", ""))[:64], str(form.get("password", ""))
        source = request.remote or "?"
        keys = throttle_keys(name, source)
        if self.throttle.blocked(*keys):
            log.warning("console sign-in throttled for %r from %s", name, source)
            self.state.audit.event("console_login", "alert", admin=name, source=source, detail="throttled")
            return self._login_page("Too many failed sign-ins: wait a minute and try again.", 429)
        if not await asyncio.to_thread(self.admins.verify, name, password):
            self.throttle.failed(*keys)
            log.warning("console sign-in refused for %r from %s", name, source)
            self.state.audit.event(
                "console_login", "failure", admin=name, source=source, detail="wrong name or password"
            )
            return self._login_page("Wrong account name or password.", 401)
        self.state.audit.event("console_login", "success", admin=name, source=source)
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE,
            self.signer.issue(name),
            max_age=int(self.signer.lifetime_s),
            httponly=True,
            secure=self.secure,
            samesite="Strict",
            path="/",
        )
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        raise response
