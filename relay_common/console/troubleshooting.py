"""Which entry of docs/operations.md ("Troubleshooting by symptom") each recorded reason points to.

The console shows the hint beside each recent error and links to the section; the anchors are checked
against docs/operations.md by tests/unit/common/test_console.py, so a renamed heading fails CI.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay_common.errors import Reason

DOC = "operations.md"
REJECTED = "association-rejected"
GUARANTEES = "what-the-relay-guarantees-on-each-kind-of-failure"


@dataclass(frozen=True)
class Entry:
    anchor: str  # the heading's anchor in docs/operations.md
    title: str  # the heading, as the operator finds it in the document
    hint: str  # one line: what to look at first


_ENTRIES: dict[str, Entry] = {
    Reason.UNKNOWN_CALLED_AE: Entry(REJECTED, "Association rejected", "add a [[remote]] for the called title"),
    Reason.UNKNOWN_DEVICE: Entry(REJECTED, "Association rejected", "the other site does not publish that title"),
    Reason.NOT_PERMITTED: Entry(REJECTED, "Association rejected", "the device is not shared with this site"),
    Reason.SECURITY: Entry("key-rotation", "Key rotation", "a peer's identity key changed or a check failed"),
    Reason.UNKNOWN_IDENTITY: Entry("key-rotation", "Key rotation", "no identity key known for that site"),
    Reason.BRIDGE_UNREACHABLE: Entry(
        "the-router-does-not-sign-on", "The router does not sign on", "this router is not signed on"
    ),
    Reason.SITE_OFFLINE: Entry(REJECTED, "Association rejected", "the other site's router is not signed on"),
    Reason.TIMEOUT: Entry(REJECTED, "Association rejected", "the other router did not answer in time"),
    Reason.DEVICE_UNREACHABLE: Entry(REJECTED, "Association rejected", "the other router cannot reach its device"),
    Reason.ROUTER_LIMIT: Entry(REJECTED, "Association rejected", "[dicom] max_associations reached here"),
    Reason.OVERLOADED: Entry(REJECTED, "Association rejected", "a limit of the bridge or the other router"),
    Reason.DEVICE_REJECTED: Entry(REJECTED, "Association rejected", "the called device itself refused"),
    Reason.PROTOCOL: Entry("malformed-input", "Malformed input", "a device broke the DICOM protocol"),
    Reason.LINK_LOST: Entry(
        "uplink-cut-the-bridge-is-unreachable-but-nothing-is-reset", "Uplink cut", "the stream to the bridge broke"
    ),
    Reason.PEER_ABORTED: Entry(GUARANTEES, "What the relay guarantees", "the other side aborted"),
    Reason.IDLE: Entry(GUARANTEES, "What the relay guarantees", "no traffic for idle_timeout_s"),
    Reason.SPILL: Entry(GUARANTEES, "What the relay guarantees", "a spilled data set could not be stored or fetched"),
    Reason.SHUTDOWN: Entry("router-restart-or-crash", "Router restart or crash", "a router was shutting down"),
    Reason.OTHER: Entry(GUARANTEES, "What the relay guarantees", "see the router's log"),
}
NOT_SIGNED_ON = Entry("the-router-does-not-sign-on", "The router does not sign on", "read the last error")


def entry_for(reason: object) -> Entry | None:
    """The troubleshooting entry for a reason label (None: no reason, nothing to troubleshoot)."""
    if not reason:
        return None
    return _ENTRIES.get(str(reason), _ENTRIES[Reason.OTHER])


def sections() -> list[dict[str, object]]:
    """One per documented section: its anchor, title and the reasons (with their hints) that point to it."""
    found: dict[str, dict[str, object]] = {}
    reasons: dict[str, list[tuple[str, str]]] = {}
    for reason, entry in [*_ENTRIES.items(), ("not signed on", NOT_SIGNED_ON)]:
        if entry.anchor not in found:
            reasons[entry.anchor] = []
            found[entry.anchor] = {"anchor": entry.anchor, "title": entry.title, "reasons": reasons[entry.anchor]}
        reasons[entry.anchor].append((str(reason), entry.hint))
    return list(found.values())
