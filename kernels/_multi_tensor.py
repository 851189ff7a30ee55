"""Multi-tensor launch tables and the chunk layout shared by the GS-EMA kernels.

A list of tensor pairs ``(x_i, y_i)`` is cut into chunks of ``chunk`` elements (``LAYOUT.chunk`` for every kernel) that
never straddle two tensors. Each chunk is one program of a single launch and is described by one column of an int64
table::

    table[0, c] = address of the chunk's first element in x      (bytes)
    table[1, c] = address of the chunk's first element in y      (bytes)
    table[2, c] = number of elements in the chunk                (chunk, or fewer for a tensor's last chunk)

Pairs are grouped by their ``(x.dtype, y.dtype)`` and whether both start on a 16-byte boundary, so that each group is
one launch with the element types and the load width known at compile time: a model's parameter list is one group, a
mixed fp32/bf16 list a few; never one launch per tensor.

Building a table reads every tensor's ``data_ptr()`` and copies a small table to the device, so tables are cached by
the addresses, shapes and dtypes of the pairs: a training loop whose parameters and gradient buffers stay in place
builds its tables once, and later calls launch with no host-to-device traffic (and can be captured in a CUDA graph).

Tables are device state that launches read, so they are cached in a
:class:`~gsema_fast.reference.device.GraphSafeCache` (built outside a CUDA-graph capture, pinned by one).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gsema_fast.reference.device import GraphSafeCache
from gsema_fast.reference.multi_tensor import FLOAT_DTYPES

# Read once at import, as Triton reads it when the kernels are decorated.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Layout:
    """The chunk layout of every multi-tensor kernel (fused_ema, grad_stats, gsema_update): a program covers
    ``chunk = block * iters`` elements of one tensor in ``iters`` iterations of ``block`` lanes, with ``num_warps``
    warps. One layout for all: the launch tables are cached per chunk size, so launches over the same pairs (the EMA
    and the teacher update of one teacher/student list) share one table, and gsema_update runs fused_ema's loop."""

    block: int
    iters: int
    num_warps: int

    @property
    def chunk(self) -> int:
        return self.block * self.iters


# What a GPU runs, and so what the compile gate compiles.
COMPILED_LAYOUT = Layout(block=1024, iters=8, num_warps=4)
# Under Triton's interpreter (CPU tests) every iteration is a round of numpy calls: shorter chunks keep the tests
# quick while still running the multi-iteration loop and the masked tail.
LAYOUT = Layout(block=1024, iters=2, num_warps=4) if INTERPRETED else COMPILED_LAYOUT

# The element type of a kernel's tensors as a constexpr: 0 fp32, 1 fp16, 2 bf16, 3 fp64.
DTYPE_CODES = {dtype: code for code, dtype in enumerate(FLOAT_DTYPES)}
FP64 = DTYPE_CODES[torch.float64]

# 16 bytes is the widest global load; aligned chunk addresses let Triton emit it.
VECTOR_BYTES = 16


@triton.jit
def as_pointer(
    address,  # int64 byte address of an element
    CODE: tl.constexpr,  # element type, a DTYPE_CODES value
    ALIGNED: tl.constexpr,  # every chunk address is a multiple of 16 bytes
):
    if CODE == 0:
        pointer = address.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        pointer = address.to(tl.pointer_type(tl.float16))
    elif CODE == 2:
        pointer = address.to(tl.pointer_type(tl.bfloat16))
    else:
        pointer = address.to(tl.pointer_type(tl.float64))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def widen(
    x,  # values loaded from memory
    WIDE: tl.constexpr,  # to fp64 (a float64 tensor's maths) instead of fp32
):
    # A constexpr branch: a conditional expression choosing between two dtypes does not compile.
    if WIDE:
        out = x.to(tl.float64)
    else:
        out = x.to(tl.float32)
    return out


@dataclass(frozen=True)
class Group:
    """One launch: the chunks of all pairs that share ``(x.dtype, y.dtype)`` and their alignment."""

    x_code: int
    y_code: int
    table: torch.Tensor  # int64 [3, num_chunks] on the tensors' device
    num_chunks: int
    first_chunk: int  # index of this group's first chunk among all groups (row offset into per-chunk outputs)
    aligned: bool


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]
    num_chunks: int  # over all groups
    other_pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # pairs of other dtypes, handled by the caller


_PLANS = GraphSafeCache(32, "launch table")


def _key(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], chunk: int) -> tuple:
    return (
        chunk,
        xs[0].device,
        tuple((x.data_ptr(), y.data_ptr(), x.shape, y.shape, x.dtype, y.dtype) for x, y in zip(xs, ys, strict=True)),
    )


def plan_pairs(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], chunk: int) -> Plan:
    """The cached launch plan for the pairs ``zip(xs, ys)`` (already validated by the caller; contiguous floats).

    Raises ``RuntimeError`` during a CUDA-graph capture if the plan was not built before (see :class:`GraphSafeCache`).
    """
    return _PLANS.get(_key(xs, ys, chunk), lambda: _build(xs, ys, chunk), xs[0].device)


def _build(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], chunk: int) -> Plan:
    device = xs[0].device
    by_kind: dict[tuple[int, int, bool], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    others = []
    for x, y in zip(xs, ys, strict=True):
        if x.dtype in DTYPE_CODES and y.dtype in DTYPE_CODES:
            if x.numel():
                # A tensor that does not start on a 16-byte boundary (a view into a flat buffer) gets a group of its
                # own, so that it costs the others none of their 16-byte loads.
                aligned = x.data_ptr() % VECTOR_BYTES == 0 and y.data_ptr() % VECTOR_BYTES == 0
                by_kind.setdefault((DTYPE_CODES[x.dtype], DTYPE_CODES[y.dtype], aligned), []).append((x, y))
        else:
            others.append((x, y))
    groups = []
    first = 0
    for (x_code, y_code, aligned), pairs in sorted(by_kind.items()):
        columns: list[tuple[int, int, int]] = []
        for x, y in pairs:
            x_ptr, y_ptr, n = x.data_ptr(), y.data_ptr(), x.numel()
            for start in range(0, n, chunk):
                columns.append(
                    (x_ptr + start * x.element_size(), y_ptr + start * y.element_size(), min(chunk, n - start))
                )
        aligned &= (chunk * min(pairs[0][0].element_size(), pairs[0][1].element_size())) % VECTOR_BYTES == 0
        host = torch.tensor(columns, dtype=torch.int64).t().contiguous()
        if device.type == "cuda":
            # Pinned memory and a non-blocking copy: building a plan never waits for the device.
            table = host.pin_memory().to(device, non_blocking=True)
        else:
            table = host.to(device)
        groups.append(Group(x_code, y_code, table, len(columns), first, aligned))
        first += len(columns)
    return Plan(tuple(groups), first, tuple(others))


def clear_cache() -> None:
    """Forget every cached plan (tests use it; a trainer never needs to, and must not while a graph uses them)."""
    _PLANS.clear()
