r"""Boundary-aware contrastive loss (BACL, paper Sec. 2.3, Eq. 3-5): FFT high-pass, cosine Gram matrix, InfoNCE.

Four latents of one mini-batch, each ``[B, C, D, H, W]``, are indexed

    0 = student on source, 1 = student on target, 2 = teacher on source, 3 = teacher on target.

**Boundary features** (Eq. 3), over the three spatial axes:

.. math::

    b = \big|\mathcal{F}^{-1}\big(\mathcal{F}(z)\cdot M\big)\big|,\qquad
    M(k) = 1 - \prod_{a \in \{D, H, W\}} \ell_a(k_a)

where :math:`\ell_a` marks the low band of axis :math:`a` of length :math:`n`:

- ``symmetric``: :math:`\ell(k) = [\,|k| < c\,n/2\,]` for the signed frequency :math:`k`. M is even in k, so
  :math:`\mathcal{F}^{-1}(\mathcal{F}(z) M)` is real and the rfftn/irfftn pair computes it on half the spectrum.
- ``reference``: the public code's mask: after ``fftshift``, zero the slice ``[lo, hi)`` of every axis with
  :math:`lo = \lfloor n(1-c)/2 \rfloor`, :math:`hi = \lfloor n(1+c)/2 \rfloor` (``[n//4, 3n//4)`` for c = 0.5,
  one bin more on the negative side for even n). The filtered spectrum is then complex. Shifting the mask back
  (``ifftshift``) instead of shifting the spectrum twice gives the same bits: a shift only permutes elements.

**Loss** (Eq. 4-5), per sample and per term (volume: :math:`f_i = z_i`, boundary: :math:`f_i = b_i`), from the
Gram matrix of the flattened features:

.. math::

    G_{ij} = \langle f_i, f_j\rangle,\quad n_i = \sqrt{\max(G_{ii}, \epsilon^2)},\quad
    h_{ij} = \frac{G_{ij}}{n_i n_j},\quad s_{ij} = h_{ij}/\tau

    L_b = -\log\frac{\sum_{P} e^{s}}{\sum_{P\cup N} e^{s}}
        = \mathrm{softplus}\big(\mathrm{LSE}_{N}(s) - \mathrm{LSE}_{P}(s)\big),
    \qquad L = \frac{1}{B}\sum_b L_b

with positives :math:`P = \{(0,2), (1,3)\}` and negatives :math:`N = \{(0,1), (2,3), (0,3), (1,2)\}`.
:math:`\max(\lVert f\rVert, \epsilon)` is ``F.cosine_similarity``'s guard (eps = 1e-8). Identical inputs give
:math:`\log 3` per term. With ``reduction="batch_mean"`` (the public code) the similarities are averaged over the
batch first, :math:`\bar h_p = \frac{1}{B}\sum_b h_{b,p}`, and :math:`L` is the one InfoNCE of :math:`\bar h`; then
:math:`\partial L/\partial h_{b,p} = \partial L/\partial \bar h_p / B` for every sample, and the backward below is
unchanged but for :math:`g`.

**Backward.** With :math:`w = \mathrm{softmax}_{P\cup N}(s) - [p \in P]\,\mathrm{softmax}_P(s)`,
:math:`\partial L/\partial h_p = g_p = w_p/(\tau B)`, and :math:`\partial h_{ij}/\partial f_i = f_j/(n_i n_j) -
h_{ij} f_i/n_i^2`, every gradient is a combination of the four features of its sample:

.. math::

    \frac{\partial L}{\partial f_i} = \sum_j A_{ij} f_j,\qquad A_{ij} = \frac{g_{ij}}{n_i n_j}\ (i \ne j),\qquad
    A_{ii} = -[G_{ii} > \epsilon^2]\,\frac{\sum_{j\ne i} g_{ij} h_{ij}}{n_i^2}

So the forward is one read of the four tensors (ten sums per sample and program), then a one-program launch that adds
the per-program sums in a fixed order (no atomics: the same inputs give the same bits) and evaluates the InfoNCE
algebra on O(B) scalars; the backward is one more read plus one write per input that needs a gradient. The
reduction is a launch of its own so that its many live scalars do not set the register budget of the streaming
kernel. The modulus of the boundary features is
fused into both reads: the kernels take the filtered spectrum's inverse transform ``x`` (real, symmetric mask) or
``w`` (complex, reference mask, read as interleaved ``(re, im)``), use :math:`|x|` or :math:`|w|` as the feature,
and multiply the gradient by :math:`\mathrm{sign}(x)` or :math:`w/|w|`.

**FFTs** stay with torch.fft (cuFFT): the four latents are stacked and filtered by one batched transform each way.
The high-pass :math:`\mathcal{F}^{-1} M \mathcal{F}` is self-adjoint (M is a real diagonal), so its backward is the
same three calls on the stacked gradients that are wanted (the real part for the complex path), and the result is
added to the volume term's gradient inside that term's backward kernel. A fused forward+backward is then two Gram
launches, two gradient launches, and a stack plus three torch.fft/elementwise calls each way, whatever the number
of inputs that need a gradient.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from gsema_fast.config import BaclOptions
from gsema_fast.kernels._multi_tensor import INTERPRETED
from gsema_fast.kernels._variants import Variant, check_int32, pointer
from gsema_fast.reference.bacl import (
    EPS,
    BACLResult,
    acc_dtype,
    apply_high_pass,
    check_inputs,
    filtered_stack,
)
from gsema_fast.reference.device import device_guard
from gsema_fast.reference.multi_tensor import FLOAT_DTYPES

# Feature modes of the kernels: how the stored value turns into the feature f.
IDENTITY = 0  # f = x (the volume term)
ABS = 1  # f = |x| of a real tensor (symmetric boundary term)
COMPLEX_ABS = 2  # f = |w| of a complex tensor stored as interleaved (re, im) (reference boundary term)

NUM_SUMS = tl.constexpr(10)  # 4 squared norms + 6 cross products per sample
ROW = tl.constexpr(16)  # a row of sums padded to a power of two for 2-D loads
# BACL's own launch shape, not the multi-tensor chunk layout: its programs reduce one sample of four equally shaped
# feature tensors. The tile is fixed per feature mode and dtype (_tile_shape), so that every variant is listed; the
# number of programs per sample is chosen per shape and device (_plan).
MAX_CHUNKS = 1024  # programs per sample, bounds the final reduction
SUM_ROWS = 16  # partial rows per step of the final reduction (one warp: 8 values per thread and step)
CPU_PROGRAMS = 2  # programs per launch under the interpreter, where each one costs Python time


# --------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _tile(
    BLOCK: tl.constexpr,  # features per tile
    VEC: tl.constexpr,  # consecutive features per thread
):
    # [BLOCK // VEC, VEC] indices, a thread's VEC consecutive features in a row: a tile's products are summed along
    # the row inside the thread, so each running sum takes one register per thread instead of VEC.
    return tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def _sample_pointer(
    ptr,  # a tensor's first element
    offset,  # elements from there to the sample's first
    ALIGNED: tl.constexpr,  # the sample starts on a 16-byte boundary (checked by the launcher)
):
    p = ptr + offset
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _feature(
    ptr,  # pointer to the sample's first element (first float of the (re, im) pairs for COMPLEX_ABS)
    idx,  # [BLOCK // VEC, VEC] element indices within the sample, VEC consecutive ones per thread
    end,  # first index past the chunk
    MODE: tl.constexpr,  # IDENTITY, ABS or COMPLEX_ABS
    ACC: tl.constexpr,  # accumulation dtype
    MASKED: tl.constexpr,  # the tile crosses the end of the chunk
):
    # Returns the feature f and the stored value it came from (needed by the backward's chain rule).
    if MODE == 2:
        pair = tl.arange(0, 2)
        offs = idx[:, :, None] * 2 + pair[None, None, :]
        if MASKED:
            raw = tl.load(ptr + offs, mask=(idx < end)[:, :, None], other=0.0).to(ACC)
        else:
            raw = tl.load(ptr + offs).to(ACC)
        f = tl.sqrt(tl.sum(raw * raw, axis=2))
    else:
        if MASKED:
            raw = tl.load(ptr + idx, mask=idx < end, other=0.0).to(ACC)
        else:
            raw = tl.load(ptr + idx).to(ACC)
        if MODE == 1:
            f = tl.abs(raw)
        else:
            f = raw
    return f, raw


@triton.jit
def _gram_tile(
    p0,  # sample base pointer of input 0 (student, source)
    p1,  # sample base pointer of input 1 (student, target)
    p2,  # sample base pointer of input 2 (teacher, source)
    p3,  # sample base pointer of input 3 (teacher, target)
    idx,  # [BLOCK // VEC, VEC] element indices of this tile
    end,  # first index past the chunk
    s00,  # [BLOCK // VEC] running sums of f0*f0, one per thread's row of VEC features (VEC: the kernel's)
    s11,  # f1*f1
    s22,  # f2*f2
    s33,  # f3*f3
    s02,  # f0*f2 (positive)
    s13,  # f1*f3 (positive)
    s01,  # f0*f1 (negative)
    s23,  # f2*f3 (negative)
    s03,  # f0*f3 (negative)
    s12,  # f1*f2 (negative)
    MODE: tl.constexpr,  # IDENTITY, ABS or COMPLEX_ABS
    ACC: tl.constexpr,  # accumulation dtype
    MASKED: tl.constexpr,  # the tile crosses the end of the chunk
):
    f0, _r0 = _feature(p0, idx, end, MODE, ACC, MASKED)
    f1, _r1 = _feature(p1, idx, end, MODE, ACC, MASKED)
    f2, _r2 = _feature(p2, idx, end, MODE, ACC, MASKED)
    f3, _r3 = _feature(p3, idx, end, MODE, ACC, MASKED)
    s00 += tl.sum(f0 * f0, axis=1)
    s11 += tl.sum(f1 * f1, axis=1)
    s22 += tl.sum(f2 * f2, axis=1)
    s33 += tl.sum(f3 * f3, axis=1)
    s02 += tl.sum(f0 * f2, axis=1)
    s13 += tl.sum(f1 * f3, axis=1)
    s01 += tl.sum(f0 * f1, axis=1)
    s23 += tl.sum(f2 * f3, axis=1)
    s03 += tl.sum(f0 * f3, axis=1)
    s12 += tl.sum(f1 * f2, axis=1)
    return s00, s11, s22, s33, s02, s13, s01, s23, s03, s12


@triton.jit
def _pick(
    row,  # [ROW] one sample's sums
    cols,  # [ROW] column indices
    k: tl.constexpr,  # column to extract
):
    return tl.sum(tl.where(cols == k, row, 0.0), axis=0)


@triton.jit
def _sample_sums(
    partials,  # [B * NUM_CHUNKS, ROW] per-program sums, row = sample * NUM_CHUNKS + chunk
    s,  # sample
    NUM_CHUNKS,  # programs per sample
    ACC: tl.constexpr,  # accumulation dtype
    ROWS: tl.constexpr,  # partial rows read per step
):
    # The sample's ten sums, added over its programs' rows in a fixed order.
    cols = tl.arange(0, ROW)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, ROW], dtype=ACC)
    for first in range(0, NUM_CHUNKS, ROWS):
        r = first + rows
        offs = (s * NUM_CHUNKS + r)[:, None] * ROW + cols[None, :]
        acc += tl.load(partials + offs, mask=(r < NUM_CHUNKS)[:, None] & (cols < NUM_SUMS)[None, :], other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _cosines(
    g,  # [ROW] one sample's sums
    EPS2: tl.constexpr,  # eps**2, floor of a squared norm
):
    # Squared norms, clamped norms and the six cosine similarities (positives first) of one sample.
    cols = tl.arange(0, ROW)
    g00 = _pick(g, cols, 0)
    g11 = _pick(g, cols, 1)
    g22 = _pick(g, cols, 2)
    g33 = _pick(g, cols, 3)
    n0 = tl.sqrt(tl.maximum(g00, EPS2))
    n1 = tl.sqrt(tl.maximum(g11, EPS2))
    n2 = tl.sqrt(tl.maximum(g22, EPS2))
    n3 = tl.sqrt(tl.maximum(g33, EPS2))
    h02 = _pick(g, cols, 4) / (n0 * n2)
    h13 = _pick(g, cols, 5) / (n1 * n3)
    h01 = _pick(g, cols, 6) / (n0 * n1)
    h23 = _pick(g, cols, 7) / (n2 * n3)
    h03 = _pick(g, cols, 8) / (n0 * n3)
    h12 = _pick(g, cols, 9) / (n1 * n2)
    return g00, g11, g22, g33, n0, n1, n2, n3, h02, h13, h01, h23, h03, h12


@triton.jit
def _pack6(
    v0,  # values for columns 0..5 of a [ROW] vector
    v1,  # ..
    v2,  # ..
    v3,  # ..
    v4,  # ..
    v5,  # ..
):
    cols = tl.arange(0, ROW)
    out = tl.where(cols == 0, v0, 0.0)
    out = tl.where(cols == 1, v1, out)
    out = tl.where(cols == 2, v2, out)
    out = tl.where(cols == 3, v3, out)
    out = tl.where(cols == 4, v4, out)
    out = tl.where(cols == 5, v5, out)
    return out


@triton.jit
def _infonce(
    h02,  # cosine similarities (of one sample, or averaged over the batch), positives first
    h13,  # ..
    h01,  # ..
    h23,  # ..
    h03,  # ..
    h12,  # ..
    inv_tau,  # 1 / tau
    scale,  # factor of every dL/dh: inv_tau / B (the batch mean folded in)
):
    t02 = h02 * inv_tau
    t13 = h13 * inv_tau
    t01 = h01 * inv_tau
    t23 = h23 * inv_tau
    t03 = h03 * inv_tau
    t12 = h12 * inv_tau
    # L = log(1 + sum_N e^t / sum_P e^t) = softplus(lse_neg - lse_pos). Each log-sum-exp has its own maximum
    # (a small tau cannot underflow the positive sum), and the softplus keeps the loss's relative precision
    # when it is small: lse_all - lse_pos would cancel.
    m_pos = tl.maximum(t02, t13)
    m_neg = tl.maximum(tl.maximum(t01, t23), tl.maximum(t03, t12))
    lse_pos = m_pos + tl.log(tl.exp(t02 - m_pos) + tl.exp(t13 - m_pos))
    lse_neg = m_neg + tl.log(tl.exp(t01 - m_neg) + tl.exp(t23 - m_neg) + tl.exp(t03 - m_neg) + tl.exp(t12 - m_neg))
    gap = lse_neg - lse_pos
    small = tl.exp(-tl.abs(gap))
    one_plus = 1.0 + small
    # log1p(small) to full precision (Goldberg): log(1 + x) * x / ((1 + x) - 1).
    log1p = tl.where(
        one_plus == 1.0, small, tl.log(one_plus) * (small / tl.where(one_plus == 1.0, 1.0, one_plus - 1.0))
    )
    loss = tl.maximum(gap, 0.0) + log1p
    lse_all = lse_pos + loss
    # dL/dh for each pair. A positive's softmax difference is written as one product,
    # -e^(t - lse_pos) * sum_N / sum_all, which does not cancel.
    neg_share = tl.exp(lse_neg - lse_all)
    d02 = -tl.exp(t02 - lse_pos) * neg_share * scale
    d13 = -tl.exp(t13 - lse_pos) * neg_share * scale
    d01 = tl.exp(t01 - lse_all) * scale
    d23 = tl.exp(t23 - lse_all) * scale
    d03 = tl.exp(t03 - lse_all) * scale
    d12 = tl.exp(t12 - lse_all) * scale
    return loss, d02, d13, d01, d23, d03, d12


@triton.jit
def _coefficients(
    g00,  # squared norms of the sample's four features
    g11,  # ..
    g22,  # ..
    g33,  # ..
    n0,  # their clamped norms
    n1,  # ..
    n2,  # ..
    n3,  # ..
    h02,  # the sample's cosine similarities
    h13,  # ..
    h01,  # ..
    h23,  # ..
    h03,  # ..
    h12,  # ..
    d02,  # dL/dh of the sample's pairs
    d13,  # ..
    d01,  # ..
    d23,  # ..
    d03,  # ..
    d12,  # ..
    EPS2: tl.constexpr,  # eps**2, floor of a squared norm
    ACC: tl.constexpr,  # accumulation dtype
):
    # The sample's gradient coefficients A as a [ROW] vector, in the column layout of the sums.
    # A clamped norm is a constant: its sample's diagonal term drops out, as in autograd through the clamp.
    c0 = (g00 > EPS2).to(ACC) / (n0 * n0)
    c1 = (g11 > EPS2).to(ACC) / (n1 * n1)
    c2 = (g22 > EPS2).to(ACC) / (n2 * n2)
    c3 = (g33 > EPS2).to(ACC) / (n3 * n3)
    a00 = -c0 * (d02 * h02 + d01 * h01 + d03 * h03)
    a11 = -c1 * (d13 * h13 + d01 * h01 + d12 * h12)
    a22 = -c2 * (d02 * h02 + d23 * h23 + d12 * h12)
    a33 = -c3 * (d13 * h13 + d23 * h23 + d03 * h03)
    cols = tl.arange(0, ROW)
    out = _pack6(a00, a11, a22, a33, d02 / (n0 * n2), d13 / (n1 * n3))
    out = tl.where(cols == 6, d01 / (n0 * n1), out)
    out = tl.where(cols == 7, d23 / (n2 * n3), out)
    out = tl.where(cols == 8, d03 / (n0 * n3), out)
    out = tl.where(cols == 9, d12 / (n1 * n2), out)
    return out


@triton.jit
def _finalize(
    partials,  # [B * NUM_CHUNKS, ROW] per-program sums, row = sample * NUM_CHUNKS + chunk
    coef,  # [B, ROW] out: gradient coefficients A, same column layout as the sums, divided by B
    sims,  # [B, 6] out: cosine similarities, positives first
    term,  # [1] out: this term's loss, averaged over the batch
    total,  # [1] out: the total loss; this term is added to it when add_total
    B,  # samples
    NUM_CHUNKS,  # programs per sample
    inv_tau,  # 1 / tau
    add_total,  # 1: total already holds the other term (launched before, same stream)
    batch_mean,  # 1: one InfoNCE of the batch-mean similarities instead of the mean of per-sample ones
    EPS2: tl.constexpr,  # eps**2, floor of a squared norm
    ACC: tl.constexpr,  # accumulation dtype
    ROWS: tl.constexpr,  # partial rows read per step
):
    cols = tl.arange(0, ROW)
    inv_b = tl.full([], 1.0, ACC) / B
    scale = inv_tau * inv_b
    if batch_mean != 0:
        # dL/dh of sample b's pair is dL/dh_mean / B for every sample: one InfoNCE, then each sample's A from its
        # own norms and similarities (its sums are read again rather than kept: B is small, the rows are in L2).
        h_sum = tl.zeros([ROW], dtype=ACC)
        for s in range(0, B):
            g = _sample_sums(partials, s, NUM_CHUNKS, ACC, ROWS)
            _g00, _g11, _g22, _g33, _n0, _n1, _n2, _n3, h02, h13, h01, h23, h03, h12 = _cosines(g, EPS2)
            h = _pack6(h02, h13, h01, h23, h03, h12)
            tl.store(sims + s * 6 + cols, h, mask=cols < 6)
            h_sum += h
        h_mean = h_sum * inv_b
        loss, d02, d13, d01, d23, d03, d12 = _infonce(
            _pick(h_mean, cols, 0),
            _pick(h_mean, cols, 1),
            _pick(h_mean, cols, 2),
            _pick(h_mean, cols, 3),
            _pick(h_mean, cols, 4),
            _pick(h_mean, cols, 5),
            inv_tau,
            scale,
        )
        for s in range(0, B):
            g = _sample_sums(partials, s, NUM_CHUNKS, ACC, ROWS)
            g00, g11, g22, g33, n0, n1, n2, n3, h02, h13, h01, h23, h03, h12 = _cosines(g, EPS2)
            out = _coefficients(
                g00, g11, g22, g33, n0, n1, n2, n3, h02, h13, h01, h23, h03, h12,
                d02, d13, d01, d23, d03, d12, EPS2, ACC,
            )  # fmt: skip
            tl.store(coef + s * ROW + cols, out)
        mean = tl.where(cols == 0, loss, 0.0)
    else:
        total_b = tl.zeros([ROW], dtype=ACC)  # only column 0 is used; a vector keeps the loop-carried type fixed
        for s in range(0, B):
            g = _sample_sums(partials, s, NUM_CHUNKS, ACC, ROWS)
            g00, g11, g22, g33, n0, n1, n2, n3, h02, h13, h01, h23, h03, h12 = _cosines(g, EPS2)
            loss_b, d02, d13, d01, d23, d03, d12 = _infonce(h02, h13, h01, h23, h03, h12, inv_tau, scale)
            total_b += tl.where(cols == 0, loss_b, 0.0)
            out = _coefficients(
                g00, g11, g22, g33, n0, n1, n2, n3, h02, h13, h01, h23, h03, h12,
                d02, d13, d01, d23, d03, d12, EPS2, ACC,
            )  # fmt: skip
            tl.store(coef + s * ROW + cols, out)
            tl.store(sims + s * 6 + cols, _pack6(h02, h13, h01, h23, h03, h12), mask=cols < 6)
        mean = total_b * inv_b
    tl.store(term + cols, mean, mask=cols == 0)
    if add_total != 0:
        mean += tl.load(total + cols, mask=cols == 0, other=0.0)
    tl.store(total + cols, mean, mask=cols == 0)


@triton.jit(
    do_not_specialize=["N", "CHUNK", "NUM_CHUNKS"],
    do_not_specialize_on_alignment=["x0", "x1", "x2", "x3", "partials"],
)
def _bacl_fwd_kernel(
    x0,  # input 0 (student, source), [B, N] contiguous ([B, N, 2] floats for COMPLEX_ABS)
    x1,  # input 1 (student, target)
    x2,  # input 2 (teacher, source)
    x3,  # input 3 (teacher, target)
    partials,  # [B * NUM_CHUNKS, ROW] out: this program's ten sums go to row sample * NUM_CHUNKS + chunk
    N,  # features per sample
    CHUNK,  # features per program, a multiple of BLOCK
    NUM_CHUNKS,  # programs per sample
    MODE: tl.constexpr,  # IDENTITY, ABS or COMPLEX_ABS
    ACC: tl.constexpr,  # accumulation dtype: fp32, or fp64 for fp64 inputs
    BLOCK: tl.constexpr,  # features per tile
    VEC: tl.constexpr,  # consecutive features per thread in a tile (16 bytes of each input)
    ALIGNED: tl.constexpr,  # every sample of every input starts on a 16-byte boundary
):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    base = sample.to(tl.int64) * N
    if MODE == 2:
        base = base * 2  # a complex feature is two floats
    p0 = _sample_pointer(x0, base, ALIGNED)
    p1 = _sample_pointer(x1, base, ALIGNED)
    p2 = _sample_pointer(x2, base, ALIGNED)
    p3 = _sample_pointer(x3, base, ALIGNED)
    start = tl.multiple_of(chunk * CHUNK, BLOCK)
    end = tl.minimum(start + CHUNK, N)
    s00 = tl.zeros([BLOCK // VEC], dtype=ACC)
    s11 = tl.zeros([BLOCK // VEC], dtype=ACC)
    s22 = tl.zeros([BLOCK // VEC], dtype=ACC)
    s33 = tl.zeros([BLOCK // VEC], dtype=ACC)
    s02 = tl.zeros([BLOCK // VEC], dtype=ACC)
    s13 = tl.zeros([BLOCK // VEC], dtype=ACC)
    s01 = tl.zeros([BLOCK // VEC], dtype=ACC)
    s23 = tl.zeros([BLOCK // VEC], dtype=ACC)
    s03 = tl.zeros([BLOCK // VEC], dtype=ACC)
    s12 = tl.zeros([BLOCK // VEC], dtype=ACC)
    lanes = _tile(BLOCK, VEC)
    full_end = start + (end - start) // BLOCK * BLOCK
    # Whole tiles go unmasked so that the loads vectorise; at most one masked tile follows.
    for first in range(start, full_end, BLOCK):
        s00, s11, s22, s33, s02, s13, s01, s23, s03, s12 = _gram_tile(
            p0, p1, p2, p3, first + lanes, end, s00, s11, s22, s33, s02, s13, s01, s23, s03, s12, MODE, ACC, False
        )
    if full_end < end:
        s00, s11, s22, s33, s02, s13, s01, s23, s03, s12 = _gram_tile(
            p0, p1, p2, p3, full_end + lanes, end, s00, s11, s22, s33, s02, s13, s01, s23, s03, s12, MODE, ACC, True
        )
    row = partials + (sample * NUM_CHUNKS + chunk) * ROW
    tl.store(row + 0, tl.sum(s00, axis=0))
    tl.store(row + 1, tl.sum(s11, axis=0))
    tl.store(row + 2, tl.sum(s22, axis=0))
    tl.store(row + 3, tl.sum(s33, axis=0))
    tl.store(row + 4, tl.sum(s02, axis=0))
    tl.store(row + 5, tl.sum(s13, axis=0))
    tl.store(row + 6, tl.sum(s01, axis=0))
    tl.store(row + 7, tl.sum(s23, axis=0))
    tl.store(row + 8, tl.sum(s03, axis=0))
    tl.store(row + 9, tl.sum(s12, axis=0))


@triton.jit(
    do_not_specialize=["B", "NUM_CHUNKS", "add_total", "batch_mean"],
    do_not_specialize_on_alignment=["partials", "coef", "sims", "term", "total"],
)
def _bacl_reduce_kernel(
    partials,  # [B * NUM_CHUNKS, ROW] per-program sums of the forward, row = sample * NUM_CHUNKS + chunk
    coef,  # [B, ROW] out: gradient coefficients for the backward
    sims,  # [B, 6] out: cosine similarities, positives first
    term,  # [1] out: this term's loss, averaged over the batch
    total,  # [1] out: the total loss (this term, plus the other one with add_total)
    B,  # samples
    NUM_CHUNKS,  # programs per sample in the forward
    inv_tau,  # 1 / tau
    add_total,  # 1: add this term to the total written by the launch before
    batch_mean,  # 1: reduction "batch_mean", one InfoNCE of the batch-mean similarities
    EPS2: tl.constexpr,  # eps**2, floor of a squared norm
    ACC: tl.constexpr,  # accumulation dtype
    ROWS: tl.constexpr,  # partial rows read per step
):
    # One program adds the rows in a fixed order: the same inputs give the same bits.
    _finalize(partials, coef, sims, term, total, B, NUM_CHUNKS, inv_tau, add_total, batch_mean, EPS2, ACC, ROWS)


@triton.jit
def _chain(
    g,  # [BLOCK // VEC, VEC] gradient with respect to the feature f
    raw,  # the stored value f came from ([BLOCK // VEC, VEC], or [BLOCK // VEC, VEC, 2] for COMPLEX_ABS)
    f,  # [BLOCK // VEC, VEC] the feature
    MODE: tl.constexpr,  # IDENTITY, ABS or COMPLEX_ABS
):
    # Gradient with respect to the stored value; where |x| or |w| is 0 it is 0, as torch.abs's backward says.
    if MODE == 2:
        safe = tl.where(f > 0, f, 1.0)
        out = tl.where(f > 0, g / safe, 0.0)[:, :, None] * raw
    elif MODE == 1:
        out = tl.where(raw > 0, g, tl.where(raw < 0, -g, 0.0))
    else:
        out = g
    return out


@triton.jit
def _store_grad(
    ptr,  # sample base pointer of the gradient
    idx,  # [BLOCK // VEC, VEC] element indices of this tile
    end,  # first index past the chunk
    value,  # gradient of the stored value
    MODE: tl.constexpr,  # IDENTITY, ABS or COMPLEX_ABS
    MASKED: tl.constexpr,  # the tile crosses the end of the chunk
):
    if MODE == 2:
        pair = tl.arange(0, 2)
        offs = idx[:, :, None] * 2 + pair[None, None, :]
        if MASKED:
            tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=(idx < end)[:, :, None])
        else:
            tl.store(ptr + offs, value.to(ptr.dtype.element_ty))
    else:
        if MASKED:
            tl.store(ptr + idx, value.to(ptr.dtype.element_ty), mask=idx < end)
        else:
            tl.store(ptr + idx, value.to(ptr.dtype.element_ty))


@triton.jit
def _extra(
    ptr,  # sample base pointer of a gradient to add (EXTRA 1: real; EXTRA 2: interleaved complex, real part used)
    idx,  # [BLOCK // VEC, VEC] element indices of this tile
    end,  # first index past the chunk
    EXTRA: tl.constexpr,  # 1 or 2
    ACC: tl.constexpr,  # accumulation dtype
    MASKED: tl.constexpr,  # the tile crosses the end of the chunk
):
    if EXTRA == 2:
        offs = idx * 2
    else:
        offs = idx
    if MASKED:
        value = tl.load(ptr + offs, mask=idx < end, other=0.0).to(ACC)
    else:
        value = tl.load(ptr + offs).to(ACC)
    return value


@triton.jit
def _grad_tile(
    p0,  # sample base pointer of input 0
    p1,  # input 1
    p2,  # input 2
    p3,  # input 3
    q0,  # sample base pointer of the gradient of input 0 (unused unless need0)
    q1,  # gradient of input 1
    q2,  # gradient of input 2
    q3,  # gradient of input 3
    e0,  # sample base pointer of a gradient to add to that of input 0 (used with EXTRA)
    e1,  # .. input 1
    e2,  # .. input 2
    e3,  # .. input 3
    idx,  # [BLOCK // VEC, VEC] element indices of this tile
    end,  # first index past the chunk
    a00,  # A coefficients of this sample, scaled by the incoming gradient
    a11,  # ..
    a22,  # ..
    a33,  # ..
    a02,  # ..
    a13,  # ..
    a01,  # ..
    a23,  # ..
    a03,  # ..
    a12,  # ..
    need0,  # 1: input 0 wants a gradient
    need1,  # 1: input 1 wants a gradient
    need2,  # 1: input 2 wants a gradient
    need3,  # 1: input 3 wants a gradient
    MODE: tl.constexpr,  # IDENTITY, ABS or COMPLEX_ABS
    EXTRA: tl.constexpr,  # 0: nothing to add; 1: add e_i (real); 2: add the real part of e_i (complex)
    ACC: tl.constexpr,  # accumulation dtype
    MASKED: tl.constexpr,  # the tile crosses the end of the chunk
):
    # Every gradient needs all four features, so all four are read whichever gradients are written.
    f0, r0 = _feature(p0, idx, end, MODE, ACC, MASKED)
    f1, r1 = _feature(p1, idx, end, MODE, ACC, MASKED)
    f2, r2 = _feature(p2, idx, end, MODE, ACC, MASKED)
    f3, r3 = _feature(p3, idx, end, MODE, ACC, MASKED)
    if need0 != 0:
        g0 = _chain(a00 * f0 + a01 * f1 + a02 * f2 + a03 * f3, r0, f0, MODE)
        if EXTRA != 0:
            g0 += _extra(e0, idx, end, EXTRA, ACC, MASKED)
        _store_grad(q0, idx, end, g0, MODE, MASKED)
    if need1 != 0:
        g1 = _chain(a01 * f0 + a11 * f1 + a12 * f2 + a13 * f3, r1, f1, MODE)
        if EXTRA != 0:
            g1 += _extra(e1, idx, end, EXTRA, ACC, MASKED)
        _store_grad(q1, idx, end, g1, MODE, MASKED)
    if need2 != 0:
        g2 = _chain(a02 * f0 + a12 * f1 + a22 * f2 + a23 * f3, r2, f2, MODE)
        if EXTRA != 0:
            g2 += _extra(e2, idx, end, EXTRA, ACC, MASKED)
        _store_grad(q2, idx, end, g2, MODE, MASKED)
    if need3 != 0:
        g3 = _chain(a03 * f0 + a13 * f1 + a23 * f2 + a33 * f3, r3, f3, MODE)
        if EXTRA != 0:
            g3 += _extra(e3, idx, end, EXTRA, ACC, MASKED)
        _store_grad(q3, idx, end, g3, MODE, MASKED)


@triton.jit(
    do_not_specialize=["N", "CHUNK", "need0", "need1", "need2", "need3"],
    do_not_specialize_on_alignment=[
        *("x0", "x1", "x2", "x3"),
        *("q0", "q1", "q2", "q3"),
        *("e0", "e1", "e2", "e3"),
        *("coef", "grad_loss"),
    ],
)
def _bacl_bwd_kernel(
    x0,  # input 0 (student, source), as in the forward
    x1,  # input 1 (student, target)
    x2,  # input 2 (teacher, source)
    x3,  # input 3 (teacher, target)
    q0,  # out: gradient of input 0, same layout (input 0 itself when not need0: never touched)
    q1,  # out: gradient of input 1
    q2,  # out: gradient of input 2
    q3,  # out: gradient of input 3
    e0,  # gradient to add to that of input 0, same sample layout (input 0 itself when EXTRA == 0: never read)
    e1,  # .. input 1
    e2,  # .. input 2
    e3,  # .. input 3
    coef,  # [B, ROW] gradient coefficients from the forward
    grad_loss,  # [1] incoming gradient of the loss, read on the device (no host sync)
    N,  # features per sample
    CHUNK,  # features per program, a multiple of BLOCK
    need0,  # 1: input 0 wants a gradient
    need1,  # 1: input 1 wants a gradient
    need2,  # 1: input 2 wants a gradient
    need3,  # 1: input 3 wants a gradient
    MODE: tl.constexpr,  # IDENTITY, ABS or COMPLEX_ABS
    EXTRA: tl.constexpr,  # 0: nothing to add; 1: add e_i (real); 2: add the real part of e_i (complex)
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK: tl.constexpr,  # features per tile
    VEC: tl.constexpr,  # consecutive features per thread in a tile (16 bytes of each input)
    ALIGNED: tl.constexpr,  # every sample of every tensor starts on a 16-byte boundary
):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    base = sample.to(tl.int64) * N
    if MODE == 2:
        base = base * 2  # a complex feature is two floats
    extra_base = sample.to(tl.int64) * N
    if EXTRA == 2:
        extra_base = extra_base * 2
    up = tl.load(grad_loss).to(ACC)
    row = coef + sample * ROW
    a00 = tl.load(row + 0) * up
    a11 = tl.load(row + 1) * up
    a22 = tl.load(row + 2) * up
    a33 = tl.load(row + 3) * up
    a02 = tl.load(row + 4) * up
    a13 = tl.load(row + 5) * up
    a01 = tl.load(row + 6) * up
    a23 = tl.load(row + 7) * up
    a03 = tl.load(row + 8) * up
    a12 = tl.load(row + 9) * up
    p0 = _sample_pointer(x0, base, ALIGNED)
    p1 = _sample_pointer(x1, base, ALIGNED)
    p2 = _sample_pointer(x2, base, ALIGNED)
    p3 = _sample_pointer(x3, base, ALIGNED)
    g0 = _sample_pointer(q0, base, ALIGNED)
    g1 = _sample_pointer(q1, base, ALIGNED)
    g2 = _sample_pointer(q2, base, ALIGNED)
    g3 = _sample_pointer(q3, base, ALIGNED)
    r0 = _sample_pointer(e0, extra_base, ALIGNED)
    r1 = _sample_pointer(e1, extra_base, ALIGNED)
    r2 = _sample_pointer(e2, extra_base, ALIGNED)
    r3 = _sample_pointer(e3, extra_base, ALIGNED)
    start = tl.multiple_of(chunk * CHUNK, BLOCK)
    end = tl.minimum(start + CHUNK, N)
    lanes = _tile(BLOCK, VEC)
    full_end = start + (end - start) // BLOCK * BLOCK
    for first in range(start, full_end, BLOCK):
        _grad_tile(
            p0, p1, p2, p3, g0, g1, g2, g3, r0, r1, r2, r3,
            first + lanes, end, a00, a11, a22, a33, a02, a13, a01, a23, a03, a12,
            need0, need1, need2, need3, MODE, EXTRA, ACC, False,
        )  # fmt: skip
    if full_end < end:
        _grad_tile(
            p0, p1, p2, p3, g0, g1, g2, g3, r0, r1, r2, r3,
            full_end + lanes, end, a00, a11, a22, a33, a02, a13, a01, a23, a03, a12,
            need0, need1, need2, need3, MODE, EXTRA, ACC, True,
        )  # fmt: skip


# -------------------------------------------------------------------------------------------------- launchers


class _Plan(NamedTuple):
    block: int  # elements per tile
    chunk: int  # elements per program, a multiple of block
    num_chunks: int  # programs per sample
    num_warps: int


# A tile gives each of TILE_ROWS threads 16 consecutive bytes of every input (VEC features: 8 of bf16, 4 of fp32, 2
# complex fp32 numbers): one 16-byte load per input, and sums kept per thread, which holds the forward within 64
# registers, the most that leaves sm_90 half its threads. Unaligned inputs are read one feature at a time whatever
# the tile, so their tile is one feature per thread. Powers of two, so that tiles divide chunks.
TILE_BYTES = 16
TILE_ROWS = 256
TILE_WARPS = 8
# The element types each feature mode is launched with: the latents themselves for the volume term (one dtype for
# all four, see bacl), the filtered latents in fp32 or fp64 for the boundary terms.
FEATURE_DTYPES = {
    IDENTITY: FLOAT_DTYPES,
    ABS: (torch.float32, torch.float64),
    COMPLEX_ABS: (torch.float32, torch.float64),
}
_EXTRAS = {IDENTITY: (0, 1, 2), ABS: (0,), COMPLEX_ABS: (0,)}  # what the backward of each mode may add in


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr-function wrapper: microseconds per call on the host


def _plan(n: int, batch: int, mode: int, dtype: torch.dtype, aligned: bool, device: torch.device) -> _Plan:
    """Tile and grid for ``batch`` samples of ``n`` features: a function of the shape and device alone.

    About four programs per SM keep enough loads in flight to stream at copy bandwidth; the interpreter gets
    ``CPU_PROGRAMS``. Cached: the loss is host-bound at the sizes it is used at, so every microsecond of Python
    before a launch counts.
    """
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    block, _vec, num_warps = _tile_shape(mode, dtype, aligned)
    return _plan_cached(n, batch, block, num_warps, device.type, index, CPU_PROGRAMS)


@functools.lru_cache(maxsize=256)
def _plan_cached(n, batch, block, num_warps, device_type, index, cpu_programs) -> _Plan:
    programs = 4 * _num_sms(index) if device_type == "cuda" else cpu_programs
    num_chunks = max(1, min(_cdiv(n, block), _cdiv(programs, batch), MAX_CHUNKS))
    chunk = _cdiv(_cdiv(n, num_chunks), block) * block
    return _Plan(block, chunk, _cdiv(n, chunk), num_warps)


def _tile_shape(mode: int, dtype: torch.dtype, aligned: bool) -> tuple[int, int, int]:
    """``(block, vec, num_warps)`` of a tile of features of ``dtype`` in ``mode``: features per tile, consecutive
    features per thread, warps."""
    feature_bytes = dtype.itemsize * (2 if mode == COMPLEX_ABS else 1)
    vec = max(1, TILE_BYTES // feature_bytes) if aligned else 1
    return vec * TILE_ROWS, vec, max(1, min(TILE_WARPS, TILE_ROWS // 32))


def _acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


@functools.cache
def forward_variant(mode: int, dtype: torch.dtype, aligned: bool, tile: tuple[int, int, int]) -> Variant:
    """The variant of ``_bacl_fwd_kernel`` for four features of ``dtype`` in ``mode``, ``tile`` from _tile_shape."""
    block, vec, num_warps = tile
    return Variant(
        _bacl_fwd_kernel,
        args=(
            *((f"x{i}", pointer(dtype)) for i in range(4)),
            ("partials", pointer(_acc_of(dtype))),
            *((name, "i32") for name in ("N", "CHUNK", "NUM_CHUNKS")),
        ),
        constexprs=(
            ("MODE", mode),
            ("ACC", _tl_acc(_acc_of(dtype))),
            ("BLOCK", block),
            ("VEC", vec),
            ("ALIGNED", aligned),
        ),
        num_warps=num_warps,
    )


@functools.cache
def reduce_variant(acc: torch.dtype, rows: int) -> Variant:
    """The variant of ``_bacl_reduce_kernel`` for sums in ``acc``: one program of one warp, whose registers bound
    nothing else."""
    out = pointer(acc)
    return Variant(
        _bacl_reduce_kernel,
        args=(
            *((name, out) for name in ("partials", "coef", "sims", "term", "total")),
            ("B", "i32"),
            ("NUM_CHUNKS", "i32"),
            ("inv_tau", "fp32"),
            ("add_total", "i32"),
            ("batch_mean", "i32"),
        ),
        constexprs=(("EPS2", EPS * EPS), ("ACC", _tl_acc(acc)), ("ROWS", rows)),
        num_warps=1,
    )


@functools.cache
def backward_variant(mode: int, dtype: torch.dtype, extra: int, aligned: bool, tile: tuple[int, int, int]) -> Variant:
    """The variant of ``_bacl_bwd_kernel``: gradients stored in the features' ``dtype``; with ``extra`` the added
    gradients are in the accumulation dtype (the high-pass's output), else the features stand in for them unread."""
    block, vec, num_warps = tile
    acc = _acc_of(dtype)
    added = pointer(acc) if extra else pointer(dtype)
    return Variant(
        _bacl_bwd_kernel,
        args=(
            *((f"x{i}", pointer(dtype)) for i in range(4)),
            *((f"q{i}", pointer(dtype)) for i in range(4)),
            *((f"e{i}", added) for i in range(4)),
            ("coef", pointer(acc)),
            ("grad_loss", pointer(acc)),
            ("N", "i32"),
            ("CHUNK", "i32"),
            *((f"need{i}", "i32") for i in range(4)),
        ),
        constexprs=(
            ("MODE", mode),
            ("EXTRA", extra),
            ("ACC", _tl_acc(acc)),
            ("BLOCK", block),
            ("VEC", vec),
            ("ALIGNED", aligned),
        ),
        num_warps=num_warps,
    )


def variants() -> list[Variant]:
    """Every variant the launchers can produce (BACL's tiles do not depend on the multi-tensor layout)."""
    out = []
    for mode, dtypes in FEATURE_DTYPES.items():
        for dtype in dtypes:
            for aligned in (False, True):
                tile = _tile_shape(mode, dtype, aligned)
                out.append(forward_variant(mode, dtype, aligned, tile))
                out += [backward_variant(mode, dtype, e, aligned, tile) for e in _EXTRAS[mode]]
    return out + [reduce_variant(acc, SUM_ROWS) for acc in (torch.float32, torch.float64)]


def _aligned(tensors, per_sample: int, stride_elements: int) -> bool:
    """Whether every sample of every tensor starts on a 16-byte boundary: 16-byte loads then need no masks."""
    return all(t.data_ptr() % 16 == 0 and (per_sample * stride_elements * t.element_size()) % 16 == 0 for t in tensors)


def _check_features(xs: tuple[torch.Tensor, ...], mode: int) -> None:
    """The launchers' contract: four contiguous tensors of one dtype of their mode, one shape, one device that Triton
    can reach, at most 2**31 - 1 features per sample."""
    if len(xs) != 4:
        raise ValueError(f"expected 4 feature tensors, got {len(xs)}")
    if mode not in FEATURE_DTYPES:
        raise ValueError(f"mode must be IDENTITY, ABS or COMPLEX_ABS (0, 1, 2), got {mode!r}")
    x = xs[0]
    shape, device, dtype = getattr(x, "shape", None), getattr(x, "device", None), getattr(x, "dtype", None)
    for i, xi in enumerate(xs):
        if not isinstance(xi, torch.Tensor):
            raise TypeError(f"feature {i} must be a tensor, got {type(xi).__name__}")
        if xi.dtype not in FEATURE_DTYPES[mode]:
            names = "/".join(str(d).removeprefix("torch.") for d in FEATURE_DTYPES[mode])
            raise TypeError(f"feature {i} must be {names} in this mode, got {xi.dtype}")
        if xi.dtype != dtype:
            raise TypeError(f"feature {i} is {xi.dtype}, feature 0 {dtype}: the four features share one dtype")
        if xi.shape != shape:
            raise ValueError(f"feature {i} has shape {tuple(xi.shape)}, feature 0 has {tuple(shape)}")
        if xi.device != device:
            raise ValueError(f"feature {i} is on {xi.device}, feature 0 on {device}")
        if not xi.is_contiguous():
            raise ValueError(f"feature {i} must be contiguous, got strides {xi.stride()}")
    if x.dim() < 2 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"features must be [B, ...] with B >= 1 and at least one element, got {tuple(x.shape)}")
    if mode == COMPLEX_ABS and (x.dim() < 3 or x.shape[-1] != 2):
        raise ValueError(f"COMPLEX_ABS features are view_as_real tensors [B, ..., 2], got {tuple(x.shape)}")
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    check_int32(x[0].numel(), "the number of features per sample")
    check_int32(x.shape[0], "the batch size")


