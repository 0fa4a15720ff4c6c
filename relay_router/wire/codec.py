"""The frame codec of one association, sans-IO: data in, typed events out; payloads in, frames out.

It owns what makes a frame acceptable: the sequence numbers of both directions, the flags each
kind of frame may carry given the agreed `Features`, sealing (relay_router.seal), compression
(relay_router.compress), pace reports and the arrival meter (relay_router.pace) and the envelope
of blob notices (relay_router.spill). It does no I/O: no asyncio, grpc or socket here, so it is
tested like relay_router.ul, without processes.

A received frame becomes one event (`DataReceived`, `PaceReport`, `BlobNotice`) or one
`FrameRejected`, whose `security` attribute says whether it is an integrity or ordering failure.
Its `detail` texts are those the routers have always logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason, RelayError
from relay_router.compress import DecompressionError, FrameCompressor, FrameDecompressor
from relay_router.pace import ArrivalMeter, PaceError, decode_report, encode_report
from relay_router.seal import (
    Confirmation,
    FrameSealer,
    Handshake,
    HandshakeError,
    PublicIdentity,
    TamperError,
    verify_confirmation,
)
from relay_router.wire.features import Features
from relay_router.wire.flags import BLOB_FLAGS, PACE_FLAGS, FrameFlag


class FrameRejected(RelayError):
    """A received frame cannot be accepted; the association must be aborted.

    `security` is set for integrity and ordering failures (tampered, replayed, reordered,
    re-flagged, unsealed, cross-association); a frame that authenticates but whose content is
    bad (a corrupt compressed frame, a nonsensical pace report) is a protocol error.
    """

    reason = Reason.PROTOCOL


def _alert(detail: str) -> FrameRejected:
    return FrameRejected(f"SECURITY: {detail}", reason=Reason.SECURITY, security=True)


@dataclass(frozen=True)
class DataReceived:
    """Bytes of the association (P-DATA and other PDUs) for the local device."""

    payload: bytes


@dataclass(frozen=True)
class PaceReport:
    """The other router receives this direction at `rate` bytes per second."""

    rate: int


@dataclass(frozen=True)
class BlobNotice:
    """An opened blob notice (PARTS or END, relay_router.spill) and the reference it came with."""

    notice: bytes
    ref: pb.BlobRef


Event = DataReceived | PaceReport | BlobNotice


def handshake_message(handshake: Handshake) -> pb.Handshake:
    """The initiator's half of the handshake (relay_router.seal) as it travels in Open and the notice."""
    return pb.Handshake(
        kem_ciphertext=handshake.kem_ciphertext,
        signature=handshake.signature,
        suite=handshake.suite,
        ephemeral_key=handshake.ephemeral_key,
        sent_unix_ms=handshake.sent_unix_ms,
    )


def handshake_from(message: pb.Handshake) -> Handshake:
    """The initiator's half as the responder receives it (every field is checked by relay_router.seal.respond)."""
    return Handshake(
        message.kem_ciphertext, message.signature, message.ephemeral_key, message.sent_unix_ms, message.suite
    )


def confirm_frame(confirmation: Confirmation, features: Features) -> pb.Frame:
    """The responder's Confirm: its ephemeral share, its signature and the features it accepts."""
    return pb.Frame(
        confirm=pb.Confirm(
            signature=confirmation.signature,
            features=features.names(),
            ephemeral_reply=confirmation.ephemeral_reply,
        )
    )


def first_frame(sealer: FrameSealer, request_pdu: bytes) -> pb.Data:
    """Frame 0 of the initiator's direction: the A-ASSOCIATE-RQ, carried inside Open (under the early key)."""
    return pb.Data(payload=sealer.seal(request_pdu, 0, FrameFlag.SEALED), seq=0, flags=FrameFlag.SEALED)


def open_first_frame(sealer: FrameSealer, data: pb.Data) -> bytes:
    """The A-ASSOCIATE-RQ from frame 0 (the responder's side of `first_frame`)."""
    if data.seq != 0 or data.flags != FrameFlag.SEALED:
        raise FrameRejected("the first frame of the association is not sealed", reason=Reason.SECURITY, security=True)
    try:
        return sealer.open(data.payload, 0, FrameFlag.SEALED)
    except TamperError as exc:
        raise FrameRejected(str(exc), reason=Reason.SECURITY, security=True) from exc


def blob_notice_frame(sealer: FrameSealer, seq: int, notice: bytes, ref: pb.BlobRef) -> pb.Data:
    """A blob notice as a frame at sequence number `seq` (relay_router.spill builds the notice)."""
    return pb.Data(payload=sealer.seal(notice, seq, BLOB_FLAGS), seq=seq, flags=BLOB_FLAGS, blob=ref)


