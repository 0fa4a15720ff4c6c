"""Feature agreement between the two routers of one association, decided in one place.

The initiator offers feature names in `Open.features`; the responder answers with the ones it
accepts in `Confirm.features`; each side then uses only what both said. A name the other side
does not know is ignored, so older and newer routers interoperate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

COMPRESSION = "zstd"  # frames compressed with zstd when it pays (relay_router.compress)
SHUFFLE = "zstd-shuffle2"  # ... after byte-plane shuffling when that compresses better; needs COMPRESSION
SPILL = "spill/2"  # pipelined blobs (PARTS notices); a router that offers the older "spill" gets inline frames
PACE = "pace"  # frames sized to the path, from the receiver's rate reports (relay_router.pace)
# The payload is an accelerated record stream (relay_router.accel.records), not Upper Layer PDUs. Offered only
# by a router opening an accelerated transfer, answered only for a [[shared]] device with accelerate = true.
ACCEL = "accel1"


@dataclass(frozen=True)
class Features:
    """What one association uses (or, for `offer`, what a router is willing to use)."""

    compress: bool = False
    shuffle: bool = False
    spill: bool = False
    pace: bool = False
    accel: bool = False

    @classmethod
    def offer(cls, *, compression: bool, spill: bool = True, accel: bool = False) -> Features:
        """What this router offers as initiator: everything, compression and spill only if configured.

        `spill` is `[dicom] spill`: a router that cannot reach the blob store says so here (and in
        `answer`), so its peers send it everything inline instead of blobs it could not fetch.
        """
        return cls(compress=compression, shuffle=compression, spill=spill, pace=True, accel=accel)

    @classmethod
    def parse(cls, names: Iterable[str]) -> Features:
        """The features named in an Open or a Confirm (unknown names ignored; shuffle only with compression)."""
        given = set(names)
        compress = COMPRESSION in given
        return cls(
            compress=compress,
            shuffle=compress and SHUFFLE in given,
            spill=SPILL in given,
            pace=PACE in given,
            accel=ACCEL in given,
        )

    def names(self) -> list[str]:
        """The feature names, in the order routers have always sent them."""
        pairs = (
            (self.compress, COMPRESSION),
            (self.shuffle, SHUFFLE),
            (self.spill, SPILL),
            (self.pace, PACE),
            (self.accel, ACCEL),
        )
        return [name for wanted, name in pairs if wanted]

    def __and__(self, other: Features) -> Features:
        compress = self.compress and other.compress
        return Features(
            compress=compress,
            shuffle=compress and self.shuffle and other.shuffle,
            spill=self.spill and other.spill,
            pace=self.pace and other.pace,
            accel=self.accel and other.accel,
        )

    @classmethod
    def answer(cls, offered: Iterable[str], *, compression: bool, spill: bool = True, accel: bool = False) -> Features:
        """The responder's decision: what the initiator offered and this router accepts.

        `accel`: the called device takes accelerated transfers (`accelerate = true` on its [[shared]] entry).
        """
        return cls.parse(offered) & cls.offer(compression=compression, spill=spill, accel=accel)

    @classmethod
    def agreed(cls, offered: Features, answered: Iterable[str]) -> Features:
        """The initiator's view once the Confirm arrives: what it offered and the responder accepted."""
        return offered & cls.parse(answered)
