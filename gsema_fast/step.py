"""One teacher-student training step: GS-EMA with three backward passes that add up to one.

The total loss is ``lambda_sup * (L_ss + L_st + L_ts + L_tt) + lambda_con * L_con`` (``L_xy``: Dice + CE of network
x in {student, teacher} on domain y in {source, target}; the teacher terms carry no gradient and are logged only).
GS-EMA needs the gradients of ``L_ss`` and ``L_st`` separately, and the optimizer needs the gradient of the total.
Rather than a full backward of the total plus two more for the separate gradients (the public code, about four
plain steps), the step runs

1. ``lambda_sup * L_ss`` backward into gradient buffer A,
2. ``lambda_sup * L_st`` backward into buffer B,
3. ``grad_stats(A, B, accumulate_into_a=True)``: one fused read of both buffers gives the agreement statistics and
   leaves A = A + B,
4. ``lambda_con * L_con`` backward, accumulating into A (it reaches only the encoder),

then the optimizer step on A and the conditional EMA of the teacher, decided on the device. The three passes traverse
disjoint parts of the graph (source forward, target forward, encoder), so together they cost one backward of the
total. Nothing in the step reads a value on the host: losses and counters stay on the device until logging time, and
a step with a non-finite loss or gradient is skipped on the device (the fused optimizer's ``found_inf``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from gsema_fast import ops
from gsema_fast.ema import EMA, GSEMA
from gsema_fast.losses import BACL

MODES = ("none", "ema", "gsema")


@dataclass
class StepContext:
    """What a step needs, built once by the trainer (and by benchmarks and tests)."""

    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    mode: str  # none | ema | gsema
    updater: GSEMA | EMA | None
    dce: nn.Module
    bacl: BACL | None  # None: no contrastive term
    lambda_sup: float
    lambda_con: float
    amp_dtype: torch.dtype | None = None  # autocast dtype, None for fp32
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    teacher_terms: bool = True  # default for forward_all's teacher_logits
    # Persistent gradient buffers (A holds the optimizer's gradient); fixed addresses keep the fused ops' launch
    # tables cached and let the step be captured.
    grads_a: list[torch.Tensor] = field(default_factory=list)
    grads_b: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"ema.mode must be one of {MODES}, got {self.mode!r}")
        params = self.params
        self.grads_a = [torch.zeros_like(p) for p in params]
        self.grads_b = [torch.zeros_like(p) for p in params] if self.mode == "gsema" else []
        self.point_grads_at(self.grads_a)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def point_grads_at(self, buffers: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, buffers, strict=True):
            p.grad = g

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.student.parameters()).device.type
        return torch.autocast(device_type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor, *, retain_graph: bool = False) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(retain_graph=retain_graph)


def forward_all(ctx: StepContext, x_s, y_s, x_t, y_t, *, teacher_logits: bool | None = None) -> dict[str, torch.Tensor]:
    """Student on source and target (two graphs, so each DCE backward walks only its own), teacher on both at once
    under ``no_grad``, the DCE terms and BACL.

    The teacher's DCE terms are logged, never trained: with ``teacher_logits`` False (default: ``ctx.teacher_terms``)
    the teacher runs only up to its latent, BACL's one input from it, which skips most of its forward.
    """
    out: dict[str, torch.Tensor] = {}
    teacher_logits = ctx.teacher_terms if teacher_logits is None else teacher_logits
    with ctx.autocast():
        logits_ss, z_ss = ctx.student(x_s)
        logits_st, z_st = ctx.student(x_t)
        out["dce_student_src"] = ctx.dce(logits_ss, y_s)
        out["dce_student_trg"] = ctx.dce(logits_st, y_t)
        with torch.no_grad():
            if teacher_logits:
                logits_t, z_t = ctx.teacher(torch.cat((x_s, x_t)))
                logits_ts, logits_tt = logits_t.chunk(2)
                out["dce_teacher_src"] = ctx.dce(logits_ts, y_s)
                out["dce_teacher_trg"] = ctx.dce(logits_tt, y_t)
            else:
                z_t = ctx.teacher.forward_latent(torch.cat((x_s, x_t)))
            z_ts, z_tt = z_t.chunk(2)
    if ctx.bacl is not None:
        # BACL runs outside autocast: its fused passes accumulate in fp32 and take bf16 latents as they come.
        out["bacl"], parts = ctx.bacl(z_ss, z_st, z_ts, z_tt)
        out.update({f"bacl_{k}": v for k, v in parts.items()})
    return out


def _total(ctx: StepContext, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss that is trained (student terms and BACL); the teacher's terms are logged on their own."""
    total = ctx.lambda_sup * (out["dce_student_src"] + out["dce_student_trg"])
    if "bacl" in out:
        total = total + ctx.lambda_con * out["bacl"]
    return total.detach()


