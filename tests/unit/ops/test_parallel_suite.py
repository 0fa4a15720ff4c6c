"""The suite under pytest-xdist: the port allocator (tests/support/ports.py), the scheduling (tests/conftest.py)."""

from __future__ import annotations

import socket

import pytest

from tests import conftest
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


def test_the_release_builds_are_one_unit_and_other_files_their_own() -> None:
    release = conftest.work_unit("tests/integration/test_release.py::test_wheel_installs_offline")
    assert conftest.work_unit("tests/integration/test_container.py::test_bridge_container_relays") == release
    assert conftest.work_unit("tests/unit/ul/test_pdu.py::test_x[1]") == "tests/unit/ul/test_pdu.py"


def test_units_start_slowest_first_then_integration_then_unit_files() -> None:
    units = ["tests/unit/ul/test_pdu.py", "tests/integration/test_ops.py", "release-build"]
    assert sorted(units, key=conftest.unit_rank) == ["release-build", "tests/integration/test_ops.py", units[0]]
