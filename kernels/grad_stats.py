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

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gsema_fast.kernels._multi_tensor import (
    BLOCK,
    CHUNK,
    ITERS,
    NUM_WARPS,
    as_pointer,
    check_pairs,
    device_guard,
    plan_pairs,
)

NUM_STATS = 6
STATS_DTYPE = torch.float64  # exact counts (see above); six numbers, so the width costs nothing
_PARTIAL_STRIDE = 8  # partial rows padded to a power of two for the 2-D load of the final reduction


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
    acc_dot += x * y
    acc_aa += x * x
    acc_bb += y * y
    # Signs are compared directly: the sign of x*y would be lost when the product underflows to zero.
    sign_x = (x > 0).to(tl.float32) - (x < 0).to(tl.float32)
    sign_y = (y > 0).to(tl.float32) - (y < 0).to(tl.float32)
    acc_sign += sign_x * sign_y
    acc_nza += (x != 0).to(tl.float32)
    acc_nzb += (y != 0).to(tl.float32)
    if ACCUMULATE:
        if MASKED:
            tl.store(a + offsets, (x + y).to(a.dtype.element_ty), mask=mask)
        else:
            tl.store(a + offsets, (x + y).to(a.dtype.element_ty))
    return acc_dot, acc_aa, acc_bb, acc_sign, acc_nza, acc_nzb


@triton.jit
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
    acc_dot = tl.zeros([BLOCK], dtype=tl.float32)
    acc_aa = tl.zeros([BLOCK], dtype=tl.float32)
    acc_bb = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sign = tl.zeros([BLOCK], dtype=tl.float32)
    acc_nza = tl.zeros([BLOCK], dtype=tl.float32)
    acc_nzb = tl.zeros([BLOCK], dtype=tl.float32)
    offsets = tl.arange(0, BLOCK)
    if length == BLOCK * ITERS:
        # Full chunks (all but a tensor's last) go unmasked so the loads vectorise.
        for i in tl.static_range(ITERS):
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
        for i in tl.static_range(ITERS):
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


@triton.jit
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


CPU_CHUNK = 1 << 16  # elements per piece on the CPU path: two fp32 pieces stay in a core's L2 across the reductions


def _piece_stats(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, signs: torch.Tensor) -> None:
    """The six statistics of one piece into ``out`` (a row), with ten BLAS-speed ops and no allocation.

    ``sign(a) . sign(b)`` is the sign agreement; the non-zeros are counted as the sum of ``a != 0`` (stored as 0/1
    floats), which counts a NaN as the kernel does: ``sign(NaN)`` is 0 in torch, so ``sign(a) . sign(a)`` would not.
    """
    wide = out.dtype
    x, y = x.to(wide), y.to(wide)
    sign_x, sign_y, nonzero = signs[0, : x.numel()], signs[1, : x.numel()], signs[2, : x.numel()]
    torch.sign(x, out=sign_x)
    torch.sign(y, out=sign_y)
    for column, (u, v) in enumerate(((x, y), (x, x), (y, y), (sign_x, sign_y))):
        torch.dot(u, v, out=out[column])
    for column, u in ((4, x), (5, y)):
        torch.ne(u, 0, out=nonzero)
        torch.sum(nonzero, dim=0, out=out[column])


def grad_stats_reference(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, accumulate_into_a: bool = False
) -> torch.Tensor:
    """The torch reference (and CPU path): the same statistics, piece by piece so each piece is read from cache.

    Large tensors are cut into views of ``CPU_CHUNK`` elements; the many small ones (biases, norms) are gathered into
    pieces of at most ``CPU_CHUNK`` elements, since per-op overhead and not memory dominates them. Per-piece sums are
    fp32 (fp64 when an input is float64), so a piece's counts (below 2**24) are exact; their total is fp64, exact, and
    deterministic like the kernel. Returns ``STATS_DTYPE``.
    """
    device = a[0].device
    wide = torch.float64 if any(t.dtype == torch.float64 for t in (*a, *b)) else torch.float32
    large = [(x.view(-1), y.view(-1)) for x, y in zip(a, b, strict=True) if x.numel() >= CPU_CHUNK]
    small_groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    filled = CPU_CHUNK
    for x, y in zip(a, b, strict=True):
        if 0 < x.numel() < CPU_CHUNK:
            if filled + x.numel() > CPU_CHUNK:
                small_groups.append([])
                filled = 0
            small_groups[-1].append((x, y))
            filled += x.numel()
    num_pieces = sum(-(-x.numel() // CPU_CHUNK) for x, _ in large) + len(small_groups)
    if not num_pieces:
        return torch.zeros(NUM_STATS, dtype=STATS_DTYPE, device=device)
    rows = torch.empty((num_pieces, NUM_STATS), dtype=wide, device=device)
    signs = torch.empty((3, CPU_CHUNK), dtype=wide, device=device)
    piece = 0
    for flat_x, flat_y in large:
        for start in range(0, flat_x.numel(), CPU_CHUNK):
            piece_x, piece_y = flat_x[start : start + CPU_CHUNK], flat_y[start : start + CPU_CHUNK]
            _piece_stats(piece_x, piece_y, rows[piece], signs)
            piece += 1
            if accumulate_into_a:
                piece_x.add_(piece_y)  # while the piece is still in cache
    for group in small_groups:
        gathered_x = torch.cat([x.reshape(-1).to(wide) for x, _ in group])
        gathered_y = torch.cat([y.reshape(-1).to(wide) for _, y in group])
        _piece_stats(gathered_x, gathered_y, rows[piece], signs)
        piece += 1
        if accumulate_into_a:
            for x, y in group:
                x.add_(y)
    return rows.to(STATS_DTYPE).sum(0)


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
        plan = plan_pairs(a, b, CHUNK)
        out = torch.empty(NUM_STATS, dtype=STATS_DTYPE, device=device)
        if plan.num_chunks == 0:
            return out.zero_()
        partials = torch.empty((plan.num_chunks, _PARTIAL_STRIDE), dtype=torch.float32, device=device)
        for group in plan.groups:
            _grad_stats_kernel[(group.num_chunks,)](
                group.table,
                group.num_chunks,
                partials[group.first_chunk :],
                A_CODE=group.x_code,
                B_CODE=group.y_code,
                ALIGNED=group.aligned,
                ACCUMULATE=accumulate_into_a,
                BLOCK=BLOCK,
                ITERS=ITERS,
                num_warps=NUM_WARPS,
            )
        # One program over the per-chunk rows, not a chunk of the tensors: its shape is its own.
        _sum_rows_kernel[(1,)](partials, plan.num_chunks, out, ROWS=64, num_warps=4)
    return out
