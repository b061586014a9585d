"""Keep the byte path's chunk buffers in the agent's heap instead of handing them back to the kernel.

Every streamed chunk makes a few short-lived buffers of about 1 MiB: the ``bytes`` gRPC sends or hands
over, and gRPC's own slices. Left to its defaults, glibc's malloc returns such memory to the kernel as
soon as it is freed (an mmap'd block, or the top of a heap past its trim threshold), so the next chunk
faults in fresh pages, each zeroed by the kernel: on the VMs measured that cost more CPU than the copies
themselves (DESIGN.md, "Facts measured on these machines"). The agent is a program of its own, so it may
set the process's malloc policy: blocks under :data:`MMAP_THRESHOLD` come from the heap, and up to
:data:`TRIM_THRESHOLD` of free heap is kept for reuse. Shards themselves are larger and still get (and
give back) pages of their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Final

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_chunk_memory"]

log = logging.getLogger(__name__)

#: Allocations below this come from the heap: the most glibc's adaptive threshold (128 KiB at start) reaches.
MMAP_THRESHOLD: Final = 32 << 20
#: Free memory at the top of a heap kept before it is returned to the kernel (glibc's default: 128 KiB,
#: then twice the adaptive threshold).
TRIM_THRESHOLD: Final = 128 << 20

_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3


def keep_chunk_memory() -> bool:
    """Set this process's malloc thresholds for the byte path (glibc only); whether it could.

    Call it once, early, in a program of gpupool's own (never from library code in a user's process).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not done:
        log.debug("mallopt refused the byte path's thresholds; keeping malloc's defaults")
    return done
