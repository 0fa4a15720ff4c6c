"""The per-association handshake and feature agreement, without processes.

relay_router.seal's initiate/respond/verify_confirmation with real keys, the first frame that
rides in Open, and the codec's last handshake step (the Confirm) with the features it agrees.
"""

from __future__ import annotations

import os
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.seal import (
    AssociationContext,
    Handshake,
    HandshakeError,
    Identity,
    UnknownPeer,
    initiate,
    respond,
)
from relay_router.wire.codec import DataReceived, FrameCodec, FrameRejected, first_frame, open_first_frame
from relay_router.wire.features import COMPRESSION, PACE, SHUFFLE, SPILL, Features
from relay_router.wire.flags import FrameFlag

PROPERTIES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RQ = b"\x01\x00" + os.urandom(200)  # stands for an A-ASSOCIATE-RQ: the codec does not parse it


@cache
def identities() -> tuple[Identity, Identity, Identity]:
    """site-a, site-b, and a stranger (the bridge's own key, say)."""
    return Identity.generate(), Identity.generate(), Identity.generate()


def context(aid: str = "", **changes: str) -> AssociationContext:
    fields = {"association_id": aid or "0" * 32, "from_site": "site-a", "to_site": "site-b", "called_ae_title": "PACS"}
    return AssociationContext(**{**fields, **changes})


def test_both_routers_derive_the_same_keys_and_the_confirmation_verifies() -> None:
    a, b, _ = identities()
    ctx = context(os.urandom(16).hex())
    handshake, tx = initiate(a, b.public, ctx)
    confirmation, rx = respond(b, a.public, handshake, ctx)
    assert open_first_frame(rx, first_frame(tx, RQ)) == RQ
    initiator = FrameCodec(
        tx, initiator=True, features=Features.offer(compression=True), compression_level=3, accept_blobs=True,
        confirm_from=(b.public, "site-b"),
    )  # fmt: skip
    answered = Features.answer(Features.offer(compression=True).names(), compression=True)
    responder = FrameCodec(rx, initiator=False, features=answered, compression_level=3, accept_blobs=True)
    assert initiator.confirm(pb.Confirm(signature=confirmation, features=answered.names())) == answered
    assert responder.decode(initiator.encode_data(b"P-DATA")) == DataReceived(b"P-DATA")
    assert initiator.decode(responder.encode_data(b"answer")) == DataReceived(b"answer")


@pytest.mark.parametrize(
    "change",
    [{"association_id": "1" * 32}, {"from_site": "site-x"}, {"to_site": "site-c"}, {"called_ae_title": "OTHER"}],
    ids=lambda c: next(iter(c)),
)
def test_the_signature_binds_the_association_context(change: dict[str, str]) -> None:
    """The bridge supplies the context; changing any of it (re-routing, a replay under a new id) fails."""
    a, b, _ = identities()
    handshake, _ = initiate(a, b.public, context())
    with pytest.raises(HandshakeError, match="not signed by .*pinned key") as failed:
        respond(b, a.public, handshake, context(**change))
    assert failed.value.security and failed.value.reason is Reason.SECURITY


def test_a_stranger_cannot_open_an_association_in_a_routers_name() -> None:
    a, b, stranger = identities()
    handshake, _ = initiate(stranger, b.public, context())
    with pytest.raises(HandshakeError, match="not signed by site-a's pinned key"):
        respond(b, a.public, handshake, context())


