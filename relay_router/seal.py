"""End-to-end protection of associations: identities, the per-association handshake, frame sealing.

The bridge relays ciphertext it cannot open and cannot originate an
association in a router's name. Built only from vetted constructions in
`cryptography`:

- Identity: an Ed25519 signing key and an HPKE key for the hybrid KEM
  ML-KEM-768 + X25519 (RFC 9180 with draft-ietf-hpke-pq), so traffic recorded
  today stays confidential against a future quantum attacker.
- Handshake `fs1` (no extra round trip; it rides in Open, the notice and Confirm):
  the initiator seals a fresh 32-byte secret to the responder's static KEM key
  with HPKE, adds an ephemeral key share (ML-KEM-768 encapsulation key and
  X25519 public key) and its clock, and signs the transcript hash T0 (protocol,
  association id, both sites, called AE, both identities, HPKE ciphertext,
  ephemeral share, time, offered features) with Ed25519. The responder verifies
  the signature against the key it has pinned for the claimed initiating site,
  checks the time against its own clock, opens the secret, encapsulates to the
  ephemeral ML-KEM key, does X25519 with an ephemeral key of its own, and
  answers (Confirm) with that share and its signature over T1 (T0, its share,
  the features it accepts).
- Keys: frame 0 of the initiator's direction (the A-ASSOCIATE-RQ, sent before
  the responder has said anything) is sealed under an early key from the static
  HPKE secret alone. Every other frame uses one AES-256-GCM key per direction
  from HKDF-SHA256 over static secret || ephemeral X25519 secret || ML-KEM
  shared secret, salted with T1: neither router's long-term keys open them once
  the ephemeral private keys are gone (forward secrecy), and a replayed Open
  meets a fresh responder share, so nothing after frame 0 can be replayed.
- Frames: nonce = 4 zero bytes || 64-bit frame sequence number (one key per
  direction, sequence never repeats); associated data = association id,
  direction, sequence and frame flags, so a replayed, reordered,
  truncated-then-spliced, re-flagged or cross-association frame fails
  authentication.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relay_common.errors import Reason, SecurityError
from relay_common.files import write_private
from relay_router.wire.flags import FrameFlag

PROTOCOL = b"dicom-relay relay.v1 e2e fs1"
KEM_NAME = "MLKEM768-X25519"
# The handshake with forward secrecy; the suite before it ("relay.v1/MLKEM768-X25519/...") is no longer accepted.
SUITE_NAME = "relay.v1-fs1/MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"
SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
MLKEM768_PUBLIC_LENGTH = 1184
MLKEM768_CIPHERTEXT_LENGTH = 1088
X25519_LENGTH = 32
EPHEMERAL_KEY_LENGTH = MLKEM768_PUBLIC_LENGTH + X25519_LENGTH  # initiator's share, in Open
EPHEMERAL_REPLY_LENGTH = MLKEM768_CIPHERTEXT_LENGTH + X25519_LENGTH  # responder's share, in Confirm
# An Open is accepted only if its signed time is within this many seconds of the responder's clock; the
# responder's replay record keeps each id as long (relay_router.routing.SeenAssociations).
FRESHNESS_WINDOW_S = 300
ASSOCIATION_ID = re.compile(r"[0-9a-f]{32}")  # what initiators choose (UUID4, hex)
# The flag bits are registered in relay_router.wire.flags; these names stay for existing callers.
FLAG_COMPRESSED = FrameFlag.COMPRESSED
FLAG_SEALED = FrameFlag.SEALED
INITIATOR_TO_RESPONDER = 0
RESPONDER_TO_INITIATOR = 1


class HandshakeError(SecurityError):
    """The peer could not be authenticated; the association must be refused."""


class UnknownPeer(HandshakeError):
    """No identity is known for the site (the bridge offered none: usually nothing is shared with us).

    Not an attack: the bridge is then asked only for its refusal reason.
    """

    reason = Reason.UNKNOWN_IDENTITY
    security = False


class TamperError(SecurityError):
    """A frame failed authentication: altered, replayed, reordered or from another association."""


def _lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation, so field boundaries cannot be shifted."""
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


