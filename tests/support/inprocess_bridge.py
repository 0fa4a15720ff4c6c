"""The real bridge, run in the test's process on a thread of its own, with a servicer subclass.

For tests that must watch or disturb what crosses the bridge (an attacker, a slow
link): the routers stay real processes talking gRPC over TLS to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from relay_bridge import config as bridge_config
from relay_bridge.server import RelayServicer, start
from relay_demo.network import LocalRelayNetwork


class InProcessBridge:
    def __init__(self, net: LocalRelayNetwork, servicer_class: type[RelayServicer]) -> None:
        cfg = bridge_config.load(net.workdir / "bridge.toml")
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, listen="127.0.0.1:0"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, port, servicer = self.run(start(cfg, servicer_class=servicer_class))
        assert isinstance(servicer, servicer_class)
        self.servicer: Any = servicer
        net.bridge_port = port

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def call(self, fn: Callable[[], object]) -> None:
        async def invoke() -> None:
            fn()

        self.run(invoke())

    def stop(self) -> None:
        self.run(self.server.stop(0))
        self.run(self._cancel_background_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()

    async def _cancel_background_tasks(self) -> None:
        """End what the bridge left running (the blob broker's sweepers...), as `serve` does at shutdown.

        Left pending, such tasks are destroyed whenever the garbage collector gets to them, and asyncio
        then logs "Task was destroyed but it is pending!" from inside whatever runs at that moment; on
        CPython 3.11 inside ast.parse that is a SystemError ("AST constructor recursion depth mismatch")
        that crashed a pytest-xdist worker while it formatted a failure.
        """
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
