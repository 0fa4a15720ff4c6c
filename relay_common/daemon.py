"""Running a daemon's asyncio main: signals, readiness, exit codes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("relay_common.daemon")


def announce_ready(ready_file: Path | None, **facts: object) -> None:
    """Tell supervisors we are serving: a JSON file for tests, sd_notify for systemd."""
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(facts))
        tmp.replace(ready_file)
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:
        address = "\0" + notify[1:] if notify.startswith("@") else notify
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", address)


async def run_until_signalled(start: Callable[[], Awaitable[object]], stop: Callable[[], Awaitable[object]]) -> None:
    """Start, wait for SIGTERM or SIGINT, then stop gracefully."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    await stopping.wait()
    log.info("shutting down")
    await stop()