@dataclass(frozen=True)
class PublicIdentity:
    sign_key: bytes  # Ed25519, 32 bytes raw
    kem_key: bytes  # ML-KEM-768 public key (1184 bytes) || X25519 public key (32 bytes)

    @property
    def fingerprint(self) -> str:
        """SHA-256 over both public keys; what operators compare and pin."""
        return hashlib.sha256(_lp(b"identity", self.sign_key, self.kem_key)).hexdigest()

    def verifier(self) -> ed25519.Ed25519PublicKey:
        try:
            return ed25519.Ed25519PublicKey.from_public_bytes(self.sign_key)
        except ValueError as exc:
            raise HandshakeError("the peer's signing key is malformed") from exc

    def hpke_key(self) -> hpke.MLKEM768X25519PublicKey:
        if len(self.kem_key) != MLKEM768_PUBLIC_LENGTH + X25519_LENGTH:
            raise HandshakeError("the peer's KEM key has the wrong length")
        try:
            return hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(self.kem_key[:MLKEM768_PUBLIC_LENGTH]),
                x25519.X25519PublicKey.from_public_bytes(self.kem_key[MLKEM768_PUBLIC_LENGTH:]),
            )
        except ValueError as exc:
            raise HandshakeError("the peer's KEM key is malformed") from exc


class Identity:
    """This router's long-term private keys."""

    def __init__(
        self, sign: ed25519.Ed25519PrivateKey, kem_mlkem: mlkem.MLKEM768PrivateKey, kem_x25519: x25519.X25519PrivateKey
    ) -> None:
        self._sign = sign
        self._mlkem = kem_mlkem
        self._x25519 = kem_x25519
        self._hpke = hpke.MLKEM768X25519PrivateKey(kem_mlkem, kem_x25519)
        self.public = PublicIdentity(
            sign.public_key().public_bytes_raw(),
            kem_mlkem.public_key().public_bytes_raw() + kem_x25519.public_key().public_bytes_raw(),
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls(
            ed25519.Ed25519PrivateKey.generate(),
            mlkem.MLKEM768PrivateKey.generate(),
            x25519.X25519PrivateKey.generate(),
        )

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Read the key file, or create it (mode 0600) on first start."""
        if path.exists():
            try:
                data = json.loads(path.read_text())
                return cls(
                    ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["ed25519"])),
                    mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes.fromhex(data["mlkem768_seed"])),
                    x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(data["x25519"])),
                )
            except (OSError, ValueError, KeyError) as exc:
                raise ValueError(f"cannot read the identity key file {path}: {exc}") from exc
        identity = cls.generate()
        identity.save(path)
        return identity

    def save(self, path: Path) -> None:
        data = {
            "kind": "dicom-relay router identity (private keys: keep secret)",
            "ed25519": self._sign.private_bytes_raw().hex(),
            "mlkem768_seed": self._mlkem.private_bytes_raw().hex(),
            "x25519": self._x25519.private_bytes_raw().hex(),
        }
        write_private(path, json.dumps(data))

    def sign(self, message: bytes) -> bytes:
        return self._sign.sign(message)

    def open_secret(self, ciphertext: bytes, info: bytes) -> bytes:
        return SUITE.decrypt(ciphertext, self._hpke, info=info)


def _features(names: Sequence[str]) -> bytes:
    return _lp(*(name.encode() for name in names))


@dataclass(frozen=True)
class Handshake:
    """The initiator's half, as carried in `Open.handshake`."""

    kem_ciphertext: bytes  # HPKE: the static secret, sealed to the responder's long-term KEM key
    signature: bytes  # Ed25519 over LP("initiator", T0)
    ephemeral_key: bytes = b""  # ML-KEM-768 encapsulation key || X25519 public key, fresh per association
    sent_unix_ms: int = 0  # the initiator's clock when it opened the association
    suite: str = SUITE_NAME


@dataclass(frozen=True)
class Confirmation:
    """The responder's half, as carried in `Confirm`."""

    ephemeral_reply: bytes  # ML-KEM-768 ciphertext to the initiator's ephemeral key || responder's X25519 public
    signature: bytes  # Ed25519 over LP("responder", T1)


@dataclass(frozen=True)
class AssociationContext:
    """What both routers must agree on; the bridge supplies it, the signatures check it."""

    association_id: str
    from_site: str
    to_site: str
    called_ae_title: str

    def transcript(
        self, initiator: PublicIdentity, responder: PublicIdentity, handshake: Handshake, offered: Sequence[str]
    ) -> bytes:
        """T0: everything the initiator's signature covers."""
        return hashlib.sha256(
            _lp(
                PROTOCOL,
                handshake.suite.encode(),
                self.association_id.encode(),
                self.from_site.encode(),
                self.to_site.encode(),
                self.called_ae_title.encode(),
                initiator.sign_key,
                initiator.kem_key,
                responder.sign_key,
                responder.kem_key,
                handshake.kem_ciphertext,
                handshake.ephemeral_key,
                struct.pack(">Q", handshake.sent_unix_ms),
                _features(offered),
            )
        ).digest()

    @property
    def hpke_info(self) -> bytes:
        return _lp(PROTOCOL, self.association_id.encode())


def _confirm_transcript(t0: bytes, reply: bytes, answered: Sequence[str]) -> bytes:
    """T1: what the responder's signature covers and what salts the frame keys."""
    return hashlib.sha256(_lp(PROTOCOL, b"confirm", t0, reply, _features(answered))).digest()


def _key(secret: bytes, salt: bytes, label: bytes, direction: int) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_lp(PROTOCOL, label, bytes([direction])))
    return AESGCM(hkdf.derive(secret))


