"""relay_common.allocator: glibc malloc thresholds for frame-sized buffers."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from relay_common.allocator import keep_frame_buffers, operator_chose


def test_the_operators_malloc_settings_win() -> None:
    assert operator_chose({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"})
    assert operator_chose({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert not operator_chose({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert operator_chose({"DICOM_RELAY_MALLOC": "system"})
    assert not operator_chose({})
    assert keep_frame_buffers({"MALLOC_MMAP_THRESHOLD_": "131072"}) is False


PROBE = """
import ctypes, sys
from relay_common.allocator import keep_frame_buffers
print(keep_frame_buffers({"DICOM_RELAY_MALLOC": sys.argv[1]}))
buffer = bytearray(20 << 20)
address = ctypes.addressof((ctypes.c_char * 1).from_buffer(buffer))
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        print(start <= address < end)
        break
else:
    print(False)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt exists only in glibc")
@pytest.mark.parametrize(("mode", "tuned"), [("relay", True), ("system", False)])
def test_a_large_buffer_comes_from_the_heap_once_tuned(mode: str, tuned: bool) -> None:
    # In a fresh interpreter (this test process keeps glibc's defaults): with them, a 20 MiB buffer
    # is a mapping of its own, unmapped again when freed; with the thresholds raised it is carved
    # from the heap and reused.
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=dict(os.environ)
    )
    done, in_heap = out.stdout.split()
    assert (done, in_heap) == (str(tuned), str(tuned))
