"""Host memory: how much is available (:func:`available_memory`), and, for CPU training, keeping freed blocks in the
process instead of handing them back to the kernel.

PyTorch's CPU allocator is plain ``malloc``. glibc serves every block above 32 MB (its largest mmap threshold) with a
fresh ``mmap`` and returns it with ``munmap`` on free, so each large activation of every step (the first Swin stage's
attention maps, full-resolution feature maps) is page-faulted and zeroed by the kernel afresh: on a 2-core machine
that was two thirds of a SwinUNETR step's time, and more of a GS-EMA step's, whose two student graphs, teacher pass
and three backward passes allocate more. :func:`retain_freed_memory` tells malloc to take every block from its heap
and never to trim it, so steps after the first reuse warm pages; the resident size then stays at the peak, as with
the CUDA caching allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from pathlib import Path

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


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def available_memory() -> int | None:
    """Bytes of memory this process can still allocate: the system's available memory (``MemAvailable``), or less
    where a cgroup (a container's limit) leaves less. None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not found and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None:
            found.append(max(limit - usage, 0))
    return min(found) if found else None
