"""Public fused ops: validate, then dispatch to the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``)
or to the torch reference (CPU).

Set ``GSEMA_FAST_BACKEND=torch`` or ``=triton`` to force a backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from gsema_fast.kernels import fused_ema as _fused_ema
from gsema_fast.kernels import grad_stats as _grad_stats
from gsema_fast.kernels import gsema_update as _gsema_update
from gsema_fast.kernels._multi_tensor import check_pairs

BACKEND_ENV = "GSEMA_FAST_BACKEND"


def _first(seq) -> torch.Tensor | None:
    """The first element of a tensor list, or None for anything else (validation reports it properly)."""
    if isinstance(seq, Sequence) and not isinstance(seq, torch.Tensor) and seq and isinstance(seq[0], torch.Tensor):
        return seq[0]
    return None


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernels serve tensors on this device.

    CUDA tensors go to Triton, CPU tensors to the torch reference unless Triton's interpreter is on (that is how CI
    exercises the kernels). ``GSEMA_FAST_BACKEND`` overrides both; it is read on every call so tests can flip it.
    """
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", "torch", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be 'torch' or 'triton', got {forced!r}")
    if forced:
        return forced == "triton"
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------------------
# GS-EMA: gradient statistics, the conditional teacher update, and a fused EMA.
# ----------------------------------------------------------------------------------------------------------------


def grad_stats(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, accumulate_into_a: bool = False
) -> torch.Tensor:
    """Statistics of two gradient lists read once: ``Tensor[6]`` float32 on ``a``'s device.

    ``[a.b, |a|^2, |b|^2, sum(sign(a)*sign(b)), count(a != 0), count(b != 0)]`` over the flattened lists, fp32
    accumulation, deterministic. With ``accumulate_into_a=True`` the same pass does ``a[i] += b[i]`` (the statistics
    are of the values before the addition). Never synchronises with the host.
    """
    if use_triton(_first(a)):
        return _grad_stats.grad_stats(a, b, accumulate_into_a=accumulate_into_a)
    check_pairs(a, b, "a", "b")
    return _grad_stats.grad_stats_reference(a, b, accumulate_into_a=accumulate_into_a)


def gsema_update_(
    teacher: Sequence[torch.Tensor],
    student: Sequence[torch.Tensor],
    stats: torch.Tensor,
    *,
    decay_aligned: float,
    decay_conflict: float,
    rule: str = "dot",
    step: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """GS-EMA teacher update in place; returns a 0-dim device tensor, 1.0 if the gradients were aligned else 0.0.

    ``aligned = stats[0] > 0`` (``rule="dot"``) or ``stats[3] > 0`` (``rule="sign"``);
    ``alpha = decay_aligned if aligned else decay_conflict``, capped at ``1 - 1/(step+1)`` when ``step`` is given;
    ``teacher = alpha*teacher + (1-alpha)*student`` in fp32. ``alpha == 1`` leaves the teacher's bits untouched.
    The decision is made on the device: no host synchronisation, capturable in a CUDA graph (pass ``step`` as a
    device tensor then).
    """
    if use_triton(_first(teacher)):
        return _gsema_update.gsema_update(
            teacher, student, stats, decay_aligned=decay_aligned, decay_conflict=decay_conflict, rule=rule, step=step
        )
    check_pairs(teacher, student, "teacher", "student", floating="x")
    _gsema_update.check_update_args(stats, teacher[0].device, decay_aligned, decay_conflict, rule, step)
    return _gsema_update.gsema_update_reference(
        teacher, student, stats, decay_aligned=decay_aligned, decay_conflict=decay_conflict, rule=rule, step=step
    )


def fused_ema_(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], weight: float | torch.Tensor) -> None:
    """``ema[i] += weight * (current[i] - ema[i])`` for every pair: the ``torch._foreach_lerp_`` contract.

    ``weight``: a float or a 0-dim tensor on the tensors' device. ``current`` may be of lower precision than
    ``ema``; the maths is fp32. Non-float tensors (e.g. ``num_batches_tracked``) are copied.
    """
    if use_triton(_first(ema)):
        _fused_ema.fused_ema(ema, current, weight)
        return
    check_pairs(ema, current, "ema", "current", floating="x")
    _fused_ema.check_weight(weight, ema[0].device)
    _fused_ema.fused_ema_reference(ema, current, weight)


def ema_multi_avg_fn(decay: float):
    """``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: an EMA with ``decay`` through ``fused_ema_``.

    Same results as ``torch.optim.swa_utils.get_ema_multi_avg_fn(decay)``, including its treatment of integer
    buffers (``AveragedModel`` passes lists of one dtype; an integer list gets torch's truncated average rather than
    ``fused_ema_``'s copy, so that swapping the function changes nothing but speed).
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")

    @torch.no_grad()
    def ema_update(ema_param_list, current_param_list, _num_averaged):
        ema_list, current_list = list(ema_param_list), list(current_param_list)
        if ema_list and not ema_list[0].is_floating_point():
            for ema, current in zip(ema_list, current_list, strict=True):
                ema.copy_(ema * decay + current * (1 - decay))
            return
        fused_ema_(ema_list, current_list, 1.0 - decay)

    return ema_update

