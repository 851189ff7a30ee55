r"""Gradient-agreement statistics of two gradient lists in one pass, optionally accumulating one into the other.

For the flattened concatenations :math:`a = \mathrm{cat}_i\, a_i` and :math:`b = \mathrm{cat}_i\, b_i`:

.. math::

    s = \big[\, a\cdot b,\; \lVert a\rVert^2,\; \lVert b\rVert^2,\; \textstyle\sum_j \operatorname{sign}(a_j)
        \operatorname{sign}(b_j),\; \#\{a_j \neq 0\},\; \#\{b_j \neq 0\} \,\big] \in \mathbb{R}^6

GS-EMA's decision reads it on the device: the gradients agree when :math:`s_0 > 0` (angle below 90 degrees) or, with
the public code's rule, when the cosine of the sign vectors is positive, i.e. :math:`s_3 > 0`. The cosine itself is
:math:`s_0 / (\sqrt{s_1} \sqrt{s_2})`. With ``accumulate_into_a`` the same pass stores :math:`a_i \leftarrow a_i + b_i`
(the statistics are of the values before the addition), which turns two separate backward passes into one summed
gradient without another read of either list.

Each program reduces one chunk of one tensor in fp32 and writes its 6 partial sums to its own row; a second,
single-program kernel adds the rows in a fixed order in fp64 and stores them in fp64. No atomics: the same inputs give
the same bits. A chunk's counts are integers below 2**24, exact in fp32; their fp64 total is exact up to 2**53, so the
sign agreement and the non-zero counts are exact integers for any model (fp32 would round them above 2**24, 16.7M
elements).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gsema_fast.kernels._multi_tensor import DTYPE_CODES, FP64, LAYOUT, Layout, Plan, as_pointer, plan_pairs
from gsema_fast.kernels._variants import Variant
from gsema_fast.reference.device import device_guard
from gsema_fast.reference.grad_stats import NUM_STATS, STATS_DTYPE
from gsema_fast.reference.multi_tensor import check_pairs

_PARTIAL_STRIDE = 8  # partial rows padded to a power of two for the 2-D load of the final reduction
_SUM_ROWS = 64  # partial rows read per step of the final reduction
_SUM_WARPS = 4


@triton.jit
def _chunk_stats(
    a,  # pointer to the chunk's first element of a
    b,  # pointer to the chunk's first element of b
    offsets,  # element offsets within the chunk
    length,  # elements in the chunk
    acc_dot,  # fp32 [BLOCK] running sum of a*b
    acc_aa,  # fp32 [BLOCK] running sum of a*a
    acc_bb,  # fp32 [BLOCK] running sum of b*b
    acc_sign,  # fp32 [BLOCK] running sum of sign(a)*sign(b)
    acc_nza,  # fp32 [BLOCK] running count of a != 0
    acc_nzb,  # fp32 [BLOCK] running count of b != 0
    ACCUMULATE: tl.constexpr,  # also store a + b into a
    MASKED: tl.constexpr,  # the chunk is shorter than CHUNK
):
    if MASKED:
        mask = offsets < length
        x = tl.load(a + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(b + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(a + offsets).to(tl.float32)
        y = tl.load(b + offsets).to(tl.float32)
    acc_dot += tl.sum(x * y, axis=1)
    acc_aa += tl.sum(x * x, axis=1)
    acc_bb += tl.sum(y * y, axis=1)
    # Signs are compared directly: the sign of x*y would be lost when the product underflows to zero.
    sign_x = (x > 0).to(tl.float32) - (x < 0).to(tl.float32)
    sign_y = (y > 0).to(tl.float32) - (y < 0).to(tl.float32)
    acc_sign += tl.sum(sign_x * sign_y, axis=1)
    acc_nza += tl.sum((x != 0).to(tl.float32), axis=1)
    acc_nzb += tl.sum((y != 0).to(tl.float32), axis=1)
    if ACCUMULATE:
        if MASKED:
            tl.store(a + offsets, (x + y).to(a.dtype.element_ty), mask=mask)
        else:
            tl.store(a + offsets, (x + y).to(a.dtype.element_ty))
    return acc_dot, acc_aa, acc_bb, acc_sign, acc_nza, acc_nzb


@triton.jit(do_not_specialize=["num_chunks"], do_not_specialize_on_alignment=["table", "partials"])
def _grad_stats_kernel(
    table,  # int64 [3, num_chunks]: chunk address in a, chunk address in b, chunk length
    num_chunks,  # row stride of the table
    partials,  # fp32 [total_chunks, 8]: this group's rows start here
    A_CODE: tl.constexpr,  # element type of a (DTYPE_CODES)
    B_CODE: tl.constexpr,  # element type of b
    ALIGNED: tl.constexpr,  # chunk addresses are 16-byte aligned
    ACCUMULATE: tl.constexpr,  # store a + b into a
    BLOCK: tl.constexpr,  # elements per iteration
    ITERS: tl.constexpr,  # iterations per chunk (CHUNK = BLOCK * ITERS)
):
    chunk = tl.program_id(0)
    a = as_pointer(tl.load(table + chunk), A_CODE, ALIGNED)
    b = as_pointer(tl.load(table + num_chunks + chunk), B_CODE, ALIGNED)
    length = tl.load(table + 2 * num_chunks + chunk)
    acc_dot = tl.zeros([BLOCK // 8], dtype=tl.float32)
    acc_aa = tl.zeros([BLOCK // 8], dtype=tl.float32)
    acc_bb = tl.zeros([BLOCK // 8], dtype=tl.float32)
    acc_sign = tl.zeros([BLOCK // 8], dtype=tl.float32)
    acc_nza = tl.zeros([BLOCK // 8], dtype=tl.float32)
    acc_nzb = tl.zeros([BLOCK // 8], dtype=tl.float32)
    offsets = tl.arange(0, BLOCK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
    if length == BLOCK * ITERS:
        # Full chunks (all but a tensor's last) go unmasked so the loads vectorise.
        for i in range(ITERS):
            acc_dot, acc_aa, acc_bb, acc_sign, acc_nza, acc_nzb = _chunk_stats(
                a,
                b,
                i * BLOCK + offsets,
                length,
                acc_dot,
                acc_aa,
                acc_bb,
                acc_sign,
                acc_nza,
                acc_nzb,
                ACCUMULATE,
                False,
            )
    else:
        for i in range(ITERS):
            acc_dot, acc_aa, acc_bb, acc_sign, acc_nza, acc_nzb = _chunk_stats(
                a, b, i * BLOCK + offsets, length, acc_dot, acc_aa, acc_bb, acc_sign, acc_nza, acc_nzb, ACCUMULATE, True
            )
    row = partials + chunk * 8
    tl.store(row + 0, tl.sum(acc_dot, axis=0))
    tl.store(row + 1, tl.sum(acc_aa, axis=0))
    tl.store(row + 2, tl.sum(acc_bb, axis=0))
    tl.store(row + 3, tl.sum(acc_sign, axis=0))
    tl.store(row + 4, tl.sum(acc_nza, axis=0))
    tl.store(row + 5, tl.sum(acc_nzb, axis=0))
    # The final reduction loads whole rows of 8: its two padding columns must hold zeros, not stale memory.
    tl.store(row + 6, 0.0)
    tl.store(row + 7, 0.0)


@triton.jit(do_not_specialize=["num_rows"], do_not_specialize_on_alignment=["partials", "out"])
def _sum_rows_kernel(
    partials,  # fp32 [num_rows, 8] per-chunk sums
    num_rows,  # number of rows to add
    out,  # fp64 [6] result
    ROWS: tl.constexpr,  # rows read per iteration
):
    # One program in a fixed order, fp64: deterministic, and counts stay exact beyond 2**24.
    cols = tl.arange(0, 8)
    acc = tl.zeros([ROWS, 8], dtype=tl.float64)
    for first in range(0, num_rows, ROWS):
        rows = first + tl.arange(0, ROWS)
        acc += tl.load(partials + rows[:, None] * 8 + cols[None, :], mask=rows[:, None] < num_rows, other=0.0).to(
            tl.float64
        )
    total = tl.sum(acc, axis=0)
    tl.store(out + cols, total, mask=cols < 6)


def _warps(aligned: bool, wide: bool, layout: Layout) -> int:
    """Twice the layout's warps, so half the elements per thread, where 16-byte loads (aligned, not fp64) would not
    keep a thread within 64 registers, the most that still gives sm_90 half its threads (65536 / 1024)."""
    return layout.num_warps if aligned and not wide else 2 * layout.num_warps


@functools.cache
def stats_variant(a_code: int, b_code: int, aligned: bool, accumulate: bool, layout: Layout) -> Variant:
    """The variant of ``_grad_stats_kernel`` for one dtype pair."""
    return Variant(
        _grad_stats_kernel,
        args=(("table", "*i64"), ("num_chunks", "i32"), ("partials", "*fp32")),
        constexprs=(
            ("A_CODE", a_code),
            ("B_CODE", b_code),
            ("ALIGNED", aligned),
            ("ACCUMULATE", accumulate),
            ("BLOCK", layout.block),
            ("ITERS", layout.iters),
        ),
        num_warps=_warps(aligned, FP64 in (a_code, b_code), layout),
    )


# One program over the per-chunk rows, not a chunk of the tensors: its shape is its own.
SUM_ROWS_VARIANT = Variant(
    _sum_rows_kernel,
    args=(("partials", "*fp32"), ("num_rows", "i32"), ("out", "*fp64")),
    constexprs=(("ROWS", _SUM_ROWS),),
    num_warps=_SUM_WARPS,
)


def variants(layout: Layout) -> list[Variant]:
    """Every variant the launcher can produce under ``layout``: any two of the four float types."""
    codes = sorted(DTYPE_CODES.values())
    stats = [
        stats_variant(a, b, aligned, accumulate, layout)
        for a in codes
        for b in codes
        for aligned in (False, True)
        for accumulate in (False, True)
    ]
    return [*stats, SUM_ROWS_VARIANT]


def grad_stats(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, accumulate_into_a: bool = False
) -> torch.Tensor:
    """``[a.b, |a|^2, |b|^2, sum sign(a)sign(b), #a!=0, #b!=0]`` (float64, on a's device) in one fused pass.

    ``a``, ``b``: equal-length lists of floating tensors of matching shapes (dtypes may differ, pairs may be empty).
    With ``accumulate_into_a`` the kernel also stores ``a[i] += b[i]``. Launches one kernel per distinct
    ``(a.dtype, b.dtype)`` pair plus one final reduction, whatever the number of tensors; never synchronises.
    """
    check_pairs(a, b, "a", "b")
    device = a[0].device
    with device_guard(device):
        plan = plan_pairs(a, b, LAYOUT.chunk)
        out = torch.empty(NUM_STATS, dtype=STATS_DTYPE, device=device)
        if plan.num_chunks == 0:
            return out.zero_()
        partials = torch.empty((plan.num_chunks, _PARTIAL_STRIDE), dtype=torch.float32, device=device)
        _launch_chunks(plan, partials, bool(accumulate_into_a))
        SUM_ROWS_VARIANT.launch((1,), partials, plan.num_chunks, out)
    return out


def _launch_chunks(plan: Plan, partials: torch.Tensor, accumulate: bool) -> None:
    """Each chunk's six sums into its row of ``partials`` (padded to 8 columns): one launch per dtype pair."""
    for group in plan.groups:
        variant = stats_variant(group.x_code, group.y_code, group.aligned, accumulate, LAYOUT)
        variant.launch((group.num_chunks,), group.table, group.num_chunks, partials[group.first_chunk :])
