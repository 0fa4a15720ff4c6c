"""Metrics of accelerated retrieval: held final C-MOVE responses (relay_router.accel.moves.MoveRegistry).

Read at scrape time from the running router's registry; zeros (every family present) on a router with no
accelerated `[[shared]]` device. No label names a move, a title or a patient: only how holds ended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from relay_common.metrics import SourcedCollector, register_sourced

if TYPE_CHECKING:
    from relay_router.accel.moves import MoveRegistry

__all__ = ["HOLD_ENDS", "MoveCollector", "register_move_metrics"]

HOLD_ENDS = ("confirmed", "timed_out", "transparent")


class MoveCollector(SourcedCollector["MoveRegistry"]):
    """relay_router_accel_move_* families, read from the registry when Prometheus scrapes."""

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        moves = self.source()
        yield GaugeMetricFamily(
            "relay_router_accel_moves_held",
            "C-MOVEs to an accelerated destination here whose final response is held (or will be) until "
            "their images are delivered",
            value=0 if moves is None else moves.in_flight(),
        )
        ends = CounterMetricFamily(
            "relay_router_accel_move_holds",
            "Final C-MOVE responses held here and released, by how the hold ended (confirmed: every "
            "sub-operation had its outcome at the destination; timed_out: move_hold_max_s ended it with some "
            "unconfirmed; transparent: the sub-operations went transparently, the archive's answer passed)",
            labels=["end"],
        )
        counts = (0, 0, 0) if moves is None else (moves.confirmed_total, moves.timed_out_total, moves.transparent_total)
        for end, count in zip(HOLD_ENDS, counts, strict=True):
            ends.add_metric([end], count)
        yield ends
        yield CounterMetricFamily(
            "relay_router_accel_move_subops_unconfirmed",
            "C-MOVE sub-operations reported failed in a final response because their delivery was not "
            "confirmed within move_hold_max_s (the images are still delivered afterwards)",
            value=0 if moves is None else moves.unconfirmed_total,
        )


def register_move_metrics(registry: CollectorRegistry, moves: Callable[[], MoveRegistry | None]) -> None:
    """RouterMetrics registers the families at once; they read the running router's registry at each scrape."""
    register_sourced(registry, MoveCollector, moves)
