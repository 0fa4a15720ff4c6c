"""The per-association handshake and feature agreement, without processes.

relay_router.seal's initiate/respond/verify_confirmation with real keys, the first frame that
rides in Open, the codec's last handshake step (the Confirm) with the features it agrees,
downgrade attempts by a bridge, freshness, forward secrecy and replays.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from functools import cache

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.relay.v1 import relay_pb2 as pb
from relay_common.errors import Reason
from relay_router.seal import (
    FRESHNESS_WINDOW_S,
    PROTOCOL,
    SUITE_NAME,
    AssociationContext,
    Confirmation,
    FrameSealer,
    Handshake,
    HandshakeError,
    Identity,
    TamperError,
    UnknownPeer,
    _lp,
    initiate,
    respond,
)
from relay_router.wire.codec import (
    DataReceived,
    FrameCodec,
    FrameRejected,
    confirm_frame,
    first_frame,
    handshake_from,
    handshake_message,
    open_first_frame,
)
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


OFFER = Features.offer(compression=True)
ANSWER = Features.answer(OFFER.names(), compression=True)


def handshake_pair(ctx: AssociationContext | None = None, *, now: float | None = None):
    """Both halves of one handshake between site-a and site-b: (handshake, tx, confirmation, rx)."""
    a, b, _ = identities()
    ctx = ctx or context(os.urandom(16).hex())
    handshake, tx = initiate(a, b.public, ctx, OFFER.names(), now=now)
    confirmation, rx = respond(b, a.public, handshake, ctx, OFFER.names(), ANSWER.names(), now=now)
    return handshake, tx, confirmation, rx


def confirm_message(confirmation: Confirmation, features: Features = ANSWER) -> pb.Confirm:
    return confirm_frame(confirmation, features).confirm


def initiator_codec(tx: FrameSealer) -> FrameCodec:
    a, b, _ = identities()
    return FrameCodec(
        tx, initiator=True, features=OFFER, compression_level=3, accept_blobs=True, confirm_from=(b.public, "site-b")
    )


def test_both_routers_derive_the_same_keys_and_the_confirmation_verifies() -> None:
    _, tx, confirmation, rx = handshake_pair()
    assert open_first_frame(rx, first_frame(tx, RQ)) == RQ
    initiator = initiator_codec(tx)
    responder = FrameCodec(rx, initiator=False, features=ANSWER, compression_level=3, accept_blobs=True)
    assert initiator.confirm(confirm_message(confirmation)) == ANSWER
    assert responder.decode(initiator.encode_data(b"P-DATA")) == DataReceived(b"P-DATA")
    assert initiator.decode(responder.encode_data(b"answer")) == DataReceived(b"answer")


def test_the_handshake_survives_the_wire_format() -> None:
    """What the bridge carries (Open.handshake, Confirm) holds every field the two halves need."""
    handshake, _, confirmation, _ = handshake_pair()
    assert handshake_from(pb.Handshake.FromString(handshake_message(handshake).SerializeToString())) == handshake
    assert handshake.suite == SUITE_NAME and len(handshake.ephemeral_key) == 1184 + 32
    assert len(confirmation.ephemeral_reply) == 1088 + 32


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
@given(
    field=st.sampled_from(["kem_ciphertext", "signature", "ephemeral_key"]),
    where=st.integers(0, 10_000),
    bit=st.integers(0, 7),
)
def test_any_flipped_bit_of_the_handshake_is_refused(field: str, where: int, bit: int) -> None:
    a, b, _ = identities()
    handshake, _ = initiate(a, b.public, context())
    raw = bytearray(getattr(handshake, field))
    raw[where % len(raw)] ^= 1 << bit
    forged = dataclasses.replace(handshake, **{field: bytes(raw)})
    with pytest.raises(HandshakeError):
        respond(b, a.public, forged, context())


@pytest.mark.parametrize(
    "downgrade",
    [
        {"ephemeral_key": b""},  # no ephemeral share: the keys would depend on the static key alone
        {"suite": "relay.v1/MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"},  # claims the old handshake
        {"ephemeral_key": b"", "suite": "relay.v1/MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"},
        {"sent_unix_ms": 0},
    ],
    ids=["no-share", "old-suite", "both", "no-time"],
)
def test_a_bridge_cannot_strip_forward_secrecy_or_freshness(downgrade: dict[str, object]) -> None:
    """The suite, the ephemeral share and the time are all in the signed transcript."""
    a, b, _ = identities()
    handshake, _ = initiate(a, b.public, context())
    with pytest.raises(HandshakeError, match="not signed by site-a's pinned key") as refused:
        respond(b, a.public, dataclasses.replace(handshake, **downgrade), context())
    assert refused.value.security


def test_an_older_router_is_told_apart_from_a_forgery() -> None:
    """An initiator that really signed another suite (an older router) is refused with a message naming it."""
    a, b, _ = identities()
    ctx = context()
    unsigned = dataclasses.replace(initiate(a, b.public, ctx)[0], signature=b"", suite="relay.v1/MLKEM768-X25519/x")
    t0 = ctx.transcript(a.public, b.public, unsigned, ())
    legacy = dataclasses.replace(unsigned, signature=a.sign(_lp(b"initiator", t0)))
    with pytest.raises(HandshakeError, match="^unsupported handshake suite 'relay.v1/MLKEM768-X25519/x'"):
        respond(b, a.public, legacy, ctx)


@pytest.mark.parametrize("stripped", [[], [SPILL, PACE], [COMPRESSION, SPILL, PACE]])
def test_a_bridge_cannot_strip_an_offered_feature(stripped: list[str]) -> None:
    """The feature offer is signed: a notice whose list differs from the Open's is refused."""
    a, b, _ = identities()
    handshake, _ = initiate(a, b.public, context(), OFFER.names())
    with pytest.raises(HandshakeError, match="not signed by site-a's pinned key"):
        respond(b, a.public, handshake, context(), stripped, ANSWER.names())


