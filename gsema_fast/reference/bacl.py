r"""The boundary-aware contrastive loss in plain torch: the FFT high-pass, input validation, and the loss with
autograd's backward (the CPU path and the reference of ``gsema_fast.kernels.bacl``, whose docstring gives the maths).

Four latents of one mini-batch, each ``[B, C, D, H, W]``: 0 = student on source, 1 = student on target,
2 = teacher on source, 3 = teacher on target. Positives (0, 2), (1, 3); negatives (0, 1), (2, 3), (0, 3), (1, 2).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, NamedTuple

import torch

from gsema_fast.config import BaclOptions
from gsema_fast.reference.device import GraphSafeCache

EPS = 1e-8  # F.cosine_similarity's default guard on each norm
SPATIAL = (-3, -2, -1)


def acc_dtype(xs) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


# ------------------------------------------------------------------------------------- high-pass (torch.fft)


def _low_band(n: int, cutoff: float, mask: str) -> torch.Tensor:
    """1 on the low band of one axis of length ``n``, in unshifted FFT order, as float64 (exact 0/1)."""
    # The nearest simple fraction (0.4 -> 2/5): band edges fall where the decimal puts them, not one bin off because
    # the binary float is a hair above or below; every comparison below is then exact.
    c = Fraction(cutoff).limit_denominator(1 << 20)
    if mask == "symmetric":
        # Bin j holds frequency j or j - n, so |k| = min(j, n - j).
        band = [float(2 * min(j, n - j) < c * n) for j in range(n)]
        return torch.tensor(band, dtype=torch.float64)
    lo = math.floor(n * (1 - c) / 2)
    hi = math.floor(n * (1 + c) / 2)
    shifted = torch.zeros(n, dtype=torch.float64)
    shifted[lo:hi] = 1.0
    return torch.fft.ifftshift(shifted)


_MASKS = GraphSafeCache(64, "high-pass mask")


def _build_mask(size: tuple[int, int, int], cutoff: float, mask: str, dtype: torch.dtype, device: torch.device):
    d, h, w = (_low_band(n, cutoff, mask) for n in size)
    low = d[:, None, None] * h[None, :, None] * w[None, None, :]
    full = (1.0 - low).to(dtype)
    if mask == "symmetric":
        full = full[..., : size[2] // 2 + 1].contiguous()  # the rfftn half of the last axis
    return full.to(device)


def high_pass_mask(
    size: tuple[int, int, int],
    options: BaclOptions | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> torch.Tensor:
    """M for spatial ``size = (D, H, W)`` and the options' ``cutoff`` and ``mask`` (:meth:`BaclOptions.of`), in
    unshifted FFT order: ``[D, H, W // 2 + 1]`` (the rfftn half) for ``symmetric``, ``[D, H, W]`` for ``reference``
    (equal to ``ifftshift`` of the public code's shifted mask)."""
    options = BaclOptions.of(options, **overrides)
    key = (tuple(int(n) for n in size), options.cutoff, options.mask, dtype, torch.device(device))
    # Cached (built from host values, copied once) and, being read by launches a CUDA graph may capture, kept alive
    # for as long as such a graph (see GraphSafeCache).
    return _MASKS.get(key, lambda: _build_mask(*key), key[-1])


def apply_high_pass(x: torch.Tensor, options: BaclOptions, *, inplace: bool = False) -> torch.Tensor:
    """``IFFT(FFT(x) * M)`` over the last three axes; real for ``symmetric`` (real x), complex for ``reference``.

    ``inplace`` masks the spectrum in place (outside autograd only).
    """
    m = high_pass_mask(tuple(x.shape[-3:]), options, dtype=x.real.dtype, device=x.device)
    if options.mask == "symmetric" and not x.is_complex():
        spectrum = torch.fft.rfftn(x, dim=SPATIAL)
        spectrum = spectrum.mul_(m) if inplace else spectrum * m
        return torch.fft.irfftn(spectrum, s=x.shape[-3:], dim=SPATIAL)
    spectrum = torch.fft.fftn(x, dim=SPATIAL)
    spectrum = spectrum.mul_(m) if inplace else spectrum * m
    return torch.fft.ifftn(spectrum, dim=SPATIAL)


def work_dtype(z: torch.Tensor) -> torch.dtype:
    return z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float32  # torch.fft has no bfloat16


def filtered_latent(z: torch.Tensor, options: BaclOptions) -> torch.Tensor:
    """``IFFT(FFT(z) * M)`` before the modulus, differentiable: real for ``symmetric``, complex for ``reference``."""
    return apply_high_pass(z.to(work_dtype(z)), options)


def filtered_stack(zs, options: BaclOptions) -> torch.Tensor:
    """The four latents filtered as one stack ``[4, B, C, D, H, W]``: one batched FFT each way (no autograd)."""
    work = torch.float64 if any(z.dtype == torch.float64 for z in zs) else torch.float32
    if all(z.dtype == zs[0].dtype for z in zs):
        stacked = torch.stack(zs).to(work)
    else:
        stacked = torch.stack([z.to(work) for z in zs])
    return apply_high_pass(stacked, options, inplace=True)


def high_pass(z: torch.Tensor, options: BaclOptions | None = None, **overrides: Any) -> torch.Tensor:
    """Boundary features ``|IFFT(FFT(z) * M)|`` over the spatial axes of ``z: [B, C, D, H, W]``, in ``z.dtype``, for
    the options' ``cutoff`` and ``mask`` (:meth:`BaclOptions.of`: ``high_pass(z, cutoff=0.4)``).

    ``mask="symmetric"``: M is 0 where ``|k_i| < cutoff * n_i / 2`` on all three axes, 1 elsewhere; the filtered
    volume is real and the rfftn/irfftn pair computes it. ``mask="reference"``: the public code's mask, the
    ``fftshift``-ed centred cube ``[floor(n(1-c)/2), floor(n(1+c)/2))`` per axis (``[n//4, 3n//4)`` at the default
    0.5), bit for bit; complex path. torch.fft on every backend (cuFFT on CUDA); differentiable.
    Raises ``TypeError``/``ValueError`` for a non-float or non-5-D ``z``, ``cutoff`` outside (0, 1) or an unknown mask.
    """
    options = BaclOptions.of(options, **overrides)
    _check_latent(z, "z")
    return filtered_latent(z, options).abs().to(z.dtype)


class BACLResult(NamedTuple):
    """The loss (the only differentiable field) and its parts for logging, all on the device.

    ``volume``, ``boundary``: each term's loss (0-dim, detached). ``*_sims``: ``[B, 6]`` cosine similarities,
    detached: (S_s,T_s), (S_t,T_t) (positives), then (S_s,S_t), (T_s,T_t), (S_s,T_t), (S_t,T_s) (negatives).
    A switched-off term's fields are ``None``.
    """

    loss: torch.Tensor
    volume: torch.Tensor | None
    boundary: torch.Tensor | None
    volume_sims: torch.Tensor | None
    boundary_sims: torch.Tensor | None


def _check_latent(z, name: str) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {z.dtype}")
    if z.dim() != 5:
        raise ValueError(f"{name} must be [B, C, D, H, W] (5 dims), got shape {tuple(z.shape)}")
    if z.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(z.shape)}")


def check_inputs(zs, options: BaclOptions) -> None:
    """Validate ``bacl``'s latents, and that ``options`` (validated when made) turn a term on; ``ValueError``/
    ``TypeError`` naming the argument and the bad value."""
    names = ("z_stu_src", "z_stu_trg", "z_tea_src", "z_tea_trg")
    for name, z in zip(names, zs, strict=True):
        _check_latent(z, name)
    for name, z in zip(names[1:], zs[1:], strict=True):
        if z.shape != zs[0].shape:
            raise ValueError(f"{name} has shape {tuple(z.shape)}, z_stu_src has {tuple(zs[0].shape)}")
        if z.device != zs[0].device:
            raise ValueError(f"{name} is on {z.device}, z_stu_src on {zs[0].device}")
    options.require_term()


def _result(volume, boundary) -> BACLResult:
    terms = [t[0] for t in (volume, boundary) if t is not None]
    loss = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return BACLResult(
        loss,
        volume[0].detach() if volume else None,
        boundary[0].detach() if boundary else None,
        volume[1] if volume else None,
        boundary[1] if boundary else None,
    )


_PAIR_I = (0, 1, 0, 2, 0, 1)  # positives (0,2), (1,3), then negatives (0,1), (2,3), (0,3), (1,2)
_PAIR_J = (2, 3, 1, 3, 3, 2)


def _contrast_reference(features, tau: float, reduction: str = "sample"):
    """One term from four feature tensors: Gram matrix by one batched matmul, then Eq. 4-5; autograd backward.

    ``reduction="batch_mean"`` averages the similarities over the batch before the InfoNCE, as the public code does.
    """
    acc = acc_dtype(features)
    batch = features[0].shape[0]
    x = torch.stack([f.reshape(batch, -1).to(acc) for f in features], dim=1)  # [B, 4, N]
    gram = torch.bmm(x, x.transpose(1, 2))  # [B, 4, 4]
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(EPS * EPS).sqrt()
    i, j = list(_PAIR_I), list(_PAIR_J)
    sims = gram[:, i, j] / (norms[:, i] * norms[:, j])  # [B, 6]
    logits = (sims.mean(0, keepdim=True) if reduction == "batch_mean" else sims) / tau
    # -log(sum_P / sum_all) = softplus(lse_neg - lse_pos): no cancellation when the loss is small.
    gap = torch.logsumexp(logits[:, 2:], dim=1) - torch.logsumexp(logits[:, :2], dim=1)
    loss = torch.nn.functional.softplus(gap).mean()
    return loss, sims.detach()


def bacl_reference(
    z_stu_src: torch.Tensor,
    z_stu_trg: torch.Tensor,
    z_tea_src: torch.Tensor,
    z_tea_trg: torch.Tensor,
    options: BaclOptions | None = None,
    **overrides: Any,
) -> BACLResult:
    """The same maths in plain torch (the tests' reference and the CPU path): rfftn/irfftn or fftn/ifftn, one
    ``bmm`` for the Gram matrix of each term, autograd for the backward. Options: :meth:`BaclOptions.of`."""
    options = BaclOptions.of(options, **overrides)
    zs = (z_stu_src, z_stu_trg, z_tea_src, z_tea_trg)
    check_inputs(zs, options)
    tau, reduction = options.tau, options.reduction
    vol = _contrast_reference(zs, tau, reduction) if options.volume else None
    boundary_features = [filtered_latent(z, options).abs() for z in zs] if options.boundary else None
    bnd = _contrast_reference(boundary_features, tau, reduction) if options.boundary else None
    return _result(vol, bnd)
