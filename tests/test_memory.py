"""CPU memory retention: after one step's worth of large blocks, the next reuses warm pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SECOND_ROUND_FAULTS = """
import resource, sys
import torch
from gsema_fast.memory import retain_freed_memory

if sys.argv[1] == "on":
    assert retain_freed_memory()
for size in (16 << 20, 12 << 20):  # 64 MB, then 48 MB, each written and freed: activations of a step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(size)
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_round_faults(mode: str) -> int:
    job = subprocess.run([sys.executable, "-c", SECOND_ROUND_FAULTS, mode], capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    return int(job.stdout.split()[-1])


# Decided without calling retain_freed_memory here: it would change malloc for the whole test session.
@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs Linux with glibc")
def test_freed_blocks_are_reused_without_page_faults():
    off, on = second_round_faults("off"), second_round_faults("on")
    assert on * 10 < off, (on, off)  # off: the kernel maps and zeroes every page of the second block afresh


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo, as the function does on Linux")
def test_available_memory_is_what_the_system_reports_at_most():
    from gsema_fast.memory import available_memory

    available = available_memory()
    assert isinstance(available, int) and available > 0
    with open("/proc/meminfo") as handle:
        total = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemTotal:"))
    assert available <= total
