"""The GS-EMA teacher update in plain torch: the CPU path and the kernel's reference.

``aligned`` from the gradient statistics (``stats[0] > 0`` for the rule "dot", ``stats[3] > 0`` for "sign"),
``alpha = decay_aligned`` if aligned else ``decay_conflict``, the optional warm-up cap ``min(alpha, 1 - 1/(t+1))``
for an alpha below 1, and ``teacher = alpha * teacher + (1 - alpha) * student`` (see ``gsema_fast.kernels.gsema_update``
for the maths).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gsema_fast.config import EmaRule, check_choice
from gsema_fast.reference.multi_tensor import lerp_


def check_update_args(
    stats: torch.Tensor,
    device: torch.device,
    decay_aligned: float,
    decay_conflict: float,
    rule: str,
    step: int | torch.Tensor | None,
) -> None:
    if not isinstance(stats, torch.Tensor):
        raise TypeError(f"stats must be the tensor returned by grad_stats, got {type(stats).__name__}")
    if stats.dim() != 1 or stats.numel() < 4 or stats.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"stats must be a float64 (or float32) tensor of 6 statistics, got shape {tuple(stats.shape)} {stats.dtype}"
        )
    if stats.device != device:
        raise ValueError(f"stats is on {stats.device}, the teacher on {device}")
    for name, decay in (("decay_aligned", decay_aligned), ("decay_conflict", decay_conflict)):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(decay).__name__}")
        if not math.isfinite(decay) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"{name} must be a finite number in [0, 1], got {decay}")
    check_choice("rule", rule, EmaRule)
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.device != device:
            raise ValueError(
                f"step must be an int or a 0-dim tensor on {device}, got shape {tuple(step.shape)} on {step.device}"
            )
        if step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
            raise TypeError(f"step is a count: a 0-dim tensor of an integer dtype, got {step.dtype}")
    elif step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be a non-negative int, a 0-dim tensor or None, got {step!r}")


def decision_reference(
    stats: torch.Tensor, decay_aligned: float, decay_conflict: float, rule: str, step: int | torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(aligned, alpha)`` as 0-dim fp32 tensors on the stats' device, computed without leaving it: the kernel's
    ``decide``, in the same fp32 arithmetic, with no host-to-device copy (capturable, no sync)."""
    aligned = stats[3 if rule == "sign" else 0] > 0
    alpha = torch.where(aligned, float(decay_aligned), float(decay_conflict)).to(torch.float32)
    if step is not None:
        step_f = step.float() if isinstance(step, torch.Tensor) else torch.full_like(alpha, float(step))
        alpha = torch.where(alpha < 1.0, torch.minimum(alpha, 1.0 - 1.0 / (step_f + 1.0)), alpha)
    return aligned.float(), alpha


def gsema_update_reference(
    teacher: Sequence[torch.Tensor],
    student: Sequence[torch.Tensor],
    stats: torch.Tensor,
    *,
    decay_aligned: float,
    decay_conflict: float,
    rule: str = "dot",
    step: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch reference (and CPU path). On the CPU the decision is read directly (no device to wait for) and a
    conflict with ``alpha == 1`` skips the update; on another device the update is masked with ``torch.where``.
    """
    aligned, alpha = decision_reference(stats, decay_aligned, decay_conflict, rule, step)
    weight = 1.0 - alpha
    if stats.device.type == "cpu":
        alpha_value = float(alpha)
        if alpha_value < 1.0:
            lerp_(teacher, student, 1.0 - alpha_value)
        return aligned
    update = alpha < 1.0
    for t, s in zip(teacher, student, strict=True):
        if t.dtype in (torch.float16, torch.bfloat16):
            # In fp32 and rounded once, as on every other path.
            t.copy_(torch.where(update, t.float().lerp(s.float(), weight), t.float()).to(t.dtype))
        elif t.is_floating_point() or t.is_complex():
            t.copy_(torch.where(update, t.lerp(s.to(t.dtype), weight.to(t.dtype)), t))
        else:
            t.copy_(torch.where(update, s, t))
    return aligned
