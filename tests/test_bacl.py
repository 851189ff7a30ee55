"""BACL: high_pass, bacl_loss, the fused Gram/InfoNCE kernels and the BACL module.

The oracle is the paper's maths written out in plain torch, in float64: full complex FFTs over the spatial axes with
explicitly built masks, ``F.cosine_similarity`` for each of the six pairs, Eq. 5 term by term, autograd for the
gradients. Both implementations are checked against it: the fused Triton path (natively on CUDA, interpreted on the
CPU) and the torch reference that serves the CPU.
"""

from __future__ import annotations

import math
import typing

import pytest
import torch
from backends import BACKENDS, HAS_TRITON
from torch.nn import functional as F  # noqa: N812

from gsema_fast import ops
from gsema_fast.config import BaclMask, BaclOptions
from gsema_fast.losses import BACL
from gsema_fast.reference import bacl as R  # noqa: N812
from gsema_fast.reference import device as device_state

MASKS = typing.get_args(BaclMask)

if HAS_TRITON:
    from gsema_fast.kernels import bacl as K  # noqa: N812

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = {"torch": R.bacl_reference, **({"triton": K.bacl} if HAS_TRITON else {})}
SHAPES = [(2, 5, 12, 10, 14), (1, 3, 8, 8, 8), (3, 2, 7, 9, 5)]
SPATIAL = (-3, -2, -1)
# (rtol, atol as a fraction of the largest reference value). Low-precision inputs are read exactly and reduced in
# fp32, so values keep fp32 accuracy; their gradients are stored in the input dtype.
VALUE_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6), torch.float16: (1e-5, 1e-6)}
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (4e-3, 2e-3)}
PAIRS = [(0, 2), (1, 3), (0, 1), (2, 3), (0, 3), (1, 2)]  # positives first, as in BACLResult


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    # Every tensor here is tiny: on a busy machine MKL's thread hand-offs cost 100x the FFTs themselves.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ oracle


def oracle_mask(size, cutoff, mask):
    """Full-size M in unshifted FFT order, built the literal way for each mode."""
    if mask == "symmetric":
        low = torch.ones(size, dtype=torch.float64)
        for axis, n in enumerate(size):
            k = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)  # signed integer frequencies
            band = (k.abs() < cutoff * n / 2).double()
            low = low * band.reshape([n if a == axis else 1 for a in range(3)])
        return 1.0 - low
    shifted = torch.ones(size, dtype=torch.float64)
    d, h, w = (slice(math.floor(n * (1 - cutoff) / 2), math.floor(n * (1 + cutoff) / 2)) for n in size)
    shifted[d, h, w] = 0.0
    return torch.fft.ifftshift(shifted)


def oracle_high_pass(z, cutoff=0.5, mask="symmetric"):
    m = oracle_mask(tuple(z.shape[-3:]), cutoff, mask).to(z.device)
    return torch.fft.ifftn(torch.fft.fftn(z, dim=SPATIAL) * m, dim=SPATIAL).abs()


def oracle_term(feats, tau, reduction="sample"):
    sims = torch.stack([F.cosine_similarity(feats[i].flatten(1), feats[j].flatten(1), dim=-1) for i, j in PAIRS], 1)
    # batch_mean: the public code's F.cosine_similarity(...).mean() over the batch, before exp and log.
    e = torch.exp((sims.mean(0, keepdim=True) if reduction == "batch_mean" else sims) / tau)
    pos = e[:, 0] + e[:, 1]
    neg = e[:, 2] + e[:, 3] + e[:, 4] + e[:, 5]
    return (-torch.log(pos / (pos + neg))).mean(), sims


def oracle(zs, *, cutoff=0.5, tau=1.0, volume=True, boundary=True, mask="symmetric", reduction="sample"):
    """(loss, volume sims, boundary sims) in float64."""
    zs = [z.double() if z.dtype != torch.float64 else z for z in zs]
    loss = torch.zeros((), dtype=torch.float64, device=zs[0].device)
    sims_v = sims_b = None
    if volume:
        lv, sims_v = oracle_term(zs, tau, reduction)
        loss = loss + lv
    if boundary:
        lb, sims_b = oracle_term([oracle_high_pass(z, cutoff, mask) for z in zs], tau, reduction)
        loss = loss + lb
    return loss, sims_v, sims_b


