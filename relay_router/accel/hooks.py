"""Where accelerated routes branch off the relay: one call from outbound.py, one from inbound.py.

`accept_locally` (near side): a local device called a `[[remote]]` title with `accelerate = true` whose
destination's capabilities are known; the router answers the association itself
(relay_router.accel.acceptor). Until the far router has been reached once, the route stays
transparent, so the first association still works exactly as before.

`run_far_session` (far side): the association's Open carried `accel1`; after the handshake verified,
the router confirms and runs a `FarSession` instead of connecting to the device.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.accel import records
from relay_router.accel.acceptor import MAX_PDU, StorageAcceptor
from relay_router.accel.capabilities import DeviceCapabilities
from relay_router.accel.negotiation import answer
from relay_router.accel.receive import FarSession
from relay_router.accel.transfer import RecordChannel, TransferError
from relay_router.outcome import Outcome, Result
from relay_router.wire.codec import FrameCodec, FrameRejected, confirm_frame
from relay_router.wire.features import Features

if TYPE_CHECKING:
    from relay_router.accel.runtime import AccelRuntime
    from relay_router.config import RouterConfig, SharedDevice
    from relay_router.identity.wiring import IdentityRoute
    from relay_router.seal import Confirmation, FrameSealer
    from relay_router.tunnel import AssociationStream
    from relay_router.ul import AssociateInfo

log = logging.getLogger("relay_router.accel")


async def accept_locally(
    accel: AccelRuntime,
    config: RouterConfig,
    request_pdu: bytes,
    request: AssociateInfo,
    capabilities: DeviceCapabilities,
    granted: tuple[str, ...] | None,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    outcome: Outcome,
) -> None:
    """Answer the local device's association as the remote device (accelerated storage)."""
    negotiated = answer(
        request_pdu,
        request,
        capabilities,
        granted=granted,
        max_pdu_length=MAX_PDU,
        commitment=accel.commitment is not None,
    )
    outcome.established = outcome.established or outcome.started
    if negotiated.rejected:
        log.info(
            "accelerated %r: contexts not accepted (the destination does not take them, or not granted): %s",
            request.called_ae,
            ", ".join(sorted(set(negotiated.rejected))),
            extra={"assoc": outcome.association_id},
        )
    local_ae = request.called_ae
    acceptor = StorageAcceptor(
        reader,
        writer,
        outcome,
        request,
        negotiated,
        spool=accel.spool,
        route=accel.near_route(local_ae),
        on_commit=lambda: accel.committed(local_ae),
        idle_timeout_s=config.dicom.idle_timeout_s,
        commitment=accel.commitment,
    )
    await acceptor.run()


async def run_far_session(
    accel: AccelRuntime,
    config: RouterConfig,
    stream: AssociationStream,
    *,
    device: SharedDevice,
    from_site: str,
    hello: bytes,
    sealer: FrameSealer,
    confirmation: Confirmation,
    features: Features,
    outcome: Outcome,
    identity: IdentityRoute | None = None,
) -> None:
    """Confirm the accelerated transfer and receive it into the spool until the near router closes.
    `identity`: the device's patient identity route; instances are coerced before the spool."""
    await stream.send(confirm_frame(confirmation, features))
    dicom = config.dicom
    codec = FrameCodec(
        sealer,
        initiator=False,
        features=features,
        compression_level=dicom.compression_level if dicom.compression else None,
        accept_blobs=False,
    )
    channel = RecordChannel(
        stream, codec, records.NEAR_TO_FAR, frame_bytes=dicom.frame_bytes, association_id=outcome.association_id
    )
    session = FarSession(
        channel,
        from_site=from_site,
        device=device,
        our_ae=config.router.name[:16],
        spool=accel.spool,
        capabilities=accel.far_capabilities,
        book=accel.book,
        on_commit=lambda: accel.wake_pool(device),
        moves=accel.moves,
        partners=accel.move_partners,
        blobs=accel.blobs,
        spill_parallel=dicom.spill_parallel,
        spill_stats=accel.spill.stats,
        audit=accel.audit,
        identity=identity,
    )
    outcome.result = Result.ESTABLISHED
    accel.session_started(session)
    reason: Reason | None = None
    try:
        await session.run(hello)
        outcome.result = Result.CLOSED
    except asyncio.CancelledError:
        if not session.stopping:  # cancelled from outside (the service's last resort): let it through
            raise
        reason = Reason.SHUTDOWN  # ended by this router's shutdown: the near router resumes on its next stream
        outcome.result = Result.CLOSED
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # the cancellation was ours and is handled: later awaits must not see it
    except (TransferError, FrameRejected, records.RecordError) as exc:
        reason = exc.reason
        level = logging.ERROR if exc.security else logging.WARNING
        log.log(level, "accelerated transfer from %s: %s", from_site, exc, extra={"assoc": outcome.association_id})
        outcome.fail(exc)
    finally:
        accel.session_ended(session)
        outcome.bytes_to_local, outcome.bytes_to_remote = channel.bytes_received, channel.bytes_sent
        await channel.close(reason)
    log.info(
        "accelerated transfer from %s into %s ended: %d instances spooled",
        from_site,
        device.ae_title,
        session.stored,
        extra={"assoc": outcome.association_id},
    )


def refuse_unaccelerated() -> pb.Refused.Reason:
    """What a router answers an `accel1` Open for a device that does not take accelerated transfers."""
    return pb.Refused.SERVICE_NOT_GRANTED
