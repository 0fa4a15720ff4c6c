"""Two RelayConnections wired back to back, as router A (device is requestor) and router B.

    SCU device --LOCAL--> [router A] --REMOTE==tunnel==REMOTE--> [router B] --LOCAL--> SCP device

Deliveries are queued and pumped, so that both devices can "send at once" (release collision).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from relay_router.ul import AssociateRequested, RelayConnection, Send, Side
from relay_router.ul.connection import Action


@dataclass
class Relay:
    a_called: str | None = "ARCHIVE_B"  # router A: directory name of the remote device
    a_calling: str | None = "SITEA_WS1"  # router A: site-qualified alias of the local device
    b_called: str | None = "ORTHANC"  # router B: the real AE title of the local archive
    b_calling: str | None = None
    a: RelayConnection = field(default_factory=lambda: RelayConnection(Side.LOCAL))
    b: RelayConnection = field(default_factory=lambda: RelayConnection(Side.REMOTE))
    to_scu: bytearray = field(default_factory=bytearray)
    to_scp: bytearray = field(default_factory=bytearray)
    events_a: list[Action] = field(default_factory=list)
    events_b: list[Action] = field(default_factory=list)
    tunnel_sends: int = 0
    _queue: deque[tuple[RelayConnection, Side, bytes]] = field(default_factory=deque)

    def scu_sends(self, data: bytes) -> None:
        self._queue.append((self.a, Side.LOCAL, data))

    def scp_sends(self, data: bytes) -> None:
        self._queue.append((self.b, Side.LOCAL, data))

    def pump(self) -> None:
        while self._queue:
            router, side, data = self._queue.popleft()
            self._handle(router, router.receive(side, data))

    def _handle(self, router: RelayConnection, actions: list[Action]) -> None:
        events = self.events_a if router is self.a else self.events_b
        for action in actions:
            if isinstance(action, Send):
                if action.to is Side.REMOTE:
                    self.tunnel_sends += 1
                    peer = self.b if router is self.a else self.a
                    self._queue.append((peer, Side.REMOTE, action.data))
                elif router is self.a:
                    self.to_scu += action.data
                else:
                    self.to_scp += action.data
                continue
            events.append(action)
            if isinstance(action, AssociateRequested):
                if router is self.a:
                    self._handle(router, router.accept_request(called=self.a_called, calling=self.a_calling))
                else:
                    self._handle(router, router.accept_request(called=self.b_called, calling=self.b_calling))

    def take_scu(self) -> bytes:
        data = bytes(self.to_scu)
        self.to_scu.clear()
        return data

    def take_scp(self) -> bytes:
        data = bytes(self.to_scp)
        self.to_scp.clear()
        return data
