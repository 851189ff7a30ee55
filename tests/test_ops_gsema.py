"""grad_stats, gsema_update_, fused_ema_ and ema_multi_avg_fn against float64 maths and torch, on both backends."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from backends import BACKENDS, HAS_TRITON, INTERPRETED, needs_triton, runs_triton_kernels
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gsema_fast import ops
from gsema_fast.reference import device as device_state

# tiny tensors: a second thread only adds synchronisation
pytestmark = pytest.mark.usefixtures("one_thread")

if HAS_TRITON:
    from gsema_fast.kernels import _multi_tensor
    from gsema_fast.kernels import bacl as bacl_kernels
    from gsema_fast.kernels import fused_ema as fused_ema_kernels
    from gsema_fast.kernels import grad_stats as grad_stats_kernels
    from gsema_fast.kernels import gsema_update as gsema_update_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {
    "odd": [(1,), (7,), (4097,), (0,), (65539,), (3, 5, 2)],
    "many": [(int(n),) for n in torch.randint(1, 300, (151,), generator=torch.Generator().manual_seed(1))],
}
# The 151-tensor list (a SwinUNETR's parameter count) is slow under Triton's interpreter: two dtypes suffice there.
CASES = [
    ("odd", torch.float32),
    ("odd", torch.bfloat16),
    ("odd", torch.float16),
    ("many", torch.float32),
    ("many", torch.bfloat16),
]
# Tolerance relative to the float64 result, per dtype of the lower-precision input.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
EMA_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, request.param)
    if HAS_TRITON:
        _multi_tensor.clear_cache()
    return request.param


def random_list(shapes, dtype=torch.float32, *, zeros=0.0):
    out = []
    for shape in shapes:
        t = torch.randn(shape, device=DEVICE, dtype=torch.float32)
        if zeros:
            t[torch.rand(shape, device=DEVICE) < zeros] = 0
        out.append(t.to(dtype))
    return out


def round_as_stored(values: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """fp32 ``values`` rounded to ``dtype`` the way the path under test stores them.

    Compiled Triton and torch round fp32 -> bf16 to nearest even; Triton's interpreter (the CPU tests) truncates,
    dropping the low 16 bits. A bf16 result is compared with the rounding its path really does, exactly, rather than
    with a one-ulp tolerance that would pass either.
    """
    values = values.float()
    if dtype == torch.bfloat16 and backend == "triton" and INTERPRETED:
        return (values.view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return values.to(dtype)


def stats64(a, b):
    x = torch.cat([t.reshape(-1).double() for t in a])
    y = torch.cat([t.reshape(-1).double() for t in b])
    return torch.stack(
        [x @ y, x @ x, y @ y, (x.sign() * y.sign()).sum(), (x != 0).sum().double(), (y != 0).sum().double()]
    )


# ------------------------------------------------------------------------------------------------ grad_stats


@pytest.mark.parametrize(("sizes", "dtype"), CASES)
def test_grad_stats_matches_float64(backend, sizes, dtype):
    a = random_list(SIZES[sizes], dtype, zeros=0.1)
    b = random_list(SIZES[sizes], torch.float32, zeros=0.1)
    got = ops.grad_stats(a, b)
    want = stats64(a, b)
    assert got.dtype == torch.float64 and got.shape == (6,) and got.device == a[0].device
    scale = torch.tensor([math.sqrt(want[1] * want[2]), want[1], want[2], want[4], 1, 1], dtype=torch.float64)
    err = (got.double().cpu() - want.cpu()).abs() / scale
    assert (err < RTOL[dtype]).all(), (got, want)
    assert got[3:].double().cpu().equal(want[3:].cpu()), "sign agreement and counts are exact"


@runs_triton_kernels
def test_grad_stats_backends_agree_and_are_deterministic(monkeypatch):
    a = random_list(SIZES["odd"], zeros=0.05)
    b = random_list(SIZES["odd"], torch.bfloat16)
    results = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv(ops.BACKEND_ENV, name)
        first, second = ops.grad_stats(a, b), ops.grad_stats(a, b)
        assert torch.equal(first, second), f"{name}: two runs differ"
        results[name] = first
    torch.testing.assert_close(results["torch"], results["triton"], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_stats_accumulate_into_a(backend, dtype):
    a = random_list(SIZES["odd"], dtype)
    b = random_list(SIZES["odd"], dtype)
    before = [t.clone() for t in a]
    want = stats64(before, b)
    got = ops.grad_stats(a, b, accumulate_into_a=True)
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-3)
    for new, old, add in zip(a, before, b, strict=True):
        # The sum of two bf16 values is formed in fp32 (exactly as torch does) and rounded as the path stores it.
        assert torch.equal(new, round_as_stored(old.float() + add.float(), dtype, backend))


def test_grad_stats_sign_counts_and_zeros(backend):
    a = [torch.tensor([1.0, -2.0, 0.0, 3.0, 1e-30], device=DEVICE)]
    b = [torch.tensor([2.0, 5.0, 1.0, 0.0, 1e-30], device=DEVICE)]
    got = ops.grad_stats(a, b).cpu()
    # 1e-30 * 1e-30 underflows in fp32; the sign agreement must still count it.
    assert got[3].item() == 1.0 - 1.0 + 0.0 + 0.0 + 1.0
    assert got[4].item() == 4 and got[5].item() == 4
    assert ops.grad_stats([torch.zeros(0, device=DEVICE)], [torch.zeros(0, device=DEVICE)]).abs().sum() == 0


def test_grad_stats_counts_are_exact_beyond_2_24(backend, monkeypatch):
    """The counts and the sign agreement are integers: exact past 2**24 (fp32 would give 2**24 for 2**24 + 1)."""
    # Big chunks keep the interpreter to a few programs; each chunk's fp32 count stays below 2**24, as on a GPU.
    if backend == "triton":
        monkeypatch.setattr(grad_stats_kernels, "LAYOUT", _multi_tensor.Layout(block=1 << 20, iters=8, num_warps=4))
    n = (1 << 24) + 1
    a = [torch.ones(n, device=DEVICE)]
    b = [torch.ones(n, device=DEVICE)]
    got = ops.grad_stats(a, b).cpu()
    assert got.dtype == torch.float64
    assert got[3].item() == n and got[4].item() == n and got[5].item() == n


def test_grad_stats_counts_a_nan_as_non_zero(backend):
    """``count(a != 0)`` counts a NaN (NaN != 0) on both paths; it agrees in sign with nothing."""
    a = [torch.tensor([1.0, float("nan"), 0.0, -2.0], device=DEVICE)]
    b = [torch.tensor([1.0, 1.0, 1.0, -1.0], device=DEVICE)]
    got = ops.grad_stats(a, b).cpu()
    assert got[4].item() == 3 and got[5].item() == 4
    assert got[3].item() == 2.0
    assert math.isnan(got[0].item()) and math.isnan(got[1].item())


@runs_triton_kernels
def test_grad_stats_partial_rows_are_written_whole():
    """The final reduction loads rows of 8 partial sums; the two padding columns are written (zeros), never read
    stale."""
    a, b = random_list([(5000,), (3,)]), random_list([(5000,), (3,)])
    plan = _multi_tensor.plan_pairs(a, b, _multi_tensor.LAYOUT.chunk)
    partials = torch.full((plan.num_chunks, 8), float("nan"), device=DEVICE)
    grad_stats_kernels._launch_chunks(plan, partials, accumulate=False)
    assert torch.isfinite(partials).all() and (partials[:, 6:] == 0).all()


def test_grad_cos_never_overflows():
    # fp16 loss scaling makes squared norms large: their product (1e40) overflows fp32, their roots' product does not.
    stats = torch.tensor([1e20, 1e20, 1e20, 0.0, 1.0, 1.0], dtype=torch.float32, device=DEVICE)
    assert ops.grad_cos(stats).item() == pytest.approx(1.0)
    stats = torch.tensor([-3.0, 4.0, 9.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=DEVICE)
    assert ops.grad_cos(stats).item() == pytest.approx(-0.5)


def test_grad_stats_bad_input():
    x = [torch.randn(3, device=DEVICE)]
    with pytest.raises(ValueError, match="same length"):
        ops.grad_stats(x, x + x)
    with pytest.raises(ValueError, match="must not be empty"):
        ops.grad_stats([], [])
    with pytest.raises(ValueError, match=r"a\[0\] and b\[0\] differ in shape: \(3,\) vs \(4,\)"):
        ops.grad_stats(x, [torch.randn(4, device=DEVICE)])
    with pytest.raises(TypeError, match=r"b\[0\] must be float.*torch.int64"):
        ops.grad_stats(x, [torch.ones(3, dtype=torch.int64, device=DEVICE)])
    with pytest.raises(TypeError, match="list or tuple"):
        ops.grad_stats(x[0], x)
    with pytest.raises(ValueError, match="contiguous"):
        ops.grad_stats([torch.randn(4, 4, device=DEVICE).t()], [torch.randn(4, 4, device=DEVICE)])
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="is on meta"):
            ops.grad_stats(x, [torch.empty(3, device="meta")])


# ------------------------------------------------------------------------------------------------ gsema_update_


def stats_for(dot: float, sign: float) -> torch.Tensor:
    return torch.tensor([dot, 1.0, 1.0, sign, 1.0, 1.0], device=DEVICE)


def expected_alpha(aligned: bool, decay_aligned, decay_conflict, step):
    alpha = decay_aligned if aligned else decay_conflict
    return alpha if step is None else min(alpha, 1 - 1 / (step + 1))


@pytest.mark.parametrize(("sizes", "student_dtype"), CASES)
@pytest.mark.parametrize("step", [None, 3, "tensor"])
def test_gsema_update_matches_float64(backend, sizes, student_dtype, step):
    teacher = random_list(SIZES[sizes])
    student = random_list(SIZES[sizes], student_dtype)
    start = [t.clone() for t in teacher]
    step_arg = torch.tensor(5, device=DEVICE) if step == "tensor" else step
    step_value = 5 if step == "tensor" else step
    aligned = ops.gsema_update_(
        teacher, student, stats_for(0.5, -1.0), decay_aligned=0.9, decay_conflict=1.0, step=step_arg
    )
    assert aligned.dim() == 0 and aligned.item() == 1.0 and aligned.device == teacher[0].device
    alpha = expected_alpha(True, 0.9, 1.0, step_value)
    for new, old, s in zip(teacher, start, student, strict=True):
        want = alpha * old.double() + (1 - alpha) * s.double()
        torch.testing.assert_close(new.double(), want, rtol=0, atol=EMA_ATOL[student_dtype] * 4)


@pytest.mark.parametrize(
    ("rule", "dot", "sign", "aligned"),
    [
        ("dot", 1e-3, -5.0, True),
        ("dot", 0.0, 5.0, False),  # orthogonal gradients are not aligned (angle must be below 90 degrees)
        ("dot", -1e-3, 5.0, False),
        ("sign", -1.0, 2.0, True),
        ("sign", 1.0, 0.0, False),
        ("sign", 1.0, -2.0, False),
    ],
)
def test_gsema_decision_rules(backend, rule, dot, sign, aligned):
    teacher = random_list(SIZES["odd"])
    student = random_list(SIZES["odd"])
    start = [t.clone() for t in teacher]
    got = ops.gsema_update_(teacher, student, stats_for(dot, sign), decay_aligned=0.5, decay_conflict=0.75, rule=rule)
    assert got.item() == float(aligned)
    alpha = 0.5 if aligned else 0.75
    torch.testing.assert_close(teacher[2], alpha * start[2] + (1 - alpha) * student[2])


@pytest.mark.parametrize("step", [0, 1, 9, 10_000])
@pytest.mark.parametrize("aligned", [True, False])
def test_gsema_warmup_formula(backend, step, aligned):
    teacher, student = random_list([(33,)]), random_list([(33,)])
    start = teacher[0].clone()
    stats = stats_for(1.0, 1.0) if aligned else stats_for(-1.0, -1.0)
    ops.gsema_update_(teacher, student, stats, decay_aligned=0.99, decay_conflict=1.0, step=step)
    # The cap applies to an update only: a conflict with decay 1.0 ("no update") stays no update.
    alpha = 0.99 if aligned else 1.0
    alpha = min(alpha, 1 - 1 / (step + 1)) if alpha < 1.0 else alpha
    torch.testing.assert_close(teacher[0], alpha * start + (1 - alpha) * student[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("step", [0, 1, 100, "tensor"])
@pytest.mark.parametrize(("rule", "decays", "stats"), [
    ("dot", (0.9, 1.0), (-1.0, 1.0)),  # a conflict under the default settings
    ("sign", (0.9, 1.0), (1.0, -1.0)),
    ("dot", (1.0, 0.999), (1.0, 1.0)),  # decay_aligned 1.0 means "no update" just as well
])  # fmt: skip
def test_warmup_never_turns_no_update_into_one(backend, step, rule, decays, stats):
    teacher = random_list(SIZES["odd"])
    student = random_list(SIZES["odd"])
    bits = [t.clone() for t in teacher]
    step_arg = torch.tensor(100, device=DEVICE) if step == "tensor" else step
    ops.gsema_update_(
        teacher, student, stats_for(*stats), decay_aligned=decays[0], decay_conflict=decays[1], rule=rule, step=step_arg
    )
    assert all(torch.equal(new, old) for new, old in zip(teacher, bits, strict=True))


def test_warmup_caps_a_conflict_decay_below_one(backend):
    """The public code's conflict decay 0.999 is an update: the warm-up caps it as any other."""
    teacher, student = random_list([(33,)]), random_list([(33,)])
    start = teacher[0].clone()
    ops.gsema_update_(teacher, student, stats_for(-1.0, -1.0), decay_aligned=0.9, decay_conflict=0.999, step=3)
    torch.testing.assert_close(teacher[0], 0.75 * start + 0.25 * student[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sizes", ["odd", "many"])
def test_gsema_conflict_with_alpha_one_leaves_teacher_bitwise(backend, sizes):
    teacher = random_list(SIZES[sizes])
    teacher[0].fill_(-0.0)  # -0.0 + 0 * x would become +0.0: the update must not be computed at all
    student = random_list(SIZES[sizes])
    counter = torch.tensor(7)
    teacher.append(counter.clone().to(DEVICE))
    student.append(torch.tensor(8, device=DEVICE))
    bits = [t.clone() for t in teacher]
    got = ops.gsema_update_(teacher, student, stats_for(-1.0, -1.0), decay_aligned=0.9, decay_conflict=1.0)
    assert got.item() == 0.0
    for new, old in zip(teacher, bits, strict=True):
        assert torch.equal(
            new.view(-1).view(torch.uint8) if new.is_floating_point() else new,
            old.view(-1).view(torch.uint8) if old.is_floating_point() else old,
        )
    assert torch.signbit(teacher[0]).all()


def test_gsema_update_copies_integer_buffers_when_updating(backend):
    teacher = [torch.randn(5, device=DEVICE), torch.tensor(1, device=DEVICE)]
    student = [torch.randn(5, device=DEVICE), torch.tensor(9, device=DEVICE)]
    ops.gsema_update_(teacher, student, stats_for(1.0, 1.0), decay_aligned=0.9, decay_conflict=1.0)
    assert teacher[1].item() == 9


@runs_triton_kernels
def test_gsema_update_is_deterministic_and_backends_agree(monkeypatch):
    student = random_list(SIZES["odd"], torch.bfloat16)
    base = random_list(SIZES["odd"])
    results = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv(ops.BACKEND_ENV, name)
        runs = []
        for _ in range(2):
            teacher = [t.clone() for t in base]
            ops.gsema_update_(teacher, student, stats_for(1.0, 1.0), decay_aligned=0.9, decay_conflict=1.0, step=4)
            runs.append(teacher)
        assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True)), f"{name}: two runs differ"
        results[name] = runs[0]
    for x, y in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_gsema_update_bad_input():
    t, s = [torch.randn(3, device=DEVICE)], [torch.randn(3, device=DEVICE)]
    good = stats_for(1.0, 1.0)
    kwargs = {"decay_aligned": 0.9, "decay_conflict": 1.0}
    with pytest.raises(ValueError, match=r"decay_aligned must be a finite number in \[0, 1\], got nan"):
        ops.gsema_update_(t, s, good, decay_aligned=float("nan"), decay_conflict=1.0)
    with pytest.raises(ValueError, match="decay_conflict must be a finite number in \\[0, 1\\], got 1.5"):
        ops.gsema_update_(t, s, good, decay_aligned=0.9, decay_conflict=1.5)
    with pytest.raises(ValueError, match="rule must be one of"):
        ops.gsema_update_(t, s, good, rule="cosine", **kwargs)
    with pytest.raises(ValueError, match=r"stats must be a float64 \(or float32\) tensor of 6"):
        ops.gsema_update_(t, s, torch.ones(2, device=DEVICE), **kwargs)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        ops.gsema_update_(t, s, good, step=-1, **kwargs)
    with pytest.raises(ValueError, match="same length"):
        ops.gsema_update_(t, s + s, good, **kwargs)
    with pytest.raises(TypeError, match=r"teacher\[0\] \(torch.int64\) and student\[0\] \(torch.float32\)"):
        ops.gsema_update_([torch.ones(3, dtype=torch.int64, device=DEVICE)], s, good, **kwargs)


