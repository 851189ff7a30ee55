r"""Exponential moving average over a whole list of tensors in one launch: ``torch._foreach_lerp_`` semantics.

.. math::

    e_i \leftarrow e_i + w\,(c_i - e_i) \qquad (\text{i.e. } e_i \leftarrow \alpha e_i + (1-\alpha) c_i,\; w = 1-\alpha)

computed in fp32 (fp64 when the EMA tensor is float64), the weight included, and rounded once to the EMA's dtype,
with torch's two-sided lerp formula (``c - (c - e)(1 - w)`` for ``w >= 0.5``) so results match ``torch.lerp``: the
results of ``torch._foreach_lerp_`` with a Python float weight, whose scalar torch also takes in fp32 (fp64 for
float64 tensors), also for a bf16 or fp16 EMA. ``current`` may be of a lower precision than ``ema`` (an fp32 EMA of
a bf16 model). The weight is a Python float or a 0-dim device tensor; a device tensor is read by the kernel, so a
schedule computed on the device costs no synchronisation and the launch can be captured in a CUDA graph. Non-float
tensors (``num_batches_tracked``) are copied; strided (non-contiguous) float pairs go through the torch reference.

The memory traffic is the floor for an EMA: read ``e`` and ``c`` once, write ``e`` once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gsema_fast.kernels._multi_tensor import (
    BLOCK,
    CHUNK,
    DTYPE_CODES,
    ITERS,
    NUM_WARPS,
    as_pointer,
    check_pairs,
    device_guard,
    plan_pairs,
)


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
    weight,  # scalar weight of current
    WIDE: tl.constexpr,  # compute in fp64 (float64 EMA) instead of fp32
    BLOCK: tl.constexpr,  # elements per iteration
    ITERS: tl.constexpr,  # iterations per chunk
):
    offsets = tl.arange(0, BLOCK)
    math_type = tl.float64 if WIDE else tl.float32
    if length == BLOCK * ITERS:
        # Full chunks go unmasked so the loads and stores vectorise.
        for i in tl.static_range(ITERS):
            o = i * BLOCK + offsets
            e = tl.load(ema + o).to(math_type)
            c = tl.load(current + o).to(math_type)
            tl.store(ema + o, lerp_values(e, c, weight).to(ema.dtype.element_ty))
    else:
        for i in tl.static_range(ITERS):
            o = i * BLOCK + offsets
            mask = o < length
            e = tl.load(ema + o, mask=mask, other=0.0).to(math_type)
            c = tl.load(current + o, mask=mask, other=0.0).to(math_type)
            tl.store(ema + o, lerp_values(e, c, weight).to(ema.dtype.element_ty), mask=mask)


@triton.jit
def _fused_ema_kernel(
    table,  # int64 [3, num_chunks]: chunk address in ema, chunk address in current, chunk length
    num_chunks,  # row stride of the table
    weight_ptr,  # 0-dim device tensor holding the weight (read when WEIGHT_IN_TENSOR)
    weight_value,  # the weight as a scalar argument (otherwise)
    E_CODE: tl.constexpr,  # element type of ema (DTYPE_CODES)
    C_CODE: tl.constexpr,  # element type of current
    ALIGNED: tl.constexpr,  # chunk addresses are 16-byte aligned
    WEIGHT_IN_TENSOR: tl.constexpr,  # take the weight from weight_ptr
    BLOCK: tl.constexpr,  # elements per iteration
    ITERS: tl.constexpr,  # iterations per chunk (CHUNK = BLOCK * ITERS)
):
    chunk = tl.program_id(0)
    wide = E_CODE == 3
    if WEIGHT_IN_TENSOR:
        weight = tl.load(weight_ptr).to(tl.float64 if wide else tl.float32)
    else:
        weight = weight_value
    ema = as_pointer(tl.load(table + chunk), E_CODE, ALIGNED)
    current = as_pointer(tl.load(table + num_chunks + chunk), C_CODE, ALIGNED)
    length = tl.load(table + 2 * num_chunks + chunk)
    lerp_chunk(ema, current, length, weight, wide, BLOCK, ITERS)


def check_weight(weight: float | torch.Tensor, device: torch.device, name: str = "weight") -> None:
    if isinstance(weight, torch.Tensor):
        if weight.dim() != 0 or not weight.is_floating_point():
            raise TypeError(
                f"{name} must be a float or a 0-dim float tensor, got shape {tuple(weight.shape)} {weight.dtype}"
            )
        if weight.device != device:
            raise ValueError(f"{name} is on {weight.device}, the tensors on {device}")
        return
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(weight).__name__}")
    if not torch.isfinite(torch.tensor(float(weight))):
        raise ValueError(f"{name} must be finite, got {weight}")


def fused_ema_reference(
    ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], weight: float | torch.Tensor
) -> None:
    """The torch reference (and CPU path): ``torch._foreach_lerp_`` per dtype group, copies for non-float tensors.

    A tensor weight is used in fp32 (fp64 for a float64 EMA) as a float weight is: a bf16 or fp16 EMA is averaged in
    fp32 and rounded once, since ``_foreach_lerp_`` would round a list weight to the tensors' dtype (bf16(0.1) =
    0.10009765625).
    """
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list, list]] = {}
    for e, c in zip(ema, current, strict=True):
        if not e.is_floating_point():
            e.copy_(c)
        elif e.numel():
            es, cs = groups.setdefault((e.dtype, c.dtype), ([], []))
            es.append(e)
            cs.append(c)
    for (e_dtype, c_dtype), (es, cs) in groups.items():
        if not isinstance(weight, torch.Tensor):
            torch._foreach_lerp_(es, cs if c_dtype == e_dtype else [c.to(e_dtype) for c in cs], float(weight))
            continue
        math_dtype = torch.float64 if e_dtype == torch.float64 else torch.float32
        # The Tensor-weight overload of _foreach_lerp_ is recent; a broadcast 0-dim weight works everywhere.
        weights = [weight.to(math_dtype)] * len(es)
        if e_dtype == math_dtype:
            torch._foreach_lerp_(es, cs if c_dtype == e_dtype else [c.to(e_dtype) for c in cs], weights)
        else:
            wide = [e.to(math_dtype) for e in es]
            torch._foreach_lerp_(wide, [c.to(math_dtype) for c in cs], weights)
            torch._foreach_copy_(es, wide)


def fused_ema(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], weight: float | torch.Tensor) -> None:
    """``ema[i] += weight * (current[i] - ema[i])`` for every pair, in place, one launch per dtype pair.

    Float tensors are averaged, others (integer buffers) copied; strided float pairs (which ``torch._foreach_lerp_``
    accepts too) are averaged by the torch reference, with the same maths. Never synchronises with the host.
    """
    check_pairs(ema, current, "ema", "current", floating="x", contiguous=False)
    device = ema[0].device
    check_weight(weight, device)
    dense = [(e, c) for e, c in zip(ema, current, strict=True) if e.is_contiguous() and c.is_contiguous()]
    strided = [(e, c) for e, c in zip(ema, current, strict=True) if not (e.is_contiguous() and c.is_contiguous())]
    with device_guard(device):
        if dense:
            _launch([e for e, _ in dense], [c for _, c in dense], weight)
        if strided:
            fused_ema_reference([e for e, _ in strided], [c for _, c in strided], weight)


def _launch(ema: list[torch.Tensor], current: list[torch.Tensor], weight: float | torch.Tensor) -> None:
    plan = plan_pairs(ema, current, CHUNK)
    wide_weight = None
    for group in plan.groups:
        in_tensor = isinstance(weight, torch.Tensor)
        group_weight = weight
        if not in_tensor and group.x_code == DTYPE_CODES[torch.float64]:
            # Triton passes a Python float as fp32: a float64 EMA reads its weight from a device scalar instead,
            # filled by a kernel (no host-to-device copy, capturable).
            if wide_weight is None:
                wide_weight = torch.full((), float(weight), dtype=torch.float64, device=ema[0].device)
            group_weight, in_tensor = wide_weight, True
        _fused_ema_kernel[(group.num_chunks,)](
            group.table,
            group.num_chunks,
            group_weight if in_tensor else group.table,
            0.0 if in_tensor else float(weight),
            E_CODE=group.x_code,
            C_CODE=group.y_code,
            ALIGNED=group.aligned,
            WEIGHT_IN_TENSOR=in_tensor,
            BLOCK=BLOCK,
            ITERS=ITERS,
            num_warps=NUM_WARPS,
        )
    for e, c in plan.other_pairs:
        e.copy_(c)