def latents(shape, dtype=torch.float32, requires=(True, True, False, False)):
    """Four latents with some structure: positives correlate more than negatives, so no similarity sits near 0."""
    base = [torch.randn(shape, device=DEVICE) for _ in range(4)]
    zs = [base[0] + 0.5 * base[2], base[1] + 0.5 * base[3], base[0] + 0.3 * base[1], base[1] + 0.3 * base[2]]
    return [z.to(dtype).requires_grad_(r) for z, r in zip(zs, requires, strict=True)]


def close(actual, expected, tol, what):
    rtol, atol = tol
    expected = expected.detach().double()
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol * scale + 1e-30, msg=what)


def check_against_oracle(impl, zs, value_tol, grad_tol, **opts):
    result = impl(*zs, **opts)
    result.loss.backward()
    refs = [z.detach().double().requires_grad_(z.requires_grad) for z in zs]
    loss, sims_v, sims_b = oracle(refs, **opts)
    loss.backward()
    close(result.loss, loss, value_tol, "loss")
    assert (result.volume_sims is None) == (sims_v is None) and (result.boundary_sims is None) == (sims_b is None)
    if sims_v is not None:
        close(result.volume_sims, sims_v, value_tol, "volume similarities")
    if sims_b is not None:
        close(result.boundary_sims, sims_b, value_tol, "boundary similarities")
    for i, (z, ref) in enumerate(zip(zs, refs, strict=True)):
        if z.requires_grad:
            assert z.grad is not None and z.grad.dtype == z.dtype and z.grad.shape == z.shape
            close(z.grad, ref.grad, grad_tol, f"gradient of input {i}")
    return result


# ------------------------------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask", MASKS)
def test_bacl_matches_oracle(impl, shape, dtype, mask):
    zs = latents(shape, dtype)
    result = check_against_oracle(IMPLS[impl], zs, VALUE_TOL[dtype], GRAD_TOL[dtype], tau=0.5, mask=mask)
    assert result.loss.shape == () and result.loss.dtype == torch.float32
    assert zs[2].grad is None and zs[3].grad is None  # teachers that do not require grad get none
    assert result.volume_sims.shape == (shape[0], 6) and not result.volume_sims.requires_grad


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("terms", ["volume", "boundary"])
@pytest.mark.parametrize("tau", [1.0, 0.1])
@pytest.mark.parametrize("mask", MASKS)
def test_single_term_and_tau_all_inputs_grad(impl, terms, tau, mask):
    zs = latents((2, 3, 6, 5, 7), requires=(True, True, True, True))
    opts = dict(volume=terms == "volume", boundary=terms == "boundary", tau=tau, mask=mask, cutoff=0.4)
    result = check_against_oracle(IMPLS[impl], zs, (1e-5, 1e-6), (1e-4, 1e-5), **opts)
    assert (result.volume is None) == (terms != "volume") and (result.boundary is None) == (terms != "boundary")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("mask", MASKS)
def test_gradcheck_float64(impl, mask):
    zs = [z.detach().double() for z in latents((2, 2, 4, 3, 5))]
    for z in zs[:3]:
        z.requires_grad_(True)

    def fn(*xs):
        return IMPLS[impl](*xs, zs[3], tau=0.7, mask=mask, cutoff=0.5).loss

    # The interpreted kernels are slow, so they get gradcheck's random-projection mode.
    assert torch.autograd.gradcheck(fn, zs[:3], eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=impl == "triton")


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("terms", [(True, True), (True, False), (False, True)])
def test_identical_latents_give_log3_per_term(impl, terms):
    z = torch.randn(2, 3, 6, 6, 6, device=DEVICE)
    result = IMPLS[impl](z, z, z, z, volume=terms[0], boundary=terms[1])
    torch.testing.assert_close(result.loss, torch.tensor(sum(terms) * math.log(3.0), device=DEVICE))
    for sims in (result.volume_sims, result.boundary_sims):
        if sims is not None:
            torch.testing.assert_close(sims, torch.ones_like(sims))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("mask", MASKS)
def test_mixed_dtypes_student_bf16_teacher_fp32(impl, mask):
    zs = latents((2, 3, 6, 5, 4))
    zs = [zs[0].detach().bfloat16().requires_grad_(), zs[1].detach().bfloat16().requires_grad_(), zs[2], zs[3]]
    check_against_oracle(IMPLS[impl], zs, (1e-5, 1e-6), GRAD_TOL[torch.bfloat16], tau=0.5, mask=mask)


