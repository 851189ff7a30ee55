"""GSEMA and EMA updaters: decisions, counters, warm-up, buffers, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gsema_fast.ema import EMA, GSEMA


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.Conv3d(4, 2, 1))


def stats(dot: float, sign: float) -> torch.Tensor:
    return torch.tensor([dot, 1.0, 1.0, sign, 1.0, 1.0])


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(1.0)
        model[1].num_batches_tracked.add_(3)


def test_gsema_teacher_is_a_frozen_copy():
    student = small_net()
    gsema = GSEMA(student)
    assert gsema.teacher is not student
    assert all(not p.requires_grad for p in gsema.teacher.parameters())
    assert all(
        torch.equal(a, b)
        for a, b in zip(gsema.teacher.state_dict().values(), student.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("rule", ["dot", "sign"])
def test_gsema_updates_only_when_aligned(rule):
    student = small_net()
    gsema = GSEMA(student, decay_aligned=0.5, decay_conflict=1.0, rule=rule, warmup=False)
    perturb(student)
    before = {k: v.clone() for k, v in gsema.teacher.state_dict().items()}
    conflict = stats(-1.0, 1.0) if rule == "dot" else stats(1.0, -1.0)
    assert gsema.update(conflict).item() == 0.0
    assert all(torch.equal(before[k], v) for k, v in gsema.teacher.state_dict().items())
    aligned = stats(1.0, -1.0) if rule == "dot" else stats(-1.0, 1.0)
    assert gsema.update(aligned).item() == 1.0
    after = gsema.teacher.state_dict()
    want = 0.5 * before["0.weight"] + 0.5 * student.state_dict()["0.weight"]
    torch.testing.assert_close(after["0.weight"], want)
    torch.testing.assert_close(after["1.running_mean"], 0.5 * before["1.running_mean"] + 0.5 * student[1].running_mean)
    assert after["1.num_batches_tracked"].item() == student[1].num_batches_tracked.item()
    assert int(gsema.step) == 2 and int(gsema.num_aligned) == 1 and gsema.aligned_fraction() == 0.5


def test_gsema_warmup_uses_the_update_count():
    student = small_net()
    gsema = GSEMA(student, decay_aligned=0.9, warmup=True)
    perturb(student)
    gsema.update(stats(1.0, 1.0))  # t = 0: alpha = min(0.9, 0) = 0, the teacher becomes the student
    assert torch.equal(gsema.teacher[0].weight, student[0].weight)
    perturb(student)
    before = gsema.teacher[0].weight.clone()
    gsema.update(stats(1.0, 1.0))  # t = 1: alpha = min(0.9, 0.5)
    torch.testing.assert_close(gsema.teacher[0].weight, 0.5 * before + 0.5 * student[0].weight)


def test_gsema_state_round_trip():
    student = small_net()
    gsema = GSEMA(student, decay_aligned=0.8, rule="sign")
    perturb(student)
    gsema.update(stats(1.0, 1.0))
    gsema.update(stats(-1.0, -1.0))
    other = GSEMA(small_net())
    other.load_state_dict(gsema.state_dict())
    assert other.rule == "sign" and other.decay_aligned == 0.8
    assert int(other.step) == 2 and int(other.num_aligned) == 1
    assert all(
        torch.equal(a, b)
        for a, b in zip(other.teacher.state_dict().values(), gsema.teacher.state_dict().values(), strict=True)
    )


def test_gsema_bad_arguments():
    with pytest.raises(ValueError, match="rule must be one of"):
        GSEMA(small_net(), rule="angle")
    with pytest.raises(ValueError, match=r"decay_aligned must be a finite number in \[0, 1\], got 1.2"):
        GSEMA(small_net(), decay_aligned=1.2)
    with pytest.raises(ValueError, match="decay_conflict must be a finite number"):
        GSEMA(small_net(), decay_conflict=float("nan"))


@pytest.mark.parametrize("exclude_buffers", [False, True])
def test_ema_matches_formula_and_handles_buffers(exclude_buffers):
    model = small_net()
    ema = EMA(model, decay=0.75, warmup=False, exclude_buffers=exclude_buffers)
    perturb(model)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model)
    after = ema.module.state_dict()
    torch.testing.assert_close(after["0.weight"], 0.75 * before["0.weight"] + 0.25 * model[0].weight)
    if exclude_buffers:
        assert torch.equal(after["1.running_mean"], model[1].running_mean)
    else:
        torch.testing.assert_close(
            after["1.running_mean"], 0.75 * before["1.running_mean"] + 0.25 * model[1].running_mean
        )
    assert after["1.num_batches_tracked"].item() == model[1].num_batches_tracked.item()
    x = torch.randn(1, 1, 5, 5, 5)
    ema.eval()
    assert ema(x).shape == (1, 2, 3, 3, 3)


def test_ema_warmup_and_set():
    model = small_net()
    ema = EMA(model, decay=0.99)
    perturb(model)
    ema.update(model)  # t = 0: copies
    assert torch.equal(ema.module[0].weight, model[0].weight)
    perturb(model)
    before = ema.module[0].weight.clone()
    ema.update(model, step=3)  # decay = min(0.99, 0.75)
    torch.testing.assert_close(ema.module[0].weight, 0.75 * before + 0.25 * model[0].weight)
    perturb(model)
    ema.set(model)
    assert torch.equal(ema.module[0].weight, model[0].weight)
    assert int(ema.num_updates) == 2
