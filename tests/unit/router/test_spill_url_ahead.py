"""relay_router.spill_receive: a part's download URL is asked for before the part is announced.

Each part costs the receiving router a URL from the bridge (one round trip) and then the GET; asking for
the URLs of the next `parallel` parts ahead means an announced part is fetched at once. Real sealed parts
(the sender of tests/unit/router/test_spill.py into an in-memory store); the notices are fed one at a time,
as they arrive from the sending router while it still uploads.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from relay_router import spill_receive
from relay_router.spill import SpillReceiver
from tests.unit.router.test_spill import AID, MemoryTransport, sent_blob


class Recording(MemoryTransport):
    """Records slot requests and GETs in order, with the announcements the test makes."""

    def __init__(self, inner: MemoryTransport) -> None:
        super().__init__()
        self.blobs = inner.blobs
        self.events: list[tuple[str, int]] = []

    async def slot(
        self, association_id: str, blob_id: str, part: int, *, download: bool, size: int = 0
    ) -> tuple[str, str]:
        if download:
            self.events.append(("url", part))
        await asyncio.sleep(0.01)  # a round trip to the bridge
        return await super().slot(association_id, blob_id, part, download=download, size=size)

    async def get(self, url: str) -> bytes:
        self.events.append(("get", int(url.rsplit("/", 1)[1])))
        return await super().get(url)


async def _receive_notice_by_notice(transport: Recording, rx: object, frames: list[object], parallel: int) -> bytes:
    receiver = SpillReceiver(transport, AID, rx, parallel=parallel)  # type: ignore[arg-type]
    out: list[bytes] = []

    async def sink(plain: bytes) -> bool:
        out.append(plain)
        return True

    delivery: asyncio.Task[None] | None = None
    for frame in frames:
        blob, began, _ = receiver.accept(frame, rx.open(frame.payload, frame.seq, frame.flags))  # type: ignore[attr-defined]
        transport.events.append(("announced", blob.end[0] if blob.end else blob.announced))
        if began:
            delivery = asyncio.create_task(receiver.deliver(blob, sink))
        await asyncio.sleep(0.1)  # the sending router's next part is being uploaded
    assert delivery is not None
    await asyncio.wait_for(delivery, 10)
    return b"".join(out)


async def test_each_part_url_is_ready_before_the_part_is_announced() -> None:
    chunks = [os.urandom(60_000) for _ in range(6)]
    store, rx, frames = await sent_blob(chunks)
    transport = Recording(store)
    assert await _receive_notice_by_notice(transport, rx, frames, parallel=2) == b"".join(chunks)

    events = transport.events
    parts = max(part for kind, part in events if kind == "get") + 1
    assert sorted(part for kind, part in events if kind == "get") == list(range(parts)), "each part fetched once"
    for part in range(1, parts):
        url = events.index(("url", part))
        announced = next(i for i, (kind, count) in enumerate(events) if kind == "announced" and count > part)
        assert url < announced, f"part {part}'s URL was asked for only after its announcement: {events}"
    urls = [part for kind, part in events if kind == "url"]
    # Before the manifest the count is unknown: at most `parallel` URLs past the last part go unused.
    assert len(urls) == len(set(urls)) and max(urls) < parts + 2, "no URL asked twice, at most 2 ahead"


async def test_a_url_asked_for_long_ago_is_asked_for_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spill_receive, "URL_FRESH_S", 0.0)  # every URL asked ahead is stale by the time of its GET
    chunks = [os.urandom(60_000) for _ in range(4)]
    store, rx, frames = await sent_blob(chunks)
    transport = Recording(store)
    assert await _receive_notice_by_notice(transport, rx, frames, parallel=2) == b"".join(chunks)
    events = transport.events
    for part in {part for kind, part in events if kind == "get"}:
        get = events.index(("get", part))
        assert ("url", part) in events[:get]
        last_url = max(i for i, event in enumerate(events[:get]) if event == ("url", part))
        assert events.count(("url", part)) >= 2 or part == 0, f"part {part}'s stale URL was used: {events}"
        assert last_url < get
