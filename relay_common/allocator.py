"""Keep glibc's malloc from handing every frame buffer back to the kernel.

The relay moves data in buffers of 64 KiB to 4 MiB (frames, gRPC messages, sealed payloads).
glibc serves requests above its mmap threshold (128 KiB at start, raised dynamically only
after such a block is freed) with a fresh `mmap` and returns them with `munmap`, and it trims
the top of a heap whenever more than twice that is free. Every frame then costs page faults,
zeroed pages and, in a process with several threads (gRPC's pollers), a TLB shootdown on
every CPU that runs one of them. Measured on loopback (docs/benchmarks.md, "Where the CPU
goes"): the same relay with the thresholds below used 11-12 instead of 14 CPU s/GB over
router A, the bridge and router B, and moved 22% instead of 13-18% of direct throughput.

The price is memory: up to `TRIM_THRESHOLD` of freed heap may stay mapped per heap instead of
going back to the system. Operators who set glibc's malloc tunables themselves
(`GLIBC_TUNABLES=glibc.malloc...` or the older `MALLOC_*_` variables) keep their settings, and
`DICOM_RELAY_MALLOC=system` leaves glibc's defaults alone. Careful with the tunables: fixing any
of the thresholds turns glibc's dynamic threshold off, and a fixed 128 KiB mmap threshold made
router A cost 12 instead of 4-7 CPU s/GB on loopback.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("relay_common.allocator")

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Above the largest buffer the relay makes (gRPC messages are capped at 20 MiB), so buffers come
# from the heap and are reused; freed heap is returned once more than TRIM_THRESHOLD sits on top.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
OPT_OUT = "DICOM_RELAY_MALLOC"  # "system": keep glibc's defaults


def operator_chose(environ: dict[str, str] | os._Environ[str]) -> bool:
    """True when the environment tunes glibc's malloc or opts out (then it is left alone)."""
    return (
        environ.get(OPT_OUT) == "system"
        or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
        or any(v in environ for v in OPERATOR_VARIABLES)
    )


def keep_frame_buffers(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False if not done (not glibc, or tuned)."""
    if operator_chose(environ):
        log.debug("malloc tunables come from the environment; left as they are")
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting the mmap threshold also stops its dynamic adjustment.
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.warning("could not raise glibc's malloc thresholds; frame buffers will be mapped and unmapped")
    return done