@pytest.mark.parametrize("impl", BACKENDS)
def test_zero_latent_gives_finite_loss_and_gradients(impl):
    zs = latents((2, 3, 5, 4, 6), requires=(True, True, True, True))
    with torch.no_grad():
        zs[3].zero_()  # a zero feature vector: its norm is clamped and its similarities are 0
    check_against_oracle(IMPLS[impl], zs, (1e-5, 1e-6), (1e-4, 1e-5), tau=0.5)
    assert all(torch.isfinite(z.grad).all() for z in zs)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("terms", [(True, True), (False, True)])
def test_batch_mean_reduction_matches_oracle(impl, mask, terms):
    """``reduction="batch_mean"``: one InfoNCE of the similarities averaged over the batch (the public code)."""
    zs = latents((3, 3, 6, 5, 4), requires=(True, True, True, False))
    opts = dict(tau=0.5, mask=mask, volume=terms[0], boundary=terms[1], reduction="batch_mean")
    result = check_against_oracle(IMPLS[impl], zs, (1e-5, 1e-6), (1e-4, 1e-5), **opts)
    per_sample = IMPLS[impl](*zs, tau=0.5, mask=mask, volume=terms[0], boundary=terms[1]).loss
    assert abs(float(result.loss.detach()) - float(per_sample.detach())) > 1e-6  # a different loss for B > 1
    single = [z[:1].detach() for z in zs]  # and the same one for B = 1
    torch.testing.assert_close(
        IMPLS[impl](*single, **opts).loss, IMPLS[impl](*single, **{**opts, "reduction": "sample"}).loss
    )


@pytest.mark.parametrize("impl", BACKENDS)
def test_batch_mean_gradcheck_float64(impl):
    zs = [z.detach().double() for z in latents((2, 2, 4, 3, 5))]
    for z in zs[:3]:
        z.requires_grad_(True)

    def fn(*xs):
        return IMPLS[impl](*xs, zs[3], tau=0.7, mask="reference", reduction="batch_mean").loss

    assert torch.autograd.gradcheck(fn, zs[:3], eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=impl == "triton")


def test_masks_are_built_before_a_capture_and_pinned_by_it(monkeypatch):
    R._MASKS.clear()
    capture = [True]
    monkeypatch.setattr(device_state, "capturing", lambda d: capture[0])
    with pytest.raises(RuntimeError, match="high-pass mask .* outside a CUDA graph capture"):
        R.high_pass_mask((6, 6, 6), device=DEVICE)
    capture[0] = False
    mask = R.high_pass_mask((6, 6, 6), device=DEVICE)
    capture[0] = True
    assert R.high_pass_mask((6, 6, 6), device=DEVICE) is mask
    capture[0] = False
    for n in range(1, 70):  # more masks than the cache keeps
        R.high_pass_mask((n, 2, 2), device=DEVICE)
    capture[0] = True
    assert R.high_pass_mask((6, 6, 6), device=DEVICE) is mask


# --------------------------------------------------------------------------------------------------- high_pass