@PROPERTIES
@given(field=st.sampled_from(["kem_ciphertext", "signature"]), where=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_any_flipped_bit_of_the_handshake_is_refused(field: str, where: int, bit: int) -> None:
    a, b, _ = identities()
    handshake, _ = initiate(a, b.public, context())
    raw = bytearray(getattr(handshake, field))
    raw[where % len(raw)] ^= 1 << bit
    forged = Handshake(**{**handshake.__dict__, field: bytes(raw)})
    with pytest.raises(HandshakeError):
        respond(b, a.public, forged, context())


def test_the_confirmation_must_come_from_the_pinned_responder() -> None:
    a, b, stranger = identities()
    ctx = context()
    handshake, tx = initiate(a, b.public, ctx)
    respond(b, a.public, handshake, ctx)
    codec = FrameCodec(
        tx, initiator=True, features=Features.offer(compression=True), compression_level=3, accept_blobs=True,
        confirm_from=(b.public, "site-b"),
    )  # fmt: skip
    forged = stranger.sign(b"anything")
    with pytest.raises(FrameRejected, match="^SECURITY: the confirmation was not signed by site-b's pinned key$") as no:
        codec.confirm(pb.Confirm(signature=forged, features=[COMPRESSION]))
    assert no.value.security and codec.awaiting_confirm and codec.features == Features()


def test_nothing_is_accepted_before_the_confirmation() -> None:
    a, b, _ = identities()
    ctx = context()
    handshake, tx = initiate(a, b.public, ctx)
    _, rx = respond(b, a.public, handshake, ctx)
    codec = FrameCodec(tx, initiator=True, features=Features(), compression_level=None, accept_blobs=True,
                       confirm_from=(b.public, "site-b"))  # fmt: skip
    responder = FrameCodec(rx, initiator=False, features=Features(), compression_level=None, accept_blobs=True)
    with pytest.raises(FrameRejected, match="data arrived before the destination confirmed the handshake") as early:
        codec.decode(responder.encode_data(b"too early"))
    assert early.value.security


@pytest.mark.parametrize(
    ("seq", "flags", "damage", "message"),
    [
        (1, FrameFlag.SEALED, False, "not sealed"),
        (0, FrameFlag.SEALED | FrameFlag.COMPRESSED, False, "not sealed"),
        (0, FrameFlag(0), False, "not sealed"),
        (0, FrameFlag.SEALED, True, "frame 0 failed authentication"),
    ],
)
def test_a_bad_first_frame_is_refused(seq: int, flags: int, damage: bool, message: str) -> None:
    a, b, _ = identities()
    ctx = context()
    handshake, tx = initiate(a, b.public, ctx)
    _, rx = respond(b, a.public, handshake, ctx)
    frame = first_frame(tx, RQ)
    frame.seq, frame.flags = seq, flags
    if damage:
        frame.payload = frame.payload[:-1] + bytes([frame.payload[-1] ^ 0x80])
    with pytest.raises(FrameRejected, match=message) as refused:
        open_first_frame(rx, frame)
    assert refused.value.security


def test_an_unknown_peer_is_not_an_attack() -> None:
    error = UnknownPeer("the bridge has not provided an identity for site x")
    assert isinstance(error, HandshakeError) and not error.security and error.reason is Reason.UNKNOWN_IDENTITY


# -- feature agreement ------------------------------------------------------------------------
NAMES = [COMPRESSION, SHUFFLE, SPILL, PACE, "spill", "future-feature"]


@PROPERTIES
@given(
    initiator_compression=st.booleans(),
    responder_compression=st.booleans(),
    answered_extra=st.lists(st.sampled_from(NAMES), unique=True),
    drop=st.lists(st.sampled_from(NAMES), unique=True),
)
def test_both_sides_agree_on_features_and_use_only_what_both_said(
    initiator_compression: bool, responder_compression: bool, answered_extra: list[str], drop: list[str]
) -> None:
    offer = Features.offer(compression=initiator_compression)
    offered = [n for n in offer.names() if n not in drop] + ["future-feature"]  # an older or newer initiator
    answered = Features.answer(offered, compression=responder_compression)
    assert set(answered.names()) <= set(offered)
    agreed = Features.agreed(offer, answered.names())
    assert agreed == answered  # both routers reach the same decision
    assert not agreed.shuffle or agreed.compress
    assert agreed.compress == (initiator_compression and responder_compression and COMPRESSION in offered)
    # A hostile responder answering more than was offered gains nothing.
    greedy = Features.agreed(offer, answered.names() + answered_extra)
    assert greedy & offer == greedy


def test_feature_names_are_sent_in_the_order_routers_always_used() -> None:
    assert Features.offer(compression=True).names() == [COMPRESSION, SHUFFLE, SPILL, PACE]
    assert Features.offer(compression=False).names() == [SPILL, PACE]
    assert Features.answer(["spill", PACE], compression=True).names() == [PACE]  # the old "spill" is not spill/2
