"""Which implementations of the fused ops this machine can test.

The torch references run everywhere. The Triton kernels run where Triton imports: compiled on a CUDA device, and
under Triton's interpreter on the CPU (``conftest`` turns it on). Where Triton is absent (macOS, Windows, Linux on
Arm, or CI's Triton-free run), the tests of the kernels skip and everything else runs.
"""

from __future__ import annotations

import importlib
import os

import pytest


def _triton_imports() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


HAS_TRITON = _triton_imports()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
# Triton's interpreter runs a kernel's every program in Python: the kernels' cases then take half the quick tier's
# time, so there they are slow (the full suite runs them; on a CUDA device they are compiled, and quick).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_triton_cases = [needs_triton, *([pytest.mark.slow] if INTERPRETED else [])]
# A backend parameter: the "triton" case skips where Triton is absent.
BACKENDS = ["torch", pytest.param("triton", marks=_triton_cases)]


def runs_triton_kernels(test):
    """A test that runs the Triton kernels: skipped without Triton, slow where they are interpreted."""
    for mark in _triton_cases:
        test = mark(test)
    return test