def _features_per_sample(x: torch.Tensor, mode: int) -> int:
    return x[0].numel() // (2 if mode == COMPLEX_ABS else 1)


def _contrast_forward(
    xs,
    options: BaclOptions,
    mode: int,
    *,
    sims=None,
    term=None,
    total=None,
    add_total: bool = False,
):
    """Launch the Gram pass over four feature tensors: ``(total, sims, coef)``.

    Writes the term's loss to ``term`` and the total to ``total`` (the term itself, or added to what ``total``
    holds with ``add_total``), the similarities ``[B, 6]`` to ``sims``; missing outputs are allocated. ``coef``
    ``[B, ROW]`` holds the gradient coefficients for ``_contrast_backward``. Of the ``options``, ``tau`` and
    ``reduction``: ``"sample"`` (the mean of per-sample losses) or ``"batch_mean"`` (one loss of the batch-mean
    similarities).
    """
    _check_features(xs, mode)
    if not isinstance(options, BaclOptions):
        raise TypeError(f"options must be a BaclOptions, got {type(options).__name__}")
    with device_guard(xs[0].device):
        return _launch_forward(xs, options, mode, sims, term, total, add_total)


def _launch_forward(xs, options, mode, sims, term, total, add_total):
    x = xs[0]
    batch, n = x.shape[0], _features_per_sample(x, mode)
    acc = _acc_of(x.dtype)
    aligned = _aligned(xs, n, 2 if mode == COMPLEX_ABS else 1)
    plan = _plan(n, batch, mode, x.dtype, aligned, x.device)
    if sims is None:
        sims = torch.empty((batch, 6), dtype=acc, device=x.device)
    if term is None:
        term = torch.empty((), dtype=acc, device=x.device)
    if total is None:
        total = term
    for name, out, shape in (("sims", sims, (batch, 6)), ("term", term, ()), ("total", total, ())):
        if out.shape != shape or out.dtype != acc or out.device != x.device or not out.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous {acc} tensor of shape {shape} on {x.device}, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
    scratch = torch.empty((batch * (plan.num_chunks + 1), ROW.value), dtype=acc, device=x.device)
    coef, partials = scratch[:batch], scratch[batch:]  # one allocation: the host time matters at these sizes
    forward_variant(mode, x.dtype, aligned, _tile_shape(mode, x.dtype, aligned)).launch(
        (batch, plan.num_chunks), *xs, partials, n, plan.chunk, plan.num_chunks
    )
    reduce_variant(acc, SUM_ROWS).launch(
        (1,),
        partials,
        coef,
        sims,
        term,
        total,
        batch,
        plan.num_chunks,
        1.0 / options.tau,
        int(add_total),
        int(options.reduction == "batch_mean"),
    )
    return total, sims, coef