@pytest.mark.parametrize("offset_s", [-FRESHNESS_WINDOW_S - 1, FRESHNESS_WINDOW_S + 1, -86_400])
def test_an_open_outside_the_freshness_window_is_refused(offset_s: float) -> None:
    """A recorded Open replayed later (or a badly wrong clock) is refused before anything is opened."""
    a, b, _ = identities()
    sent = 1_800_000_000.0
    handshake, _ = initiate(a, b.public, context(), now=sent)
    with pytest.raises(HandshakeError, match=r"outside ±300 s \(a replayed Open, or one of the two clocks is wrong\)"):
        respond(b, a.public, handshake, context(), now=sent - offset_s)


@pytest.mark.parametrize("skew_s", [-FRESHNESS_WINDOW_S + 1, 0, FRESHNESS_WINDOW_S - 1])
def test_clock_skew_within_the_window_is_accepted(skew_s: float) -> None:
    a, b, _ = identities()
    handshake, _ = initiate(a, b.public, context(), now=1_800_000_000.0)
    respond(b, a.public, handshake, context(), now=1_800_000_000.0 + skew_s)


def test_the_confirmation_must_come_from_the_pinned_responder() -> None:
    _, tx, confirmation, _ = handshake_pair(context())
    codec = initiator_codec(tx)
    _, _, stranger = identities()
    forged = Confirmation(confirmation.ephemeral_reply, stranger.sign(b"anything"))
    with pytest.raises(FrameRejected, match="^SECURITY: the confirmation was not signed by site-b's pinned key$") as no:
        codec.confirm(confirm_message(forged))
    assert no.value.security and codec.awaiting_confirm and codec.features == Features()


@PROPERTIES
@given(where=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_a_tampered_ephemeral_reply_is_refused(where: int, bit: int) -> None:
    _, tx, confirmation, _ = handshake_pair(context())
    raw = bytearray(confirmation.ephemeral_reply)
    raw[where % len(raw)] ^= 1 << bit
    codec = initiator_codec(tx)
    with pytest.raises(FrameRejected, match="confirmation was not signed by site-b's pinned key"):
        codec.confirm(confirm_message(Confirmation(bytes(raw), confirmation.signature)))
    assert codec.awaiting_confirm and not tx.established


def test_the_accepted_features_are_signed_too() -> None:
    """A bridge that changes the Confirm's feature list (to switch compression off, say) is caught."""
    _, tx, confirmation, _ = handshake_pair(context())
    with pytest.raises(FrameRejected, match="confirmation was not signed"):
        initiator_codec(tx).confirm(confirm_message(confirmation, Features(spill=True, pace=True)))


def test_nothing_is_accepted_before_the_confirmation() -> None:
    _, tx, _, rx = handshake_pair(context())
    codec = FrameCodec(tx, initiator=True, features=Features(), compression_level=None, accept_blobs=True,
                       confirm_from=(identities()[1].public, "site-b"))  # fmt: skip
    responder = FrameCodec(rx, initiator=False, features=Features(), compression_level=None, accept_blobs=True)
    with pytest.raises(FrameRejected, match="data arrived before the destination confirmed the handshake") as early:
        codec.decode(responder.encode_data(b"too early"))
    assert early.value.security
    with pytest.raises(TamperError, match="no frame keys before the destination confirmed"):
        tx.seal(b"frame 1 has no key yet", 1)


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
    _, tx, _, rx = handshake_pair(context())
    frame = first_frame(tx, RQ)
    frame.seq, frame.flags = seq, flags
    if damage:
        frame.payload = frame.payload[:-1] + bytes([frame.payload[-1] ^ 0x80])
    with pytest.raises(FrameRejected, match=message) as refused:
        open_first_frame(rx, frame)
    assert refused.value.security


# -- forward secrecy and replay -----------------------------------------------------------------
def _long_term_keys_attack(handshake: Handshake, ctx: AssociationContext) -> list[AESGCM]:
    """Every frame key an attacker with both routers' identity files can derive from a recorded Open."""
    a, b, _ = identities()
    secret = b.open_secret(handshake.kem_ciphertext, ctx.hpke_info)  # the static secret: long-term keys give it
    t0 = ctx.transcript(a.public, b.public, handshake, OFFER.names())
    keys = []
    for label in (b"early frame key", b"frame key"):
        for direction in (0, 1):
            info = _lp(PROTOCOL, label, bytes([direction]))
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=t0, info=info)
            keys.append(AESGCM(hkdf.derive(secret)))
    return keys


