"""BACL benchmarks: ``ops.bacl_loss`` against the plain torch composition of the reference maths, side by side in
the same run, and the fused Gram and gradient passes (device time, from a CUDA graph) against a device copy of the
same bytes.

Targets (issue 3). GPU: forward+backward at least 8x faster than the torch composition at 4 x [1, 96, 24, 24, 24]
(9.4 ms on an H200 in the anchor measurement, made before the fused loss was written: ``ANCHOR_H200_MS``), and the
fused Gram pass at 80% of copy bandwidth or more. CPU: faster than the torch composition. The CPU runs the public
op's CPU path (the torch reference) on latents with a quarter of the channels, so that the file takes about a minute
on two cores.

GPU figures come two ways. Eager (``ms``, the speed-ups): each call launched from Python, as a plain training loop
runs it; at these sizes the fused loss is bound by the host's launch overhead. CUDA graph (``graph_ms``,
``graph_speedup_vs_anchor_composition``, and ``ms`` of the fused passes): device time only, both sides captured the
same way. The fused passes' target figure is ``fraction_of_graph_copy`` (a copy of the same bytes, also replayed
from a graph); ``fraction_of_copy`` compares with ``_util``'s eager copy.

Two compositions are timed: ``anchor`` is the public code's maths as the anchor measurement composed it in plain
torch (complex FFT over all five axes, fftshift mask, 12 ``F.cosine_similarity`` calls, batch-averaged
similarities); ``spatial`` is the same library calls for this project's default maths (FFT over the spatial axes
only, symmetric mask, per-sample loss), the fairer baseline. ``extra_info`` holds both times and both speed-ups.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from bench._util import DEVICE, ON_GPU, record, timed
from gsema_fast import ops
from gsema_fast.config import BaclOptions
from gsema_fast.kernels import bacl as K  # noqa: N812
from gsema_fast.reference import bacl as R  # noqa: N812

SHAPES = [(1, 96, 24, 24, 24), (2, 48, 32, 32, 32)] if ON_GPU else [(1, 24, 24, 24, 24), (2, 12, 32, 32, 32)]
DTYPES = [torch.float32, torch.bfloat16]
WARMUP, ITERS = (5, 30) if ON_GPU else (1, 3)
TARGET_SPEEDUP = 8.0  # GPU, forward+backward, against the anchor composition
TARGET_FRACTION_OF_COPY = 0.8  # GPU, the fused Gram pass
# The anchor composition in fp32 on an H200 (torch 2.11, 2026-11-26), measured before the fused loss existed.
ANCHOR_H200_MS = {
    ((1, 96, 24, 24, 24), "fwd"): 4.636,
    ((1, 96, 24, 24, 24), "fwdbwd"): 9.358,
    ((2, 48, 32, 32, 32), "fwd"): 4.45,
    ((2, 48, 32, 32, 32), "fwdbwd"): 7.994,
}


def _cos(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)


def anchor_composition(zs_s, zs_t, zt_s, zt_t):
    """The public code's BACL maths as the anchor measurement composed it in plain torch (fp32 latents)."""

    def high_freq(z, lo, hi):
        f = torch.fft.fftshift(torch.fft.fftn(z.to(torch.complex64)))
        m = torch.ones(z.shape, device=z.device)
        m[:, :, lo:hi, lo:hi, lo:hi] = 0
        return torch.fft.ifftn(torch.fft.ifftshift(f * m.to(torch.complex64))).abs()

    n = zs_s.shape[-1]
    lo, hi = n // 4, 3 * n // 4
    b = [high_freq(z, lo, hi) for z in (zs_s, zs_t, zt_s, zt_t)]

    def nce(a, b_, c, d):
        cos = lambda u, v: _cos(u, v).mean()  # noqa: E731
        p = torch.exp(cos(a, c)) + torch.exp(cos(b_, d))
        ng = torch.exp(cos(a, b_)) + torch.exp(cos(c, d)) + torch.exp(cos(a, d)) + torch.exp(cos(b_, c))
        return -torch.log(p / (p + ng))

    return nce(zs_s, zs_t, zt_s, zt_t) + nce(*b)


