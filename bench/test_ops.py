"""Throughput of the GS-EMA ops over real parameter lists (MONAI SwinUNETR, feature sizes 48 and 24, 151 tensors).

Compared side by side in one run: ``fused_ema_`` vs ``torch._foreach_lerp_`` vs a Python loop; ``grad_stats`` vs the
public code's decision (``torch.cat`` + sign + cosine, read on the host) vs torch ops on pre-flattened vectors; the
GS-EMA tail (``grad_stats`` + ``gsema_update_``) vs the reference tail (decision + loop EMA). ``extra_info`` holds
the achieved GB/s, the copy bandwidth for the same bytes measured in the same run, and the speed-ups.

    pytest bench/test_ops.py --benchmark-json=ops.json
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from bench._util import DEVICE, ON_GPU, copy_gbps, record, sync, timed
from gsema_fast import ops

FEATURE_SIZES = [48, 24]
ROUNDS = 30 if ON_GPU else 3
ITERS = 20 if ON_GPU else 5


@functools.lru_cache(maxsize=1)
def parameter_lists(feature_size: int) -> dict[str, list[torch.Tensor]]:
    """Teacher, student and two gradient lists shaped like a SwinUNETR's parameters (random values, never zeros)."""
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=3, feature_size=feature_size).to(DEVICE)
    student = [p.detach() for p in model.parameters()]
    return {
        "student": student,
        "teacher": [p + 0.01 * torch.randn_like(p) for p in student],
        "g_src": [torch.randn_like(p) for p in student],
        "g_trg": [torch.randn_like(p) for p in student],
    }


def numel(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)


def run_synced(benchmark, fn):
    def call():
        fn()
        sync()

    return benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)


# ------------------------------------------------------------------------------------------------ EMA


def ema_impls(teacher, student, weight=0.1):
    def loop():
        for t, s in zip(teacher, student, strict=True):
            t.mul_(1 - weight).add_(s, alpha=weight)

    return {
        "fused_ema_": lambda: ops.fused_ema_(teacher, student, weight),
        "foreach_lerp_": lambda: torch._foreach_lerp_(teacher, student, weight),
        "python_loop": loop,
    }


@pytest.mark.parametrize("impl", ["fused_ema_", "foreach_lerp_", "python_loop"])
@pytest.mark.parametrize("feature_size", FEATURE_SIZES)
def test_ema(benchmark, feature_size, impl):
    lists = parameter_lists(feature_size)
    fn = ema_impls(lists["teacher"], lists["student"])[impl]
    n = numel(lists["student"])
    run_synced(benchmark, fn)
    if not benchmark.disabled:
        record(benchmark, nbytes=12 * n, ms=timed(fn, iters=ITERS), params=n, tensors=len(lists["student"]))


# ------------------------------------------------------------------------------------------------ grad_stats


def reference_decision(g_src, g_trg) -> bool:
    """The public code's decision: concatenate, take signs, cosine, read on the host."""
    a = torch.cat([g.view(-1) for g in g_src])
    b = torch.cat([g.view(-1) for g in g_trg])
    return bool(F.cosine_similarity(torch.sign(a), torch.sign(b), dim=0) > 0)


@pytest.mark.parametrize("impl", ["grad_stats", "reference_cat_sign_cos", "flat_torch_4_stats"])
@pytest.mark.parametrize("feature_size", FEATURE_SIZES)
def test_grad_stats(benchmark, feature_size, impl):
    lists = parameter_lists(feature_size)
    g_src, g_trg = lists["g_src"], lists["g_trg"]
    if impl == "grad_stats":

        def fn():
            return ops.grad_stats(g_src, g_trg)

    elif impl == "reference_cat_sign_cos":

        def fn():
            return reference_decision(g_src, g_trg)

    else:
        flat_a = torch.cat([g.view(-1) for g in g_src])
        flat_b = torch.cat([g.view(-1) for g in g_trg])

        def fn():
            return (
                torch.dot(flat_a, flat_b),
                torch.dot(flat_a, flat_a),
                torch.dot(flat_b, flat_b),
                (torch.sign(flat_a) * torch.sign(flat_b)).sum(),
            )

    n = numel(g_src)
    run_synced(benchmark, fn)
    if not benchmark.disabled:
        record(benchmark, nbytes=8 * n, ms=timed(fn, iters=ITERS), params=n)


# ------------------------------------------------------------------------------------------------ the tail


def tail_impls(lists):
    teacher, student, g_src, g_trg = lists["teacher"], lists["student"], lists["g_src"], lists["g_trg"]
    step = torch.tensor(1000, device=DEVICE)

    def gsema():
        stats = ops.grad_stats(g_src, g_trg)
        ops.gsema_update_(teacher, student, stats, decay_aligned=0.9, decay_conflict=1.0, step=step)

    def reference():
        alpha = 0.9 if reference_decision(g_src, g_trg) else 0.999
        for t, s in zip(teacher, student, strict=True):
            t.mul_(alpha).add_(s, alpha=1 - alpha)

    impls = {"gsema": gsema, "reference": reference}
    if ON_GPU:
        gsema()  # builds and caches the launch tables outside the capture
        sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gsema()
        impls["gsema_cuda_graph"] = graph.replay
    return impls


@pytest.mark.parametrize("impl", ["gsema", "reference", "gsema_cuda_graph"])
@pytest.mark.parametrize("feature_size", FEATURE_SIZES)
def test_gsema_tail(benchmark, feature_size, impl):
    if impl == "gsema_cuda_graph" and not ON_GPU:
        pytest.skip("CUDA graphs need a GPU")
    lists = parameter_lists(feature_size)
    impls = tail_impls(lists)
    n = numel(lists["student"])
    run_synced(benchmark, impls[impl])
    if benchmark.disabled:
        return
    ms = timed(impls[impl], iters=ITERS)
    # The floor reads both gradients, the teacher and the student, and writes the teacher: 20 bytes per fp32 param.
    floor_ms = 20 * n / (copy_gbps(20 * n) * 1e6)
    extra = {"floor_ms": round(floor_ms, 4), "x_floor": round(ms / floor_ms, 2)}
    if impl != "reference":
        extra["speedup_vs_reference"] = round(timed(impls["reference"], iters=ITERS) / ms, 2)
    record(benchmark, nbytes=20 * n, ms=ms, params=n, **extra)
