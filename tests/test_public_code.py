"""``configs/reference.yaml`` against the public reference code's maths, restated directly here: the contrastive loss
of a batch of two, and the teacher's warm-up from the first step.
The config goes through the trainer's own builder, so what is checked is what a run with ``--config reference`` does.
"""

from __future__ import annotations

import pytest
import torch
from backends import BACKENDS
from torch.nn import functional as F  # noqa: N812

from gsema_fast import ops
from gsema_fast.config import load_config, resolve_auto
from gsema_fast.training.build import build_context

# tiny tensors: a second thread only adds synchronisation
pytestmark = pytest.mark.usefixtures("one_thread")

# The reference config with a tiny UNet in place of its SwinUNETR: the method's settings are untouched.
SMALL = ["model.name=unet", "model.channels=[4,8,16]", "model.num_res_units=1", "data.patch_size=[16,16,16]"]


def reference_context():
    return build_context(resolve_auto(load_config("reference", SMALL), "cpu"), torch.device("cpu"))


def public_boundary_contrast(zs_s, zs_t, zt_s, zt_t):
    """The public code's contrastive term: boundary features by an fftshift-ed mask zeroing ``[n//4, 3n//4)^3``,
    cosine similarities averaged over the batch, then exp and log (tau = 1)."""

    def cos(a, b):
        return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).mean()

    def high_freq(z):
        n = z.shape[-1]
        lo, hi = n // 4, 3 * n // 4
        f = torch.fft.fftshift(torch.fft.fftn(z.to(torch.complex128)))
        m = torch.ones(z.shape, dtype=torch.float64)
        m[:, :, lo:hi, lo:hi, lo:hi] = 0
        return torch.fft.ifftn(torch.fft.ifftshift(f * m)).abs()

    a, b_, c, d = (high_freq(z) for z in (zs_s, zs_t, zt_s, zt_t))
    p = torch.exp(cos(a, c)) + torch.exp(cos(b_, d))
    ng = torch.exp(cos(a, b_)) + torch.exp(cos(c, d)) + torch.exp(cos(a, d)) + torch.exp(cos(b_, c))
    return -torch.log(p / (p + ng))


def test_reference_config_pins_the_public_code_and_the_others_do_not():
    reference = load_config("reference")
    assert reference.bacl.reduction == "batch_mean" and reference.ema.warmup_start == 1
    for name in ("paper", "demo", "gpu"):
        cfg = load_config(name)
        assert cfg.bacl.reduction == "sample" and cfg.ema.warmup_start == 0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_contrast_is_the_public_code(backend, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, backend)
    ctx = reference_context()
    base = [torch.randn(2, 3, 8, 8, 8, dtype=torch.float64) for _ in range(4)]
    zs = [base[0] + 0.5 * base[2], base[1] + 0.5 * base[3], base[0] + 0.3 * base[1], base[1] + 0.3 * base[2]]
    zs = [z.requires_grad_(i < 2) for i, z in enumerate(zs)]
    loss, _ = ctx.bacl(*zs)
    want = public_boundary_contrast(*zs)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
    got_grads = torch.autograd.grad(loss, zs[:2])
    want_grads = torch.autograd.grad(want, zs[:2])
    for got, ref in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)
    # The per-sample mean of exp/log (this project's default) is a different number for a batch of two.
    per_sample = ops.bacl_loss(*zs, volume=False, mask="reference")
    assert abs(float(per_sample.detach()) - float(want.detach())) > 1e-6


def test_reference_warmup_is_the_public_code():
    """The public loop: a counter t from 1, alpha = 0.9 if the sign vectors' cosine is positive else 0.999, capped
    at 1 - 1/(t + 1), then teacher = alpha * teacher + (1 - alpha) * student."""
    ctx = reference_context()
    teacher = [p.detach().clone() for p in ctx.teacher.parameters()]
    t = 1
    for sign in (1.0, -1.0, 1.0, 1.0, -1.0, 1.0):
        with torch.no_grad():
            for p in ctx.student.parameters():
                p.add_(torch.randn_like(p))
        stats = torch.tensor([-sign, 1.0, 1.0, sign, 1.0, 1.0], dtype=torch.float64)  # the dot disagrees on purpose
        ctx.updater.update(stats)
        alpha = min(0.9 if sign > 0 else 0.999, 1 - 1 / (t + 1))
        for e, p in zip(teacher, ctx.student.parameters(), strict=True):
            e.mul_(alpha).add_(p.detach(), alpha=1 - alpha)
        t += 1
    for got, want in zip(ctx.teacher.parameters(), teacher, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
