"""Which identity key each peer site must have: configured pins, then trust on first use.

The bridge distributes identities, but it is not trusted: a key it offers for a
site is accepted only if it matches the pin in router.toml or, for a site with
no configured pin, the fingerprint recorded the first time the site was seen
(state_dir/known_sites.json). A changed key is refused loudly until an operator
has checked the new fingerprint with the other site and re-pinned it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from relay_common.errors import Reason, RelayError, SecurityError
from relay_common.files import write_private
from relay_router.seal import HandshakeError, PublicIdentity, UnknownPeer

log = logging.getLogger("relay_router.peers")


class PeerKeyRejected(HandshakeError, SecurityError):
    """The key the bridge offers for a site is not the pinned one, or the site has no required pin.

    Still a `HandshakeError` (callers refuse the association), and a `SecurityError`
    (reason "security", an alert) for code that branches on the typed root.
    """


class NoPeerKey(UnknownPeer, RelayError):
    """The bridge offered no identity for the site (usually: nothing is shared between us). Not an attack."""

    reason = Reason.UNKNOWN_IDENTITY
    security = False


class PeerKeys:
    def __init__(self, known_file: Path, pins: dict[str, str], *, require_pin: bool = False) -> None:
        self._known_file = known_file
        self._pins = dict(pins)
        # With require_pin, only sites pinned in router.toml are trusted: no trust on first use.
        self._require_pin = require_pin
        self._offered: dict[str, PublicIdentity] = {}
        self._mismatch: dict[str, str] = {}
        try:
            self._known: dict[str, str] = json.loads(known_file.read_text())
        except FileNotFoundError:
            self._known = {}
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {known_file}: {exc}") from exc

    def set_pins(self, pins: dict[str, str]) -> dict[str, str]:
        """A reloaded [[pin]] list: it applies to associations admitted from now on (running ones were
        verified at their start). The identities the bridge offered are checked against it again; returns
        the new mismatches, as `update` does."""
        self._pins = dict(pins)
        return self.update(self._offered)

    def expected(self, site: str) -> str | None:
        return self._pins.get(site) or self._known.get(site)

    def update(self, offered: dict[str, PublicIdentity]) -> dict[str, str]:
        """Take the identities from a directory message; record first sightings; return new mismatches."""
        before = dict(self._mismatch)
        changed = False
        self._offered = dict(offered)
        self._mismatch.clear()
        for site, identity in offered.items():
            fingerprint = identity.fingerprint
            expected = self.expected(site)
            if expected is None and self._require_pin:
                continue  # identity() refuses it: not pinned
            if expected is None:
                self._known[site] = fingerprint
                changed = True
                log.info("first contact with site %s: pinned identity %s", site, fingerprint)
            elif expected != fingerprint:
                self._mismatch[site] = fingerprint
                log.error(
                    "SECURITY: the bridge offers identity %s for site %s, but %s is pinned; refusing every "
                    "association with %s. If %s was reinstalled, confirm the new fingerprint with its "
                    "administrator and pin it in router.toml ([[pin]]).",
                    fingerprint,
                    site,
                    expected,
                    site,
                    site,
                    extra={"security_alert": "identity_mismatch", "site": site},
                )
        if changed:
            self._save()
        return {site: fp for site, fp in self._mismatch.items() if before.get(site) != fp}

    def identity(self, site: str) -> PublicIdentity:
        """The verified identity of `site`; `PeerKeyRejected` (security) or `NoPeerKey` saying why there is none."""
        if site in self._mismatch:
            raise PeerKeyRejected(
                f"site {site}'s identity key changed (offered {self._mismatch[site][:16]}..., "
                f"pinned {(self.expected(site) or '')[:16]}...)"
            )
        if self._require_pin and site not in self._pins:
            raise PeerKeyRejected(f"site {site} has no [[pin]] in router.toml and require_pin is on")
        identity = self._offered.get(site)
        if identity is None:
            raise NoPeerKey(f"the bridge has not provided an identity for site {site}")
        return identity

    def caller_identity(self, site: str, offered: PublicIdentity | None) -> PublicIdentity:
        """The verified identity of a site calling us: the directory's, else the one the bridge sent
        with this association (a router that shares with "*" is not sent every site's key). The
        same rules hold for both: a pin or a known fingerprint must match, require_pin admits only
        pinned sites, and an unknown site's first key is recorded (trust on first use)."""
        if offered is None or site in self._offered or site in self._mismatch:
            return self.identity(site)
        if self._require_pin and site not in self._pins:
            raise PeerKeyRejected(f"site {site} has no [[pin]] in router.toml and require_pin is on")
        offered.verifier(), offered.hpke_key()  # HandshakeError for malformed keys, before anything is recorded
        fingerprint = offered.fingerprint
        expected = self.expected(site)
        if expected is None:
            self._known[site] = fingerprint
            self._save()
            log.info("first contact with site %s (calling us): pinned identity %s", site, fingerprint)
        elif expected != fingerprint:
            raise PeerKeyRejected(
                f"the bridge offers identity {fingerprint[:16]}... for calling site {site}, "
                f"but {expected[:16]}... is pinned"
            )
        return offered

    def _save(self) -> None:
        write_private(self._known_file, json.dumps(self._known, indent=2, sort_keys=True))
