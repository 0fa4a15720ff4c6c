"""Pinning: configured pins, the operator's approvals, pending sites, require_pin and trust_first_use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay_common.errors import Reason
from relay_router.approvals import MAX_PENDING, ApprovalError, ApprovalStore
from relay_router.peers import PeerKeys, PeerUnapproved
from relay_router.seal import HandshakeError, Identity, PublicIdentity, UnknownPeer


def pending(tmp_path: Path) -> dict[str, str]:
    return {site: p.fingerprint for site, p in ApprovalStore(tmp_path).pending().items()}


def test_a_first_key_is_refused_and_pending_until_the_operator_approves_it(tmp_path: Path) -> None:
    peers = PeerKeys(tmp_path / "known_sites.json", {})
    first, second = Identity.generate().public, Identity.generate().public
    assert peers.update({"site-b": first}) == {}
    with pytest.raises(PeerUnapproved) as refused:
        peers.identity("site-b")
    assert refused.value.fingerprint == first.fingerprint and refused.value.reason is Reason.PEER_UNAPPROVED
    assert not refused.value.security  # a new partner's first call looks the same: not an alert by itself
    assert f"peers approve site-b --fingerprint {first.fingerprint}" in str(refused.value)
    assert pending(tmp_path) == {"site-b": first.fingerprint}
    assert peers.expected("site-b") is None  # nothing approved by the bridge's word

    # Another process (`relay-router peers approve`) approves it: the running router sees it at once.
    assert "approved site-b" in ApprovalStore(tmp_path).approve("site-b", first.fingerprint)
    assert peers.identity("site-b") == first
    assert pending(tmp_path) == {}
    # A different key later is refused as a changed key (an alert), and the approval survives a restart.
    assert peers.update({"site-b": second}) == {"site-b": second.fingerprint}
    with pytest.raises(HandshakeError, match="identity key changed") as changed:
        peers.identity("site-b")
    assert changed.value.security and not isinstance(changed.value, PeerUnapproved)
    assert PeerKeys(tmp_path / "known_sites.json", {}).expected("site-b") == first.fingerprint


def test_approving_another_fingerprint_than_the_offered_one_is_refused(tmp_path: Path) -> None:
    peers = PeerKeys(tmp_path / "known_sites.json", {})
    offered, real = Identity.generate().public, Identity.generate().public
    peers.update({"site-b": offered})
    with pytest.raises(ApprovalError, match="NOT approved: the bridge offers"):
        ApprovalStore(tmp_path).approve("site-b", real.fingerprint)
    with pytest.raises(PeerUnapproved):
        peers.identity("site-b")  # still refused
    with pytest.raises(ApprovalError, match="not a fingerprint"):
        ApprovalStore(tmp_path).approve("site-b", "abc")
    with pytest.raises(ApprovalError, match="not a site name"):
        ApprovalStore(tmp_path).approve("Site B!", real.fingerprint)
    # Rejecting drops the pending entry; a site approved in advance (before any offer) is trusted.
    assert "removed site-b's pending request" in ApprovalStore(tmp_path).reject("site-b")
    assert pending(tmp_path) == {}
    ApprovalStore(tmp_path).approve("site-c", real.fingerprint)
    assert peers.caller_identity("site-c", real) == real
    ApprovalStore(tmp_path).reject("site-c")
    with pytest.raises(PeerUnapproved):
        peers.caller_identity("site-c", real)
    with pytest.raises(ApprovalError, match="neither approved nor pending"):
        ApprovalStore(tmp_path).reject("site-x")


def test_known_sites_of_earlier_versions_stay_approved(tmp_path: Path) -> None:
    """The upgrade path: entries recorded by trust on first use before this version keep working."""
    old = Identity.generate().public
    (tmp_path / "known_sites.json").write_text(json.dumps({"site-b": old.fingerprint}))
    peers = PeerKeys(tmp_path / "known_sites.json", {})
    peers.update({"site-b": old})
    assert peers.identity("site-b") == old


def test_pending_sites_are_bounded(tmp_path: Path) -> None:
    """A bridge inventing names cannot grow the pending file without bound."""
    peers = PeerKeys(tmp_path / "known_sites.json", {})
    key = Identity.generate().public
    peers.update({f"invented-{n}": key for n in range(MAX_PENDING + 20)})
    assert len(pending(tmp_path)) == MAX_PENDING
    with pytest.raises(PeerUnapproved):
        peers.identity(f"invented-{MAX_PENDING + 5}")  # refused all the same, just not recorded


def test_trust_first_use_is_the_old_rule_on_request(tmp_path: Path) -> None:
    peers = PeerKeys(tmp_path / "known_sites.json", {}, trust_first_use=True)
    first = Identity.generate().public
    peers.update({"site-b": first})
    assert peers.identity("site-b") == first
    assert ApprovalStore(tmp_path).known() == {"site-b": first.fingerprint}
    # require_pin wins over it.
    strict = PeerKeys(tmp_path / "other.json", {}, require_pin=True, trust_first_use=True)
    strict.update({"site-c": first})
    with pytest.raises(HandshakeError, match="no \\[\\[pin\\]\\]"):
        strict.identity("site-c")


def test_require_pin_refuses_sites_without_a_configured_pin(tmp_path: Path) -> None:
    pinned, stranger = Identity.generate().public, Identity.generate().public
    peers = PeerKeys(tmp_path / "known.json", {"site-b": pinned.fingerprint}, require_pin=True)
    peers.update({"site-b": pinned, "site-x": stranger})
    assert peers.identity("site-b") == pinned
    with pytest.raises(HandshakeError, match="no \\[\\[pin\\]\\]"):
        peers.identity("site-x")
    assert not (tmp_path / "known.json").exists()  # nothing trusted on first use
    assert pending(tmp_path) == {}  # nor waiting: only a pin in router.toml helps


def test_unknown_site_is_distinguished(tmp_path: Path) -> None:
    with pytest.raises(UnknownPeer):
        PeerKeys(tmp_path / "known.json", {}).identity("nowhere")


def test_refusals_are_typed_relay_errors(tmp_path: Path) -> None:
    """Callers branch on the type and its attributes, never on the message text."""
    from relay_common.errors import RelayError
    from relay_router.peers import NoPeerKey, PeerKeyRejected

    peers = PeerKeys(tmp_path / "known_sites.json", {})
    ApprovalStore(tmp_path).approve("site-b", Identity.generate().public.fingerprint)
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
    peers = PeerKeys(tmp_path / "known_sites.json", {})
    peers.update({})  # the directory names nobody
    with pytest.raises(PeerUnapproved):
        peers.caller_identity("site-c", caller)  # an invented or new site: refused, pending
    assert pending(tmp_path) == {"site-c": caller.fingerprint}
    ApprovalStore(tmp_path).approve("site-c", caller.fingerprint)
    assert peers.caller_identity("site-c", caller) == caller
    with pytest.raises(HandshakeError, match="is pinned"):
        peers.caller_identity("site-c", other)  # a different key later is refused
    with pytest.raises(HandshakeError, match="malformed|wrong length"):
        peers.caller_identity("site-d", PublicIdentity(b"x" * 32, b"y"))
    assert "site-d" not in pending(tmp_path)  # nothing recorded for it
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


def test_a_changed_key_is_approved_only_with_the_fingerprint_the_bridge_now_offers(tmp_path: Path) -> None:
    """A reinstalled partner: the new key is refused (an alert) and listed as changed until the operator
    approves the fingerprint the partner read out; any other fingerprint is refused."""
    from relay_router.approvals import peers_listing

    old, new, other = (Identity.generate().public for _ in range(3))
    store = ApprovalStore(tmp_path)
    store.approve("site-b", old.fingerprint)
    peers = PeerKeys(tmp_path / "known_sites.json", {})
    assert peers.update({"site-b": new}) == {"site-b": new.fingerprint}
    with pytest.raises(HandshakeError, match="identity key changed"):
        peers.identity("site-b")
    (row,) = peers_listing(store, {})
    assert row["state"] == "changed" and row["fingerprint"] == new.fingerprint and row["approved"] == old.fingerprint
    with pytest.raises(ApprovalError, match="NOT approved"):
        store.approve("site-b", other.fingerprint)
    assert f"replacing {old.fingerprint}" in store.approve("site-b", new.fingerprint)
    assert peers.identity("site-b") == new
    assert peers_listing(store, {}) == [{"site": "site-b", "state": "approved", "fingerprint": new.fingerprint}]


def test_a_damaged_pending_file_never_stops_the_router(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "pending_sites.json").write_text("{not json")
    peers = PeerKeys(tmp_path / "known_sites.json", {})
    key = Identity.generate().public
    peers.update({"site-b": key})  # the directory is still taken
    with pytest.raises(PeerUnapproved):
        peers.identity("site-b")  # and the site still refused
    assert "cannot record site site-b as pending" in caplog.text
