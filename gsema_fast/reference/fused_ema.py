"""The fused EMA in plain torch: the CPU path and the kernel's reference (``torch._foreach_lerp_`` semantics)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gsema_fast.reference.multi_tensor import lerp_


def check_weight(weight: float | torch.Tensor, device: torch.device, name: str = "weight") -> None:
    """A float in [0, 1], or a 0-dim float tensor on ``device`` (whose value is not read: that would synchronise)."""
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
    if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {weight}")


def fused_ema_reference(
    ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], weight: float | torch.Tensor
) -> None:
    """``ema[i] += weight * (current[i] - ema[i])``: ``torch._foreach_lerp_`` per dtype pair (maths and weight in
    fp32, fp64 for a float64 EMA), complex pairs averaged likewise, other pairs copied."""
    lerp_(ema, current, weight)