@pytest.mark.parametrize("size", [(8, 8, 8), (12, 10, 14), (7, 9, 5), (32, 32, 32), (1, 2, 3)], ids=str)
@pytest.mark.parametrize("cutoff", [0.5, 0.25, 0.3])
def test_reference_mask_is_the_fftshift_construction_bit_for_bit(size, cutoff):
    if cutoff == 0.5:  # the public code's own slice bounds
        bounds = [slice(n // 4, 3 * n // 4) for n in size]
    else:
        bounds = [slice(int(n * (1 - cutoff) / 2), int(n * (1 + cutoff) / 2)) for n in size]
    shifted = torch.ones(size)
    shifted[tuple(bounds)] = 0.0
    m = R.high_pass_mask(size, cutoff=cutoff, mask="reference")
    assert torch.equal(m, torch.fft.ifftshift(shifted))
    z = torch.randn(2, 3, *size)
    spectrum = torch.fft.fftn(z, dim=SPATIAL)
    explicit = torch.fft.ifftn(
        torch.fft.ifftshift(torch.fft.fftshift(spectrum, dim=SPATIAL) * shifted, dim=SPATIAL), dim=SPATIAL
    ).abs()
    assert torch.equal(ops.high_pass(z, cutoff=cutoff, mask="reference"), explicit)


def test_reference_mask_is_off_by_one_bin_on_even_axes():
    m = R.high_pass_mask((32, 32, 32), mask="reference")
    assert m[-8, 0, 0] == 0 and m[8, 0, 0] == 1  # zeroes k = -8 but not k = +8, as the public code
    assert int((m == 0).sum()) == 16**3


@pytest.mark.parametrize("size", [(8, 8, 8), (12, 10, 14), (7, 9, 5), (1, 2, 3)], ids=str)
@pytest.mark.parametrize("cutoff", [0.5, 0.3, 0.4, 0.9])
def test_symmetric_mask_is_the_centred_cube_on_the_rfft_half(size, cutoff):
    full = oracle_mask(size, cutoff, "symmetric")
    half = R.high_pass_mask(size, cutoff=cutoff, mask="symmetric", dtype=torch.float64)
    assert torch.equal(half, full[..., : size[2] // 2 + 1])
    flipped = torch.roll(torch.flip(full, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))  # M(-k)
    assert torch.equal(full, flipped)
    zeros = math.prod(sum(abs(k) < cutoff * n / 2 for k in range(-(n // 2), n - n // 2)) for n in size)
    assert int((full == 0).sum()) == zeros


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_high_pass_matches_complex_construction(shape, mask, dtype):
    z = torch.randn(shape, device=DEVICE).to(dtype)
    b = ops.high_pass(z, cutoff=0.5, mask=mask)
    assert b.dtype == dtype and b.shape == z.shape
    ref = oracle_high_pass(z.double(), 0.5, mask)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(b.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("mask", MASKS)
def test_high_pass_gradcheck(mask):
    z = torch.randn(2, 2, 5, 4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.high_pass(x, cutoff=0.6, mask=mask), (z,), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- dispatch and module


@pytest.mark.parametrize("op", ["bacl_loss", "bacl_terms", "module"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bacl_dispatch(backend, op, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, backend)
    called = []
    for module, name in ((R, "bacl_reference"), *(((K, "bacl"),) if HAS_TRITON else ())):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: called.append(_n) or _o(*a, **k))
    zs = latents((1, 2, 4, 4, 4))
    if op == "bacl_loss":
        loss = ops.bacl_loss(*zs, tau=0.5)
    elif op == "bacl_terms":
        loss = ops.bacl_terms(*zs, tau=0.5).loss
    else:
        loss = BACL(tau=0.5)(*zs)[0]
    assert called == ["bacl" if backend == "triton" else "bacl_reference"]
    torch.testing.assert_close(loss, oracle([z.detach() for z in zs], tau=0.5)[0].float())


@pytest.mark.parametrize("terms", [(True, True), (False, True)])
def test_bacl_module_parts(terms):
    module = BACL(tau=0.5, volume=terms[0], boundary=terms[1], mask="reference", cutoff=0.5)
    assert "mask='reference'" in repr(module)
    zs = latents((2, 3, 6, 5, 4))
    loss, parts = module(*zs)
    expected = ops.bacl_loss(*zs, tau=0.5, volume=terms[0], boundary=terms[1], mask="reference")
    torch.testing.assert_close(loss, expected)
    _, sims_v, sims_b = oracle([z.detach() for z in zs], tau=0.5, volume=terms[0], boundary=terms[1], mask="reference")
    names = [n for n, on in zip(("volume", "boundary"), terms, strict=True) if on]
    assert sorted(parts) == sorted(f"{n}{s}" for n in names for s in ("", "_pos", "_neg"))
    assert all(p.shape == () and not p.requires_grad and p.device == zs[0].device for p in parts.values())
    torch.testing.assert_close(sum(parts[n] for n in names), loss.detach())
    for name, sims in (("volume", sims_v), ("boundary", sims_b)):
        if sims is not None:
            torch.testing.assert_close(parts[f"{name}_pos"].double(), sims[:, :2].mean(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(parts[f"{name}_neg"].double(), sims[:, 2:].mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert zs[0].grad is not None and zs[2].grad is None


# -------------------------------------------------------------------------------------------------- bad inputs


def _good():
    return [torch.randn(1, 2, 4, 4, 4) for _ in range(4)]


BAD_BACL = [
    ("shape", lambda zs: ([*zs[:3], torch.randn(1, 2, 4, 4, 5)], {}), ValueError,
     r"z_tea_trg has shape \(1, 2, 4, 4, 5\)"),
    ("device", lambda zs: ([zs[0], zs[1].to("meta"), *zs[2:]], {}), ValueError, "z_stu_trg is on meta"),
    ("4 dims", lambda zs: ([z[0] for z in zs], {}), ValueError, r"5 dims\), got shape \(2, 4, 4, 4\)"),
    ("empty", lambda zs: ([torch.randn(0, 2, 4, 4, 4)] * 4, {}), ValueError, "must not be empty"),
    ("integer", lambda zs: ([zs[0].long(), *zs[1:]], {}), TypeError, "z_stu_src must be a floating .*torch.int64"),
    ("not a tensor", lambda zs: ([zs[0].tolist(), *zs[1:]], {}), TypeError, "z_stu_src must be a tensor, got list"),
    ("cutoff 0", lambda zs: (zs, {"cutoff": 0.0}), ValueError, r"cutoff must be a number in \(0, 1\), got 0.0"),
    ("cutoff 1", lambda zs: (zs, {"cutoff": 1}), ValueError, r"got 1$"),
    ("cutoff nan", lambda zs: (zs, {"cutoff": float("nan")}), ValueError, "got nan"),
    ("tau 0", lambda zs: (zs, {"tau": 0.0}), ValueError, "tau must be a finite number > 0, got 0.0"),
    ("tau < 0", lambda zs: (zs, {"tau": -1.0}), ValueError, "got -1.0"),
    ("tau inf", lambda zs: (zs, {"tau": float("inf")}), ValueError, "got inf"),
    ("tau str", lambda zs: (zs, {"tau": "1"}), ValueError, "got '1'"),
    ("mask", lambda zs: (zs, {"mask": "centred"}), ValueError, "mask must be one of .*got 'centred'"),
    ("no term", lambda zs: (zs, {"volume": False, "boundary": False}), ValueError, "volume=False, boundary=False"),
    ("reduction", lambda zs: (zs, {"reduction": "mean"}), ValueError, "reduction must be one of .*got 'mean'"),
]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD_BACL, ids=[c[0] for c in BAD_BACL])
def test_bacl_loss_rejects_bad_input(case, backend, monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, backend)
    _, make, exc, match = case
    zs, kwargs = make(_good())
    with pytest.raises(exc, match=match):
        ops.bacl_loss(*zs, **kwargs)


@pytest.mark.parametrize(
    ("z", "kwargs", "exc", "match"),
    [
        (torch.randn(2, 4, 4, 4), {}, ValueError, r"z must be \[B, C, D, H, W\] \(5 dims\), got shape \(2, 4, 4, 4\)"),
        (torch.ones(1, 1, 2, 2, 2, dtype=torch.int32), {}, TypeError, "got torch.int32"),
        (torch.randn(1, 1, 2, 2, 2), {"cutoff": 1.5}, ValueError, "got 1.5"),
        (torch.randn(1, 1, 2, 2, 2), {"mask": "shifted"}, ValueError, "got 'shifted'"),
    ],
)
def test_high_pass_rejects_bad_input(z, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.high_pass(z, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": -0.5}, "got -0.5"),
        ({"cutoff": 0}, "got 0"),
        ({"volume": False, "boundary": False}, "volume=False"),
        ({"reduction": "batch"}, "reduction must be one of .*got 'batch'"),
    ],
)
def test_bacl_module_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BACL(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_options_object_and_keyword_arguments_make_the_same_call(backend, monkeypatch):
    """Every BACL signature takes the one options object (a config's bacl section), keyword arguments, or both (the
    keywords replace the object's fields)."""
    monkeypatch.setenv(ops.BACKEND_ENV, backend)
    zs = _good()
    options = BaclOptions(tau=0.5, mask="reference", volume=False)
    by_object = ops.bacl_loss(*zs, options)
    assert torch.equal(by_object, ops.bacl_loss(*zs, tau=0.5, mask="reference", volume=False))
    assert torch.equal(ops.bacl_terms(*zs, options).loss, by_object)
    assert torch.equal(
        ops.bacl_loss(*zs, options, tau=2.0), ops.bacl_loss(*zs, tau=2.0, mask="reference", volume=False)
    )
    assert torch.equal(BACL(options)(*zs)[0], by_object) and BACL(options).options is options
    assert torch.equal(BACL(options, volume=True)(*zs)[0], ops.bacl_loss(*zs, tau=0.5, mask="reference"))
    assert torch.equal(ops.high_pass(zs[0], options), ops.high_pass(zs[0], mask="reference"))
    assert R.high_pass_mask((4, 4, 4), options) is R.high_pass_mask((4, 4, 4), mask="reference")
    with pytest.raises(TypeError, match="unexpected BACL option 'tua'"):
        ops.bacl_loss(*zs, tua=0.5)
    with pytest.raises(TypeError, match="options must be a BaclOptions, got dict"):
        ops.bacl_loss(*zs, {"tau": 0.5})
    with pytest.raises(ValueError, match=r"volume=False, boundary=False"):
        BACL(options, boundary=False)