# ------------------------------------------------------------------------------------------------ fused_ema_


@pytest.mark.parametrize(("sizes", "current_dtype"), CASES)
@pytest.mark.parametrize("weight", [0.1, 0.75, "tensor"])
def test_fused_ema_matches_foreach_lerp(backend, sizes, current_dtype, weight):
    ema = random_list(SIZES[sizes])
    current = random_list(SIZES[sizes], current_dtype)
    start = [e.clone() for e in ema]
    want = [e.clone() for e in ema]
    w = 0.3 if weight == "tensor" else weight
    torch._foreach_lerp_(want, [c.float() for c in current], w)
    ops.fused_ema_(ema, current, torch.tensor(w, device=DEVICE) if weight == "tensor" else w)
    for got, ref, e0, c in zip(ema, want, start, current, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.double(), (1 - w) * e0.double() + w * c.double(), rtol=0, atol=1e-6)


def lerp32(ema: torch.Tensor, current: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.lerp's two-sided formula in fp32 for an fp32 ``weight``: ``(separate multiply and add, fused
    multiply-add)``. Triton's interpreter does the first; compiled code may contract to the second, as torch does."""
    e, c = ema.float(), current.float()
    w = torch.tensor(weight, dtype=torch.float32)
    diff = c - e
    if weight < 0.5:
        return e + w * diff, (e.double() + w.double() * diff.double()).float()
    return c - diff * (1 - w), (c.double() - diff.double() * (1 - w).double()).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", [0.25, 0.75])