class FrameCodec:
    """Both directions of one association's frames, from this router's point of view.

    Frame 0 of the initiator's direction (the A-ASSOCIATE-RQ) travels inside Open, so the
    initiator sends from 1 and the responder expects 1 next. The initiator learns the agreed
    features from the responder's Confirm (`confirm`); until it has verified, no frame is accepted.
    """

    def __init__(
        self,
        sealer: FrameSealer,
        *,
        initiator: bool,
        features: Features,
        compression_level: int | None,
        accept_blobs: bool,
        confirm_from: tuple[PublicIdentity, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sealer = sealer
        self.send_seq = 1 if initiator else 0
        self.receive_seq = 0 if initiator else 1
        self._compression_level = compression_level
        self._accept_blobs = accept_blobs  # this router can fetch blobs (it has a bridge link)
        # Initiator: the responder's (identity, site) whose Confirm must verify before any frame is accepted.
        self._confirm_from = confirm_from
        self._offered = features
        self.features = Features() if confirm_from is not None else features
        self.compressor: FrameCompressor | None = None
        self._decompressor: FrameDecompressor | None = None
        self._start_compression()
        self._meter = ArrivalMeter(clock)
        self._rate_to_report: int | None = None

    def _start_compression(self) -> None:
        if self.features.compress and self._compression_level:
            self.compressor = FrameCompressor(self._compression_level, shuffle=self.features.shuffle)
            self._decompressor = FrameDecompressor()

    # -- the handshake's last step (initiator) -----------------------------------
    @property
    def awaiting_confirm(self) -> bool:
        return self._confirm_from is not None

    def confirm(self, confirm: pb.Confirm) -> Features:
        """Verify the responder's Confirm, take its key share and adopt the features both routers agreed."""
        assert self._confirm_from is not None
        identity, site = self._confirm_from
        try:
            confirmation = Confirmation(confirm.ephemeral_reply, confirm.signature)
            verify_confirmation(identity, self.sealer, confirmation, list(confirm.features), site)
        except HandshakeError as exc:
            raise _alert(str(exc)) from exc
        self._confirm_from = None
        self.features = Features.agreed(self._offered, confirm.features)
        self._start_compression()
        return self.features

    # -- sending -------------------------------------------------------------------
    def _frame(self, payload: bytes, flags: FrameFlag) -> pb.Data:
        seq = self.send_seq
        self.send_seq += 1
        return pb.Data(payload=self.sealer.seal(payload, seq, flags), seq=seq, flags=flags)

    def encode_data(self, payload: bytes, *, burst: bool = False) -> pb.Data:
        """A data frame: compressed when agreed and it pays, then sealed."""
        flags = FrameFlag.SEALED | (FrameFlag.BURST if burst and self.features.pace else 0)
        data = payload
        if self.compressor is not None:
            data, packed = self.compressor.pack(payload)
            flags |= packed
        return self._frame(data, flags)

    def encode_pace_report(self, rate: int) -> pb.Data:
        return self._frame(encode_report(rate), PACE_FLAGS)

    def encode_blob_notice(self, build: Callable[[int], pb.Data]) -> pb.Data:
        """A blob notice built by relay_router.spill (`blob_notice_frame`) at the next sequence number."""
        data = build(self.send_seq)
        if data.seq != self.send_seq or data.flags != BLOB_FLAGS:
            raise ValueError("a blob notice must be built at the sequence number it is given, with BLOB_FLAGS")
        self.send_seq += 1
        return data

    @property
    def expansion(self) -> float:
        """Plaintext bytes per wire byte so far (the compression ratio, 1.0 without compression)."""
        packer = self.compressor
        return packer.bytes_in / packer.bytes_out if packer is not None and packer.bytes_out else 1.0

    # -- receiving -----------------------------------------------------------------
    def _allowed(self, data: pb.Data) -> FrameFlag:
        if data.HasField("blob") or data.flags & FrameFlag.BLOB:
            if data.HasField("blob") and self._accept_blobs and data.flags == BLOB_FLAGS:
                return BLOB_FLAGS
            raise _alert("a blob reference this router did not agree to or cannot fetch")
        if self.features.pace and data.flags & FrameFlag.PACE:
            return PACE_FLAGS  # a pace report is neither compressed nor part of a burst
        allowed = FrameFlag.SEALED
        if self._decompressor is not None:
            allowed |= FrameFlag.COMPRESSED
        if self.features.shuffle and self._decompressor is not None:
            allowed |= FrameFlag.SHUFFLED
        if self.features.pace:
            allowed |= FrameFlag.BURST
        return allowed

    def decode(self, data: pb.Data) -> Event:
        """The event a received frame carries, or FrameRejected."""
        if self._confirm_from is not None:
            raise _alert("data arrived before the destination confirmed the handshake")
        # Read once: each read of a protobuf bytes field copies it (relay frames are up to 1 MiB).
        payload, flags = data.payload, data.flags
        if self.features.pace and not flags & FrameFlag.PACE:
            rate = self._meter.observe(len(payload), bool(flags & FrameFlag.BURST))
            if rate is not None:
                self._rate_to_report = rate
        if data.seq != self.receive_seq:
            raise _alert(f"frame {data.seq} where {self.receive_seq} was expected (lost, replayed or reordered)")
        self.receive_seq += 1
        allowed = self._allowed(data)
        if not data.flags & FrameFlag.SEALED or data.flags & ~int(allowed):  # int: IntFlag's ~ drops unknown bits
            raise _alert(f"frame flags {data.flags:#x}; only sealed frames (and agreed compression) accepted")
        try:
            plain = self.sealer.open(payload, data.seq, flags)
        except TamperError as exc:
            raise _alert(str(exc)) from exc
        if data.flags & FrameFlag.COMPRESSED:
            assert self._decompressor is not None
            try:
                plain = self._decompressor.unpack(plain, data.flags)
            except DecompressionError as exc:
                raise FrameRejected(f"the other router sent a bad compressed frame: {exc}") from exc
        if data.flags & FrameFlag.PACE:
            try:
                return PaceReport(decode_report(plain))
            except PaceError as exc:
                raise FrameRejected(f"the other router sent a bad pace report: {exc}") from exc
        if data.flags & FrameFlag.BLOB:
            return BlobNotice(plain, data.blob)
        return DataReceived(plain)

    def take_rate_to_report(self) -> int | None:
        """A receive rate the other router should hear about (pacing), once."""
        rate, self._rate_to_report = self._rate_to_report, None
        return rate
