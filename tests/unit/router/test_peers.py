"""Pinning: configured pins, trust on first use, and require_pin."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay_router.peers import PeerKeys
from relay_router.seal import HandshakeError, Identity, PublicIdentity, UnknownPeer


def test_first_contact_is_pinned_and_a_changed_key_refused(tmp_path: Path) -> None:
    peers = PeerKeys(tmp_path / "known.json", {})
    first, second = Identity.generate().public, Identity.generate().public
    assert peers.update({"site-b": first}) == {}
    assert peers.identity("site-b") == first
    assert peers.update({"site-b": second}) == {"site-b": second.fingerprint}
    with pytest.raises(HandshakeError, match="identity key changed"):
        peers.identity("site-b")
    # The pin survives a restart.
    assert PeerKeys(tmp_path / "known.json", {}).expected("site-b") == first.fingerprint


def test_require_pin_refuses_sites_without_a_configured_pin(tmp_path: Path) -> None:
    pinned, stranger = Identity.generate().public, Identity.generate().public
    peers = PeerKeys(tmp_path / "known.json", {"site-b": pinned.fingerprint}, require_pin=True)
    peers.update({"site-b": pinned, "site-x": stranger})
    assert peers.identity("site-b") == pinned
    with pytest.raises(HandshakeError, match="no \\[\\[pin\\]\\]"):
        peers.identity("site-x")
    assert not (tmp_path / "known.json").exists()  # nothing trusted on first use


def test_unknown_site_is_distinguished(tmp_path: Path) -> None:
    with pytest.raises(UnknownPeer):
        PeerKeys(tmp_path / "known.json", {}).identity("nowhere")


def test_refusals_are_typed_relay_errors(tmp_path: Path) -> None:
    """Callers branch on the type and its attributes, never on the message text."""
    from relay_common.errors import Reason, RelayError
    from relay_router.peers import NoPeerKey, PeerKeyRejected

    peers = PeerKeys(tmp_path / "known.json", {})
    peers.update({"site-b": Identity.generate().public})
    peers.update({"site-b": Identity.generate().public})
    with pytest.raises(PeerKeyRejected) as changed:
        peers.identity("site-b")
    assert isinstance(changed.value, RelayError) and changed.value.security
    assert changed.value.reason is Reason.SECURITY
    with pytest.raises(NoPeerKey) as unknown:
        peers.identity("nowhere")
    assert isinstance(unknown.value, UnknownPeer) and not unknown.value.security
    assert unknown.value.reason is Reason.UNKNOWN_IDENTITY
    assert "nowhere" in unknown.value.detail


def test_a_callers_identity_sent_with_its_association_follows_the_same_rules(tmp_path: Path) -> None:
    """A router sharing with "*" gets a caller's key with the association (issue 17, item 10)."""
    caller, other = Identity.generate().public, Identity.generate().public
    peers = PeerKeys(tmp_path / "known.json", {})
    peers.update({})  # the directory names nobody
    assert peers.caller_identity("site-c", caller) == caller  # first use: recorded
    assert PeerKeys(tmp_path / "known.json", {}).expected("site-c") == caller.fingerprint
    with pytest.raises(HandshakeError, match="is pinned"):
        peers.caller_identity("site-c", other)  # a different key later is refused
    with pytest.raises(HandshakeError, match="malformed|wrong length"):
        peers.caller_identity("site-d", PublicIdentity(b"x" * 32, b"y"))
    assert PeerKeys(tmp_path / "known.json", {}).expected("site-d") is None  # nothing recorded for it
    with pytest.raises(UnknownPeer):
        peers.caller_identity("site-e", None)


def test_a_callers_identity_needs_a_pin_under_require_pin(tmp_path: Path) -> None:
    pinned, stranger = Identity.generate().public, Identity.generate().public
    peers = PeerKeys(tmp_path / "known.json", {"site-b": pinned.fingerprint}, require_pin=True)
    assert peers.caller_identity("site-b", pinned) == pinned
    with pytest.raises(HandshakeError, match="is pinned"):
        peers.caller_identity("site-b", stranger)
    with pytest.raises(HandshakeError, match="no \\[\\[pin\\]\\]"):
        peers.caller_identity("site-x", stranger)
    assert not (tmp_path / "known.json").exists()