def _frame_keys(secret: bytes, t1: bytes) -> tuple[AESGCM, AESGCM]:
    """(initiator -> responder, responder -> initiator)."""
    return tuple(_key(secret, t1, b"frame key", d) for d in (INITIATOR_TO_RESPONDER, RESPONDER_TO_INITIATOR))  # type: ignore[return-value]


def _early_key(static_secret: bytes, t0: bytes) -> AESGCM:
    """Frame 0 of the initiator's direction only: the A-ASSOCIATE-RQ, sent before the responder answers."""
    return _key(static_secret, t0, b"early frame key", INITIATOR_TO_RESPONDER)


@dataclass
class _Pending:
    """The initiator's secrets between Open and Confirm; dropped once the frame keys exist."""

    static_secret: bytes
    t0: bytes
    mlkem: mlkem.MLKEM768PrivateKey
    x25519: x25519.X25519PrivateKey
    offered: tuple[str, ...]


class FrameSealer:
    """Seals outgoing and opens incoming frame payloads of one association.

    Frame 0 of the initiator's direction uses the early key; every other frame the forward-secret keys.
    The initiator's sealer has only the early key until `verify_confirmation` installs the others.
    Built directly from a secret and a transcript (tests, benchmarks), frame 0 uses the frame key.
    """

    def __init__(self, secret: bytes, transcript: bytes, association_id: str, *, initiator: bool) -> None:
        keys = _frame_keys(secret, transcript)
        self._setup(association_id, initiator=initiator, early=keys[0], keys=keys, transcript=transcript)

    @classmethod
    def _from_handshake(
        cls,
        association_id: str,
        *,
        initiator: bool,
        early: AESGCM,
        keys: tuple[AESGCM, AESGCM] | None,
        transcript: bytes,
    ) -> FrameSealer:
        sealer = cls.__new__(cls)
        sealer._setup(association_id, initiator=initiator, early=early, keys=keys, transcript=transcript)
        return sealer

    def _setup(
        self,
        association_id: str,
        *,
        initiator: bool,
        early: AESGCM,
        keys: tuple[AESGCM, AESGCM] | None,
        transcript: bytes,
    ) -> None:
        self._aid = bytes.fromhex(association_id) if len(association_id) == 32 else association_id.encode()
        self._send_dir = INITIATOR_TO_RESPONDER if initiator else RESPONDER_TO_INITIATOR
        self._recv_dir = 1 - self._send_dir
        self._early = early
        self._keys = keys
        self.transcript = transcript  # T0 until the Confirm verifies (initiator), then T1
        self._pending: _Pending | None = None

    @property
    def established(self) -> bool:
        return self._keys is not None

    def _cipher(self, direction: int, seq: int) -> AESGCM:
        if direction == INITIATOR_TO_RESPONDER and seq == 0:
            return self._early
        if self._keys is None:
            raise TamperError(f"frame {seq}: no frame keys before the destination confirmed the handshake")
        return self._keys[direction]

    def _aad(self, direction: int, seq: int, flags: int) -> bytes:
        return self._aid + struct.pack(">BQI", direction, seq, flags)

    def seal(self, payload: bytes, seq: int, flags: int = FLAG_SEALED) -> bytes:
        """Encrypt one frame payload; `flags` (as sent in the frame) are authenticated too."""
        cipher = self._cipher(self._send_dir, seq)
        return cipher.encrypt(struct.pack(">IQ", 0, seq), payload, self._aad(self._send_dir, seq, flags))

    def open(self, sealed: bytes, seq: int, flags: int = FLAG_SEALED) -> bytes:
        cipher = self._cipher(self._recv_dir, seq)
        try:
            return cipher.decrypt(struct.pack(">IQ", 0, seq), sealed, self._aad(self._recv_dir, seq, flags))
        except InvalidTag as exc:
            raise TamperError(
                f"frame {seq} failed authentication (altered, replayed, reordered or from another association)"
            ) from exc


