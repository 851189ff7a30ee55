"""Multi-tensor launch tables and the chunk layout shared by the GS-EMA kernels.

A list of tensor pairs ``(x_i, y_i)`` is cut into chunks of ``chunk`` elements (:data:`CHUNK` for every kernel) that
never straddle two tensors. Each chunk is one program of a single launch and is described by one column of an int64
table::

    table[0, c] = address of the chunk's first element in x      (bytes)
    table[1, c] = address of the chunk's first element in y      (bytes)
    table[2, c] = number of elements in the chunk                (chunk, or fewer for a tensor's last chunk)

Pairs are grouped by their ``(x.dtype, y.dtype)`` so that each group is one launch with the element types known at
compile time: a model's parameter list is one group, a mixed fp32/bf16 list a few; never one launch per tensor.

Building a table reads every tensor's ``data_ptr()`` and copies a small table to the device, so tables are cached by
the addresses, shapes and dtypes of the pairs: a training loop whose parameters and gradient buffers stay in place
builds its tables once, and later calls launch with no host-to-device traffic (and can be captured in a CUDA graph).

CUDA graphs replay the addresses they captured, so device state that a launch reads must outlive every graph that
captured it. Cached device state (these tables, BACL's masks) is therefore built only outside a capture: a launch
being captured finds its state in the cache or raises, and an entry a capture used is pinned, never evicted. The
counter a reduction needs (:func:`ticket`) is made inside a capture when one is under way, so that the graph zeroes
and owns its own.

Every launcher runs under :func:`device_guard` of its tensors' device: Triton launches on the current device's
current stream, and the table copies and scratch allocations go to the tensors' device's current stream, so both must
be the tensors' device.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Read once at import, as Triton reads it when the kernels are decorated.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The chunk layout of every multi-tensor kernel (fused_ema, grad_stats, gsema_update): a program covers CHUNK =
# BLOCK * ITERS elements of one tensor in ITERS iterations of BLOCK lanes, with NUM_WARPS warps. One layout for all:
# the launch tables are cached per chunk size, so launches over the same pairs (the EMA and the teacher update of one
# teacher/student list) share one table, and gsema_update runs fused_ema's lerp_chunk loop.
BLOCK = 1024
# Under Triton's interpreter (CPU tests) every iteration is a round of numpy calls: shorter chunks keep the tests
# quick while still running the multi-iteration loop and the masked tail.
ITERS = 2 if INTERPRETED else 8
CHUNK = BLOCK * ITERS
NUM_WARPS = 4

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

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


@dataclass(frozen=True)
class Group:
    """One launch: the chunks of all pairs that share ``(x.dtype, y.dtype)``."""

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
    other_pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # non-float pairs, handled by the caller


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device (hence its current stream the launch stream) for a launch."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def capturing(device: torch.device) -> bool:
    """Whether work issued now for ``device`` is being captured into a CUDA graph (never on other devices)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class GraphSafeCache:
    """A least-recently-used cache of device state that launches read, safe under CUDA-graph capture.

    Outside a capture: an ordinary LRU cache of ``size`` entries. During a capture: a missing entry raises (building
    it would copy from host memory at replay time into memory the graph owns, and leave the cached copy unwritten
    until then), and an entry that is found is pinned: it lives as long as the process (or until :meth:`clear`), as
    long as any graph that captured its address.
    """

    def __init__(self, size: int, what: str) -> None:
        self.size = size
        self.what = what
        self.recent: OrderedDict[Hashable, object] = OrderedDict()
        self.pinned: dict[Hashable, object] = {}

    def get(self, key: Hashable, build: Callable[[], object], device: torch.device):
        value = self.pinned.get(key)
        if value is not None:
            return value
        value = self.recent.get(key)
        if capturing(device):
            if value is None:
                raise RuntimeError(
                    f"the {self.what} for these tensors is built on their first use outside a CUDA graph capture: "
                    "run the op once on the same tensors before capturing (the usual warm-up)"
                )
            self.pinned[key] = self.recent.pop(key)
            return value
        if value is not None:
            self.recent.move_to_end(key)
            return value
        value = build()
        self.recent[key] = value
        if len(self.recent) > self.size:
            self.recent.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget every entry, pinned ones too: only when no captured graph that used them will replay again."""
        self.recent.clear()
        self.pinned.clear()


_PLANS = GraphSafeCache(32, "launch table")
_TICKETS: dict[tuple, torch.Tensor] = {}


def ticket(device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter for a last-program-reduces launch, which leaves it at zero again.

    Outside a capture: one per device and stream, made once (launches on one stream run one after another, so they
    share it; another stream gets its own). During a capture: a new one, zeroed by the graph itself on every replay and
    owned by it, so no graph depends on memory zeroed only inside another graph, and two graphs never share one.
    """
    if capturing(device):
        return torch.zeros(1, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    counter = _TICKETS.get(key)
    if counter is None:
        counter = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


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
    by_dtype: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    others = []
    for x, y in zip(xs, ys, strict=True):
        if x.dtype in DTYPE_CODES and y.dtype in DTYPE_CODES:
            if x.numel():
                by_dtype.setdefault((DTYPE_CODES[x.dtype], DTYPE_CODES[y.dtype]), []).append((x, y))
        else:
            others.append((x, y))
    groups = []
    first = 0
    for (x_code, y_code), pairs in sorted(by_dtype.items()):
        columns: list[tuple[int, int, int]] = []
        aligned = True
        for x, y in pairs:
            x_ptr, y_ptr, n = x.data_ptr(), y.data_ptr(), x.numel()
            aligned &= x_ptr % VECTOR_BYTES == 0 and y_ptr % VECTOR_BYTES == 0
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


def check_pairs(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    x_name: str,
    y_name: str,
    *,
    floating: str = "all",
    contiguous: bool = True,
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument and value unless ``zip(xs, ys)`` is a valid pair list.

    ``floating``: ``"all"`` (every tensor must be floating point), or ``"x"`` (non-float pairs are allowed and are
    copied by the caller, but an integer ``x`` paired with a float ``y`` is not). ``contiguous``: float pairs must be
    contiguous (a caller that handles strided pairs itself passes False). All tensors must be on one device.
    """
    for name, seq in ((x_name, xs), (y_name, ys)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if len(xs) != len(ys):
        raise ValueError(f"{x_name} and {y_name} must have the same length, got {len(xs)} and {len(ys)}")
    if not xs:
        raise ValueError(f"{x_name} and {y_name} must not be empty")
    device = None
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        for name, t in ((x_name, x), (y_name, y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
        if x.shape != y.shape:
            raise ValueError(f"{x_name}[{i}] and {y_name}[{i}] differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        device = device or x.device
        for name, t in ((x_name, x), (y_name, y)):
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, expected {device} like {x_name}[0]")
        x_float, y_float = x.is_floating_point(), y.is_floating_point()
        if floating == "all":
            for name, t, ok in ((x_name, x, x_float), (y_name, y, y_float)):
                if not ok or t.dtype not in DTYPE_CODES:
                    raise TypeError(f"{name}[{i}] must be float32/float16/bfloat16/float64, got {t.dtype}")
        elif x_float != y_float or (x_float and (x.dtype not in DTYPE_CODES or y.dtype not in DTYPE_CODES)):
            raise TypeError(f"{x_name}[{i}] ({x.dtype}) and {y_name}[{i}] ({y.dtype}) must both be float, or both not")
        if contiguous and x.is_floating_point() and x.numel() and not (x.is_contiguous() and y.is_contiguous()):
            raise ValueError(f"{x_name}[{i}] and {y_name}[{i}] must be contiguous (strides {x.stride()}, {y.stride()})")
