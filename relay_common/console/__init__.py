"""What the bridge's and the routers' web consoles share: the template environment, formatting, the server.

Both consoles are read-only, server-rendered pages (Jinja2, autoescaping always on) served by aiohttp on
the daemon's own event loop, so a page reads the daemon's state directly, without locks. They refresh
themselves every few seconds with `<meta http-equiv="refresh">`: no JavaScript at all, so the Content
Security Policy forbids scripts outright and a `<script>` that a hostile peer smuggles into an AE title
or a description would neither be markup (escaped) nor run (CSP).
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import jinja2

from relay_common.metrics import format_age, format_bytes

REFRESH_S = 2  # a site going offline shows within this plus the bridge's own detection time


def printable(value: object) -> object:
    """Control characters (ANSI escapes, NUL, newlines in a peer's field) shown as \\xNN, never passed on."""
    if not isinstance(value, str):
        return value
    if value.isprintable():
        return value
    return "".join(
        ch if ch.isprintable() else f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}" for ch in value
    )


def since(ts: object, now: float | None = None) -> str:
    """ "since 12:03:04 UTC (5 min)" (a day or more ago: with the date)."""
    if not isinstance(ts, int | float):
        return "never"
    now = time.time() if now is None else now
    fmt = "%H:%M:%S" if now - ts < 86400 else "%Y-%m-%d %H:%M:%S"
    return f"since {time.strftime(fmt, time.gmtime(ts))} UTC ({format_age(now - ts)})"


def at(ts: object, now: float | None = None) -> str:
    """ "12:03:04 UTC (5 min ago)"."""
    if not isinstance(ts, int | float):
        return "never"
    now = time.time() if now is None else now
    fmt = "%H:%M:%S" if now - ts < 86400 else "%Y-%m-%d %H:%M:%S"
    return f"{time.strftime(fmt, time.gmtime(ts))} UTC ({format_age(now - ts)} ago)"


def rate(nbytes: object, seconds: object) -> str:
    if not isinstance(nbytes, int | float) or not isinstance(seconds, int | float) or seconds <= 0:
        return "-"
    return f"{format_bytes(nbytes / seconds)}/s"


def environment() -> jinja2.Environment:
    """The templates of both consoles; every `{{ }}` is escaped and stripped of control characters."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("relay_common.console", "templates"),
        autoescape=True,  # every field may come from a hostile peer: never turn this off
        undefined=jinja2.StrictUndefined,
        finalize=printable,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(since=since, at=at, nbytes=format_bytes, rate=rate, age=format_age)
    env.globals["refresh_s"] = REFRESH_S
    return env


def render(env: jinja2.Environment, name: str, **context: Any) -> str:
    return env.get_template(name).render(now=time.time(), **context)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
