"""Which identity key each peer site must have: configured pins, then the operator's approvals.

The bridge distributes identities, but it is not trusted: a key it offers for a
site is accepted only if it matches the pin in router.toml or, for a site with
no configured pin, the fingerprint the hospital's operator approved
(`relay-router peers approve`, state_dir/known_sites.json; relay_router.approvals).
A key offered for a site with neither is recorded as pending and refused, in both
directions, until the operator has compared its fingerprint with the other site's
operator and approved it. `[router] trust_first_use = true` restores the old rule
(the first key offered is recorded as approved). A changed key is refused loudly
until an operator has checked the new fingerprint with the other site.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from relay_common.errors import Reason, RelayError, SecurityError
from relay_router.approvals import ApprovalStore
from relay_router.seal import HandshakeError, PublicIdentity, UnknownPeer

if TYPE_CHECKING:
    from relay_common.audit import AuditLog

log = logging.getLogger("relay_router.peers")


class PeerKeyRejected(HandshakeError, SecurityError):
    """The key the bridge offers for a site is not the pinned one, or the site has no required pin.

    Still a `HandshakeError` (callers refuse the association), and a `SecurityError`
    (reason "security", an alert) for code that branches on the typed root.
    """


class PeerUnapproved(PeerKeyRejected):
    """The bridge offers a key for a site the operator has not approved (nor pinned): refused, pending.

    Not necessarily an attack (a new partner's first association looks the same), so its own
    reason rather than "security"; the operator approves or rejects it with `relay-router peers`.
    """

    reason = Reason.PEER_UNAPPROVED
    security = False

    def __init__(self, site: str, fingerprint: str) -> None:
        super().__init__(
            f"site {site} is not approved: the bridge offers identity {fingerprint}; compare it with {site}'s "
            f"operator (`relay-router fingerprint` there), then run "
            f"`relay-router peers approve {site} --fingerprint {fingerprint}`"
        )
        self.site = site
        self.fingerprint = fingerprint

    def audit(self, audit: AuditLog, *, direction: str, called_ae: str, association_id: str) -> None:
        """The `peer_unapproved` alert, the same for calls in and out."""
        audit.event(
            "peer_unapproved",
            "alert",
            site=self.site,
            direction=direction,
            fingerprint=self.fingerprint,
            called_ae=called_ae,
            association_id=association_id,
        )


class NoPeerKey(UnknownPeer, RelayError):
    """The bridge offered no identity for the site (usually: nothing is shared between us). Not an attack."""

    reason = Reason.UNKNOWN_IDENTITY
    security = False


class PeerKeys:
    def __init__(
        self, known_file: Path, pins: dict[str, str], *, require_pin: bool = False, trust_first_use: bool = False
    ) -> None:
        self._store = ApprovalStore(known_file.parent, known_file=known_file)
        self._pins = dict(pins)
        # With require_pin, only sites pinned in router.toml are trusted: no approvals, no trust on first use.
        self._require_pin = require_pin
        # The old rule, on explicit request only: the first key the bridge offers for a site is believed.
        self._trust_first_use = trust_first_use and not require_pin
        self._offered: dict[str, PublicIdentity] = {}
        self._mismatch: dict[str, str] = {}
        self._known = self._store.known()  # ValueError names the file when it is unreadable
        self._known_version = self._store.known_version()

    def set_pins(self, pins: dict[str, str]) -> dict[str, str]:
        """A reloaded [[pin]] list: it applies to associations admitted from now on (running ones were
        verified at their start). The identities the bridge offered are checked against it again; returns
        the new mismatches, as `update` does."""
        self._pins = dict(pins)
        return self.update(self._offered)

    def _refresh(self) -> None:
        """Re-read known_sites.json when `relay-router peers` (another process) changed it."""
        version = self._store.known_version()
        if version == self._known_version:
            return
        try:
            self._known = self._store.known()
        except ValueError as exc:  # half-edited by hand: keep what we had, say so
            log.error("keeping the approvals read before: %s", exc)
            return
        self._known_version = version

    def expected(self, site: str) -> str | None:
        self._refresh()
        return self._pins.get(site) or self._known.get(site)

    def _first_sight(self, site: str, fingerprint: str, direction: str, *, attempt: bool) -> None:
        """A key for a site with no pin and no approval: approve it (trust_first_use) or record it as pending."""
        if self._trust_first_use:
            self._store.remember_known(site, fingerprint)
            self._refresh()
            log.info("first contact with site %s%s: pinned identity %s (trust_first_use)", site, _how(direction),
                     fingerprint)  # fmt: skip
            return
        if self._record_pending(site, fingerprint, direction, attempt=attempt):
            log.warning(
                "site %s%s is waiting for approval: the bridge offers identity %s. Compare it with %s's operator, "
                "then run `relay-router peers approve %s --fingerprint %s` (or `peers reject %s`)",
                site, _how(direction), fingerprint, site, site, fingerprint, site,
                extra={"site": site},
            )  # fmt: skip

    def _record_pending(self, site: str, fingerprint: str, direction: str, *, attempt: bool) -> bool:
        """The pending list is for the operator's convenience: a damaged file or a full disk is logged,
        never a reason to stop serving (the site is refused all the same)."""
        try:
            return self._store.record_pending(site, fingerprint, direction, attempt=attempt)
        except (OSError, ValueError) as exc:
            log.error("cannot record site %s as pending: %s", site, exc)
            return False

    def update(self, offered: dict[str, PublicIdentity]) -> dict[str, str]:
        """Take the identities from a directory message; record unknown sites as pending; return new mismatches."""
        before = dict(self._mismatch)
        self._offered = dict(offered)
        self._mismatch.clear()
        for site, identity in offered.items():
            fingerprint = identity.fingerprint
            expected = self.expected(site)
            if expected is None and self._require_pin:
                continue  # identity() refuses it: not pinned
            if expected is None:
                self._first_sight(site, fingerprint, "directory", attempt=False)
            elif expected != fingerprint:
                self._mismatch[site] = fingerprint
                # Pending too: `peers approve` then checks the operator's fingerprint against this offer.
                if site not in self._pins:
                    self._record_pending(site, fingerprint, "directory", attempt=False)
                log.error(
                    "SECURITY: the bridge offers identity %s for site %s, but %s is pinned; refusing every "
                    "association with %s. If %s was reinstalled, confirm the new fingerprint with its "
                    "administrator and pin it in router.toml ([[pin]]) or approve it "
                    "(`relay-router peers approve`).",
                    fingerprint,
                    site,
                    expected,
                    site,
                    site,
                    extra={"security_alert": "identity_mismatch", "site": site},
                )
        return {site: fp for site, fp in self._mismatch.items() if before.get(site) != fp}

    def _check(self, site: str, identity: PublicIdentity, direction: str) -> PublicIdentity:
        """`identity` if the operator's pin or approval matches it; the typed refusal otherwise.
        Checked at each use, not only when the directory came: an approval applies at once."""
        if self._require_pin and site not in self._pins:
            raise PeerKeyRejected(f"site {site} has no [[pin]] in router.toml and require_pin is on")
        fingerprint = identity.fingerprint
        expected = self.expected(site)
        if expected is None:
            self._first_sight(site, fingerprint, direction, attempt=True)
            if not self._trust_first_use:
                raise PeerUnapproved(site, fingerprint)
        elif expected != fingerprint:
            if site not in self._pins:
                self._record_pending(site, fingerprint, direction, attempt=True)
            raise PeerKeyRejected(
                f"site {site}'s identity key changed: the bridge offers {fingerprint[:16]}..., "
                f"but {expected[:16]}... is pinned"
            )
        return identity

    def identity(self, site: str) -> PublicIdentity:
        """The verified identity of `site` (the directory's offer), to call it; `PeerUnapproved`,
        `PeerKeyRejected` (security) or `NoPeerKey` saying why there is none."""
        if self._require_pin and site not in self._pins:
            raise PeerKeyRejected(f"site {site} has no [[pin]] in router.toml and require_pin is on")
        identity = self._offered.get(site)
        if identity is None:
            raise NoPeerKey(f"the bridge has not provided an identity for site {site}")
        return self._check(site, identity, "outbound")

    def caller_identity(self, site: str, offered: PublicIdentity | None) -> PublicIdentity:
        """The verified identity of a site calling us: the directory's, else the one the bridge sent
        with this association (a router that shares with "*" is not sent every site's key). The
        same rules hold for both: a pin or an approved fingerprint must match, require_pin admits only
        pinned sites, and an unknown site's key is recorded as pending and refused."""
        if offered is None or site in self._offered:
            if self._require_pin and site not in self._pins:
                raise PeerKeyRejected(f"site {site} has no [[pin]] in router.toml and require_pin is on")
            identity = self._offered.get(site)
            if identity is None:
                raise NoPeerKey(f"the bridge has not provided an identity for site {site}")
            return self._check(site, identity, "inbound")
        if self._require_pin and site not in self._pins:
            raise PeerKeyRejected(f"site {site} has no [[pin]] in router.toml and require_pin is on")
        offered.verifier(), offered.hpke_key()  # HandshakeError for malformed keys, before anything is recorded
        return self._check(site, offered, "inbound")


def _how(direction: str) -> str:
    return {"inbound": " (calling us)", "outbound": " (called by us)"}.get(direction, "")
