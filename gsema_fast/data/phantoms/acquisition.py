"""How a centre acquires a phantom: the anatomy sampled on the centre's voxel grid (partial volume at the vessel
walls), then point-spread, contrast and gamma, background texture, bias field, noise model, metal streaks or detector
rings, and integer or float storage in the centre's orientation
(:class:`~gsema_fast.data.phantoms.centres.CentreStyle`).

Only numpy and scipy are used here (no torch): the cases are generated in worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from gsema_fast.data.phantoms.anatomy import LABELS, R_MIN_MM, Aneurysm, Tree, draw_anatomy
from gsema_fast.data.phantoms.centres import CentreStyle

# Reference voxel size: ``size`` voxels of this spacing span a case's field of view (3DRA reconstructions: 0.2-0.6 mm).
REF_SPACING_MM = 0.4
_CHUNK = 8  # centreline pieces rasterised together in one bounding box


@dataclass(frozen=True)
class Scan:
    """One case as its centre stores it: the voxel array (the centre's type and storage orientation), the label
    volume (uint8) on the same grid, the voxel-to-world matrix (mm), the voxel size and the aneurysms drawn."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    aneurysms: list[Aneurysm]


def scan_case(style: CentreStyle, domain: int, index: int, size: int, seed: int) -> Scan:
    """Case ``index`` of centre ``domain``, acquired as ``style`` says: a patient drawn from the case's own random
    stream (deterministic in (seed, domain, index)) in a field of view of ``size`` reference voxels (+-10 %), sampled
    on the centre's matrix."""
    rng = np.random.default_rng([seed, domain, index])
    fov = size * REF_SPACING_MM * rng.uniform(0.9, 1.1) * np.ones(3)
    tree, aneurysms = draw_anatomy(rng, fov)
    shape = tuple(max(int(round(size * m)), 8) for m in style.matrix)
    spacing = fov / np.asarray(shape)
    image, label = _acquire(rng, style, tree, aneurysms, shape, spacing)
    if style.axcodes == "LPS":
        image, label = image[::-1, ::-1].copy(), label[::-1, ::-1].copy()
    return Scan(image, label, _affine(shape, spacing, style.axcodes), spacing, aneurysms)


# ------------------------------------------------------------------------------------------------ rasterisation


def _axes(lo: np.ndarray, hi: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates (mm) of the box [lo, hi) of indices, shaped to broadcast over three axes."""
    x = (np.arange(lo[0], hi[0]) + 0.5) * spacing[0]
    y = (np.arange(lo[1], hi[1]) + 0.5) * spacing[1]
    z = (np.arange(lo[2], hi[2]) + 0.5) * spacing[2]
    return x[:, None, None], y[None, :, None], z[None, None, :]


def _box(pmin: np.ndarray, pmax: np.ndarray, shape: tuple, spacing: np.ndarray):
    lo = np.maximum(np.floor(pmin / spacing - 0.5).astype(int), 0)
    hi = np.minimum(np.ceil(pmax / spacing + 0.5).astype(int) + 1, shape)
    return (lo, hi) if np.all(hi > lo) else None


def _rasterise_tree(tree: Tree, shape: tuple, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth inside the nearest tube (mm, > 0 inside) and the local radius of the tube that owns each voxel.

    Each centreline piece is a capsule with a linearly tapering radius; pieces are grouped so that one bounding box
    serves several of them (numpy work instead of a Python loop per piece).
    """
    depth = np.full(shape, -1e3, np.float32)
    owner = np.zeros(shape, np.float32)
    for pts, radii in tree.branches:
        for c in range(0, len(pts) - 1, _CHUNK):
            P, R = pts[c : c + _CHUNK + 1], radii[c : c + _CHUNK + 1]
            box = _box(P.min(0) - R.max(), P.max(0) + R.max(), shape, spacing)
            if box is None:
                continue
            lo, hi = box
            x, y, z = _axes(lo, hi, spacing)
            a, ab = P[:-1], P[1:] - P[:-1]
            l2 = np.maximum((ab**2).sum(1), 1e-12)
            dx = x[None] - a[:, 0, None, None, None]
            dy = y[None] - a[:, 1, None, None, None]
            dz = z[None] - a[:, 2, None, None, None]
            ab_ = ab[:, :, None, None, None]
            t = np.clip((dx * ab_[:, 0] + dy * ab_[:, 1] + dz * ab_[:, 2]) / l2[:, None, None, None], 0.0, 1.0)
            dist = np.sqrt((dx - t * ab_[:, 0]) ** 2 + (dy - t * ab_[:, 1]) ** 2 + (dz - t * ab_[:, 2]) ** 2)
            rr = R[:-1, None, None, None] + t * (R[1:] - R[:-1])[:, None, None, None]
            dep = rr - dist
            k = dep.argmax(0)
            best = np.take_along_axis(dep, k[None], 0)[0]
            best_r = np.take_along_axis(rr, k[None], 0)[0]
            sl = tuple(slice(lo[i], hi[i]) for i in range(3))
            upd = best > depth[sl]
            depth[sl] = np.where(upd, best, depth[sl])
            owner[sl] = np.where(upd, best_r, owner[sl])
    return depth, owner


def _rasterise_aneurysms(aneurysms: list[Aneurysm], shape: tuple, spacing: np.ndarray):
    """Depth inside the nearest sac (mm, approximate for ellipsoids) and each voxel's sac opacification."""
    depth = np.full(shape, -1e3, np.float32)
    fill = np.zeros(shape, np.float32)
    for an in aneurysms:
        reach = max([an.axes.max()] + [np.linalg.norm(lc - an.centre) + lr for lc, lr in an.lobes]) + 1.0
        box = _box(an.centre - reach, an.centre + reach, shape, spacing)
        if box is None:
            continue
        lo, hi = box
        x, y, z = _axes(lo, hi, spacing)
        rel = (x - an.centre[0], y - an.centre[1], z - an.centre[2])
        q = sum(
            ((rel[0] * an.rotation[0, i] + rel[1] * an.rotation[1, i] + rel[2] * an.rotation[2, i]) / an.axes[i]) ** 2
            for i in range(3)
        )
        dep = an.axes.min() * (1.0 - np.sqrt(q))
        for lc, lr in an.lobes:
            dep = np.maximum(dep, lr - np.sqrt((x - lc[0]) ** 2 + (y - lc[1]) ** 2 + (z - lc[2]) ** 2))
        sl = tuple(slice(lo[i], hi[i]) for i in range(3))
        upd = dep > depth[sl]
        depth[sl] = np.where(upd, dep, depth[sl])
        fill[sl] = np.where(upd, an.fill, fill[sl])
    return depth, fill


# ---------------------------------------------------------------------------------------------- acquisition


def _upsample2(f: np.ndarray, axis: int) -> np.ndarray:
    """Linear 2x upsampling along one axis (cell-centred grid, edges replicated): far cheaper than ndimage.zoom."""
    f = np.moveaxis(f, axis, 0)
    prev = np.concatenate([f[:1], f[:-1]])
    nxt = np.concatenate([f[1:], f[-1:]])
    out = np.empty((2 * f.shape[0], *f.shape[1:]), f.dtype)
    out[0::2] = 0.75 * f + 0.25 * prev
    out[1::2] = 0.75 * f + 0.25 * nxt
    return np.moveaxis(out, 0, axis)


def _smooth_field(rng: np.random.Generator, shape: tuple, sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise, generated at half resolution (cheap) and upsampled."""
    half = tuple((s + 1) // 2 for s in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(half, dtype=np.float32), sigma_vox / 2, mode="wrap")
    for axis in range(3):
        f = _upsample2(f, axis)
    f = f[: shape[0], : shape[1], : shape[2]]
    return (f - f.mean()) / max(float(f.std()), 1e-6)


def _bias_field(rng: np.random.Generator, shape: tuple, amplitude: float) -> np.ndarray:
    """exp of a random polynomial of degree 2 in the normalised coordinates (a smooth gain, as in MR/CT bias)."""
    c = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    x, y, z = c[0][:, None, None], c[1][None, :, None], c[2][None, None, :]
    terms = (x, y, z, x * y, y * z, x * z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3)
    log_gain = sum(rng.uniform(-1, 1) * t for t in terms)
    return np.exp(amplitude * log_gain / 3.0).astype(np.float32)


def _rings(rng: np.random.Generator, shape: tuple, spacing: np.ndarray, level: float) -> np.ndarray:
    """Detector-miscalibration rings: thin concentric circles about the rotation axis (z), constant along z."""
    x = (np.arange(shape[0]) + 0.5) * spacing[0]
    y = (np.arange(shape[1]) + 0.5) * spacing[1]
    cx = x.mean() + rng.normal(0, 0.05) * x[-1]
    cy = y.mean() + rng.normal(0, 0.05) * y[-1]
    rho = np.sqrt((x[:, None] - cx) ** 2 + (y[None, :] - cy) ** 2)
    field = np.zeros(rho.shape, np.float32)
    width = 0.6 * float(spacing[:2].mean())
    for r in rng.uniform(1.0, rho.max(), int(rng.integers(8, 16))):
        field += rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) * np.exp(-0.5 * ((rho - r) / width) ** 2)
    return (level * field)[:, :, None]


def _metal_and_streaks(
    rng: np.random.Generator, shape: tuple, spacing: np.ndarray, level: float, vessel_depth: np.ndarray
) -> np.ndarray:
    """A dense object (clip or coil, labelled background) and the bright/dark streaks it casts in its axial slices."""
    n = np.asarray(shape)
    for _ in range(20):  # put it away from the vessels so that it never hides labelled voxels
        idx = (rng.uniform(0.2, 0.8, 3) * n).astype(int)
        if vessel_depth[tuple(idx)] < -3.0:
            break
    c = (idx + 0.5) * spacing
    x, y, z = _axes(np.zeros(3, int), n, spacing)
    r_obj = rng.uniform(0.8, 1.6)
    obj = 2.5 * np.clip(
        (r_obj - np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)) / spacing.mean() + 0.5, 0, 1
    )
    streak = np.zeros((shape[0], shape[1]), np.float32)
    width = 0.8 * float(spacing[:2].mean())
    for theta in rng.uniform(0, np.pi, int(rng.integers(6, 12))):
        dist = np.abs(-np.sin(theta) * (x[:, :, 0] - c[0]) + np.cos(theta) * (y[:, :, 0] - c[1]))
        streak += rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0) * np.exp(-0.5 * (dist / width) ** 2)
    z_profile = 0.25 + np.exp(-0.5 * ((z[0, 0] - c[2]) / (3.0 * r_obj + 2.0)) ** 2)
    return (obj + level * streak[:, :, None] * z_profile[None, None, :]).astype(np.float32)


def _noise(rng: np.random.Generator, signal: np.ndarray, kind: str, level: float) -> np.ndarray:
    g = rng.standard_normal(signal.shape, dtype=np.float32)
    if kind == "gaussian":
        return signal + level * g
    if kind == "poisson":  # photon-counting noise: variance grows with the signal
        return signal + level * np.sqrt(np.maximum(signal, 0.0) + 0.1) * g
    if kind == "rician":
        return np.sqrt((signal + level * g) ** 2 + (level * rng.standard_normal(signal.shape, dtype=np.float32)) ** 2)
    if kind == "correlated":  # reconstruction kernels correlate noise between neighbouring voxels
        c = ndimage.gaussian_filter(g, 0.9)
        return signal + level * (
            c / max(float(c.std()), 1e-6) * 0.8 + 0.6 * rng.standard_normal(signal.shape, dtype=np.float32)
        )
    raise ValueError(f"unknown noise model {kind!r}; expected gaussian, poisson, rician or correlated")


def _acquire(rng, style: CentreStyle, tree: Tree, aneurysms: list[Aneurysm], shape: tuple, spacing: np.ndarray):
    """The stored image (style dtype) and the label volume (uint8) of one case on the centre's grid."""
    vdepth, vradius = _rasterise_tree(tree, shape, spacing)
    adepth, afill = _rasterise_aneurysms(aneurysms, shape, spacing)
    label = np.zeros(shape, np.uint8)
    label[adepth > 0] = LABELS["aneurysm"]
    label[vdepth > 0] = LABELS["vessel"]  # the neck belongs to the parent vessel

    h = float(spacing.mean())  # linear partial-volume ramp one voxel wide
    r_ref = 1.5
    vfill = 1.0 - style.distal_fade * np.clip((r_ref - vradius) / (r_ref - R_MIN_MM), 0.0, 1.0)
    lumen = np.maximum(
        np.clip(vdepth / h + 0.5, 0, 1) * vfill, np.clip(adepth / h + 0.5, 0, 1) * afill * style.sac_fill
    )
    signal = style.background + style.contrast * lumen
    if style.texture:
        signal += style.texture * (_smooth_field(rng, shape, 6.0) + 0.5 * _smooth_field(rng, shape, 2.0))
    if style.artifact == "streaks":
        signal += _metal_and_streaks(rng, shape, spacing, style.artifact_level, vdepth)
    signal = ndimage.gaussian_filter(signal, style.psf_mm / spacing, mode="nearest")
    if style.artifact == "rings":
        signal += _rings(rng, shape, spacing, style.artifact_level)
    if style.bias:
        signal *= _bias_field(rng, shape, style.bias)
    signal = np.maximum(signal, 0.0) ** style.gamma
    signal = _noise(rng, signal.astype(np.float32), style.noise, style.noise_level)

    stored = signal * style.scale + style.offset
    if style.dtype != "float32":
        info = np.iinfo(style.dtype)
        stored = np.clip(np.rint(stored), info.min, info.max)
    return stored.astype(style.dtype), label


# ------------------------------------------------------------------------------------------------------ storage


def _affine(shape: tuple, spacing: np.ndarray, axcodes: str) -> np.ndarray:
    """Voxel-to-world (mm) matrix; world voxel centres lie at (i + 0.5) * spacing whatever the storage order."""
    A = np.diag([*spacing, 1.0])
    A[:3, 3] = 0.5 * spacing
    if axcodes == "LPS":  # the array's first two axes run backwards in world space
        for ax in (0, 1):
            A[ax, ax] = -spacing[ax]
            A[ax, 3] = (shape[ax] - 0.5) * spacing[ax]
    return A
