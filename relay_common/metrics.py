"""Prometheus metrics over HTTP, served from the daemon's own asyncio loop.

Both daemons keep their metrics in a private `CollectorRegistry` (so several
services can live in one test process) and expose it with `MetricsServer`, a
deliberately small HTTP/1.1 endpoint running on the event loop. Collection
therefore happens on the loop thread: collectors may read the daemon's state
(sessions, active associations) without locks, and a `before_scrape` hook can
bring live counters (bytes of running associations) up to date first.

Labels never carry patient data, and never AE titles that a remote party can
choose: only site (router account) names, configured device titles, and small
fixed vocabularies (direction, result, reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from relay_common.config import InvalidValue, parse_host_port
from relay_common.files import write_private

log = logging.getLogger("relay_common.metrics")
F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S")
# No `*_created` series: they double the output and no dashboard of ours uses them.
disable_created_metrics()

# Association setup takes milliseconds on a LAN and up to the join/open timeouts (10-15 s) at worst.
SETUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0)
MAX_REQUEST = 16 * 1024
REQUEST_TIMEOUT_S = 10.0


def check_listen(value: str) -> None:
    """Validate a `[metrics] listen` value ("" disables); raises InvalidValue("listen", ...)."""
    if value == "":
        return
    try:
        parse_host_port(value)
    except ValueError as exc:
        raise InvalidValue("listen", f'{exc} (or "" to disable metrics)') from None


def never_raises(method: F) -> F:
    """For hooks called from the relay's own code paths: a metrics bug is logged, never propagated."""

    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception:  # relaying and auditing must go on
            log.exception("metrics hook %s failed", method.__qualname__)
            return None

    return guarded  # type: ignore[return-value]


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("dicom-relay")
    except Exception:  # running from a checkout without metadata
        return "unknown"


def new_registry() -> CollectorRegistry:
    """A registry with the standard process, platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


# An extra plain-text path served beside /metrics: returns (HTTP status line, body), e.g. a readiness probe.
Probe = Callable[[], tuple[str, bytes]]


@dataclass
class MetricsServer:
    """GET /metrics (also /) on `listen`; `before_scrape` runs on the loop before each collection.
    `probes`: further paths (e.g. the bridge's /readyz for load balancers), answered by their function."""

    registry: CollectorRegistry
    before_scrape: Callable[[], None] | None = None
    probes: dict[str, Probe] = field(default_factory=dict)
    address: str | None = None  # "host:port" actually bound, once serving
    error: str | None = None  # why it is not serving, if it tried and failed
    _server: asyncio.base_events.Server | None = field(default=None, repr=False)

    async def start(self, listen: str) -> bool:
        """Start serving; on failure log it and keep the daemon running without metrics."""
        if not listen:
            return False
        host, port = parse_host_port(listen)
        try:
            self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_REQUEST)
        except OSError as exc:
            self.error = f"cannot listen on {listen}: {exc.strerror or exc}"
            log.error("metrics disabled: %s", self.error)
            return False
        bound = self._server.sockets[0].getsockname()
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        log.info("serving Prometheus metrics on http://%s/metrics", self.address)
        return True

    @property
    def port(self) -> int | None:
        return None if self.address is None else int(self.address.rpartition(":")[2])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if asked for) and its content type."""
        if self.before_scrape is not None:
            try:
                self.before_scrape()
            except Exception:  # a bug here must not take the endpoint down
                log.exception("metrics refresh failed")
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if method not in ("GET", "HEAD"):
            status, body, content_type = "405 Method Not Allowed", b"only GET\n", "text/plain"
        elif path in self.probes:
            (status, body), content_type = self.probes[path](), "text/plain"
        elif path not in ("/metrics", "/"):
            status, body, content_type = "404 Not Found", b"metrics are at /metrics\n", "text/plain"
        else:
            status = "200 OK"
            body, content_type = self.render(headers.get("accept", ""))
        response = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        try:
            writer.write(response + (body if method == "GET" else b""))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


# -- status files --------------------------------------------------------------------
# Both daemons keep a small JSON status file current for `relay-router status` and
# `relay-bridge status`. These helpers are shared by the writers and the readers.

STALE_AFTER_S = 10.0  # a status file not rewritten for this long belongs to a daemon that is gone


def process_facts() -> dict[str, object]:
    """Who wrote the status file, so a reader can tell a stopped daemon from a running one."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "updated": round(time.time(), 3)}


def write_json_atomically(path: os.PathLike[str] | str, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text` so that readers never see half a file."""
    write_private(path, text, mode=mode)


def liveness(status: dict[str, object], *, now: float | None = None) -> str | None:
    """None if the daemon that wrote `status` looks alive, else why it is not running."""
    now = time.time() if now is None else now
    if status.get("running") is False:
        return f"stopped at {format_time(status.get('stopped'))}"
    pid, host = status.get("pid"), status.get("host")
    if isinstance(pid, int) and host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"process {pid} is gone (last update {format_time(status.get('updated'))})"
        except PermissionError:
            pass  # running as another user (dicom-relay): alive
    updated = status.get("updated")
    if not isinstance(updated, int | float):
        return "the status file has no update time"
    age = now - updated
    if age > STALE_AFTER_S:
        return f"the status file was last updated {format_age(age)} ago ({format_time(updated)})"
    return None


def format_time(ts: object) -> str:
    if not isinstance(ts, int | float):
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def format_bytes(n: object) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


class RecentWindow:
    """Counts of outcomes per minute over the last hour, plus the last few records."""

    def __init__(self, window_s: int = 3600, keep: int = 20) -> None:
        self.window_s = window_s
        self.keep = keep
        self._minutes: dict[int, dict[str, int]] = {}
        self.last: list[dict[str, object]] = []

    def add(self, result: str, record: dict[str, object], at: float | None = None) -> None:
        at = time.time() if at is None else at
        minute = int(at // 60)
        bucket = self._minutes.setdefault(minute, {})
        bucket[result] = bucket.get(result, 0) + 1
        self._prune(at)
        self.last.append(record)
        del self.last[: -self.keep]

    def _prune(self, now: float) -> None:
        oldest = int((now - self.window_s) // 60)
        for minute in [m for m in self._minutes if m <= oldest]:
            del self._minutes[minute]

    def counts(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        self._prune(now)
        total: dict[str, int] = {}
        for bucket in self._minutes.values():
            for result, n in bucket.items():
                total[result] = total.get(result, 0) + n
        return dict(sorted(total.items()))

    def summary(self, now: float | None = None) -> dict[str, object]:
        counts = self.counts(now)
        return {"window_s": self.window_s, "total": sum(counts.values()), "counts": counts, "last": list(self.last)}


class SourcedCollector(Collector, Generic[S]):
    """Families read at scrape time from `source()` (None: zeros). The metrics object registers one at
    start, so every family is present before the part that feeds it runs; that part then replaces the
    source (`register_sourced`)."""

    def __init__(self, source: Callable[[], S | None]) -> None:
        self.source = source


_SOURCED: weakref.WeakKeyDictionary[CollectorRegistry, dict[type[Any], SourcedCollector[Any]]] = (
    weakref.WeakKeyDictionary()
)


def register_sourced(
    registry: CollectorRegistry, kind: type[SourcedCollector[S]], source: Callable[[], S | None]
) -> None:
    """One collector of `kind` per registry: registered the first time, its source replaced after that
    (a registry refuses the same family names twice)."""
    collectors = _SOURCED.setdefault(registry, {})
    collector = collectors.get(kind)
    if collector is not None:
        collector.source = source
        return
    collector = kind(source)
    registry.register(collector)
    collectors[kind] = collector
