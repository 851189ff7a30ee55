"""Host memory for CPU training: keep freed blocks in the process instead of handing them back to the kernel.

PyTorch's CPU allocator is plain ``malloc``. glibc serves every block above 32 MB (its largest mmap threshold) with a
fresh ``mmap`` and returns it with ``munmap`` on free, so each large activation of every step (the first Swin stage's
attention maps, full-resolution feature maps) is page-faulted and zeroed by the kernel afresh: on a 2-core machine
that was two thirds of a SwinUNETR step's time, and more of a GS-EMA step's, whose two student graphs, teacher pass
and three backward passes allocate more. :func:`retain_freed_memory` tells malloc to take every block from its heap
and never to trim it, so steps after the first reuse warm pages; the resident size then stays at the peak, as with
the CUDA caching allocator.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_applied = False


def retain_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from its heap and keep freed memory (no ``mmap``, no trimming), for
    this whole process. Returns True when applied (Linux with glibc), False elsewhere; calling it again is free."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl): leave its allocator alone
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 1 << 28))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    if _applied:
        log.debug("malloc keeps freed memory for reuse (no mmap for large blocks, no trimming)")
    return _applied