def _contrast_backward(xs, coef: torch.Tensor, grad_total: torch.Tensor, outs, mode: int, extras=None, extra: int = 0):
    """Launch the gradient pass: the gradient of input ``i`` into ``outs[i]`` (``None``: not wanted), stored in the
    features' dtype.

    With ``extra`` 1 (2) the real tensor ``extras[i]`` (the real part of the interleaved complex one), in the
    accumulation dtype, is added: the boundary term's gradient, back through the high-pass, joins the volume term's
    in the same write.
    """
    _check_features(xs, mode)
    x = xs[0]
    batch, n = x.shape[0], _features_per_sample(x, mode)
    acc = _acc_of(x.dtype)
    if extra not in (0, 1, 2) or (extra and mode != IDENTITY):
        raise ValueError(f"extra must be 0, 1 or 2, and non-zero only for IDENTITY features, got {extra!r}")
    if len(outs) != 4 or all(o is None for o in outs):
        raise ValueError(f"outs must hold 4 entries, at least one a tensor, got {len(outs)} entries")
    for i, (xi, out) in enumerate(zip(xs, outs, strict=True)):
        if out is None:
            continue
        if out.shape != xi.shape or out.device != xi.device or out.dtype != xi.dtype or not out.is_contiguous():
            raise ValueError(
                f"outs[{i}] must be contiguous, shaped, typed and placed like input {i}, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        e = extras[i] if extra else None
        if extra and (
            e is None
            or e.numel() != xi.numel() * extra
            or e.device != xi.device
            or e.dtype != acc
            or not e.is_contiguous()
        ):
            raise ValueError(
                f"extras[{i}] must be a contiguous {acc} tensor on {xi.device} of {xi.numel() * extra} elements, "
                f"got {e if e is None else (e.dtype, tuple(e.shape))}"
            )
    ptrs = [o if o is not None else xi for o, xi in zip(outs, xs, strict=True)]
    if extra:
        # A gradient that is not wanted has nothing to add: another input's stands in, unread, so that the four
        # arguments keep the variant's type (the accumulation dtype).
        present = next(e for e in extras if e is not None)
        adds = [e if e is not None else present for e in extras]
    else:
        adds = list(xs)
    stride = 2 if mode == COMPLEX_ABS else 1
    aligned = _aligned((*xs, *ptrs), n, stride) and (not extra or _aligned(adds, n, 2 if extra == 2 else 1))
    plan = _plan(n, batch, mode, x.dtype, aligned, x.device)
    variant = backward_variant(mode, x.dtype, extra, aligned, _tile_shape(mode, x.dtype, aligned))
    with device_guard(x.device):
        variant.launch(
            (batch, plan.num_chunks),
            *xs,
            *ptrs,
            *adds,
            coef,
            grad_total.detach().reshape(1).to(acc),
            n,
            plan.chunk,
            *(int(o is not None) for o in outs),
        )
    return outs


def _boundary_features(filtered: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four kernel inputs of the boundary term: slices of the stacked filtered latents (real views if complex)."""
    stacked = torch.view_as_real(filtered) if filtered.is_complex() else filtered
    return tuple(stacked.unbind(0))


class _BACLFunction(torch.autograd.Function):
    """The whole loss with an explicit backward: ``(total, terms [2], sims [2, B, 6])``, differentiable in ``total``.

    The four latents go through the high-pass as one stacked, batched FFT. The high-pass is self-adjoint
    (``F^-1 M F`` with a real diagonal M), so its backward is the same three calls on the gradient, applied once to
    the stack of gradients that are wanted; the result is added to the volume term's gradient inside its kernel.
    """

    @staticmethod
    def forward(ctx, z0, z1, z2, z3, options: BaclOptions):
        zs = (z0, z1, z2, z3)
        acc = acc_dtype(zs)
        total = torch.empty((), dtype=acc, device=z0.device)
        terms = torch.empty(2, dtype=acc, device=z0.device)
        sims = torch.empty((2, z0.shape[0], 6), dtype=acc, device=z0.device)
        coef_v = coef_b = filtered = None
        if options.volume:
            _, _, coef_v = _contrast_forward(zs, options, IDENTITY, sims=sims[0], term=terms[0], total=total)
        if options.boundary:
            filtered = filtered_stack(zs, options)
            mode = COMPLEX_ABS if filtered.is_complex() else ABS
            feats = _boundary_features(filtered)
            _, _, coef_b = _contrast_forward(
                feats, options, mode, sims=sims[1], term=terms[1], total=total, add_total=options.volume
            )
        ctx.save_for_backward(*zs, filtered, coef_v, coef_b)
        ctx.options = options
        ctx.mark_non_differentiable(terms, sims)
        return total, terms, sims

    @staticmethod
    def backward(ctx, grad_total, _grad_terms, _grad_sims):
        *zs, filtered, coef_v, coef_b = ctx.saved_tensors
        options = ctx.options
        wanted = [i for i in range(4) if ctx.needs_input_grad[i]]
        if not wanted:
            return (None,) * 5
        extras, extra = [None] * 4, 0
        if options.boundary:
            feats = _boundary_features(filtered)
            stacked = torch.empty((len(wanted), *feats[0].shape), dtype=feats[0].dtype, device=feats[0].device)
            outs = [stacked[wanted.index(i)] if i in wanted else None for i in range(4)]
            _contrast_backward(feats, coef_b, grad_total, outs, ABS if options.mask == "symmetric" else COMPLEX_ABS)
            if filtered.is_complex():
                back = torch.view_as_real(apply_high_pass(torch.view_as_complex(stacked), options, inplace=True))
                extra = 2
            else:
                back = apply_high_pass(stacked, options, inplace=True)
                extra = 1
            extras = [back[wanted.index(i)] if i in wanted else None for i in range(4)]
        if options.volume:
            grads = [torch.empty_like(z) if i in wanted else None for i, z in enumerate(zs)]
            _contrast_backward(zs, coef_v, grad_total, grads, IDENTITY, extras, extra)
        else:
            grads = [
                None if e is None else (e[..., 0] if extra == 2 else e).to(z.dtype).contiguous()
                for e, z in zip(extras, zs, strict=True)
            ]
        return (*grads, None)


# ------------------------------------------------------------------------------------------ public function


def bacl(
    z_stu_src: torch.Tensor,
    z_stu_trg: torch.Tensor,
    z_tea_src: torch.Tensor,
    z_tea_trg: torch.Tensor,
    options: BaclOptions | None = None,
    **overrides: Any,
) -> BACLResult:
    """BACL with the fused Triton Gram/InfoNCE passes (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Per term one forward launch and one backward launch; no host sync. Only inputs that require grad get one.
    Latents of different dtypes are brought to their common dtype first (the kernels read four of one dtype).
    Options: :meth:`gsema_fast.config.BaclOptions.of`.
    """
    options = BaclOptions.of(options, **overrides)
    zs = (z_stu_src, z_stu_trg, z_tea_src, z_tea_trg)
    check_inputs(zs, options)
    common = functools.reduce(torch.promote_types, (z.dtype for z in zs))
    ready = (z.to(common).contiguous() for z in zs)
    total, terms, sims = _BACLFunction.apply(*ready, options)
    return BACLResult(
        total,
        terms[0] if options.volume else None,
        terms[1] if options.boundary else None,
        sims[0] if options.volume else None,
        sims[1] if options.boundary else None,
    )
