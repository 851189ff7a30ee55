"""Teacher updaters over the fused ops: ``GSEMA`` (the paper's gradient-surgery EMA) and a plain ``EMA``.

Both keep their counters on the device, so an update never waits for the GPU; read them (``aligned_fraction``,
``int(ema.step)``) at logging time. The counters live where the teacher lives: ``to()`` moves both, and a teacher
moved on its own takes them along at its next update. Neither knows anything about models beyond ``parameters()`` and
``buffers()``: any trainer can use them.

Typical use::

    gsema = GSEMA(student)                       # teacher = deep copy of the student, no grad
    ...
    stats = ops.grad_stats(g_src, g_trg)         # two gradient lists, see ops.grad_stats
    optimizer.step()
    gsema.update(stats)                          # conditional EMA of the teacher, decided on the device
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from gsema_fast import ops
from gsema_fast.config import EmaRule, check_choice


def _check_warmup_start(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"warmup_start must be a non-negative int, got {value!r}")
    return value


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_decay(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a finite number in [0, 1], got {value}")
    return float(value)


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _tensors(model: nn.Module, *, buffers: bool = True) -> list[torch.Tensor]:
    tensors = [p.detach() for p in model.parameters()]
    if buffers:
        tensors += [b.detach() for b in model.buffers()]
    return tensors


class GSEMA:
    """Gradient-surgery EMA: the teacher follows the student only when the source- and target-domain gradients agree.

    ``update(stats)`` after ``optimizer.step()``: ``stats`` from :func:`gsema_fast.ops.grad_stats` of the two DCE
    gradients; aligned (``rule="dot"``: ``g_src . g_trg > 0``; ``"sign"``: positive cosine of the sign vectors)
    moves the teacher with ``decay_aligned``, a conflict with ``decay_conflict`` (1.0, the default, = no update).
    With ``warmup`` a decay below 1 is capped at ``1 - 1/(t+1)`` at update ``t`` (counted from ``warmup_start``: 0
    here, 1 in the public code, whose first update uses 0.5); a decay of 1 is never warmed up, so a rejected step
    never moves the teacher. Buffers are averaged (floats) or copied (integers) together with the parameters.
    ``to(...)`` moves the teacher and the counters (the student is the trainer's to move).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        decay_aligned: float = 0.9,
        decay_conflict: float = 1.0,
        rule: str = "dot",
        warmup: bool = True,
        warmup_start: int = 0,
    ) -> None:
        check_choice("rule", rule, EmaRule)
        self.student = student
        self.teacher = _frozen_copy(student) if teacher is None else teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.decay_aligned = _check_decay("decay_aligned", decay_aligned)
        self.decay_conflict = _check_decay("decay_conflict", decay_conflict)
        self.rule = rule
        self.warmup = bool(warmup)
        self.warmup_start = _check_warmup_start(warmup_start)
        device = _device_of(self.teacher)
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.num_aligned = torch.zeros((), dtype=torch.int64, device=device)
        self.last_aligned = torch.zeros((), dtype=torch.float32, device=device)

    def to(self, *args, **kwargs) -> GSEMA:
        """``teacher.to(*args, **kwargs)``, the counters following it to its device (they keep their dtypes)."""
        self.teacher.to(*args, **kwargs)
        self._follow_teacher()
        return self

    def _follow_teacher(self) -> None:
        device = _device_of(self.teacher)
        if self.step.device != device:
            self.step = self.step.to(device)
            self.num_aligned = self.num_aligned.to(device)
            self.last_aligned = self.last_aligned.to(device)

    @torch.no_grad()
    def update(self, stats: torch.Tensor, *, skip: torch.Tensor | None = None) -> torch.Tensor:
        """Conditional EMA step from the gradient statistics; returns the 0-dim aligned flag (1.0/0.0).

        ``skip`` (0-dim bool device tensor): the optimizer skipped this step (non-finite gradients). The step then
        counts as a conflict without warm-up (with ``decay_conflict = 1`` the teacher is untouched) and is not
        counted, all decided on the device.
        """
        self._follow_teacher()
        step = (self.step + self.warmup_start if self.warmup_start else self.step) if self.warmup else None
        if skip is not None:
            stats = torch.where(skip, torch.full_like(stats, -1.0), stats)
            if step is not None:
                # A step count this large lifts the warm-up cap, leaving alpha = decay_conflict.
                step = torch.where(skip, torch.full_like(step, 1 << 40), step)
        aligned = ops.gsema_update_(
            _tensors(self.teacher),
            _tensors(self.student),
            stats,
            decay_aligned=self.decay_aligned,
            decay_conflict=self.decay_conflict,
            rule=self.rule,
            step=step,
        )
        counted = torch.ones_like(self.step) if skip is None else (~skip).to(torch.int64)
        self.step += counted
        self.num_aligned += aligned.to(torch.int64) * counted
        self.last_aligned.copy_(aligned)
        return aligned

    def aligned_fraction(self) -> float:
        """Fraction of updates so far with aligned gradients (reads the device: call it at logging time)."""
        steps = int(self.step)
        return int(self.num_aligned) / steps if steps else float("nan")

    def state_dict(self) -> dict:
        return {
            "teacher": self.teacher.state_dict(),
            "step": self.step.clone(),
            "num_aligned": self.num_aligned.clone(),
            "decay_aligned": self.decay_aligned,
            "decay_conflict": self.decay_conflict,
            "rule": self.rule,
            "warmup": self.warmup,
            "warmup_start": self.warmup_start,
        }

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.step.copy_(state["step"])
        self.num_aligned.copy_(state["num_aligned"])
        self.decay_aligned = _check_decay("decay_aligned", state["decay_aligned"])
        self.decay_conflict = _check_decay("decay_conflict", state["decay_conflict"])
        check_choice("rule", state["rule"], EmaRule)
        self.rule = state["rule"]
        self.warmup = bool(state["warmup"])
        # Checkpoints written before the start was a setting counted from 0.
        self.warmup_start = _check_warmup_start(state.get("warmup_start", 0))


