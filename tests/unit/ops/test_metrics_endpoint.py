"""relay_common.metrics: the HTTP endpoint on the event loop, config validation, status-file helpers."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest
from prometheus_client import Counter

from relay_common.config import ConfigError, load_config
from relay_common.metrics import MetricsServer, RecentWindow, liveness, new_registry, process_facts
from relay_router.config import RouterConfig


async def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return lines[0], headers, body


async def test_serves_metrics_and_refreshes_before_each_scrape() -> None:
    registry = new_registry()
    counter = Counter("demo_things", "things", registry=registry)
    calls = []
    server = MetricsServer(registry, before_scrape=lambda: (calls.append(1), counter.inc()))
    assert await server.start("127.0.0.1:0")
    try:
        status, headers, body = await http(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert headers["content-type"].startswith("text/plain")
        assert int(headers["content-length"]) == len(body)
        assert b"demo_things_total 1.0" in body and b"process_cpu_seconds_total" in body
        _, headers, body = await http(
            server.port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n"
        )
        assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
        status, _, body = await http(server.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert status.endswith("200 OK") and body == b""
        assert (await http(server.port, b"GET /other HTTP/1.1\r\n\r\n"))[0].endswith("404 Not Found")
        assert (await http(server.port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0].endswith("405 Method Not Allowed")
        assert len(calls) == 3
    finally:
        await server.stop()


async def test_probe_paths_answer_beside_the_metrics_without_a_scrape() -> None:
    """A load balancer's readiness check (the bridge's /readyz): its own status and body, no collection."""
    calls: list[int] = []
    ready = {"now": True}

    def readiness() -> tuple[str, bytes]:
        return ("200 OK", b"ready\n") if ready["now"] else ("503 Service Unavailable", b"draining\n")

    server = MetricsServer(new_registry(), before_scrape=lambda: calls.append(1), probes={"/readyz": readiness})
    assert await server.start("127.0.0.1:0")
    try:
        status, headers, body = await http(server.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, body, headers["content-type"]) == ("HTTP/1.1 200 OK", b"ready\n", "text/plain")
        ready["now"] = False
        status, _, body = await http(server.port, b"GET /readyz?verbose HTTP/1.1\r\n\r\n")
        assert (status, body) == ("HTTP/1.1 503 Service Unavailable", b"draining\n")
        assert (await http(server.port, b"POST /readyz HTTP/1.1\r\n\r\n"))[0].endswith("405 Method Not Allowed")
        assert calls == []  # a probe does not run the scrape's refresh
    finally:
        await server.stop()


async def test_a_busy_port_disables_metrics_without_stopping_the_daemon() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = MetricsServer(new_registry())
        assert not await server.start(f"127.0.0.1:{port}")
        assert server.address is None and "cannot listen on" in (server.error or "")
    assert not await MetricsServer(new_registry()).start("")  # "" means off


async def test_a_garbage_request_is_dropped() -> None:
    server = MetricsServer(new_registry())
    await server.start("127.0.0.1:0")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\x16\x03\x01" + b"A" * 20000)  # a TLS hello, or anything without a header end
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await server.stop()


ROUTER_HEAD = '[router]\nname = "a"\n[bridge]\naddress = "b:443"\ninsecure = true\npassword = "p"\n'


def test_metrics_listen_default_empty_and_invalid(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(ROUTER_HEAD)
    assert load_config(path, RouterConfig).metrics.listen == "127.0.0.1:9464"
    path.write_text(ROUTER_HEAD + '[metrics]\nlisten = ""\n')
    assert load_config(path, RouterConfig).metrics.listen == ""
    path.write_text(ROUTER_HEAD + '[metrics]\nlisten = "9464"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, RouterConfig)
    assert str(err.value) == (
        f"{path}: metrics.listen: expected HOST:PORT with a port from 0 to 65535, got '9464' "
        '(or "" to disable metrics)'
    )
    path.write_text(ROUTER_HEAD + "[metrics]\nport = 9464\n")
    with pytest.raises(ConfigError, match="metrics.port: unknown key"):
        load_config(path, RouterConfig)


def test_bridge_metrics_default(tmp_path: Path) -> None:
    from relay_bridge.config import BridgeConfig

    path = tmp_path / "bridge.toml"
    path.write_text("[server]\ninsecure = true\n")
    assert load_config(path, BridgeConfig).metrics.listen == "127.0.0.1:9465"


def test_liveness() -> None:
    facts = process_facts()
    assert liveness(facts) is None
    assert "stale" not in (liveness(facts, now=facts["updated"] + 5) or "")
    assert "last updated" in (liveness({**facts, "pid": None}, now=time.time() + 60) or "")
    assert "stopped at" in (liveness({**facts, "running": False, "stopped": time.time()}) or "")
    dead = _dead_pid()
    assert "is gone" in (liveness({**facts, "pid": dead}) or "")
    # A process on another host (e.g. a container) is judged by the file's age alone.
    assert liveness({**facts, "pid": dead, "host": "elsewhere"}) is None


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_recent_window_counts_the_last_hour_only() -> None:
    window = RecentWindow(keep=3)
    now = time.time()
    window.add("released", {"n": 1}, at=now - 3700)
    for i in range(4):
        window.add("aborted" if i == 0 else "released", {"n": i + 2}, at=now - i)
    assert window.counts(now) == {"aborted": 1, "released": 3}
    assert [r["n"] for r in window.last] == [3, 4, 5]
