r"""The GS-EMA teacher update: a conditional EMA whose decay is decided on the device from gradient statistics.

With the statistics ``s`` of :mod:`grad_stats` (``s[0] = g_src . g_trg``, ``s[3] = sum sign(g_src) sign(g_trg)``):

.. math::

    \mathrm{aligned} = \begin{cases} s_0 > 0 & \text{rule ``dot'' (angle below 90 degrees)} \\
                                      s_3 > 0 & \text{rule ``sign'' (cosine of the sign vectors)} \end{cases}
    \qquad
    \alpha = \begin{cases} d_\mathrm{aligned} & \mathrm{aligned} \\ d_\mathrm{conflict} & \text{otherwise}
             \end{cases}

with the optional warm-up :math:`\alpha \leftarrow \min(\alpha, 1 - 1/(t+1))` at step :math:`t` for a decay below 1
(a decay of 1 means "no update" and stays 1: the warm-up never moves a teacher on a step the rule rejects), then

.. math:: \theta_T \leftarrow \alpha\,\theta_T + (1-\alpha)\,\theta_S

in fp32, for every teacher/student pair, in one launch. Every program reads the two statistics itself, so the
decision never travels to the host; when :math:`\alpha = 1` (a conflict with ``decay_conflict = 1``) no program
writes anything and the teacher keeps its exact bits. Program 0 also stores ``[aligned, alpha]`` for the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gsema_fast.kernels._multi_tensor import (
    BLOCK,
    CHUNK,
    ITERS,
    NUM_WARPS,
    as_pointer,
    check_pairs,
    device_guard,
    plan_pairs,
)
from gsema_fast.kernels.fused_ema import lerp_chunk

RULES = ("dot", "sign")


@triton.jit
def decide(
    stats,  # fp32 or fp64 [>= 4] gradient statistics
    step_ptr,  # 0-dim device tensor holding the step (read when STEP_IN_TENSOR)
    step_value,  # the step as a scalar argument (otherwise)
    decay_aligned,  # alpha when the gradients agree
    decay_conflict,  # alpha when they conflict
    RULE_SIGN: tl.constexpr,  # decide on the sign agreement s[3] instead of the dot product s[0]
    WARMUP: tl.constexpr,  # cap an alpha below 1 at 1 - 1/(step + 1)
    STEP_IN_TENSOR: tl.constexpr,  # take the step from step_ptr
):
    if RULE_SIGN:
        agreement = tl.load(stats + 3)
    else:
        agreement = tl.load(stats)
    aligned = agreement > 0
    alpha = tl.where(aligned, decay_aligned, decay_conflict)
    if WARMUP:
        if STEP_IN_TENSOR:
            step = tl.load(step_ptr).to(tl.float32)
        else:
            step = step_value
        # Only an update is warmed up: alpha == 1 ("no update") stays 1.
        alpha = tl.where(alpha < 1.0, tl.minimum(alpha, 1.0 - 1.0 / (step + 1.0)), alpha)
    return aligned, alpha


@triton.jit
def _gsema_update_kernel(
    table,  # int64 [3, num_chunks]: chunk address in teacher, chunk address in student, chunk length
    num_chunks,  # row stride of the table
    stats,  # fp32 or fp64 [6] gradient statistics
    step_ptr,  # 0-dim device tensor holding the step (read when STEP_IN_TENSOR)
    step_value,  # the step as a scalar argument (otherwise)
    decay_aligned,  # alpha when the gradients agree
    decay_conflict,  # alpha when they conflict
    decision,  # fp32 [2] output: aligned (1.0/0.0) and the alpha used
    T_CODE: tl.constexpr,  # element type of the teacher (DTYPE_CODES)
    S_CODE: tl.constexpr,  # element type of the student
    ALIGNED: tl.constexpr,  # chunk addresses are 16-byte aligned
    RULE_SIGN: tl.constexpr,  # decide on the sign agreement
    WARMUP: tl.constexpr,  # cap an alpha below 1 at 1 - 1/(step + 1)
    STEP_IN_TENSOR: tl.constexpr,  # take the step from step_ptr
    WRITE_DECISION: tl.constexpr,  # this launch stores the decision (the first group's)
    BLOCK: tl.constexpr,  # elements per iteration
    ITERS: tl.constexpr,  # iterations per chunk (CHUNK = BLOCK * ITERS)
):
    chunk = tl.program_id(0)
    aligned, alpha = decide(
        stats, step_ptr, step_value, decay_aligned, decay_conflict, RULE_SIGN, WARMUP, STEP_IN_TENSOR
    )
    if WRITE_DECISION:
        if chunk == 0:
            tl.store(decision, aligned.to(tl.float32))
            tl.store(decision + 1, alpha)
    if alpha < 1.0:
        teacher = as_pointer(tl.load(table + chunk), T_CODE, ALIGNED)
        student = as_pointer(tl.load(table + num_chunks + chunk), S_CODE, ALIGNED)
        length = tl.load(table + 2 * num_chunks + chunk)
        lerp_chunk(teacher, student, length, 1.0 - alpha, T_CODE == 3, BLOCK, ITERS)


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
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if isinstance(step, torch.Tensor):
        if step.dim() != 0 or step.device != device:
            raise ValueError(
                f"step must be an int or a 0-dim tensor on {device}, got shape {tuple(step.shape)} on {step.device}"
            )
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
            _lerp_all(teacher, student, 1.0 - alpha_value)
        return aligned
    update = alpha < 1.0
    for t, s in zip(teacher, student, strict=True):
        if t.is_floating_point():
            t.copy_(torch.where(update, t.lerp(s.to(t.dtype), weight.to(t.dtype)), t))
        else:
            t.copy_(torch.where(update, s, t))
    return aligned


def _lerp_all(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], weight: float) -> None:
    groups: dict[tuple[torch.dtype, torch.dtype], tuple[list, list]] = {}
    for t, s in zip(teacher, student, strict=True):
        if not t.is_floating_point():
            t.copy_(s)
        elif t.numel():
            ts, ss = groups.setdefault((t.dtype, s.dtype), ([], []))
            ts.append(t)
            ss.append(s)
    for (t_dtype, s_dtype), (ts, ss) in groups.items():
        torch._foreach_lerp_(ts, ss if s_dtype == t_dtype else [s.to(t_dtype) for s in ss], weight)


def gsema_update(
    teacher: Sequence[torch.Tensor],
    student: Sequence[torch.Tensor],
    stats: torch.Tensor,
    *,
    decay_aligned: float,
    decay_conflict: float,
    rule: str = "dot",
    step: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Conditional EMA of ``teacher`` towards ``student`` decided on the device; returns 0-dim ``aligned`` (1.0/0.0).

    ``step`` (int or 0-dim device tensor) enables the warm-up cap. Pass a device tensor to capture the update in a
    CUDA graph (an int is baked into the launch). Non-float pairs are copied when the update happens.
    """
    check_pairs(teacher, student, "teacher", "student", floating="x")
    device = teacher[0].device
    check_update_args(stats, device, decay_aligned, decay_conflict, rule, step)
    with device_guard(device):
        return _launch(teacher, student, stats, decay_aligned, decay_conflict, rule, step)


