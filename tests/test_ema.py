"""GSEMA and EMA updaters: decisions, counters, warm-up, buffers, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gsema_fast.ema import EMA, GSEMA

# tiny tensors: a second thread only adds synchronisation
pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.mark.parametrize("rule", ["dot", "sign"])
def test_gsema_warmup_never_moves_the_teacher_on_a_conflict(rule):
    """Defaults (warm-up on, decay_conflict 1.0): a conflicting step leaves the teacher's bits alone, at every step
    (the cap 1 - 1/(t+1) applies to an update, never turning "no update" into one)."""
    student = small_net()
    gsema = GSEMA(student, rule=rule)
    conflict = stats(-1.0, 1.0) if rule == "dot" else stats(1.0, -1.0)
    for _ in range(101):
        perturb(student)
        before = {k: v.clone() for k, v in gsema.teacher.state_dict().items()}
        assert gsema.update(conflict).item() == 0.0
        assert all(torch.equal(before[k], v) for k, v in gsema.teacher.state_dict().items())
    assert int(gsema.step) == 101 and int(gsema.num_aligned) == 0


def test_gsema_warmup_start_counts_like_the_public_code():
    """warmup_start=1: the first update uses min(0.9, 1 - 1/2) = 0.5, the public code's first alpha."""
    student = small_net()
    gsema = GSEMA(student, decay_aligned=0.9, warmup_start=1)
    perturb(student)
    before = gsema.teacher[0].weight.clone()
    gsema.update(stats(1.0, 1.0))
    torch.testing.assert_close(gsema.teacher[0].weight, 0.5 * before + 0.5 * student[0].weight)
    assert int(gsema.step) == 1  # the count of updates is not shifted, only the warm-up's step
    ema = EMA(student, decay=0.9, warmup_start=1)
    perturb(student)
    before = ema.module[0].weight.clone()
    ema.update(student)
    torch.testing.assert_close(ema.module[0].weight, 0.5 * before + 0.5 * student[0].weight)


def test_gsema_to_moves_teacher_and_counters():
    student = small_net()
    gsema = GSEMA(student, decay_aligned=0.5, warmup=False)
    gsema.update(stats(1.0, 1.0))
    assert gsema.to(torch.float64) is gsema
    assert all(p.dtype == torch.float64 for p in gsema.teacher.parameters())
    assert gsema.step.dtype == torch.int64 and int(gsema.step) == 1  # counters keep their dtype and values
    assert gsema.to("cpu") is gsema and gsema.step.device.type == "cpu"
    perturb(student)
    before = gsema.teacher[0].weight.clone()
    gsema.update(stats(1.0, 1.0))  # an fp64 teacher of an fp32 student
    torch.testing.assert_close(gsema.teacher[0].weight, 0.5 * before + 0.5 * student[0].weight.double())
    assert int(gsema.step) == 2 and int(gsema.num_aligned) == 2


def test_ema_decay_one_is_never_warmed_up_into_a_move():
    model = small_net()
    ema = EMA(model, decay=1.0, warmup=True)
    before = ema.module[0].weight.clone()
    perturb(model)
    ema.update(model)
    ema.update(model, step=5)
    assert torch.equal(ema.module[0].weight, before)


def test_gsema_state_round_trip():
    student = small_net()
    gsema = GSEMA(student, decay_aligned=0.8, rule="sign", warmup_start=1)
    perturb(student)
    gsema.update(stats(1.0, 1.0))
    gsema.update(stats(-1.0, -1.0))
    other = GSEMA(small_net())
    other.load_state_dict(gsema.state_dict())
    assert other.rule == "sign" and other.decay_aligned == 0.8 and other.warmup_start == 1
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
    with pytest.raises(ValueError, match="warmup_start must be a non-negative int, got -1"):
        GSEMA(small_net(), warmup_start=-1)
    with pytest.raises(ValueError, match="warmup_start must be a non-negative int, got 1.0"):
        EMA(small_net(), warmup_start=1.0)


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


@pytest.mark.gpu
def test_updaters_follow_their_models_to_the_gpu():
    """Built on the CPU, then the models moved (as a trainer moves its modules), or the updater moved with to():
    the counters follow, and updates run on the GPU."""
    student = small_net()
    gsema = GSEMA(student, decay_aligned=0.5, warmup=False)
    ema = EMA(student, decay=0.5, warmup=True)
    student.cuda()
    gsema.teacher.cuda()
    ema.module.cuda()
    perturb(student)
    before = gsema.teacher[0].weight.clone()
    assert gsema.update(stats(1.0, 1.0).cuda()).item() == 1.0
    torch.testing.assert_close(gsema.teacher[0].weight, 0.5 * before + 0.5 * student[0].weight)
    assert gsema.step.is_cuda and gsema.num_aligned.is_cuda and int(gsema.step) == 1
    ema.update(student)
    assert ema.num_updates.is_cuda and int(ema.num_updates) == 1
    assert torch.equal(ema.module[0].weight, student[0].weight)  # warm-up step 0 copies
    other = GSEMA(small_net()).to("cuda")
    assert other.step.is_cuda and next(other.teacher.parameters()).is_cuda
    moved = EMA(small_net()).to("cuda")
    assert moved.num_updates.is_cuda


# ------------------------------------------------------------------------------- timm and torch parity


def test_ema_takes_the_decay_positionally_as_timm_does():
    model = small_net()
    ema = EMA(model, 0.75, warmup=False)
    assert ema.decay == 0.75
    perturb(model)
    before = ema.module[0].weight.clone()
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, 0.75 * before + 0.25 * model[0].weight)


def test_ema_device_places_the_average():
    model = small_net()
    ema = EMA(model, 0.5, device="cpu", warmup=False)
    assert all(p.device.type == "cpu" for p in ema.module.parameters())
    assert ema.num_updates.device.type == "cpu"


@pytest.mark.gpu
def test_ema_kept_on_the_cpu_follows_a_gpu_model():
    """timm's ``device="cpu"``: the average stays in host memory, each update copies the model's tensors there."""
    model = small_net().cuda()
    ema = EMA(model, 0.5, device="cpu", warmup=False)
    perturb(model)
    before = ema.module[0].weight.clone()
    ema.update(model)
    assert ema.module[0].weight.device.type == "cpu"
    torch.testing.assert_close(ema.module[0].weight, 0.5 * before + 0.5 * model[0].weight.cpu())


def test_ema_warmup_is_on_by_default_and_off_on_request():
    """The one deliberate difference from timm's ModelEmaV3 (warm-up off): documented in EMA's docstring."""
    model = small_net()
    assert EMA(model).warmup is True and EMA(model, warmup=False).warmup is False
