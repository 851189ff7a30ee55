"""grad_stats, gsema_update_, fused_ema_ and ema_multi_avg_fn against float64 maths and torch, on both backends."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gsema_fast import ops
from gsema_fast.kernels import _multi_tensor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
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
    assert got.dtype == torch.float32 and got.shape == (6,) and got.device == a[0].device
    scale = torch.tensor([math.sqrt(want[1] * want[2]), want[1], want[2], want[4], 1, 1], dtype=torch.float64)
    err = (got.double().cpu() - want.cpu()).abs() / scale
    assert (err < RTOL[dtype]).all(), (got, want)
    assert got[3:].double().cpu().equal(want[3:].cpu()), "sign agreement and counts are exact"


def test_grad_stats_backends_agree_and_are_deterministic(monkeypatch):
    a = random_list(SIZES["odd"], zeros=0.05)
    b = random_list(SIZES["odd"], torch.bfloat16)
    results = {}
    for name in BACKENDS:
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
        if dtype == torch.bfloat16 and INTERPRETED and backend == "triton":
            # Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest even (compiled code rounds).
            torch.testing.assert_close(new, old + add, rtol=2**-7, atol=0)
        else:
            assert torch.equal(new, old + add), "a += b rounds exactly like torch"


def test_grad_stats_sign_counts_and_zeros(backend):
    a = [torch.tensor([1.0, -2.0, 0.0, 3.0, 1e-30], device=DEVICE)]
    b = [torch.tensor([2.0, 5.0, 1.0, 0.0, 1e-30], device=DEVICE)]
    got = ops.grad_stats(a, b).cpu()
    # 1e-30 * 1e-30 underflows in fp32; the sign agreement must still count it.
    assert got[3].item() == 1.0 - 1.0 + 0.0 + 0.0 + 1.0
    assert got[4].item() == 4 and got[5].item() == 4
    assert ops.grad_stats([torch.zeros(0, device=DEVICE)], [torch.zeros(0, device=DEVICE)]).abs().sum() == 0


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
    # The cap applies to whichever decay was chosen: early on a conflict moves the teacher too, ever more slowly.
    alpha = min(0.99 if aligned else 1.0, 1 - 1 / (step + 1))
    torch.testing.assert_close(teacher[0], alpha * start + (1 - alpha) * student[0], rtol=1e-6, atol=1e-6)


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


def test_gsema_update_is_deterministic_and_backends_agree(monkeypatch):
    student = random_list(SIZES["odd"], torch.bfloat16)
    base = random_list(SIZES["odd"])
    results = {}
    for name in BACKENDS:
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
    with pytest.raises(ValueError, match="stats must be a float32 tensor of 6"):
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


def test_fused_ema_low_precision_ema_and_buffers(backend):
    ema = [torch.randn(100, device=DEVICE).to(torch.bfloat16), torch.tensor(3, device=DEVICE)]
    current = [torch.randn(100, device=DEVICE).to(torch.bfloat16), torch.tensor(4, device=DEVICE)]
    want = torch.lerp(ema[0].float(), current[0].float(), 0.25).to(torch.bfloat16)
    ops.fused_ema_(ema, current, 0.25)
    # Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest even (compiled code rounds).
    ulp = 2**-7 if INTERPRETED and backend == "triton" else 0
    torch.testing.assert_close(ema[0], want, rtol=ulp, atol=0)
    assert ema[1].item() == 4


def test_fused_ema_bad_input():
    e, c = [torch.randn(3, device=DEVICE)], [torch.randn(3, device=DEVICE)]
    with pytest.raises(ValueError, match="weight must be finite, got inf"):
        ops.fused_ema_(e, c, float("inf"))
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


# ------------------------------------------------------------------------------------------------ native GPU


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
