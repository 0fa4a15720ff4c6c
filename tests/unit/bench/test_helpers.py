"""Helpers of the benchmarks: CPU accounting from /proc, py-spy stack attribution, bridge log parsing."""

from __future__ import annotations

import os
import time

from benchmarks.common import CpuMeter, cpu_seconds
from benchmarks.loopback import frame_sizes
from benchmarks.profile import OTHER, breakdown, busy, centre_of, parse_collapsed, top_python


def test_cpu_seconds_counts_work_done_by_this_process() -> None:
    meter = CpuMeter({"me": os.getpid()})
    meter.start()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    used = meter.stop()["me"]
    # Clock ticks are 10 ms; the loop burned 0.3 s of CPU.
    assert 0.25 <= used <= 1.0
    assert cpu_seconds(os.getpid()) >= used


MAIN = "main (relay_router/cli.py:1);_pump_local (relay_router/association.py:300)"
FEED = "PduFramer.feed (relay_router/ul/framer.py:200)"
RAW = "\n".join(
    [
        f"{MAIN};FrameSealer.seal (relay_router/seal.py:219);ossl_aes_gcm_encrypt_avx512 (_rust.abi3.so) 30",
        f"{MAIN};{FEED} 10",
        f"{MAIN};{FEED};__memmove_avx512_unaligned_erms (libc.so.6) 5",
        "main (cli.py:1);EpollSelector.select (selectors.py:468);select_epoll_poll (x.c:1);epoll_wait (libc.so.6) 1000",
        "worker;0x7f00 (libc.so.6) 3",
    ]
)


def test_samples_go_to_the_innermost_matching_cost_centre_and_waits_are_left_out() -> None:
    stacks = busy(parse_collapsed(RAW))
    assert sum(n for _, n in stacks) == 48  # the 1000 samples waiting in epoll_wait are not work
    centres, total = breakdown(stacks)
    assert total == 48
    assert centres["AES-GCM (cryptography)"] == 30
    assert centres["UL framer/connection (relay_router/ul)"] == 10
    assert centres["copies (memcpy/memmove)"] == 5  # the memmove, not the framer that called it
    assert centres[OTHER] == 3
    assert centre_of(["x (relay_bridge/splice.py:129)"]).startswith("relay driver")


def test_top_python_ranks_the_innermost_python_frame() -> None:
    stacks = busy(parse_collapsed(RAW))
    top = dict(top_python(stacks, inclusive=False))
    assert top["FrameSealer.seal (relay_router/seal.py:219)"] == 30
    assert top["PduFramer.feed (relay_router/ul/framer.py:200)"] == 15


def test_frame_sizes_from_the_bridge_log_by_sending_site() -> None:
    log = (
        "old line association closed: 1 bytes from site-x, 1 bytes from site-b, 1 frames\n"
        "... association closed: 1000 bytes from site-a, 200 bytes from site-b, 4 frames, 0.1 s\n"
        "... association closed: 3000 bytes from site-a, 0 bytes from site-b, 8 frames, 0.1 s\n"
    )
    since = log.index("\n") + 1
    assert frame_sizes(log, since) == {"site-a": (1200 + 3000) / 12}