def _optimizer_step(ctx: StepContext, nonfinite: torch.Tensor) -> torch.Tensor:
    """Step the optimizer unless a loss or gradient is non-finite, decided on the device; returns the skip flag."""
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
        found = sum(t.to(nonfinite.device) for t in ctx.scaler._found_inf_per_device(ctx.optimizer).values())
        skip = nonfinite | (found > 0)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        return skip
    # A fused optimizer reads ``found_inf`` on the device and leaves parameters and state untouched when it is set.
    ctx.optimizer.found_inf = nonfinite.float()
    try:
        ctx.optimizer.step()
    finally:
        del ctx.optimizer.found_inf
    return nonfinite


def gsema_step(ctx: StepContext, x_s, y_s, x_t, y_t, *, teacher_logits: bool | None = None) -> dict[str, torch.Tensor]:
    """One GS-EMA step (``ema.mode: gsema``); returns 0-dim device tensors for logging."""
    out = forward_all(ctx, x_s, y_s, x_t, y_t, teacher_logits=teacher_logits)
    has_con = "bacl" in out and ctx.lambda_con > 0
    torch._foreach_zero_(ctx.grads_a)
    torch._foreach_zero_(ctx.grads_b)
    ctx.backward(ctx.lambda_sup * out["dce_student_src"], retain_graph=has_con)
    ctx.point_grads_at(ctx.grads_b)
    ctx.backward(ctx.lambda_sup * out["dce_student_trg"], retain_graph=has_con)
    ctx.point_grads_at(ctx.grads_a)
    stats = ops.grad_stats(ctx.grads_a, ctx.grads_b, accumulate_into_a=True)
    if has_con:
        ctx.backward(ctx.lambda_con * out["bacl"])
    total = _total(ctx, out)
    skip = _optimizer_step(ctx, ~torch.isfinite(total) | ~torch.isfinite(stats[:3]).all())
    aligned = ctx.updater.update(stats, skip=skip)
    out.update(total=total, skipped=skip.float(), aligned=aligned, grad_cos=stats[0] / (stats[1] * stats[2]).sqrt())
    return {k: v.detach() for k, v in out.items()}


def single_backward_step(
    ctx: StepContext, x_s, y_s, x_t, y_t, *, teacher_logits: bool | None = None
) -> dict[str, torch.Tensor]:
    """One step of the ``none`` and ``ema`` modes: one backward of the total loss, then the teacher follows."""
    out = forward_all(ctx, x_s, y_s, x_t, y_t, teacher_logits=teacher_logits)
    torch._foreach_zero_(ctx.grads_a)
    loss = ctx.lambda_sup * (out["dce_student_src"] + out["dce_student_trg"])
    if "bacl" in out and ctx.lambda_con > 0:
        loss = loss + ctx.lambda_con * out["bacl"]
    ctx.backward(loss)
    total = _total(ctx, out)
    skip = _optimizer_step(ctx, ~torch.isfinite(total))
    with torch.no_grad():
        if ctx.mode == "ema":
            ctx.updater.update(ctx.student)
        else:  # none: the teacher mirrors the student, so its latents and evaluation are the student's
            ops.fused_ema_(
                [p.detach() for p in ctx.teacher.parameters()], [p.detach() for p in ctx.student.parameters()], 1.0
            )
    out.update(total=total, skipped=skip.float())
    return {k: v.detach() for k, v in out.items()}


def train_step(ctx: StepContext, x_s, y_s, x_t, y_t, *, teacher_logits: bool | None = None) -> dict[str, torch.Tensor]:
    """The step of ``ctx.mode``. ``teacher_logits``: compute the teacher's (logged) DCE terms this step."""
    if ctx.mode == "gsema":
        return gsema_step(ctx, x_s, y_s, x_t, y_t, teacher_logits=teacher_logits)
    return single_backward_step(ctx, x_s, y_s, x_t, y_t, teacher_logits=teacher_logits)
