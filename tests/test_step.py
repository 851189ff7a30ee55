"""The GS-EMA step's safety nets: the warm-up on a conflicting step, the non-finite skip on the gradient the optimizer
applies, and the optimizers the step can skip with (tiny UNet on the CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import make_ctx, params_of, recorded_grad_stats, tiny_batch

from gsema_fast import ops
from gsema_fast.ema import GSEMA
from gsema_fast.losses import BACL
from gsema_fast.step import train_step

# tiny tensors: a second thread only adds synchronisation
pytestmark = pytest.mark.usefixtures("one_thread")


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a loss that is finite while its gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class NaNGradientBACL(BACL):
    """BACL whose loss is finite and whose gradient is NaN: only its backward pass makes the step non-finite."""

    def forward(self, *zs):
        loss, parts = super().forward(*zs)
        return _NaNGradient.apply(loss), parts


@pytest.mark.parametrize("mode", ["gsema", "ema"])
def test_a_nonfinite_gradient_from_bacls_pass_skips_the_step(mode):
    """The skip reads the gradient the optimizer applies (A, after BACL's pass added into it), not only the loss and
    the statistics taken before that pass."""
    ctx = make_ctx(mode)
    ctx.bacl = NaNGradientBACL()
    student, teacher = params_of(ctx.student), params_of(ctx.teacher)
    out = train_step(ctx, *tiny_batch())
    assert torch.isfinite(out["total"]) and out["skipped"].item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(student, ctx.student.parameters(), strict=True))
    if mode == "gsema":
        assert all(torch.equal(a, b) for a, b in zip(teacher, ctx.teacher.parameters(), strict=True))
        assert int(ctx.updater.step) == 0
    ctx.bacl = BACL()
    out = train_step(ctx, *tiny_batch())
    assert out["skipped"].item() == 0.0
    assert all(torch.isfinite(p).all() for p in ctx.student.parameters())


def test_warmup_never_moves_the_teacher_on_a_conflicting_step(monkeypatch):
    """Default settings (warm-up on, decay_conflict 1.0) through the whole step: the statistics say "conflict" every
    step, and the teacher keeps its bits while the student trains."""
    ctx = make_ctx("gsema")
    ctx.updater = GSEMA(ctx.student, ctx.teacher, decay_aligned=0.5, decay_conflict=1.0, warmup=True)
    grad_stats = ops.grad_stats

    def conflicting(a, b, **kwargs):
        stats = grad_stats(a, b, **kwargs)
        stats[0] = -stats[0].abs() - 1.0
        return stats

    monkeypatch.setattr(ops, "grad_stats", conflicting)
    teacher, student = params_of(ctx.teacher), params_of(ctx.student)
    for _ in range(2):
        out = train_step(ctx, *tiny_batch())
        assert out["aligned"].item() == 0.0 and out["skipped"].item() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(teacher, ctx.teacher.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(student, ctx.student.parameters(), strict=True))
    assert int(ctx.updater.step) == 2


def test_step_reports_the_overflow_free_cosine():
    ctx = make_ctx("gsema")
    with recorded_grad_stats() as seen:
        out = train_step(ctx, *tiny_batch())
    assert seen["stats"].dtype == torch.float64
    assert out["grad_cos"].dtype == torch.float32
    assert out["grad_cos"].item() == pytest.approx(ops.grad_cos(seen["stats"]).item(), rel=1e-6)


def test_step_context_rejects_an_optimizer_that_cannot_skip_on_the_device():
    """A non-finite step is skipped through the optimizer's ``found_inf``, which only fused torch optimizers read;
    the others would fail at the first step with torch's internal assertion."""
    ctx = make_ctx("gsema")
    plain = torch.optim.SGD(ctx.student.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"optimizer must be a fused torch optimizer .*got SGD with fused=None"):
        dataclasses.replace(ctx, optimizer=plain)
    # A GradScaler skips a non-finite step itself, for any optimizer.
    scaled = dataclasses.replace(ctx, optimizer=plain, scaler=torch.amp.GradScaler("cpu"))
    assert scaled.optimizer is plain


@pytest.mark.parametrize("mode", ["none", "ema", "gsema"])
def test_builders_pass_every_setting_of_their_config_sections(mode):
    """Every trainer (this package's, nnU-Net's, Lightning's) builds its updater and BACL through these two, so a
    config key added to the sections reaches them all."""
    from gsema_fast.config import load_config
    from gsema_fast.models import build_model
    from gsema_fast.step import bacl_from_config, updater_from_config

    cfg = load_config("reference", [f"ema.mode={mode}", "ema.warmup_start=3", "ema.decay_aligned=0.8"])
    updater = updater_from_config(cfg.ema, build_model(name="unet", channels=[4, 8, 16], num_res_units=0))
    if mode == "none":
        assert updater is None
    else:
        assert updater.warmup_start == 3 and updater.warmup == cfg.ema.warmup
    if mode == "gsema":
        assert (updater.decay_aligned, updater.decay_conflict, updater.rule) == (0.8, 0.999, "sign")
    if mode == "ema":
        assert updater.decay == cfg.ema.decay
    bacl = bacl_from_config(cfg.loss, cfg.bacl)
    assert bacl.options is cfg.bacl, "the config's section is the loss's options"
    assert (bacl.options.reduction, bacl.options.mask, bacl.options.volume) == ("batch_mean", "reference", False)
    off = load_config("reference", ["loss.lambda_con=0"])
    assert bacl_from_config(off.loss, off.bacl) is None