def spatial_composition(zs_s, zs_t, zt_s, zt_t, tau=1.0, cutoff=0.5):
    """This project's default maths with the same library calls: spatial FFTs, symmetric mask, per-sample loss."""
    dims = (-3, -2, -1)
    low = torch.ones(zs_s.shape[-3:], device=zs_s.device)
    for axis, n in enumerate(zs_s.shape[-3:]):
        k = torch.fft.fftfreq(n, d=1.0 / n, device=zs_s.device).abs()
        low = low * (k < cutoff * n / 2).float().reshape([n if a == axis else 1 for a in range(3)])
    m = 1.0 - low

    def term(a, b, c, d):
        e = lambda u, v: torch.exp(_cos(u, v) / tau)  # noqa: E731
        p = e(a, c) + e(b, d)
        ng = e(a, b) + e(c, d) + e(a, d) + e(b, c)
        return (-torch.log(p / (p + ng))).mean()

    zs = (zs_s, zs_t, zt_s, zt_t)
    b = [torch.fft.ifftn(torch.fft.fftn(z, dim=dims) * m, dim=dims).abs() for z in zs]
    return term(*zs) + term(*b)


def latents(shape, dtype):
    zs = [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(4)]
    for z in zs[:2]:
        z.requires_grad_(True)  # the student's latents; the teacher's carry no graph
    return zs


def runner(loss_fn, zs, backward):
    def run():
        for z in zs:
            z.grad = None
        loss = loss_fn()
        if backward:
            loss.backward()
        return loss

    return run


def synced(fn):
    """pytest-benchmark's clock is the host's: wait for the device so that its table shows device time too."""

    def run():
        fn()
        if ON_GPU:
            torch.cuda.synchronize()

    return run


_COMPOSITION_MS: dict[tuple, float] = {}


def composition_ms(fn, key):
    """Each composition once per shape, dtype and pass, shared by the cases that compare against it."""
    if key not in _COMPOSITION_MS:
        _COMPOSITION_MS[key] = timed(fn, warmup=WARMUP, iters=ITERS)
    return _COMPOSITION_MS[key]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_bacl_loss(benchmark, monkeypatch, shape, dtype, pass_):
    if not ON_GPU:
        monkeypatch.setenv(ops.BACKEND_ENV, "torch")  # the public op's CPU path, even under TRITON_INTERPRET=1
    backward = pass_ == "fwdbwd"
    zs = latents(shape, dtype)
    ours = runner(lambda: ops.bacl_loss(*zs), zs, backward)
    # The compositions upcast first: the anchor measurement timed them on fp32 latents.
    anchor = runner(lambda: anchor_composition(*(z.float() for z in zs)), zs, backward)
    spatial = runner(lambda: spatial_composition(*(z.float() for z in zs)), zs, backward)
    benchmark.group = f"bacl_loss {pass_} {'x'.join(map(str, shape))}"
    if benchmark.disabled:  # CI's pass: every path once (the forward+backward cases cover the forwards), no timing
        for fn in (anchor, spatial) if backward else ():
            assert torch.isfinite(fn())
        assert torch.isfinite(benchmark(ours))
        return
    benchmark.pedantic(synced(ours), rounds=ITERS, warmup_rounds=WARMUP)
    ours_ms = timed(ours, warmup=WARMUP, iters=ITERS) if ON_GPU else benchmark.stats.stats.median * 1e3
    key = (shape, dtype, pass_)
    anchor_ms = composition_ms(anchor, ("anchor", *key))
    spatial_ms = composition_ms(spatial, ("spatial", *key))
    extra = {
        "shape": f"4 x {list(shape)}",
        "dtype": str(dtype),
        "backend": "triton" if ops.use_triton(zs[0]) else "torch",
        "anchor_composition_ms": round(anchor_ms, 4),
        "spatial_composition_ms": round(spatial_ms, 4),
        "speedup_vs_anchor_composition": round(anchor_ms / ours_ms, 2),
        "speedup_vs_spatial_composition": round(spatial_ms / ours_ms, 2),
        "bytes": "one read of the four latents",
    }
    if ON_GPU:
        reference = runner(lambda: R.bacl_reference(*zs).loss, zs, backward)
        extra["torch_path_ms"] = round(timed(reference, warmup=WARMUP, iters=ITERS), 4)
        if dtype == torch.float32:
            extra["anchor_h200_ms"] = ANCHOR_H200_MS[(shape, pass_)]
        if backward:
            extra["target_speedup"] = TARGET_SPEEDUP
            extra["meets_target"] = anchor_ms / ours_ms >= TARGET_SPEEDUP
        # Eagerly the fused loss is bound by the host's launch overhead; in a CUDA graph (as a captured training
        # step runs it) only device time is left. Both sides are captured the same way.
        try:
            ours_graph, anchor_graph = graph_ms(ours, reps=5), graph_ms(anchor, reps=5)
            extra["graph_ms"] = round(ours_graph, 4)
            extra["anchor_composition_graph_ms"] = round(anchor_graph, 4)
            extra["graph_speedup_vs_anchor_composition"] = round(anchor_graph / ours_graph, 2)
        except RuntimeError as err:  # a capture that fails is reported, not fatal to the eager figures
            extra["graph_error"] = repr(err)[:200]
    record(benchmark, nbytes=4 * zs[0].numel() * zs[0].element_size(), ms=ours_ms, **extra)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="a Triton kernel's bandwidth: needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pass_", ["gram", "grad"])
