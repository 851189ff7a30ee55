"""BACL's Triton launchers: tile plans, chunked and deterministic reductions, gradients rounded as stored, bad
features and outputs refused, and the checks that need a GPU. The values of the whole loss against the oracle, on
both backends, are in test_bacl.py."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from backends import INTERPRETED  # noqa: E402
from test_bacl import DEVICE, GRAD_TOL, MASKS, R, check_against_oracle, close, latents  # noqa: E402

from gsema_fast.config import BaclOptions  # noqa: E402
from gsema_fast.kernels import bacl as K  # noqa: E402, N812
from gsema_fast.losses import BACL  # noqa: E402

# every test here launches the kernels: slow under Triton's interpreter (see backends.py)
pytestmark = [pytest.mark.slow] if INTERPRETED else []


@pytest.fixture(autouse=True)
def _one_cpu_thread(one_thread):
    yield


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradients_are_fp32_gradients_rounded_as_stored(dtype):
    """The backward kernel forms each gradient in fp32 and rounds it once to the input's dtype. Compiled Triton rounds
    fp32 -> bf16 to nearest even, its interpreter (the CPU tests) truncates: the gradient is compared with the same
    launch's fp32 output rounded the way this path stores, bit for bit."""
    xs = tuple(torch.randn(2, 700, device=DEVICE).to(dtype) for _ in range(4))
    exact = tuple(x.float() for x in xs)  # the same values in fp32: the same sums, the gradient before rounding
    _, _, coef = K._contrast_forward(xs, BaclOptions(tau=0.5), K.IDENTITY)
    grad = torch.full((), 3.0, device=DEVICE)
    wide = [torch.empty(2, 700, device=DEVICE), torch.empty(2, 700, device=DEVICE), None, None]
    low = [torch.empty(2, 700, device=DEVICE, dtype=dtype), torch.empty(2, 700, device=DEVICE, dtype=dtype), None, None]
    K._contrast_backward(exact, coef, grad, wide, K.IDENTITY)
    K._contrast_backward(xs, coef, grad, low, K.IDENTITY)
    truncates = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    for w, got in zip(wide[:2], low[:2], strict=True):
        want = (w.view(torch.int32) & -65536).view(torch.float32).to(dtype) if truncates else w.to(dtype)
        assert torch.equal(got, want)


def test_triton_path_is_deterministic_and_chunked(monkeypatch):
    # Tiny tiles and several programs per sample: chunks of whole tiles plus a masked tail, and a final reduction in
    # several steps.
    monkeypatch.setattr(K, "TILE_ROWS", 16)
    monkeypatch.setattr(K, "CPU_PROGRAMS", 10)
    monkeypatch.setattr(K, "SUM_ROWS", 2)
    shape = (2, 1, 5, 5, 6)
    plan = K._plan(150, 2, K.IDENTITY, torch.float32, False, torch.device("cpu"))
    assert (plan.block, plan.chunk, plan.num_chunks) == (16, 32, 5)
    zs = latents(shape)
    runs = []
    for _ in range(2):
        for z in zs:
            z.grad = None
        result = K.bacl(*zs, tau=0.5)
        result.loss.backward()
        runs.append([result.loss.detach().clone()] + [z.grad.clone() for z in zs[:2]])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    fresh = [z.detach().requires_grad_(r) for z, r in zip(zs, (True, True, False, False), strict=True)]
    check_against_oracle(K.bacl, fresh, (1e-5, 1e-6), (1e-4, 1e-5), tau=0.5)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 2047, 2048, 8400, 1 << 20])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", [K.IDENTITY, K.COMPLEX_ABS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("aligned", [True, False])
def test_plan_covers_every_element_once(n, batch, mode, dtype, aligned):
    for device in (torch.device("cpu"), DEVICE):
        plan = K._plan(n, batch, mode, dtype, aligned, device)
        assert plan.chunk % plan.block == 0 and plan.block & (plan.block - 1) == 0
        assert (plan.num_chunks - 1) * plan.chunk < n <= plan.num_chunks * plan.chunk
        assert 1 <= plan.num_chunks <= K.MAX_CHUNKS


def _features():
    return tuple(torch.randn(2, 30, device=DEVICE) for _ in range(4))


