"""End-to-end protection of associations: identities, the per-association handshake, frame sealing.

The bridge relays ciphertext it cannot open and cannot originate an
association in a router's name. Built only from vetted constructions in
`cryptography`:

- Identity: an Ed25519 signing key and an HPKE key for the hybrid KEM
  ML-KEM-768 + X25519 (RFC 9180 with draft-ietf-hpke-pq), so traffic recorded
  today stays confidential against a future quantum attacker.
- Handshake (no extra round trip; it rides in Open and in the notice):
  the initiator seals a fresh 32-byte secret to the responder's KEM key with
  HPKE (info binds the association id) and signs the transcript hash T
  (protocol, association id, both sites, called AE, both identities, HPKE
  ciphertext) with Ed25519. The responder verifies the signature against the
  key it has pinned for the claimed initiating site, opens the secret and
  answers with its own signature over T (the Confirm frame). Nothing from the
  responder reaches the local device before that confirmation verifies.
- Keys: HKDF-SHA256 over the secret, salted with T, gives one AES-256-GCM key
  per direction. Nonce = 4 zero bytes || 64-bit frame sequence number (one key
  per direction, sequence never repeats); associated data = association id,
  direction, sequence and frame flags, so a replayed, reordered,
  truncated-then-spliced, re-flagged or cross-association frame fails
  authentication.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
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

PROTOCOL = b"dicom-relay relay.v1 e2e"
KEM_NAME = "MLKEM768-X25519"
SUITE_NAME = "relay.v1/MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"
SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
MLKEM768_PUBLIC_LENGTH = 1184
X25519_LENGTH = 32
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


@dataclass(frozen=True)
class AssociationContext:
    """What both routers must agree on; the bridge supplies it, the signatures check it."""

    association_id: str
    from_site: str
    to_site: str
    called_ae_title: str

    def transcript(self, initiator: PublicIdentity, responder: PublicIdentity, kem_ciphertext: bytes) -> bytes:
        return hashlib.sha256(
            _lp(
                PROTOCOL,
                self.association_id.encode(),
                self.from_site.encode(),
                self.to_site.encode(),
                self.called_ae_title.encode(),
                initiator.sign_key,
                initiator.kem_key,
                responder.sign_key,
                responder.kem_key,
                kem_ciphertext,
            )
        ).digest()

    @property
    def hpke_info(self) -> bytes:
        return _lp(PROTOCOL, self.association_id.encode())


@dataclass(frozen=True)
class Handshake:
    kem_ciphertext: bytes
    signature: bytes


class FrameSealer:
    """Seals outgoing and opens incoming frame payloads of one association."""

    def __init__(self, secret: bytes, transcript: bytes, association_id: str, *, initiator: bool) -> None:
        def key(direction: int) -> AESGCM:
            hkdf = HKDF(
                algorithm=hashes.SHA256(),
                length=32,
                salt=transcript,
                info=_lp(PROTOCOL, b"frame key", bytes([direction])),
            )
            return AESGCM(hkdf.derive(secret))

        self._aid = bytes.fromhex(association_id) if len(association_id) == 32 else association_id.encode()
        self._send_dir = INITIATOR_TO_RESPONDER if initiator else RESPONDER_TO_INITIATOR
        self._recv_dir = 1 - self._send_dir
        self._send = key(self._send_dir)
        self._recv = key(self._recv_dir)
        self.transcript = transcript

    def _aad(self, direction: int, seq: int, flags: int) -> bytes:
        return self._aid + struct.pack(">BQI", direction, seq, flags)

    def seal(self, payload: bytes, seq: int, flags: int = FLAG_SEALED) -> bytes:
        """Encrypt one frame payload; `flags` (as sent in the frame) are authenticated too."""
        return self._send.encrypt(struct.pack(">IQ", 0, seq), payload, self._aad(self._send_dir, seq, flags))

    def open(self, sealed: bytes, seq: int, flags: int = FLAG_SEALED) -> bytes:
        try:
            return self._recv.decrypt(struct.pack(">IQ", 0, seq), sealed, self._aad(self._recv_dir, seq, flags))
        except InvalidTag as exc:
            raise TamperError(
                f"frame {seq} failed authentication (altered, replayed, reordered or from another association)"
            ) from exc


def initiate(me: Identity, peer: PublicIdentity, ctx: AssociationContext) -> tuple[Handshake, FrameSealer]:
    secret = os.urandom(32)
    ciphertext = SUITE.encrypt(secret, peer.hpke_key(), info=ctx.hpke_info)
    transcript = ctx.transcript(me.public, peer, ciphertext)
    signature = me.sign(_lp(b"initiator", transcript))
    return Handshake(ciphertext, signature), FrameSealer(secret, transcript, ctx.association_id, initiator=True)


def respond(
    me: Identity, initiator: PublicIdentity, handshake: Handshake, ctx: AssociationContext
) -> tuple[bytes, FrameSealer]:
    """Verify the initiator, open the secret; returns our confirmation signature and the sealer."""
    transcript = ctx.transcript(initiator, me.public, handshake.kem_ciphertext)
    try:
        initiator.verifier().verify(handshake.signature, _lp(b"initiator", transcript))
    except InvalidSignature as exc:
        raise HandshakeError(
            f"the association was not signed by {ctx.from_site}'s pinned key (forged or altered by the bridge)"
        ) from exc
    try:
        secret = me.open_secret(handshake.kem_ciphertext, ctx.hpke_info)
    except Exception as exc:  # noqa: BLE001 - any HPKE failure means the same thing
        raise HandshakeError("the association secret could not be opened with this router's key") from exc
    confirmation = me.sign(_lp(b"responder", transcript))
    return confirmation, FrameSealer(secret, transcript, ctx.association_id, initiator=False)


def verify_confirmation(responder: PublicIdentity, sealer: FrameSealer, signature: bytes, site: str) -> None:
    try:
        responder.verifier().verify(signature, _lp(b"responder", sealer.transcript))
    except InvalidSignature as exc:
        raise HandshakeError(f"the confirmation was not signed by {site}'s pinned key") from exc