class EMA(nn.Module):
    """A plain exponential moving average of a model (the paper's "EMA" row; usable by any trainer).

    ``update(model, step=None)``: ``ema = d*ema + (1-d)*model`` with ``d = decay``, capped at ``1 - 1/(t+1)`` with
    ``warmup`` (``t`` = ``step`` if given, else ``warmup_start`` plus the number of updates so far, counted on the
    device; the weight is computed in fp64). ``decay = 1`` is never warmed up into a move. Float buffers
    are averaged and integer buffers copied; with ``exclude_buffers`` all buffers are copied instead. ``set(model)``
    copies the weights. Calling the module runs the averaged model.

    Called as timm's ``ModelEmaV3(model, decay, ..., device=...)``: ``decay`` may be positional, and ``device`` keeps
    the average elsewhere than the model (``"cpu"`` to spare GPU memory; each update then copies the model's tensors
    there). One difference is deliberate: the warm-up is on by default (timm's is off), since a fresh average of a
    fresh model at decay 0.9999 would remember its random initialisation for thousands of steps; ``warmup=False``
    gives timm's behaviour.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        *,
        warmup: bool = True,
        exclude_buffers: bool = False,
        warmup_start: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.module = _frozen_copy(model)
        if device is not None:
            self.module.to(device)
        self.decay = _check_decay("decay", decay)
        self.warmup = bool(warmup)
        self.exclude_buffers = bool(exclude_buffers)
        self.warmup_start = _check_warmup_start(warmup_start)
        device = _device_of(self.module)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64, device=device))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | torch.Tensor | None = None) -> None:
        device = _device_of(self.module)
        if self.num_updates.device != device:  # the averaged module was moved on its own
            self.num_updates = self.num_updates.to(device)
        if self.warmup and self.decay < 1.0:  # a decay of 1 ("never move") is not warmed up into a move
            if step is None:
                t = self.num_updates.to(torch.float64) + self.warmup_start
            elif isinstance(step, torch.Tensor):
                t = step.to(device=device, dtype=torch.float64)
            else:
                t = torch.full((), float(step), dtype=torch.float64, device=device)
            decay = torch.clamp(1.0 - 1.0 / (t + 1.0), max=self.decay)
            weight = 1.0 - decay
        else:
            weight = 1.0 - self.decay
        current = _tensors(model, buffers=not self.exclude_buffers)
        if current and current[0].device != device:
            current = [t.to(device, non_blocking=True) for t in current]
        ops.fused_ema_(_tensors(self.module, buffers=not self.exclude_buffers), current, weight)
        if self.exclude_buffers:
            for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
                ema_buffer.copy_(buffer)
        self.num_updates += 1

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        for ema_tensor, tensor in zip(_tensors(self.module), _tensors(model), strict=True):
            ema_tensor.copy_(tensor)
