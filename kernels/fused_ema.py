r"""Exponential moving average over a whole list of tensors in one launch: ``torch._foreach_lerp_`` semantics.

.. math::

    e_i \leftarrow e_i + w\,(c_i - e_i) \qquad (\text{i.e. } e_i \leftarrow \alpha e_i + (1-\alpha) c_i,\; w = 1-\alpha)

computed in fp32 (fp64 when the EMA tensor is float64), the weight included, and rounded once to the EMA's dtype,
with torch's two-sided lerp formula (``c - (c - e)(1 - w)`` for ``w >= 0.5``) so results match ``torch.lerp``: the
results of ``torch._foreach_lerp_`` with a Python float weight, whose scalar torch also takes in fp32 (fp64 for
float64 tensors), also for a bf16 or fp16 EMA. ``current`` may be of a lower precision than ``ema`` (an fp32 EMA of
a bf16 model). The weight is a Python float or a 0-dim device tensor; a device tensor is read by the kernel, so a
schedule computed on the device costs no synchronisation and the launch can be captured in a CUDA graph. Non-float
tensors (``num_batches_tracked``) are copied; strided (non-contiguous) float pairs and complex pairs go through the
torch reference (``gsema_fast.reference.fused_ema``).

The memory traffic is the floor for an EMA: read ``e`` and ``c`` once, write ``e`` once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gsema_fast.kernels._multi_tensor import DTYPE_CODES, FP64, LAYOUT, Layout, as_pointer, plan_pairs, widen
from gsema_fast.kernels._variants import Variant, pointer
from gsema_fast.reference.device import device_guard
from gsema_fast.reference.fused_ema import check_weight, fused_ema_reference
from gsema_fast.reference.multi_tensor import FLOAT_DTYPES, can_average, check_pairs


@triton.jit
def lerp_values(
    ema,  # current EMA values (fp32 or fp64)
    current,  # values being averaged in, same type as ema
    weight,  # scalar weight w of the new values
):
    # torch.lerp's formula: exact at w == 1 and symmetric in rounding around w == 0.5.
    if weight < 0.5:
        result = ema + weight * (current - ema)
    else:
        result = current - (current - ema) * (1.0 - weight)
    return result


@triton.jit
def lerp_chunk(
    ema,  # pointer to the chunk's first EMA element
    current,  # pointer to the chunk's first element of the averaged tensor
    length,  # elements in the chunk
    weight,  # scalar weight of current, in the maths' precision
    WIDE: tl.constexpr,  # compute in fp64 (float64 EMA) instead of fp32
    BLOCK: tl.constexpr,  # elements per iteration
    ITERS: tl.constexpr,  # iterations per chunk
):
    offsets = tl.arange(0, BLOCK)
    if length == BLOCK * ITERS:
        # Full chunks go unmasked so the loads and stores vectorise.
        for i in range(ITERS):
            o = i * BLOCK + offsets
            e = widen(tl.load(ema + o), WIDE)
            c = widen(tl.load(current + o), WIDE)
            tl.store(ema + o, lerp_values(e, c, weight).to(ema.dtype.element_ty))
    else:
        for i in range(ITERS):
            o = i * BLOCK + offsets
            mask = o < length
            e = widen(tl.load(ema + o, mask=mask, other=0.0), WIDE)
            c = widen(tl.load(current + o, mask=mask, other=0.0), WIDE)
            tl.store(ema + o, lerp_values(e, c, weight).to(ema.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_chunks"], do_not_specialize_on_alignment=["table", "weight_ptr"])
def _fused_ema_kernel(
    table,  # int64 [3, num_chunks]: chunk address in ema, chunk address in current, chunk length
    num_chunks,  # row stride of the table
    weight_ptr,  # 0-dim device tensor holding the weight in the maths' precision (read when WEIGHT_IN_TENSOR)
    weight_value,  # the weight as an fp32 scalar argument (otherwise)
    E_CODE: tl.constexpr,  # element type of ema (DTYPE_CODES)
    C_CODE: tl.constexpr,  # element type of current
    ALIGNED: tl.constexpr,  # chunk addresses are 16-byte aligned
    WEIGHT_IN_TENSOR: tl.constexpr,  # take the weight from weight_ptr
    BLOCK: tl.constexpr,  # elements per iteration
    ITERS: tl.constexpr,  # iterations per chunk (CHUNK = BLOCK * ITERS)
):
    chunk = tl.program_id(0)
    if WEIGHT_IN_TENSOR:
        weight = tl.load(weight_ptr)
    else:
        weight = weight_value
    ema = as_pointer(tl.load(table + chunk), E_CODE, ALIGNED)
    current = as_pointer(tl.load(table + num_chunks + chunk), C_CODE, ALIGNED)
    length = tl.load(table + 2 * num_chunks + chunk)
    lerp_chunk(ema, current, length, weight, E_CODE == 3, BLOCK, ITERS)


def _math_dtype(ema_code: int) -> torch.dtype:
    return torch.float64 if ema_code == FP64 else torch.float32


@functools.cache
def ema_variant(ema_code: int, current_code: int, aligned: bool, weight_in_tensor: bool, layout: Layout) -> Variant:
    """The variant of ``_fused_ema_kernel`` for one dtype pair. Without ``weight_in_tensor`` the launcher passes the
    launch table as the unread ``weight_ptr``; a float64 EMA always reads its weight from a tensor (Triton passes a
    Python float as fp32)."""
    weight_type = pointer(_math_dtype(ema_code)) if weight_in_tensor else "*i64"
    return Variant(
        _fused_ema_kernel,
        args=(("table", "*i64"), ("num_chunks", "i32"), ("weight_ptr", weight_type), ("weight_value", "fp32")),
        constexprs=(
            ("E_CODE", ema_code),
            ("C_CODE", current_code),
            ("ALIGNED", aligned),
            ("WEIGHT_IN_TENSOR", weight_in_tensor),
            ("BLOCK", layout.block),
            ("ITERS", layout.iters),
        ),
        num_warps=layout.num_warps,
    )


def average_code_pairs() -> list[tuple[int, int]]:
    """The ``(average, averaged)`` dtype codes that an average may take (``reference.multi_tensor.can_average``)."""
    return [(DTYPE_CODES[a], DTYPE_CODES[b]) for a in FLOAT_DTYPES for b in FLOAT_DTYPES if can_average(a, b)]


def variants(layout: Layout) -> list[Variant]:
    """Every variant the launcher can produce under ``layout``."""
    return [
        ema_variant(ema, current, aligned, in_tensor, layout)
        for ema, current in average_code_pairs()
        for aligned in (False, True)
        for in_tensor in ((True,) if ema == FP64 else (False, True))
    ]


def fused_ema(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], weight: float | torch.Tensor) -> None:
    """``ema[i] += weight * (current[i] - ema[i])`` for every pair, in place, one launch per dtype pair.

    Float tensors are averaged, others (integer buffers) copied; strided float pairs and complex pairs (which
    ``torch._foreach_lerp_`` accepts too) are averaged by the torch reference, with the same maths. Never
    synchronises with the host.
    """
    check_pairs(ema, current, "ema", "current", average=True, contiguous=False)
    device = ema[0].device
    check_weight(weight, device)
    dense, other = [], []
    for e, c in zip(ema, current, strict=True):
        kernel_pair = e.dtype in DTYPE_CODES and e.is_contiguous() and c.is_contiguous()
        (dense if kernel_pair else other).append((e, c))
    with device_guard(device):
        if dense:
            _launch([e for e, _ in dense], [c for _, c in dense], weight)
        if other:
            fused_ema_reference([e for e, _ in other], [c for _, c in other], weight)


def _launch(ema: list[torch.Tensor], current: list[torch.Tensor], weight: float | torch.Tensor) -> None:
    plan = plan_pairs(ema, current, LAYOUT.chunk)
    weights: dict[torch.dtype, torch.Tensor] = {}
    for group in plan.groups:
        math = _math_dtype(group.x_code)
        in_tensor = isinstance(weight, torch.Tensor) or group.x_code == FP64
        if in_tensor and math not in weights:
            # A float weight becomes a device scalar filled by a kernel (no host-to-device copy, capturable); a tensor
            # weight is read in the maths' precision.
            if isinstance(weight, torch.Tensor):
                weights[math] = weight if weight.dtype == math else weight.to(math)
            else:
                weights[math] = torch.full((), float(weight), dtype=math, device=ema[0].device)
        variant = ema_variant(group.x_code, group.y_code, group.aligned, in_tensor, LAYOUT)
        variant.launch(
            (group.num_chunks,),
            group.table,
            group.num_chunks,
            weights[math] if in_tensor else group.table,
            0.0 if in_tensor else float(weight),
        )
