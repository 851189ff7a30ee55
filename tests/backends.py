"""Which implementations of the fused ops this machine can test.

The torch references run everywhere. The Triton kernels run where Triton imports: compiled on a CUDA device, and
under Triton's interpreter on the CPU (``conftest`` turns it on). Where Triton is absent (macOS, Windows, Linux on
Arm, or CI's Triton-free run), the tests of the kernels skip and everything else runs.
"""

from __future__ import annotations

import importlib

import pytest


def _triton_imports() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


HAS_TRITON = _triton_imports()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
# A backend parameter: the "triton" case skips where Triton is absent.
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
