"""Public fused ops: validate, then dispatch to the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``)
or to the torch reference (CPU).

Set ``GSEMA_FAST_BACKEND=torch`` or ``=triton`` to force a backend. Triton and the kernels are imported on the first
launch only: on a CPU (or a platform without Triton) the package runs the torch references and never imports it.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from gsema_fast.config import BaclOptions
from gsema_fast.reference import bacl as _bacl
from gsema_fast.reference import fused_ema as _fused_ema
from gsema_fast.reference import grad_stats as _grad_stats
from gsema_fast.reference import gsema_update as _gsema_update
from gsema_fast.reference.bacl import BACLResult
from gsema_fast.reference.multi_tensor import check_pairs

BACKEND_ENV = "GSEMA_FAST_BACKEND"
INSTALL_TRITON = "pip install triton (Linux with an NVIDIA GPU)"

__all__ = [
    "BACKEND_ENV",
    "BACLResult",
    "BaclOptions",
    "TritonUnavailableError",
    "bacl_loss",
    "bacl_terms",
    "ema_multi_avg_fn",
    "fused_ema_",
    "grad_cos",
    "grad_stats",
    "gsema_update_",
    "high_pass",
    "use_triton",
]


class TritonUnavailableError(ImportError, ValueError):
    """A kernel launch was asked for where Triton cannot serve it; one line that says what to do."""


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


@functools.cache
def _import_kernels() -> ModuleType:
    try:
        return importlib.import_module("gsema_fast.kernels")
    except ImportError as err:
        raise TritonUnavailableError(
            f"the fused ops run their Triton kernels on CUDA tensors, and Triton cannot be imported ({err}): "
            f"{INSTALL_TRITON}, or set {BACKEND_ENV}=torch for the torch path"
        ) from err


def _kernel(name: str, tensor: torch.Tensor | None) -> ModuleType:
    """The kernel module ``name`` for a launch on ``tensor``'s device: Triton imported on first use."""
    kernels = _import_kernels()
    device = tensor.device if isinstance(tensor, torch.Tensor) else None
    if device is not None and device.type != "cuda" and not kernels.INTERPRETED:
        raise TritonUnavailableError(
            f"{BACKEND_ENV}=triton: the Triton kernels run on CUDA tensors, or on the CPU under TRITON_INTERPRET=1 set "
            f"before the first launch; got tensors on {device}"
        )
    return getattr(kernels, name)


# ----------------------------------------------------------------------------------------------------------------
# GS-EMA: gradient statistics, the conditional teacher update, and a fused EMA.
# ----------------------------------------------------------------------------------------------------------------


def grad_stats(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, accumulate_into_a: bool = False
) -> torch.Tensor:
    """Statistics of two gradient lists read once: ``Tensor[6]`` float64 on ``a``'s device.

    ``[a.b, |a|^2, |b|^2, sum(sign(a)*sign(b)), count(a != 0), count(b != 0)]`` over the flattened lists, fp32
    accumulation of each chunk, fp64 total, deterministic; the sign agreement and the counts are exact integers (a
    NaN counts as non-zero and agrees with nothing). With ``accumulate_into_a=True`` the same pass does
    ``a[i] += b[i]`` (the statistics are of the values before the addition). Never synchronises with the host; runs
    on the tensors' device and its current stream, whatever the current device.
    """
    if use_triton(_first(a)):
        return _kernel("grad_stats", _first(a)).grad_stats(a, b, accumulate_into_a=accumulate_into_a)
    check_pairs(a, b, "a", "b")
    return _grad_stats.grad_stats_reference(a, b, accumulate_into_a=accumulate_into_a)


