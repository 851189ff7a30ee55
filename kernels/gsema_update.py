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
The rule, the warm-up and where the step comes from are runtime flags, not constexprs: a uniform branch costs a
streaming kernel nothing, and each constexpr would double the variants Triton compiles.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from gsema_fast.kernels._multi_tensor import LAYOUT, Layout, as_pointer, plan_pairs
from gsema_fast.kernels._variants import Variant
from gsema_fast.kernels.fused_ema import average_code_pairs, lerp_chunk
from gsema_fast.reference.device import device_guard
from gsema_fast.reference.gsema_update import check_update_args, decision_reference
from gsema_fast.reference.multi_tensor import check_pairs


@triton.jit
def decide(
    stats,  # fp64 [>= 4] gradient statistics
    step_ptr,  # 0-dim int64 device tensor holding the step (read when step_in_tensor)
    step_value,  # the step as a scalar argument (otherwise)
    decay_aligned,  # alpha when the gradients agree
    decay_conflict,  # alpha when they conflict
    rule_sign,  # 1: decide on the sign agreement s[3] instead of the dot product s[0]
    warmup,  # 1: cap an alpha below 1 at 1 - 1/(step + 1)
    step_in_tensor,  # 1: take the step from step_ptr
):
    agreement = tl.load(stats + 3 * rule_sign)
    aligned = agreement > 0
    alpha = tl.where(aligned, decay_aligned, decay_conflict)
    if warmup != 0:
        step = step_value
        if step_in_tensor != 0:
            step = tl.load(step_ptr).to(tl.float32)
        # Only an update is warmed up: alpha == 1 ("no update") stays 1.
        alpha = tl.where(alpha < 1.0, tl.minimum(alpha, 1.0 - 1.0 / (step + 1.0)), alpha)
    return aligned, alpha


@triton.jit(
    do_not_specialize=["num_chunks", "rule_sign", "warmup", "step_in_tensor", "write_decision"],
    do_not_specialize_on_alignment=["table", "stats", "step_ptr", "decision"],
)
def _gsema_update_kernel(
    table,  # int64 [3, num_chunks]: chunk address in teacher, chunk address in student, chunk length
    num_chunks,  # row stride of the table
    stats,  # fp64 [6] gradient statistics
    step_ptr,  # 0-dim int64 device tensor holding the step (read when step_in_tensor; else any int64 tensor)
    step_value,  # the step as a scalar argument (otherwise)
    decay_aligned,  # alpha when the gradients agree
    decay_conflict,  # alpha when they conflict
    decision,  # fp32 [2] output: aligned (1.0/0.0) and the alpha used
    rule_sign,  # 1: decide on the sign agreement
    warmup,  # 1: cap an alpha below 1 at 1 - 1/(step + 1)
    step_in_tensor,  # 1: take the step from step_ptr
    write_decision,  # 1: this launch stores the decision (the first group's)
    T_CODE: tl.constexpr,  # element type of the teacher (DTYPE_CODES)
    S_CODE: tl.constexpr,  # element type of the student
    ALIGNED: tl.constexpr,  # chunk addresses are 16-byte aligned
    BLOCK: tl.constexpr,  # elements per iteration
    ITERS: tl.constexpr,  # iterations per chunk (CHUNK = BLOCK * ITERS)
):
    chunk = tl.program_id(0)
    aligned, alpha = decide(
        stats, step_ptr, step_value, decay_aligned, decay_conflict, rule_sign, warmup, step_in_tensor
    )
    if write_decision != 0:
        if chunk == 0:
            tl.store(decision, aligned.to(tl.float32))
            tl.store(decision + 1, alpha)
    if alpha < 1.0:
        teacher = as_pointer(tl.load(table + chunk), T_CODE, ALIGNED)
        student = as_pointer(tl.load(table + num_chunks + chunk), S_CODE, ALIGNED)
        length = tl.load(table + 2 * num_chunks + chunk)
        lerp_chunk(teacher, student, length, 1.0 - alpha, T_CODE == 3, BLOCK, ITERS)


_ARGS = (
    ("table", "*i64"),
    ("num_chunks", "i32"),
    ("stats", "*fp64"),
    ("step_ptr", "*i64"),
    ("step_value", "fp32"),
    ("decay_aligned", "fp32"),
    ("decay_conflict", "fp32"),
    ("decision", "*fp32"),
    ("rule_sign", "i32"),
    ("warmup", "i32"),
    ("step_in_tensor", "i32"),
    ("write_decision", "i32"),
)


@functools.cache
def update_variant(teacher_code: int, student_code: int, aligned: bool, layout: Layout) -> Variant:
    """The variant of ``_gsema_update_kernel`` for one dtype pair (statistics in fp64, a step tensor in int64)."""
    return Variant(
        _gsema_update_kernel,
        args=_ARGS,
        constexprs=(
            ("T_CODE", teacher_code),
            ("S_CODE", student_code),
            ("ALIGNED", aligned),
            ("BLOCK", layout.block),
            ("ITERS", layout.iters),
        ),
        num_warps=layout.num_warps,
    )


def variants(layout: Layout) -> list[Variant]:
    """Every variant the launcher can produce under ``layout``: each dtype pair an average may take."""
    return [
        update_variant(teacher, student, aligned, layout)
        for teacher, student in average_code_pairs()
        for aligned in (False, True)
    ]


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

    ``step`` (int or 0-dim integer device tensor) enables the warm-up cap. Pass a device tensor to capture the update
    in a CUDA graph (an int is baked into the launch). Non-float pairs are copied, and complex pairs averaged by
    torch, when the update happens.
    """
    check_pairs(teacher, student, "teacher", "student", average=True)
    device = teacher[0].device
    check_update_args(stats, device, decay_aligned, decay_conflict, rule, step)
    with device_guard(device):
        return _launch(teacher, student, stats, decay_aligned, decay_conflict, rule, step)


def _launch(teacher, student, stats, decay_aligned, decay_conflict, rule, step) -> torch.Tensor:
    plan = plan_pairs(teacher, student, LAYOUT.chunk)
    decision = torch.empty(2, dtype=torch.float32, device=stats.device)
    wide_stats = stats if stats.dtype == torch.float64 else stats.to(torch.float64)
    step_in_tensor = isinstance(step, torch.Tensor)
    if step_in_tensor and step.dtype != torch.int64:
        step = step.to(torch.int64)
    for index, group in enumerate(plan.groups):
        update_variant(group.x_code, group.y_code, group.aligned, LAYOUT).launch(
            (group.num_chunks,),
            group.table,
            group.num_chunks,
            wide_stats,
            step if step_in_tensor else group.table,
            float(step) if step is not None and not step_in_tensor else 0.0,
            float(decay_aligned),
            float(decay_conflict),
            decision,
            int(rule == "sign"),
            int(step is not None),
            int(step_in_tensor),
            int(index == 0),
        )
    if not plan.groups or plan.other_pairs:
        aligned, alpha = decision_reference(stats, decay_aligned, decay_conflict, rule, step)
        if not plan.groups:
            decision[0], decision[1] = aligned, alpha
        update = decision[1] < 1.0
        for t, s in plan.other_pairs:
            if t.is_complex():
                t.copy_(torch.where(update, t.lerp(s, (1.0 - decision[1]).to(t.dtype)), t))
            else:
                t.copy_(torch.where(update, s, t))
    return decision[0]