def _opens(key: AESGCM, frame: pb.Data, aid: str, direction: int) -> bytes | None:
    aad = bytes.fromhex(aid) + struct.pack(">BQI", direction, frame.seq, frame.flags)
    try:
        return key.decrypt(struct.pack(">IQ", 0, frame.seq), frame.payload, aad)
    except InvalidTag:
        return None


def test_long_term_keys_open_only_the_request_not_the_association() -> None:
    """Forward secrecy: with both identity keys, a recorded association yields its A-ASSOCIATE-RQ and nothing else."""
    ctx = context(os.urandom(16).hex())
    handshake, tx, confirmation, rx = handshake_pair(ctx)
    initiator, responder = (
        initiator_codec(tx),
        FrameCodec(rx, initiator=False, features=ANSWER, compression_level=None, accept_blobs=True),
    )
    initiator.confirm(confirm_message(confirmation))
    recorded = [
        (0, first_frame(tx, RQ)),
        (0, initiator.encode_data(b"C-STORE " * 50)),
        (1, responder.encode_data(b"C-FIND answer " * 50)),
    ]
    keys = _long_term_keys_attack(handshake, ctx)
    assert any(_opens(k, recorded[0][1], ctx.association_id, 0) == RQ for k in keys)  # the attack itself works...
    for direction, frame in recorded[1:]:
        for key in keys:
            assert _opens(key, frame, ctx.association_id, direction) is None  # ...but opens no data frame
    assert tx._pending is None  # the ephemeral private keys are gone


def test_a_replayed_open_gets_fresh_keys_so_nothing_after_it_can_be_replayed() -> None:
    """Even within the window and without the replay record, the responder's share makes new keys."""
    a, b, _ = identities()
    ctx = context(os.urandom(16).hex())
    handshake, tx, confirmation, rx = handshake_pair(ctx)
    initiator = initiator_codec(tx)
    initiator.confirm(confirm_message(confirmation))
    recorded_frame_1 = initiator.encode_data(b"C-STORE of the original association")
    _, replayed_rx = respond(b, a.public, handshake, ctx, OFFER.names(), ANSWER.names())
    replayed = FrameCodec(replayed_rx, initiator=False, features=ANSWER, compression_level=3, accept_blobs=True)
    with pytest.raises(FrameRejected, match="frame 1 failed authentication"):
        replayed.decode(recorded_frame_1)
    original = FrameCodec(rx, initiator=False, features=ANSWER, compression_level=3, accept_blobs=True)
    assert original.decode(recorded_frame_1) == DataReceived(b"C-STORE of the original association")


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


@pytest.mark.parametrize("aid", ["Z" * 32, "a" * 31, "a" * 31 + "\n", "../" + "a" * 29])
def test_an_association_id_that_is_not_32_hex_digits_is_refused(aid: str) -> None:
    """The id names the replay record's lines and the frames' associated data: nothing else is accepted."""
    a, b, _ = identities()
    handshake, _ = initiate(a, b.public, context())  # the bridge puts another id in the notice
    with pytest.raises(HandshakeError, match="is not 32 lowercase hex digits"):
        respond(b, a.public, handshake, context(aid))
