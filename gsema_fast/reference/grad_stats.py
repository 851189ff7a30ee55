"""Gradient-agreement statistics of two gradient lists in plain torch: the CPU path and the kernel's reference.

For the flattened concatenations ``a`` and ``b`` of the two lists, ``[a.b, |a|^2, |b|^2, sum sign(a) sign(b),
#(a != 0), #(b != 0)]`` (see ``gsema_fast.kernels.grad_stats`` for the maths and how GS-EMA reads it), and with
``accumulate_into_a`` the update ``a += b`` in the same pass over each piece.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NUM_STATS = 6
STATS_DTYPE = torch.float64  # exact counts up to 2**53 elements; six numbers, so the width costs nothing

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