@pytest.mark.parametrize(
    ("make", "mode", "exc", "match"),
    [
        (lambda xs: xs[:3], K.IDENTITY, ValueError, "expected 4 feature tensors, got 3"),
        (lambda xs: (xs[0].T.contiguous().T, *xs[1:]), K.IDENTITY, ValueError, r"feature 0 must be contiguous"),
        (lambda xs: (*xs[:3], xs[3][:, :29].contiguous()), K.IDENTITY, ValueError, r"feature 3 has shape \(2, 29\)"),
        (lambda xs: (xs[0].int(), *xs[1:]), K.IDENTITY, TypeError, "feature 0 must be .*got torch.int32"),
        (lambda xs: xs, K.COMPLEX_ABS, ValueError, r"view_as_real tensors \[B, ..., 2\], got \(2, 30\)"),
        (lambda xs: xs, 7, ValueError, "got 7"),
        (lambda xs: tuple(x[:0] for x in xs), K.IDENTITY, ValueError, r"got \(0, 30\)"),
    ],
)
def test_launcher_rejects_bad_features(make, mode, exc, match):
    with pytest.raises(exc, match=match):
        K._contrast_forward(make(_features()), BaclOptions(), mode)


@pytest.mark.parametrize(
    ("outs", "extras", "extra", "match"),
    [
        (lambda xs: [None] * 4, None, 0, "at least one a tensor"),
        (lambda xs: [torch.empty(2, 29, device=DEVICE), None, None, None], None, 0, r"outs\[0\] must be contiguous"),
        (lambda xs: [torch.empty_like(xs[0]), None, None, None], [None] * 4, 1, r"extras\[0\] must be a contiguous"),
        (lambda xs: [torch.empty_like(xs[0]), None, None, None], None, 3, "extra must be 0, 1 or 2"),
    ],
)
def test_backward_launcher_rejects_bad_outputs(outs, extras, extra, match):
    xs = _features()
    _, _, coef = K._contrast_forward(xs, BaclOptions(), K.IDENTITY)
    with pytest.raises(ValueError, match=match):
        K._contrast_backward(xs, coef, torch.ones((), device=DEVICE), outs(xs), K.IDENTITY, extras, extra)


# ------------------------------------------------------------------------------------------------ GPU-only checks


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 96, 24, 24, 24), (2, 48, 32, 32, 32)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask", MASKS)
def test_gpu_benchmark_shapes_match_torch_path(shape, dtype, mask):
    zs = latents(shape, dtype)
    fused = K.bacl(*zs, tau=0.5, mask=mask)
    fused.loss.backward()
    grads = [z.grad.clone() for z in zs[:2]]
    for z in zs[:2]:
        z.grad = None
    ref = R.bacl_reference(*zs, tau=0.5, mask=mask)
    ref.loss.backward()
    close(fused.loss, ref.loss, (1e-5, 1e-6), "loss")
    close(fused.boundary_sims, ref.boundary_sims, (1e-5, 1e-6), "boundary similarities")
    for g, z in zip(grads, zs, strict=False):
        close(g, z.grad, GRAD_TOL[dtype], "gradient")


@pytest.mark.gpu
def test_gpu_module_step_never_syncs():
    module = BACL(tau=0.5)
    zs = latents((2, 16, 12, 12, 12))
    for _ in range(2):  # compile the kernels and build the cached masks
        loss, parts = module(*zs)
        loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, parts = module(*zs)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and all(torch.isfinite(p) for p in parts.values())


@pytest.mark.gpu
def test_gpu_two_captured_graphs_replay_in_any_order():
    """Two graphs captured on the same stream after an eager warm-up on another: each owns its scratch, so either
    replays first and both give the eager loss, bit for bit."""
    zs = [z.detach() for z in latents((2, 8, 8, 8, 8))]
    for _ in range(2):  # compile, and build the masks, outside the capture
        want = K.bacl(*zs, tau=0.5).loss.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graphs, losses = [], []
    for _ in range(2):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            losses.append(K.bacl(*zs, tau=0.5).loss)
        graphs.append(graph)
    for graph in (graphs[1], graphs[0], graphs[1]):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(loss, want) for loss in losses)