def _split_share(share: bytes, first: int, what: str) -> tuple[bytes, x25519.X25519PublicKey]:
    if len(share) != first + X25519_LENGTH:
        raise HandshakeError(f"the {what} has the wrong length ({len(share)} bytes)")
    try:
        return share[:first], x25519.X25519PublicKey.from_public_bytes(share[first:])
    except ValueError as exc:
        raise HandshakeError(f"the {what} is malformed") from exc


def _exchange(private: x25519.X25519PrivateKey, public: x25519.X25519PublicKey, what: str) -> bytes:
    try:
        return private.exchange(public)
    except ValueError as exc:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise HandshakeError(f"the {what} is a degenerate X25519 key") from exc


def initiate(
    me: Identity,
    peer: PublicIdentity,
    ctx: AssociationContext,
    offered: Sequence[str] = (),
    *,
    now: float | None = None,
) -> tuple[Handshake, FrameSealer]:
    """Our half of the handshake and a sealer that can seal frame 0 (the rest once the Confirm verifies)."""
    secret = os.urandom(32)
    ciphertext = SUITE.encrypt(secret, peer.hpke_key(), info=ctx.hpke_info)
    ephemeral_mlkem, ephemeral_x25519 = mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    share = ephemeral_mlkem.public_key().public_bytes_raw() + ephemeral_x25519.public_key().public_bytes_raw()
    unsigned = Handshake(ciphertext, b"", share, int((time.time() if now is None else now) * 1000))
    t0 = ctx.transcript(me.public, peer, unsigned, offered)
    handshake = Handshake(ciphertext, me.sign(_lp(b"initiator", t0)), share, unsigned.sent_unix_ms)
    sealer = FrameSealer._from_handshake(
        ctx.association_id, initiator=True, early=_early_key(secret, t0), keys=None, transcript=t0
    )
    sealer._pending = _Pending(secret, t0, ephemeral_mlkem, ephemeral_x25519, tuple(offered))
    return handshake, sealer