def _launch(teacher, student, stats, decay_aligned, decay_conflict, rule, step) -> torch.Tensor:
    plan = plan_pairs(teacher, student, CHUNK)
    decision = torch.empty(2, dtype=torch.float32, device=stats.device)
    step_in_tensor = isinstance(step, torch.Tensor)
    for index, group in enumerate(plan.groups):
        _gsema_update_kernel[(group.num_chunks,)](
            group.table,
            group.num_chunks,
            stats,
            step if step_in_tensor else stats,
            float(step) if step is not None and not step_in_tensor else 0.0,
            float(decay_aligned),
            float(decay_conflict),
            decision,
            T_CODE=group.x_code,
            S_CODE=group.y_code,
            ALIGNED=group.aligned,
            RULE_SIGN=rule == "sign",
            WARMUP=step is not None,
            STEP_IN_TENSOR=step_in_tensor,
            WRITE_DECISION=index == 0,
            BLOCK=BLOCK,
            ITERS=ITERS,
            num_warps=NUM_WARPS,
        )
    if not plan.groups or plan.other_pairs:
        aligned, alpha = decision_reference(stats, decay_aligned, decay_conflict, rule, step)
        if not plan.groups:
            decision[0], decision[1] = aligned, alpha
        update = decision[1] < 1.0
        for t, s in plan.other_pairs:
            t.copy_(torch.where(update, s, t))
    return decision[0]