def grad_cos(stats: torch.Tensor) -> torch.Tensor:
    """The cosine of the two gradients from their ``grad_stats``: ``s0 / (sqrt(s1) * sqrt(s2))``, 0-dim, on the device.

    Each norm is taken on its own, so the product of two squared norms never overflows (fp16 loss scaling makes them
    large); NaN when a gradient is zero.
    """
    return stats[0] / (stats[1].sqrt() * stats[2].sqrt())


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
    ``alpha = decay_aligned if aligned else decay_conflict``; when ``step`` is given, an ``alpha`` below 1 is capped
    at ``1 - 1/(step+1)`` (a decay of 1, "no update", is never warmed up into one);
    ``teacher = alpha*teacher + (1-alpha)*student`` in fp32. ``alpha == 1`` leaves the teacher's bits untouched.
    The decision is made on the device: no host synchronisation, capturable in a CUDA graph (pass ``step`` as a
    device tensor then).
    """
    if use_triton(_first(teacher)):
        return _kernel("gsema_update", _first(teacher)).gsema_update(
            teacher, student, stats, decay_aligned=decay_aligned, decay_conflict=decay_conflict, rule=rule, step=step
        )
    check_pairs(teacher, student, "teacher", "student", average=True)
    _gsema_update.check_update_args(stats, teacher[0].device, decay_aligned, decay_conflict, rule, step)
    return _gsema_update.gsema_update_reference(
        teacher, student, stats, decay_aligned=decay_aligned, decay_conflict=decay_conflict, rule=rule, step=step
    )


def fused_ema_(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], weight: float | torch.Tensor) -> None:
    """``ema[i] += weight * (current[i] - ema[i])`` for every pair: the ``torch._foreach_lerp_`` contract.

    ``weight``: a float in [0, 1] or a 0-dim float tensor on the tensors' device (its value is not checked: that
    would synchronise). ``ema`` is stored at least as precisely as ``current``: the same dtype, an fp32 EMA of a
    bf16/fp16 model, or a float64 one (``torch.lerp`` takes one dtype only); the maths, the weight included, is fp32
    (fp64 for a float64 EMA), as ``torch._foreach_lerp_`` with a float weight, also for a bf16/fp16 EMA. Complex
    tensors are averaged as torch does; other tensors (e.g. ``num_batches_tracked``) are copied; strided tensors are
    accepted.
    """
    if use_triton(_first(ema)):
        _kernel("fused_ema", _first(ema)).fused_ema(ema, current, weight)
        return
    check_pairs(ema, current, "ema", "current", average=True, contiguous=False)
    _fused_ema.check_weight(weight, ema[0].device)
    _fused_ema.fused_ema_reference(ema, current, weight)


def ema_multi_avg_fn(decay: float | torch.Tensor = 0.999):
    """``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: an EMA with ``decay`` through ``fused_ema_``.

    The same results as ``torch.optim.swa_utils.get_ema_multi_avg_fn(decay)``, its default decay 0.999 included, and
    its treatment of integer buffers (``AveragedModel`` passes lists of one dtype; an integer list gets torch's
    truncated average rather than ``fused_ema_``'s copy, so that swapping the function changes nothing but speed).
    ``decay`` may also be a 0-dim float tensor on the model's device (a schedule kept on the device); its value is
    then not checked.
    """
    if isinstance(decay, torch.Tensor):
        if decay.dim() != 0 or not decay.is_floating_point():
            raise TypeError(f"decay must be a number or a 0-dim float tensor, got {decay.dtype} {tuple(decay.shape)}")
    elif isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")

    @torch.no_grad()
    def ema_update(ema_param_list, current_param_list, _num_averaged):
        ema_list, current_list = list(ema_param_list), list(current_param_list)
        if ema_list and not (ema_list[0].is_floating_point() or ema_list[0].is_complex()):
            for ema, current in zip(ema_list, current_list, strict=True):
                ema.copy_(ema * decay + current * (1 - decay))
            return
        fused_ema_(ema_list, current_list, 1.0 - decay)

    return ema_update


# ----------------------------------------------------------------------------------------------------------------
# Boundary-aware contrastive loss (BACL): FFT high-pass, cosine Gram matrix and InfoNCE (paper Sec. 2.3).
# ----------------------------------------------------------------------------------------------------------------


high_pass = _bacl.high_pass


def bacl_terms(
    z_stu_src: torch.Tensor,
    z_stu_trg: torch.Tensor,
    z_tea_src: torch.Tensor,
    z_tea_trg: torch.Tensor,
    options: BaclOptions | None = None,
    **overrides: Any,
) -> BACLResult:
    """:func:`bacl_loss` with its parts for logging: a ``BACLResult`` (``gsema_fast.kernels.bacl``) of the loss
    (the only differentiable field), each term's detached loss and its ``[B, 6]`` detached cosine similarities
    (positives first), ``None`` for a switched-off term. Same arguments, backends and errors as :func:`bacl_loss`.
    """
    options = BaclOptions.of(options, **overrides)
    tensor = z_stu_src if isinstance(z_stu_src, torch.Tensor) else None
    fn = _kernel("bacl", tensor).bacl if use_triton(tensor) else _bacl.bacl_reference
    return fn(z_stu_src, z_stu_trg, z_tea_src, z_tea_trg, options)


def bacl_loss(
    z_stu_src: torch.Tensor,
    z_stu_trg: torch.Tensor,
    z_tea_src: torch.Tensor,
    z_tea_trg: torch.Tensor,
    options: BaclOptions | None = None,
    **overrides: Any,
) -> torch.Tensor:
    """Boundary-aware contrastive loss (Eq. 3-5) of four latents ``[B, C, D, H, W]``: a 0-dim tensor.

    Options: a :class:`~gsema_fast.config.BaclOptions` (a config's ``bacl`` section) and/or its fields as keyword
    arguments, which replace the object's (``bacl_loss(*latents, tau=0.5)``, ``bacl_loss(*latents, cfg.bacl)``):
    ``cutoff=0.5``, ``tau=1.0``, ``volume=True``, ``boundary=True``, ``mask="symmetric"``, ``reduction="sample"``.
    Per sample, the cosine similarities of the flattened features; positives (S_s, T_s), (S_t, T_t), negatives
    (S_s, S_t), (T_s, T_t), (S_s, T_t), (S_t, T_s); ``-log(sum_pos e^(h/tau) / sum_all e^(h/tau))`` averaged over
    the batch (``reduction="sample"``), or of the similarities averaged over the batch (``"batch_mean"``, the public
    code), for ``z`` (``volume``) plus for ``high_pass(z, cutoff=cutoff, mask=mask)`` (``boundary``).
    Differentiable with respect to every input that requires grad (teacher latents normally do not, and then get no
    gradient). fp32 accumulation (fp64 for fp64 inputs); any float dtype. Triton on CUDA (one fused launch per term
    forward and backward, no host sync), the torch reference on the CPU. Raises ``ValueError``/``TypeError`` for
    mismatched shapes or devices, fewer than 5 dims, ``cutoff`` outside (0, 1), ``tau <= 0``, an unknown mask or
    reduction, both terms off, or an unknown option.
    """
    return bacl_terms(z_stu_src, z_stu_trg, z_tea_src, z_tea_trg, options, **overrides).loss