def respond(
    me: Identity,
    initiator: PublicIdentity,
    handshake: Handshake,
    ctx: AssociationContext,
    offered: Sequence[str] = (),
    answered: Sequence[str] = (),
    *,
    now: float | None = None,
    window_s: float = FRESHNESS_WINDOW_S,
) -> tuple[Confirmation, FrameSealer]:
    """Verify the initiator and its freshness, add our ephemeral share; returns the Confirm and the sealer.

    `offered` are the feature names in the Open, `answered` those we accept (both signed over)."""
    if not ASSOCIATION_ID.fullmatch(ctx.association_id):
        raise HandshakeError(f"association id {ctx.association_id[:40]!r} is not 32 lowercase hex digits")
    t0 = ctx.transcript(initiator, me.public, handshake, offered)
    try:
        initiator.verifier().verify(handshake.signature, _lp(b"initiator", t0))
    except InvalidSignature as exc:
        older = (
            ""
            if handshake.suite == SUITE_NAME
            else f" (it names handshake suite {handshake.suite!r}: an older router?)"
        )
        raise HandshakeError(
            f"the association was not signed by {ctx.from_site}'s pinned key (forged or altered by the bridge){older}"
        ) from exc
    # Signed by the initiator from here on: what fails now is a replay, a clock or a broken router, not the bridge.
    if handshake.suite != SUITE_NAME:
        raise HandshakeError(f"unsupported handshake suite {handshake.suite!r}; this router requires {SUITE_NAME!r}")
    skew = (time.time() if now is None else now) - handshake.sent_unix_ms / 1000
    if abs(skew) > window_s:
        raise HandshakeError(
            f"the association was opened {skew:+.0f} s from this router's clock, outside ±{window_s:.0f} s "
            "(a replayed Open, or one of the two clocks is wrong)"
        )
    encapsulation_key, initiator_x25519 = _split_share(
        handshake.ephemeral_key, MLKEM768_PUBLIC_LENGTH, "initiator's ephemeral key share"
    )
    try:
        static_secret = me.open_secret(handshake.kem_ciphertext, ctx.hpke_info)
    except Exception as exc:  # any HPKE failure means the same thing
        raise HandshakeError("the association secret could not be opened with this router's key") from exc
    try:
        mlkem_secret, mlkem_ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(encapsulation_key).encapsulate()
    except ValueError as exc:
        raise HandshakeError("the initiator's ephemeral ML-KEM-768 key is malformed") from exc
    ours = x25519.X25519PrivateKey.generate()  # ephemeral: gone when this function returns
    x25519_secret = _exchange(ours, initiator_x25519, "initiator's ephemeral key share")
    reply = mlkem_ciphertext + ours.public_key().public_bytes_raw()
    t1 = _confirm_transcript(t0, reply, answered)
    keys = _frame_keys(static_secret + x25519_secret + mlkem_secret, t1)
    sealer = FrameSealer._from_handshake(
        ctx.association_id, initiator=False, early=_early_key(static_secret, t0), keys=keys, transcript=t1
    )
    return Confirmation(reply, me.sign(_lp(b"responder", t1))), sealer


def verify_confirmation(
    responder: PublicIdentity, sealer: FrameSealer, confirmation: Confirmation, answered: Sequence[str], site: str
) -> None:
    """The initiator's last step: check the responder's signature over T1 and install the forward-secret keys."""
    pending = sealer._pending
    if pending is None:
        raise HandshakeError("a second confirmation for the same association")
    t1 = _confirm_transcript(pending.t0, confirmation.ephemeral_reply, answered)
    try:
        responder.verifier().verify(confirmation.signature, _lp(b"responder", t1))
    except InvalidSignature as exc:
        raise HandshakeError(f"the confirmation was not signed by {site}'s pinned key") from exc
    mlkem_ciphertext, responder_x25519 = _split_share(
        confirmation.ephemeral_reply, MLKEM768_CIPHERTEXT_LENGTH, "destination's ephemeral key share"
    )
    try:
        mlkem_secret = pending.mlkem.decapsulate(mlkem_ciphertext)
    except ValueError as exc:
        raise HandshakeError("the destination's ML-KEM-768 ciphertext is malformed") from exc
    x25519_secret = _exchange(pending.x25519, responder_x25519, "destination's ephemeral key share")
    sealer._keys = _frame_keys(pending.static_secret + x25519_secret + mlkem_secret, t1)
    sealer.transcript = t1
    sealer._pending = None  # the ephemeral private keys go with it: forward secrecy
