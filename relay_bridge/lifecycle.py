"""The bridge's life after start: certificate reload (SIGHUP) and the drain before it stops (SIGTERM).

Drain, in order (docs/operations.md, "Upgrade without failed associations"):
1. The gRPC health service says NOT_SERVING (a load balancer's health check stops sending new
   connections here), new Opens are refused with a transient `Refused` (the caller's device gets a
   transient A-ASSOCIATE-RJ and retries) and new sign-ons with UNAVAILABLE.
2. After `MOVE_AFTER_S` (time for a Join whose notice was just sent), every router with no
   association running here is sent `Move` and its control stream ends: the router signs on again
   at once over a new connection (behind a load balancer, to another replica; with one bridge, to
   this one once it is back; an older router reconnects with its backoff).
   In a cluster, a router that still carries associations here is moved as well: until it has
   signed on elsewhere, every Open towards it lands here and is refused DRAINING, so one long
   C-MOVE would otherwise keep its site unreachable for as long as it runs (longer than the
   calling routers' `open_retry_s`). Its associations keep their streams on the old connection,
   and its session stays valid here for their blob RPCs only (`SessionRegistry.moved`). With one
   bridge there is nowhere to go, so such a router keeps its session until its associations end.
3. Running associations get `[server] drain_grace_s` to finish; then the remaining routers are sent
   `Move` too, their sessions end, and `server.stop(STOP_GRACE_S)` cuts whatever still runs (both
   devices get A-ABORT).

Every step after that (`shutdown_step`) is bounded and timed: one that hangs (a database that does not
answer, a connection that does not close) is logged by name and left behind, so a stop always ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import grpc.aio
from grpc_health.v1 import health_pb2

from protos.relay.v1 import relay_pb2 as pb

if TYPE_CHECKING:
    from relay_bridge.server import RelayServicer
    from relay_bridge.sessions import RouterSession

log = logging.getLogger("relay_bridge")
MOVE_AFTER_S = 1.0
STOP_GRACE_S = 1.0
SHUTDOWN_STEP_S = 5.0  # the bound of each step after the drain
SLOW_STEP_S = 1.0  # a step that took longer is logged with its time


async def shutdown_step(name: str, work: Awaitable[object], timeout_s: float = SHUTDOWN_STEP_S) -> None:
    """Await one step of the stop, at most `timeout_s`; a step that fails or hangs is logged by name and
    the stop goes on (the process must end: systemd would kill it, a rolling restart would stall)."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(work, timeout_s)
    except TimeoutError:
        log.warning("stopping: %s did not end within %g s; going on without it", name, timeout_s)
        return
    except Exception as exc:
        log.warning("stopping: %s failed (%s); going on", name, exc)
        return
    took = time.monotonic() - started
    if took > SLOW_STEP_S:
        log.info("stopping: %s took %.1f s", name, took)


POLL_S = 0.2


def reload_certificates(servicer: RelayServicer) -> None:
    """SIGHUP: check the certificate files now (the handshake fetcher would on the next connection anyway),
    so that the log says at once whether a renewal was accepted."""
    if not servicer.certificates:
        log.info("SIGHUP: no certificate files to reload (insecure mode)")
        return
    if not any([files.check() for files in servicer.certificates]):  # a list: check every one
        log.info("SIGHUP: certificate files unchanged (or refused, see above)")


async def drain(server: grpc.aio.Server, servicer: RelayServicer, grace_s: float, notice_s: float = 0.0) -> None:
    """Stop taking work, let running associations finish within `grace_s`, then stop the server; not before
    `notice_s`, so that a load balancer checking /readyz or the health service sees this replica say "not
    ready" before its port closes (a closed port reads as a failure, and a check that meets it half-accepted
    as a reset, not as a drain)."""
    state = servicer.state
    loop = asyncio.get_running_loop()
    started = loop.time()
    state.draining = True
    if servicer.health is not None:
        for service in ("", "relay.v1.Relay"):
            await servicer.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    log.warning(
        "draining: new associations and sign-ons are refused; %d running association(s) get up to %g s",
        len(state.splices),
        grace_s,
    )
    state.audit.event("drain", "success", running=len(state.splices), grace_s=grace_s)
    deadline, noticed = started + max(grace_s, notice_s), started + notice_s
    while (state.splices or loop.time() < noticed) and loop.time() < deadline:
        if loop.time() - started >= MOVE_AFTER_S:
            _move_routers(servicer, busy_too=state.cluster is not None)
        await asyncio.sleep(POLL_S)
    if state.splices:
        log.warning("drain: %d association(s) still running after %g s are cut", len(state.splices), grace_s)
    else:
        log.info("drain: no association running after %.1f s", loop.time() - started)
    for session in list(state.sessions.values()):
        move(session)
    await shutdown_step("the gRPC server", server.stop(STOP_GRACE_S))
    if servicer.control.watcher is not None:  # before the directory closes: no check against a closed pool
        await shutdown_step("the directory change listener", servicer.control.watcher.stop())


def _move_routers(servicer: RelayServicer, *, busy_too: bool) -> None:
    """End the control streams of routers that have nothing running here (with `busy_too`, of every
    router); they sign on again elsewhere."""
    for session in list(servicer.state.sessions.values()):
        if session.ended.is_set() or (session.associations and not busy_too):
            continue
        running = len(session.associations)
        if running:
            log.info(
                "drain: asking router %s to reconnect; its %d association(s) here go on until they end",
                session.name,
                running,
            )
        else:
            log.info("drain: asking router %s to reconnect (its control stream ends)", session.name)
        move(session)


def move(session: RouterSession) -> None:
    """Tell a router to move, then end its control stream. A router that knows `Move` signs on again at
    once over a new connection, which the load balancer gives to another replica (over this one's
    HTTP/2 connection it would reach this replica again); an older one reconnects with its backoff."""
    session.send(pb.BridgeMessage(move=pb.Move(reason="draining")))
    session.end()
