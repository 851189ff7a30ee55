"""Helpers shared by the benchmarks: the device, a measured copy bandwidth, and extra_info bookkeeping."""

from __future__ import annotations

import functools
import time

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def timed(fn, *, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of ``fn()`` (device events on CUDA, the host clock on the CPU)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


@functools.cache
def copy_gbps(nbytes: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written) for a tensor of ``nbytes``, measured now.

    Bandwidth targets compare an op with a copy of the same number of bytes in the same run: small transfers never
    reach the figure of a 1 GiB copy.
    """
    n = max(nbytes // 8, 1)  # a copy of n floats reads and writes 8n bytes
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), iters=20)
    return 2 * n * 4 / ms / 1e6


def record(benchmark, *, nbytes: int, ms: float | None = None, **extra) -> None:
    """Store achieved GB/s and its fraction of the measured copy bandwidth for the same bytes in extra_info."""
    if ms is None:
        stats = getattr(benchmark, "stats", None)
        ms = stats.stats.median * 1e3 if stats is not None and stats.stats.rounds else None
    info = benchmark.extra_info
    info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    info.update(extra)
    if ms:
        gbps = nbytes / ms / 1e6
        info["ms"] = round(ms, 4)
        info["GBps"] = round(gbps, 1)
        info["copy_GBps_same_bytes"] = round(copy_gbps(nbytes), 1)
        info["fraction_of_copy"] = round(gbps / info["copy_GBps_same_bytes"], 3)