def test_fused_ema_low_precision_ema_and_buffers(backend, dtype, weight):
    ema = [torch.randn(3000, device=DEVICE).to(dtype), torch.tensor(3, device=DEVICE)]
    current = [torch.randn(3000, device=DEVICE).to(dtype), torch.tensor(4, device=DEVICE)]
    start = ema[0].clone()
    ops.fused_ema_(ema, current, weight)
    assert ema[1].item() == 4
    if backend == "torch":
        want = [start.clone()]
        torch._foreach_lerp_(want, [current[0]], weight)
        assert torch.equal(ema[0], want[0])
        return
    # fp32 maths, rounded once as this path stores (truncation to bf16 under the interpreter, nearest-even natively).
    plain, fused = (round_as_stored(v, dtype, backend) for v in lerp32(start, current[0], weight))
    if INTERPRETED:
        assert torch.equal(ema[0], plain)
    else:
        assert ((ema[0] == plain) | (ema[0] == fused)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", [0.1, 0.3, 0.7])
def test_fused_ema_tensor_weight_is_used_in_fp32(backend, dtype, weight):
    """A 0-dim fp32 weight means what a float weight means: 0.1 stays fp32(0.1) for a bf16 EMA, not
    bf16(0.1) = 0.10009765625 (which changes about one element in ten)."""
    ema = [torch.randn(10_000, device=DEVICE).to(dtype)]
    current = [torch.randn(10_000, device=DEVICE).to(dtype)]
    w = torch.tensor(weight, dtype=torch.float32, device=DEVICE)
    want = [ema[0].clone()]
    if backend == "torch":
        torch._foreach_lerp_(want, current, float(w))
    else:  # the float weight's own rounding on this path is checked in test_fused_ema_low_precision_ema_and_buffers
        ops.fused_ema_(want, current, float(w))
    ops.fused_ema_(ema, current, w)
    assert torch.equal(ema[0], want[0])


@pytest.mark.parametrize("weight", [0.3, 0.7, "tensor"])
def test_fused_ema_float64_weight_is_float64(backend, weight):
    """A float64 EMA takes its weight in fp64, as ``torch._foreach_lerp_`` does (0.3, not fp32's 0.30000001192)."""
    ema = [torch.randn(5000, dtype=torch.float64, device=DEVICE), torch.randn(7, dtype=torch.float64, device=DEVICE)]
    current = [torch.randn_like(e) for e in ema]
    value = 0.3 if weight == "tensor" else weight
    want = [e.clone() for e in ema]
    torch._foreach_lerp_(want, current, value)
    arg = torch.tensor(value, dtype=torch.float64, device=DEVICE) if weight == "tensor" else value
    ops.fused_ema_(ema, current, arg)
    for got, ref in zip(ema, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-15, atol=1e-15)


def test_fused_ema_accepts_strided_tensors_like_foreach_lerp(backend):
    ema = [torch.randn(6, 4, device=DEVICE).t(), torch.randn(9, device=DEVICE), torch.randn(5, 3, device=DEVICE)[:, 1]]
    current = [torch.randn(6, 4, device=DEVICE).t(), torch.randn(9, device=DEVICE).bfloat16()]
    current.append(torch.randn(5, device=DEVICE))
    assert not ema[0].is_contiguous() and not ema[2].is_contiguous()
    want = [e.clone() for e in ema]
    torch._foreach_lerp_(want, [c.float() for c in current], 0.2)
    ops.fused_ema_(ema, current, 0.2)
    for got, ref in zip(ema, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_fused_ema_bad_input():
    e, c = [torch.randn(3, device=DEVICE)], [torch.randn(3, device=DEVICE)]
    with pytest.raises(ValueError, match=r"weight must be a number in \[0, 1\], got inf"):
        ops.fused_ema_(e, c, float("inf"))
    for weight in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"weight must be a number in \[0, 1\], got {weight}"):
            ops.fused_ema_(e, c, weight)
    with pytest.raises(TypeError, match="0-dim"):
        ops.fused_ema_(e, c, torch.ones(2, device=DEVICE))
    with pytest.raises(TypeError, match="weight must be a float"):
        ops.fused_ema_(e, c, "0.1")
    with pytest.raises(ValueError, match=r"ema\[0\] and current\[0\] differ in shape"):
        ops.fused_ema_(e, [torch.randn(2, device=DEVICE)], 0.1)
    with pytest.raises(ValueError, match="decay must be a number in"):
        ops.ema_multi_avg_fn(1.5)


def test_averaged_model_multi_avg_fn_matches_torch(backend):
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.BatchNorm1d(13), torch.nn.Linear(13, 3)).to(DEVICE)
    ours = AveragedModel(model, multi_avg_fn=ops.ema_multi_avg_fn(0.9), use_buffers=True)
    theirs = AveragedModel(copy.deepcopy(model), multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 7, device=DEVICE))  # moves the BatchNorm statistics
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for x, y in zip(ours.module.state_dict().values(), theirs.module.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_ema_multi_avg_fn_defaults_to_torchs_decay(backend):
    """``ops.ema_multi_avg_fn()`` is ``get_ema_multi_avg_fn()``: the same default decay, 0.999."""
    model = torch.nn.Linear(5, 4).to(DEVICE)
    ours = AveragedModel(model, multi_avg_fn=ops.ema_multi_avg_fn())
    theirs = AveragedModel(copy.deepcopy(model), multi_avg_fn=get_ema_multi_avg_fn())
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for x, y in zip(ours.module.parameters(), theirs.module.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_ema_multi_avg_fn_takes_a_tensor_decay(backend):
    ema, current = [torch.zeros(300, device=DEVICE)], [torch.ones(300, device=DEVICE)]
    ops.ema_multi_avg_fn(torch.tensor(0.75, device=DEVICE))(ema, current, None)
    torch.testing.assert_close(ema[0], torch.full_like(ema[0], 0.25))
    with pytest.raises(TypeError, match="0-dim float tensor"):
        ops.ema_multi_avg_fn(torch.tensor([0.5, 0.5]))


def test_complex_tensors_are_averaged_like_torch(backend):
    """torch's ``_foreach_lerp_`` (and so ``get_ema_multi_avg_fn``) averages complex tensors: so does fused_ema_,
    where they used to be copied."""
    ema = [torch.randn(40, dtype=torch.complex64, device=DEVICE), torch.randn(9, device=DEVICE)]
    current = [torch.randn(40, dtype=torch.complex64, device=DEVICE), torch.randn(9, device=DEVICE)]
    want = [e.clone() for e in ema]
    torch._foreach_lerp_(want, current, 0.3)
    ops.fused_ema_(ema, current, 0.3)
    for got, ref in zip(ema, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    teacher, student = [ema[0].clone()], [current[0]]
    ops.gsema_update_(teacher, student, stats_for(1.0, 1.0), decay_aligned=0.75, decay_conflict=1.0)
    torch.testing.assert_close(teacher[0], ema[0].lerp(current[0], 0.25), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("average", "averaged"), [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_an_average_less_precise_than_its_model_is_refused(backend, average, averaged):
    """``torch.lerp`` refuses mixed dtypes; an fp32 average of a bf16 model is allowed, the reverse loses the model's
    precision at every step and is refused, naming both dtypes."""
    ema, current = [torch.zeros(8, dtype=average, device=DEVICE)], [torch.ones(8, dtype=averaged, device=DEVICE)]
    with pytest.raises(TypeError, match=rf"ema\[0\] is {average}, current\[0\] {averaged}: an average must be"):
        ops.fused_ema_(ema, current, 0.5)
    with pytest.raises(TypeError, match=r"teacher\[0\] is"):
        ops.gsema_update_(ema, current, stats_for(1.0, 1.0), decay_aligned=0.5, decay_conflict=1.0)


@pytest.mark.slow
@needs_triton
def test_the_triton_backend_on_cpu_tensors_says_what_it_needs():
    """``GSEMA_FAST_BACKEND=triton`` with CPU tensors and no interpreter: one line, not Triton's "0 active drivers"."""
    code = (
        "import os, torch\n"
        "from gsema_fast import ops\n"
        "os.environ[ops.BACKEND_ENV] = 'triton'\n"
        "try:\n"
        "    ops.fused_ema_([torch.zeros(3)], [torch.ones(3)], 0.5)\n"
        "except ops.TritonUnavailableError as err:\n"
        "    print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ops.BACKEND_ENV)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GSEMA_FAST_BACKEND=triton: the Triton kernels run on CUDA tensors" in done.stdout
    assert "TRITON_INTERPRET=1" in done.stdout


# ------------------------------------------------------------------------------------- devices and CUDA graphs


def test_device_guard_makes_the_tensors_cuda_device_current():
    guard = device_state.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_state.device_guard(torch.device("cpu")), contextlib.nullcontext)


@runs_triton_kernels
def test_every_launch_runs_under_its_tensors_device_guard(monkeypatch):
    """Triton launches on the current device's current stream: every launcher makes its tensors' device current
    (tensors on cuda:1 with cuda:0 current would otherwise run on the wrong device or race its copies)."""
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    seen = []

    def guard(device):
        seen.append(torch.device(device))
        return contextlib.nullcontext()

    for module in (grad_stats_kernels, gsema_update_kernels, fused_ema_kernels, bacl_kernels):
        monkeypatch.setattr(module, "device_guard", guard)
    a, b = random_list([(5,), (300,)]), random_list([(5,), (300,)])
    zs = [torch.randn(1, 2, 4, 4, 4, device=DEVICE, requires_grad=i < 2) for i in range(4)]
    calls = {
        "grad_stats": lambda: ops.grad_stats(a, b),
        "gsema_update_": lambda: ops.gsema_update_(a, b, stats_for(1.0, 1.0), decay_aligned=0.9, decay_conflict=1.0),
        "fused_ema_": lambda: ops.fused_ema_(a, b, 0.5),
        "bacl_loss": lambda: ops.bacl_loss(*zs).backward(),
    }
    for name, call in calls.items():
        seen.clear()
        call()
        assert seen and all(d == a[0].device for d in seen), (name, seen)
    assert len(seen) == 4  # BACL: a forward and a backward launch per term


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, y: ops.grad_stats(x, y), r"b\[1\] is on meta"),
        (lambda x, y: ops.gsema_update_(x, y, stats_for(1, 1), decay_aligned=0.9, decay_conflict=1.0), r"student\[1\]"),
        (lambda x, y: ops.fused_ema_(x, y, 0.5), r"current\[1\] is on meta"),
        (lambda x, y: ops.fused_ema_(y, x, 0.5), r"ema\[1\] is on meta"),
    ],
)
def test_lists_spread_over_devices_are_rejected(backend, call, match):
    xs = [torch.randn(3, device=DEVICE), torch.randn(4, device=DEVICE)]
    ys = [torch.randn(3, device=DEVICE), torch.randn(4, device="meta")]
    with pytest.raises(ValueError, match=match):
        call(xs, ys)


@runs_triton_kernels
def test_launch_tables_are_built_before_a_capture_and_pinned_by_it(monkeypatch):
    """A CUDA graph replays the table addresses it captured: a table is never built inside a capture (its copy would
    run only at replay, from a freed host buffer) and one that a capture used is never evicted."""
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    _multi_tensor.clear_cache()
    capture = [False]
    monkeypatch.setattr(device_state, "capturing", lambda device: capture[0])
    a, b = random_list([(5,), (700,)]), random_list([(5,), (700,)])
    capture[0] = True
    with pytest.raises(RuntimeError, match="outside a CUDA graph capture: run the op once"):
        ops.grad_stats(a, b)
    capture[0] = False
    want = ops.grad_stats(a, b)  # the warm-up builds the table
    table = _multi_tensor.plan_pairs(a, b, _multi_tensor.LAYOUT.chunk).groups[0].table
    capture[0] = True
    assert torch.equal(ops.grad_stats(a, b), want)  # the capture finds it, and pins it
    capture[0] = False
    for n in range(1, 41):  # more plans than the cache keeps
        x = random_list([(n,)])
        ops.grad_stats(x, x)
    capture[0] = True
    assert _multi_tensor.plan_pairs(a, b, _multi_tensor.LAYOUT.chunk).groups[0].table is table
    assert torch.equal(ops.grad_stats(a, b), want)


# ------------------------------------------------------------------------------------------------ native GPU


@needs_triton
@pytest.mark.gpu
def test_tail_runs_without_sync_and_in_a_cuda_graph(monkeypatch):
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    shapes = SIZES["many"] + [(65539,)]
    a, b, teacher, student = (random_list(shapes) for _ in range(4))
    step = torch.tensor(3, device="cuda")
    ops.gsema_update_(teacher, student, ops.grad_stats(a, b), decay_aligned=0.9, decay_conflict=1.0, step=step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = ops.grad_stats(a, b)
        ops.gsema_update_(teacher, student, stats, decay_aligned=0.9, decay_conflict=1.0, step=step)
        ops.fused_ema_(teacher, student, step.float() / 100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want_teacher = [t.clone() for t in teacher]
    want_stats = ops.grad_stats(a, b)
    ops.gsema_update_(want_teacher, student, want_stats, decay_aligned=0.9, decay_conflict=1.0, step=step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_stats = ops.grad_stats(a, b)
        graph_aligned = ops.gsema_update_(
            teacher, student, graph_stats, decay_aligned=0.9, decay_conflict=1.0, step=step
        )
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_stats, want_stats) and graph_aligned.item() == 1.0
    for x, y in zip(teacher, want_teacher, strict=True):
        assert torch.equal(x, y)


@needs_triton
@pytest.mark.gpu
def test_captured_tail_survives_launch_table_eviction(monkeypatch):
    """Warm up, capture grad_stats + gsema_update_, push more plans through the cache than it keeps, replay: the
    graph's tables are still the ones it captured."""
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    _multi_tensor.clear_cache()
    a, b, teacher, student = (random_list(SIZES["odd"]) for _ in range(4))
    step = torch.tensor(3, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and build the tables outside the capture
        ops.gsema_update_(teacher, student, ops.grad_stats(a, b), decay_aligned=0.9, decay_conflict=1.0, step=step)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        graph_stats = ops.grad_stats(a, b)
        ops.gsema_update_(teacher, student, graph_stats, decay_aligned=0.9, decay_conflict=1.0, step=step)
    for n in range(1, 41):
        x = random_list([(n,)])
        ops.grad_stats(x, x)
    start = [t.clone() for t in teacher]
    graph.replay()
    torch.cuda.synchronize()
    want = stats64(a, b)
    torch.testing.assert_close(graph_stats.cpu(), want.cpu(), rtol=1e-5, atol=1e-3)
    alpha = 0.75 if want[0] > 0 else 1.0  # step 3 caps 0.9 at 0.75; a conflict (decay 1.0) moves nothing
    for new, old, s in zip(teacher, start, student, strict=True):
        torch.testing.assert_close(new, alpha * old + (1 - alpha) * s, rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_run_on_their_tensors_device_not_the_current_one(monkeypatch):
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    device = torch.device("cuda", 1)
    a, b, teacher, student = ([t.to(device) for t in random_list(SIZES["odd"])] for _ in range(4))
    ema = [t.clone() for t in teacher]
    want_teacher = [t.cpu().lerp(s.cpu(), 0.25) for t, s in zip(teacher, student, strict=True)]
    with torch.cuda.device(0):
        stats = ops.grad_stats(a, b)
        ops.gsema_update_(teacher, student, stats_for(1.0, 1.0).to(device), decay_aligned=0.75, decay_conflict=1.0)
        ops.fused_ema_(ema, student, 0.25)
    torch.cuda.synchronize(device)
    assert stats.device == device
    torch.testing.assert_close(stats.cpu(), stats64(a, b).cpu(), rtol=1e-5, atol=1e-3)
    for got, also, want in zip(teacher, ema, want_teacher, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(also.cpu(), want, rtol=1e-6, atol=1e-6)
