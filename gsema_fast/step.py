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
a step with a non-finite loss or gradient is skipped on the device (the fused optimizer's ``found_inf``). The
gradient checked is the one the optimizer applies: buffer A after every pass has added into it (BACL's last).

Gradient buffers live in one flat tensor per dtype, copy after copy (A, B, and in a multi-process run C for BACL),
each parameter's slice 256-byte aligned: zeroing is one kernel, and averaging across ranks is one all-reduce per
range. Across ranks the step becomes: pass 1 into A, pass 2 into B, all-reduce A|B (asynchronously, while) pass 4
runs into C, all-reduce C, then ``grad_stats`` on the averaged A and B and A += C. The decision is therefore the
one a single process would make with the global batch, and every rank updates its teacher with the same bits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from gsema_fast import ops
from gsema_fast.config import BaclOptions, EmaConfig, EmaMode, LossConfig, check_choice
from gsema_fast.ema import EMA, GSEMA
from gsema_fast.losses import BACL


def updater_from_config(ema: EmaConfig, student: nn.Module, teacher: nn.Module | None = None) -> GSEMA | EMA | None:
    """The teacher updater an ``ema`` config section asks for: :class:`GSEMA` (``mode: gsema``, over ``teacher``
    when given), :class:`EMA` (``mode: ema``) or None (``mode: none``). One place for every trainer, so that each
    setting of the section reaches the updater."""
    if ema.mode == "gsema":
        return GSEMA(
            student,
            teacher,
            decay_aligned=ema.decay_aligned,
            decay_conflict=ema.decay_conflict,
            rule=ema.rule,
            warmup=ema.warmup,
            warmup_start=ema.warmup_start,
        )
    if ema.mode == "ema":
        return EMA(student, decay=ema.decay, warmup=ema.warmup, warmup_start=ema.warmup_start)
    return None


def bacl_from_config(loss: LossConfig, bacl: BaclOptions) -> BACL | None:
    """The contrastive loss the ``loss`` and ``bacl`` config sections ask for, with the section as its options; None
    when it is off (weight 0 or neither term)."""
    if loss.lambda_con <= 0 or not bacl.has_term:
        return None
    return BACL(bacl)


@dataclass
class StepContext:
    """What a step needs, built once by the trainer (and by benchmarks and tests)."""

    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    mode: EmaMode
    updater: GSEMA | EMA | None
    dce: nn.Module
    bacl: BACL | None  # None: no contrastive term
    lambda_sup: float
    lambda_con: float
    amp_dtype: torch.dtype | None = None  # autocast dtype, None for fp32
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    teacher_terms: bool = True  # default for forward_all's teacher_logits
    # Ranks whose gradients are averaged (torch.distributed's default group); 1: a single process.
    world_size: int = 1
    # Persistent gradient buffers (A holds the optimizer's gradient, B the target pass's, C BACL's across ranks);
    # fixed addresses keep the fused ops' launch tables cached and let the step be captured.
    grads_a: list[torch.Tensor] = field(default_factory=list)
    grads_b: list[torch.Tensor] = field(default_factory=list)
    grads_c: list[torch.Tensor] = field(default_factory=list)
    storage: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (flat tensor, elements per copy)
    # The student's layers (its weight tensors of two or more dimensions: convolutions, linear maps) by name, and
    # their indices among ``params``: the per-layer agreement of a GS-EMA step (see layer_agreement).
    layers: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("ema.mode", self.mode, EmaMode)
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if self.scaler is None and self.optimizer.defaults.get("fused") is not True:
            # The step skips a non-finite update through the optimizer's found_inf, which only fused torch optimizers
            # read on the device (the others assert it is unset); a GradScaler skips for any optimizer itself.
            raise ValueError(
                f"optimizer must be a fused torch optimizer (e.g. torch.optim.AdamW(..., fused=True)), got "
                f"{type(self.optimizer).__name__} with fused={self.optimizer.defaults.get('fused')!r}"
            )
        copies = 1
        if self.mode == "gsema":
            copies = 3 if self.world_size > 1 and self.bacl is not None and self.lambda_con > 0 else 2
        buffers, self.storage = flat_gradient_buffers(self.params, copies)
        self.grads_a = buffers[0]
        self.grads_b = buffers[1] if copies > 1 else []
        self.grads_c = buffers[2] if copies > 2 else []
        self.point_grads_at(self.grads_a)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.layers = {
            name.removesuffix(".weight"): index[id(p)]
            for name, p in self.student.named_parameters()
            if p.requires_grad and p.dim() >= 2 and id(p) in index
        }

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def point_grads_at(self, buffers: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, buffers, strict=True):
            p.grad = g

    def zero_grads(self) -> None:
        for flat, _ in self.storage:
            flat.zero_()

    def reduce_grads(self, first: int, last: int) -> list:
        """Start summing gradient copies ``first:last`` across ranks (one all-reduce per dtype); returns the
        pending works. The sum becomes a mean in :meth:`finish_reduce`."""
        return [torch.distributed.all_reduce(flat[first * n : last * n], async_op=True) for flat, n in self.storage]

    def finish_reduce(self, pending: list) -> None:
        for work in pending:
            work.wait()
        for flat, _ in self.storage:
            flat.mul_(1.0 / self.world_size)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.student.parameters()).device.type
        return torch.autocast(device_type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor, *, retain_graph: bool = False) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(retain_graph=retain_graph)


ALIGN_BYTES = 256


def flat_gradient_buffers(
    params: list[torch.Tensor], copies: int
) -> tuple[list[list[torch.Tensor]], list[tuple[torch.Tensor, int]]]:
    """``copies`` zeroed sets of buffers shaped like ``params``, as views of one flat tensor per (dtype, device)
    laid out copy after copy; each view starts ``ALIGN_BYTES``-aligned from the flat tensor's start (CUDA
    allocations themselves are 512-byte aligned). Returns the sets and the flat
    tensors with their per-copy length, so that copy k of a group is ``flat[k * n : (k + 1) * n]``."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.dtype, p.device), []).append(i)
    buffers: list[list[torch.Tensor | None]] = [[None] * len(params) for _ in range(copies)]
    storage = []
    for (dtype, device), members in groups.items():
        step = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        offsets, n = [], 0
        for i in members:
            offsets.append(n)
            n += -(-params[i].numel() // step) * step
        flat = torch.zeros(copies * n, dtype=dtype, device=device)
        for k in range(copies):
            for i, off in zip(members, offsets, strict=True):
                start = k * n + off
                buffers[k][i] = flat[start : start + params[i].numel()].view(params[i].shape)
        storage.append((flat, n))
    return buffers, storage


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


def _count_on_all_ranks(flag: torch.Tensor, pending: list) -> torch.Tensor:
    """The number of ranks where ``flag`` is set, summed along with the pending gradient all-reduces (read it after
    they finish), so that every rank skips a step together."""
    count = flag.float().reshape(())
    pending.append(torch.distributed.all_reduce(count, async_op=True))
    return count


def _nonfinite_grads(ctx: StepContext) -> torch.Tensor:
    """Whether the optimizer's gradient (buffer A) holds a NaN or an infinity: 0-dim bool on the device, no sync.

    The largest magnitude of each flat buffer (one read, no temporary of its size; NaN propagates through it)."""
    peaks = [torch.linalg.vector_norm(flat[:n], float("inf")).float() for flat, n in ctx.storage]
    return ~torch.isfinite(torch.stack(peaks)).all()


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


def layer_agreement(ctx: StepContext) -> torch.Tensor:
    """The cosine of the source and the target gradient in each of the student's layers (``ctx.layers``' order),
    from buffers A and B before they are added: a ``[layers]`` device tensor, NaN for a layer without gradient.

    Three fused multi-tensor passes (the norms of A, of B and of A + B) and no host read: ``a.b = (|a+b|^2 - |a|^2 -
    |b|^2) / 2``, whose rounding moves a cosine by about fp32's epsilon.
    """
    a = [ctx.grads_a[i] for i in ctx.layers.values()]
    b = [ctx.grads_b[i] for i in ctx.layers.values()]
    norm_a = torch.stack(torch._foreach_norm(a)).double()
    norm_b = torch.stack(torch._foreach_norm(b)).double()
    norm_sum = torch.stack(torch._foreach_norm(torch._foreach_add(a, b))).double()
    dot = (norm_sum.square() - norm_a.square() - norm_b.square()) / 2
    return (dot / (norm_a * norm_b)).float()


def gsema_step(
    ctx: StepContext, x_s, y_s, x_t, y_t, *, teacher_logits: bool | None = None, layers: bool = False
) -> dict[str, torch.Tensor]:
    """One GS-EMA step (``ema.mode: gsema``); returns 0-dim device tensors for logging, and with ``layers`` the
    per-layer cosines of the source and target gradients (``layer_cos``, a vector; see :func:`layer_agreement`)."""
    out = forward_all(ctx, x_s, y_s, x_t, y_t, teacher_logits=teacher_logits)
    has_con = "bacl" in out and ctx.lambda_con > 0
    total = _total(ctx, out)
    nonfinite = ~torch.isfinite(total)
    ctx.zero_grads()
    ctx.backward(ctx.lambda_sup * out["dce_student_src"], retain_graph=has_con)
    ctx.point_grads_at(ctx.grads_b)
    ctx.backward(ctx.lambda_sup * out["dce_student_trg"], retain_graph=has_con)
    if ctx.world_size > 1:
        pending = ctx.reduce_grads(0, 2)  # in flight while BACL's pass runs
        if has_con:
            ctx.point_grads_at(ctx.grads_c)
            ctx.backward(ctx.lambda_con * out["bacl"])
            pending += ctx.reduce_grads(2, 3)
        nonfinite_ranks = _count_on_all_ranks(nonfinite, pending)
        ctx.finish_reduce(pending)
        nonfinite = nonfinite_ranks > 0
        ctx.point_grads_at(ctx.grads_a)
        if layers:
            out["layer_cos"] = layer_agreement(ctx)
        stats = ops.grad_stats(ctx.grads_a, ctx.grads_b, accumulate_into_a=True)
        if has_con:
            for flat, n in ctx.storage:
                flat[:n].add_(flat[2 * n : 3 * n])
    else:
        ctx.point_grads_at(ctx.grads_a)
        if layers:
            out["layer_cos"] = layer_agreement(ctx)
        stats = ops.grad_stats(ctx.grads_a, ctx.grads_b, accumulate_into_a=True)
        if has_con:
            ctx.backward(ctx.lambda_con * out["bacl"])
    # Finite statistics mean finite A and B, hence a finite A + B; BACL's pass adds to A after them, so A is checked
    # again then (a GradScaler checks every gradient itself).
    nonfinite = nonfinite | ~torch.isfinite(stats[:3]).all()
    if has_con and ctx.scaler is None:
        nonfinite = nonfinite | _nonfinite_grads(ctx)
    skip = _optimizer_step(ctx, nonfinite)
    aligned = ctx.updater.update(stats, skip=skip)
    out.update(total=total, skipped=skip.float(), aligned=aligned, grad_cos=ops.grad_cos(stats).float())
    return {k: v.detach() for k, v in out.items()}


def single_backward_step(
    ctx: StepContext, x_s, y_s, x_t, y_t, *, teacher_logits: bool | None = None
) -> dict[str, torch.Tensor]:
    """One step of the ``none`` and ``ema`` modes: one backward of the total loss, then the teacher follows."""
    out = forward_all(ctx, x_s, y_s, x_t, y_t, teacher_logits=teacher_logits)
    ctx.zero_grads()
    loss = ctx.lambda_sup * (out["dce_student_src"] + out["dce_student_trg"])
    if "bacl" in out and ctx.lambda_con > 0:
        loss = loss + ctx.lambda_con * out["bacl"]
    ctx.backward(loss)
    total = _total(ctx, out)
    nonfinite = ~torch.isfinite(total)
    if ctx.world_size > 1:
        pending = ctx.reduce_grads(0, 1)
        nonfinite_ranks = _count_on_all_ranks(nonfinite, pending)
        ctx.finish_reduce(pending)
        nonfinite = nonfinite_ranks > 0
    if ctx.scaler is None:  # a finite loss can still have a non-finite gradient (a GradScaler checks them itself)
        nonfinite = nonfinite | _nonfinite_grads(ctx)
    skip = _optimizer_step(ctx, nonfinite)
    with torch.no_grad():
        if ctx.mode == "ema":
            ctx.updater.update(ctx.student)
        else:  # none: the teacher mirrors the student, so its latents and evaluation are the student's
            ops.fused_ema_(
                [p.detach() for p in ctx.teacher.parameters()], [p.detach() for p in ctx.student.parameters()], 1.0
            )
    out.update(total=total, skipped=skip.float())
    return {k: v.detach() for k, v in out.items()}


def train_step(
    ctx: StepContext, x_s, y_s, x_t, y_t, *, teacher_logits: bool | None = None, layers: bool = False
) -> dict[str, torch.Tensor]:
    """The step of ``ctx.mode``. ``teacher_logits``: compute the teacher's (logged) DCE terms this step; ``layers``:
    the per-layer gradient agreement too (GS-EMA only: the other modes never hold the two gradients apart)."""
    if ctx.mode == "gsema":
        return gsema_step(ctx, x_s, y_s, x_t, y_t, teacher_logits=teacher_logits, layers=layers)
    return single_backward_step(ctx, x_s, y_s, x_t, y_t, teacher_logits=teacher_logits)
