"""The test suite's port allocator (tests/support/ports.py): safe under pytest-xdist."""

from __future__ import annotations

import socket

import pytest

from tests.support import ports


def test_workers_get_disjoint_slices_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_ephemeral_low", lambda: 32768)
    slices = [ports.port_slice(f"gw{i}", "4") for i in range(4)]
    for a, b in zip(slices, slices[1:], strict=False):
        assert a.stop <= b.start, (a, b)
    assert slices[0].start == ports.LOWEST_PORT and slices[-1].stop <= 32768
    assert ports.port_slice("", "") == range(ports.LOWEST_PORT, 32768)  # a serial run: everything


def test_a_kernel_with_no_room_below_its_ephemeral_range_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_ephemeral_low", lambda: 10200)
    with pytest.raises(RuntimeError, match="ip_local_port_range starts at 10200"):
        ports.port_slice("gw0", "3")


def test_free_ports_are_bindable_unique_and_in_this_workers_slice() -> None:
    taken = [ports.free_port() for _ in range(200)]
    assert len(set(taken)) == len(taken)
    own = ports.port_slice()
    assert all(port in own for port in taken)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", taken[-1]))


def test_a_bound_port_is_never_handed_out() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        busy = holder.getsockname()[1]
        cursor = ports._PortCursor()
        cursor._ports, cursor._next = range(busy, busy + 1), 0
        with pytest.raises(RuntimeError, match=f"no free TCP port on 127.0.0.1 in {busy}-{busy}"):
            cursor.take()