def test_bacl_fused_pass(benchmark, shape, dtype, pass_):
    """One launch of the fused forward (Gram + InfoNCE) or backward (two gradients) on the volume features."""
    xs = tuple(torch.randn(shape, device=DEVICE).to(dtype) for _ in range(4))
    loss, _, coef = K._contrast_forward(xs, BaclOptions(), K.IDENTITY)
    grad = torch.ones_like(loss)
    outs = [torch.empty_like(xs[0]), torch.empty_like(xs[1]), None, None]  # the student's two gradients
    if pass_ == "gram":
        fn = lambda: K._contrast_forward(xs, BaclOptions(), K.IDENTITY)  # noqa: E731
        moved = 4  # four tensors read
    else:
        fn = lambda: K._contrast_backward(xs, coef, grad, outs, K.IDENTITY)  # noqa: E731
        moved = 6  # four read, two written
    benchmark.group = f"bacl fused {pass_} pass"
    benchmark.pedantic(synced(fn), rounds=ITERS, warmup_rounds=WARMUP)
    nbytes = moved * xs[0].numel() * xs[0].element_size()
    ms = graph_ms(fn)
    # The copy is timed the same way: at 20-50 MB both working sets can sit in L2 (60 MB on H200) across replays.
    src = torch.empty(nbytes // 8, device=DEVICE)
    dst = torch.empty_like(src)
    copy_ms = graph_ms(lambda: dst.copy_(src))
    extra = {
        "shape": f"4 x {list(shape)}",
        "dtype": str(dtype),
        "eager_ms": round(timed(fn, warmup=WARMUP), 4),
        "copy_graph_GBps_same_bytes": round(nbytes / copy_ms / 1e6, 1),
        "fraction_of_graph_copy": round(copy_ms / ms, 3),
    }
    if pass_ == "gram":
        extra["target_fraction_of_copy"] = TARGET_FRACTION_OF_COPY
    record(benchmark, nbytes=nbytes, ms=ms, **extra)


def graph_ms(fn, reps: int = 20) -> float:
    """Device time per call: ``reps`` calls captured in one CUDA graph and replayed, so no host time in it.

    A single pass over 20-50 MB takes about 10 us on the device, less than the host needs to launch it from
    Python: eager timing would measure the host. The copy it is compared with is device-bound at these sizes.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile, and create the per-stream ticket counter, outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(reps):
            fn()
    ms = timed(graph.replay, warmup=3, iters=ITERS) / reps
    del graph  # its memory pool goes with it
    return ms
