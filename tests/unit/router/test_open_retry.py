"""The router's bounded retry of an Open while routers move between bridge replicas (relay_router.open_retry)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from protos.relay.v1 import relay_pb2 as pb
from relay_router.close_codes import received_refusal
from relay_router.open_retry import OpenRetry, worth_retrying


@dataclass
class FakeLink:
    online: bool = True
    signed_on: bool = True

    moved: bool = True

    def recently_online(self, site: str, within_s: float) -> bool:
        return self.online

    def moved_recently(self, within_s: float) -> bool:
        return self.moved

    async def wait_signed_on(self, timeout_s: float) -> bool:
        return self.signed_on


def test_only_refusals_that_say_a_move_is_under_way_are_retried() -> None:
    assert worth_retrying(pb.Refused.DRAINING, site_listed_online=False)
    assert worth_retrying(None, site_listed_online=False)  # LinkDown: this router is signing on again
    assert worth_retrying(pb.Refused.SITE_OFFLINE, site_listed_online=True)
    assert not worth_retrying(pb.Refused.SITE_OFFLINE, site_listed_online=False)  # the directory says it left
    for permanent in (pb.Refused.UNKNOWN_DEVICE, pb.Refused.NOT_PERMITTED, pb.Refused.SERVICE_NOT_GRANTED):
        assert not worth_retrying(permanent, site_listed_online=True)
    for transient in (pb.Refused.OVERLOADED, pb.Refused.TIMEOUT, pb.Refused.DEVICE_UNREACHABLE):
        assert not worth_retrying(transient, site_listed_online=True)  # the partner saw it, or a real limit


def test_retries_stop_at_the_window_and_pauses_grow() -> None:
    async def run() -> tuple[int, float]:
        retry = OpenRetry(FakeLink(), "site-b", window_s=1.0)
        started = time.monotonic()
        while await retry.again(pb.Refused.DRAINING):
            pass
        return retry.attempts, time.monotonic() - started

    attempts, took = asyncio.run(run())
    # pauses 0.1, 0.2, 0.4 (then 0.5 would pass the 1 s window): 4 attempts in all, within the window
    assert attempts == 4 and 0.65 < took < 1.0


def test_no_retry_when_the_link_does_not_come_back_or_the_window_is_zero() -> None:
    async def run(link: FakeLink, window: float) -> bool:
        return await OpenRetry(link, "site-b", window_s=window).again(None)

    assert not asyncio.run(run(FakeLink(signed_on=False), 5.0))
    assert not asyncio.run(run(FakeLink(moved=False), 5.0))  # a bridge lost, not a Move: refused at once
    assert not asyncio.run(run(FakeLink(), 0.0))


def test_a_draining_refusal_reads_as_a_restart_not_a_limit() -> None:
    reason, message = received_refusal(pb.Refused(reason=pb.Refused.DRAINING))
    assert reason.value == "shutdown" and "restarting" in message
