"""Triton kernels, one fused op per module; installed as ``gsema_fast.kernels``.

Each module holds the ``@triton.jit`` kernels, a launcher that validates its inputs, the list of the kernel variants
that launcher can produce, and one public function; the torch references live in ``gsema_fast.reference``. Importing
this package needs Triton: ``gsema_fast.ops`` imports it only when a kernel is launched.
"""

from __future__ import annotations

from gsema_fast.kernels import bacl, fused_ema, grad_stats, gsema_update
from gsema_fast.kernels._multi_tensor import COMPILED_LAYOUT, INTERPRETED, Layout
from gsema_fast.kernels._variants import Variant, join

__all__ = ["INTERPRETED", "bacl", "fused_ema", "grad_stats", "gsema_update", "variants"]


def variants(layout: Layout = COMPILED_LAYOUT) -> list[Variant]:
    """Every kernel variant the launchers can produce with the multi-tensor ``layout`` (by default the one a GPU runs):
    the list the compile gate compiles."""
    return join(
        grad_stats.variants(layout),
        gsema_update.variants(layout),
        fused_ema.variants(layout),
        bacl.variants(),
    )
