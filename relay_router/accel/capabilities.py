"""Which SOP classes and transfer syntaxes a destination device accepts: learned, cached, offered.

The near router answers the sending device's A-ASSOCIATE-RQ itself, so it must offer only what the
destination will take, or it would acknowledge instances that can never be delivered. The far router
learns it by negotiating with its device (`probe`: one presentation context per SOP class and transfer
syntax, in associations of 128 contexts, PS3.8 9.3.2.2), narrows it to the services the calling site
was granted, and sends it in a CAPABILITIES record (relay_router.accel.records). Both routers keep
what they learned in a `CapabilityCache` (in state_dir, so a restarted router can accept while the
far side is unreachable) and refresh it after `[accelerate] capability_refresh_s`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay_common.files import write_private
from relay_router import services

log = logging.getLogger("relay_router.accel")

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
# The transfer syntaxes probed: uncompressed, deflated and the common compressed ones (PS3.5 Annex A).
CANDIDATE_SYNTAXES = (
    EXPLICIT_LE,
    IMPLICIT_LE,
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR LE
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
MAX_CONTEXTS = 128  # presentation context IDs are odd numbers 1-255 (PS3.8 9.3.2.2)


class _NoContextIsNotAnError(logging.Filter):
    """pynetdicom logs a batch the device takes nothing of as an ERROR; for a capability probe (and for the
    delivery pool, which reports refused contexts itself) it is an answer, so it is logged at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage() == "No accepted presentation contexts":
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


logging.getLogger("pynetdicom.acse").addFilter(_NoContextIsNotAnError())


@dataclass(frozen=True)
class DeviceCapabilities:
    """SOP Class UID -> transfer syntaxes the device accepted for it, and when that was learned."""

    contexts: Mapping[str, tuple[str, ...]]
    learned: float  # time.time()

    def choose(self, sop_class: str, proposed: Sequence[str]) -> str | None:
        """The first proposed transfer syntax the device accepts for `sop_class` (None: reject the context)."""
        accepted = self.contexts.get(sop_class, ())
        return next((ts for ts in proposed if ts in accepted), None)

    def narrowed(self, groups: Iterable[str]) -> DeviceCapabilities:
        """Only the SOP classes of the service groups a site was granted (relay_router.services)."""
        chosen = tuple(groups)
        return DeviceCapabilities(
            {c: ts for c, ts in self.contexts.items() if services.granted(c, chosen)}, self.learned
        )


def probe(ae_title: str, host: str, port: int, *, calling_ae: str, timeout_s: float = 10.0) -> DeviceCapabilities:
    """Negotiate with the device every storage SOP class x candidate transfer syntax (blocking: run it in a
    thread). Raises OSError when the device cannot be reached or refuses every association."""
    from pynetdicom import AE, build_context  # here: the router imports pynetdicom's SCU only where it is used

    pairs = [(c, ts) for c in sorted(services.members(services.STORAGE)) for ts in CANDIDATE_SYNTAXES]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout_s
    accepted: dict[str, list[str]] = {}
    reached = False
    for start in range(0, len(pairs), MAX_CONTEXTS):
        batch = [build_context(c, ts) for c, ts in pairs[start : start + MAX_CONTEXTS]]
        started = time.monotonic()
        assoc = ae.associate(host, port, contexts=batch, ae_title=ae_title)
        if not assoc.is_established:
            # A batch with nothing the device takes fails at once (rejected, or no context accepted): go on. A
            # device that does not answer at all would cost the timeout once per batch: stop at the first.
            if time.monotonic() - started >= timeout_s / 2:
                break
            continue
        reached = True
        for context in assoc.accepted_contexts:
            accepted.setdefault(str(context.abstract_syntax), []).append(str(context.transfer_syntax[0]))
        assoc.release()
    if not reached:
        raise OSError(f"{ae_title} at {host}:{port} accepted no association for the capability probe")
    return DeviceCapabilities({c: tuple(dict.fromkeys(ts)) for c, ts in accepted.items()}, time.time())


class CapabilityCache:
    """Capabilities by name (a route's local AE title at the near router, a device at the far one), kept in
    one owner-only JSON file so that they survive a restart."""

    def __init__(self, path: Path, refresh_s: float) -> None:
        self.path = path
        self.refresh_s = refresh_s
        self._known: dict[str, DeviceCapabilities] = {}
        try:
            stored = json.loads(path.read_text())
            for name, item in stored.items():
                contexts = {str(c): tuple(str(t) for t in ts) for c, ts in item["contexts"].items()}
                self._known[str(name)] = DeviceCapabilities(contexts, float(item["learned"]))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring the capability cache %s (%s): they will be learned again", path, exc)

    def get(self, name: str) -> DeviceCapabilities | None:
        return self._known.get(name)

    def stale(self, name: str, now: float | None = None) -> bool:
        known = self._known.get(name)
        return known is None or (now if now is not None else time.time()) - known.learned > self.refresh_s

    def put(self, name: str, capabilities: DeviceCapabilities) -> None:
        self._known[name] = capabilities
        document = {n: {"contexts": dict(c.contexts), "learned": c.learned} for n, c in self._known.items()}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(self.path, json.dumps(document, sort_keys=True))
