"""Lists of tensor pairs: the validation every multi-tensor op shares, and the one dtype-grouped lerp loop.

A multi-tensor op takes two equal-length lists ``xs``, ``ys`` of tensors on one device and works on the pairs
``zip(xs, ys)``. Two kinds of list exist:

- gradients (``grad_stats``): every tensor is float32, float16, bfloat16 or float64, the two sides in any mix;
- an average and what it averages (``fused_ema_``, ``gsema_update_``): float pairs are averaged, and the average
  must be at least as precise as what it averages (the same dtype, an fp32 average of an fp16/bf16 model, or a
  float64 one of anything); complex pairs of one dtype are averaged too (by torch on every backend); other pairs
  (integer buffers such as ``num_batches_tracked``) are copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# How much of a value a dtype keeps: an average may be stored in a dtype of this rank or more than its inputs'.
_PRECISION = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def check_pairs(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    x_name: str,
    y_name: str,
    *,
    average: bool = False,
    contiguous: bool = True,
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument and value unless ``zip(xs, ys)`` is a valid pair list.

    ``average``: ``xs`` averages ``ys`` (see the module docstring); otherwise every tensor must be one of
    :data:`FLOAT_DTYPES`. ``contiguous``: float pairs must be contiguous (a caller that handles strided pairs itself
    passes False). All tensors must be on one device.
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
        if average:
            _check_average_pair(x, y, f"{x_name}[{i}]", f"{y_name}[{i}]")
        else:
            for name, t in ((x_name, x), (y_name, y)):
                if t.dtype not in FLOAT_DTYPES:
                    raise TypeError(f"{name}[{i}] must be float32/float16/bfloat16/float64, got {t.dtype}")
        if contiguous and x.dtype in FLOAT_DTYPES and x.numel() and not (x.is_contiguous() and y.is_contiguous()):
            raise ValueError(f"{x_name}[{i}] and {y_name}[{i}] must be contiguous (strides {x.stride()}, {y.stride()})")


def can_average(average: torch.dtype, averaged: torch.dtype) -> bool:
    """Whether an average stored in ``average`` may follow values of ``averaged`` (both of :data:`FLOAT_DTYPES`)."""
    return average == averaged or _PRECISION[average] > _PRECISION[averaged]


def _check_average_pair(x: torch.Tensor, y: torch.Tensor, x_name: str, y_name: str) -> None:
    x_kind, y_kind = _kind(x), _kind(y)
    if x_kind != y_kind:
        raise TypeError(f"{x_name} ({x.dtype}) and {y_name} ({y.dtype}) must both be float, both complex, or neither")
    if x_kind == "complex" and x.dtype != y.dtype:
        raise TypeError(f"{x_name} ({x.dtype}) and {y_name} ({y.dtype}) must have the same complex dtype")
    if x_kind != "float":
        return
    for name, t in ((x_name, x), (y_name, y)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")
    if not can_average(x.dtype, y.dtype):
        raise TypeError(
            f"{x_name} is {x.dtype}, {y_name} {y.dtype}: an average must be stored at least as precisely as the "
            "values it averages (the same dtype, float32 for a float16/bfloat16 model, or float64)"
        )


def _kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return "complex"
    return "float" if t.is_floating_point() else "other"


def lerp_(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], weight: float | torch.Tensor) -> None:
    """``ema[i] += weight * (current[i] - ema[i])`` for float and complex pairs, one ``torch._foreach_lerp_`` per
    dtype pair; other pairs are copied.

    The weight is used in fp32 (fp64 for a float64 EMA) whether it is a Python float, which ``_foreach_lerp_`` takes
    in that precision itself, or a 0-dim tensor, which it would otherwise round to the tensors' dtype
    (bf16(0.1) = 0.10009765625): a bf16 or fp16 EMA with a tensor weight is averaged in fp32 and rounded once.
    """
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list, list]] = {}
    for e, c in zip(ema, current, strict=True):
        if not (e.is_floating_point() or e.is_complex()):
            e.copy_(c)
        elif e.numel():
            es, cs = groups.setdefault((e.dtype, c.dtype), ([], []))
            es.append(e)
            cs.append(c)
    for (e_dtype, c_dtype), (es, cs) in groups.items():
        cs = cs if c_dtype == e_dtype else [c.to(e_dtype) for c in cs]
        if not isinstance(weight, torch.Tensor):
            torch._foreach_lerp_(es, cs, float(weight))
            continue
        if e_dtype in (torch.float16, torch.bfloat16):
            wide = [e.float() for e in es]
            # The Tensor-weight overload of _foreach_lerp_ is recent; a broadcast 0-dim weight works everywhere.
            torch._foreach_lerp_(wide, [c.float() for c in cs], [weight.float()] * len(es))
            torch._foreach_copy_(es, wide)
        else:
            torch._foreach_lerp_(es, cs, [weight.to(e_dtype)] * len(es))
