"""Synthetic multi-centre 3D rotational angiography (3DRA) phantoms with vessel and aneurysm labels.

Each case is what a 3DRA series is acquired for: a field of view around one or two saccular aneurysms, in a
branching vessel tree (tapering, tortuous tubes over a few generations). Sacs sit at bifurcation apices or on
vessel walls, with necks from narrow to wide, some lobulated or carrying a daughter bleb; their dome diameters
follow one clinical distribution (:data:`DOME_DIAMETER_MM`: 2-15 mm, median about 5.5 mm). The tree also holds the
structures that a blob detector mistakes for a sac, all labelled vessel: tight vessel loops, vessels crossing in
contact, and infundibula (funnel-shaped dilatations at the origin of a branch). The anatomy is drawn in
millimetres from the same distribution for every centre; only the acquisition differs: voxel grid (spacing,
matrix, storage orientation), point-spread function, contrast and gamma, background level and texture, bias
field, noise model and artifacts (metal streaks, detector rings), and integer or float storage. A model that
generalises across acquisition styles can therefore segment every centre.

Only numpy, scipy and nibabel are used here (no torch): this module runs in worker processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from gsema_fast.files import atomic_path, cache_root
from gsema_fast.memory import available_memory

log = logging.getLogger(__name__)

LABELS = {"background": 0, "vessel": 1, "aneurysm": 2}
FILE_ENDING = ".nii.gz"
# Reference voxel size: ``size`` voxels of this spacing span a case's field of view (3DRA reconstructions: 0.2-0.6 mm).
REF_SPACING_MM = 0.4
FORMAT_VERSION = 2  # bump when the generator changes, so that cached synthetic datasets are rebuilt


@dataclass(frozen=True)
class CentreStyle:
    """How one centre acquires and stores a volume. Intensities are in units of full vessel opacification (1.0)."""

    name: str
    matrix: tuple[float, float, float]  # matrix per axis as a fraction of ``size``; the field of view is shared
    axcodes: str  # storage orientation of the voxel array: "RAS" or "LPS" (x and y flipped)
    psf_mm: float  # sigma of the Gaussian point-spread function
    background: float  # signal of non-opacified tissue
    contrast: float  # vessel signal above background
    distal_fade: float  # fraction of opacification lost in the thinnest vessels (contrast wash-in)
    sac_fill: float  # aneurysm opacification relative to the parent vessel (flow stagnation in the sac)
    gamma: float  # intensity transfer applied to the (non-negative) signal
    texture: float  # amplitude of smooth background structure (soft tissue, subtraction residue)
    bias: float  # amplitude (log scale) of a smooth multiplicative bias field
    noise: str  # "gaussian" | "poisson" | "rician" | "correlated"
    noise_level: float
    artifact: str  # "" | "streaks" (with a metal object) | "rings"
    artifact_level: float
    dtype: str  # storage type: "uint16" | "int16" | "float32"
    scale: float  # stored value = signal * scale + offset
    offset: float


# Centre 3 is the conventional unseen centre: its low contrast, strong blur, coarse grid, metal streaks and Rician
# noise lie outside the range the other three span, so a model trained on 0-2 visibly loses accuracy there.
CENTRES: tuple[CentreStyle, ...] = (
    CentreStyle(
        "A",
        (1.0, 1.0, 1.0),
        "RAS",
        0.22,
        0.10,
        1.00,
        0.15,
        0.90,
        1.00,
        0.04,
        0.10,
        "gaussian",
        0.035,
        "",
        0.0,
        "uint16",
        3000.0,
        100.0,
    ),
    CentreStyle(
        "B",
        (0.875, 0.875, 0.875),
        "LPS",
        0.38,
        0.30,
        0.75,
        0.30,
        0.80,
        0.75,
        0.04,
        0.25,
        "poisson",
        0.09,
        "rings",
        0.05,
        "int16",
        2000.0,
        -600.0,
    ),
    CentreStyle(
        "C",
        (1.0, 1.0, 0.75),
        "RAS",
        0.30,
        0.06,
        1.00,
        0.25,
        0.70,
        1.50,
        0.08,
        0.18,
        "correlated",
        0.07,
        "",
        0.0,
        "float32",
        1.0,
        0.0,
    ),
    CentreStyle(
        "D",
        (0.75, 0.75, 0.75),
        "LPS",
        0.50,
        0.25,
        0.70,
        0.40,
        0.65,
        0.70,
        0.10,
        0.40,
        "rician",
        0.07,
        "streaks",
        0.15,
        "int16",
        1200.0,
        0.0,
    ),
    CentreStyle(
        "E",
        (0.8, 0.8, 1.0),
        "RAS",
        0.45,
        0.06,
        1.10,
        0.50,
        1.00,
        1.70,
        0.05,
        0.30,
        "gaussian",
        0.08,
        "rings",
        0.08,
        "uint16",
        4000.0,
        0.0,
    ),
    CentreStyle(
        "F",
        (0.9, 0.9, 0.9),
        "RAS",
        0.28,
        0.25,
        0.70,
        0.20,
        0.75,
        0.90,
        0.16,
        0.15,
        "correlated",
        0.05,
        "streaks",
        0.10,
        "float32",
        1.0,
        -0.25,
    ),
)

_DS_MM = 0.4  # centreline step
_R_MIN_MM = 0.3  # vessels end below this radius
_MAX_BRANCHES = 64
_CHUNK = 8  # centreline pieces rasterised together in one bounding box


# --------------------------------------------------------------------------------------------------- anatomy (mm)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    v = rng.standard_normal(3)
    return _unit(v - v.dot(d) * d)


def _rotate_towards(d: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """``d`` turned by ``angle`` in the plane spanned by ``d`` and the unit vector ``axis`` (perpendicular to d)."""
    return _unit(np.cos(angle) * d + np.sin(angle) * axis)


@dataclass
class _Tree:
    branches: list  # (points [n, 3] mm, radii [n] mm)
    bifurcations: list  # (point, parent direction, parent radius)


# Infundibula: a funnel at a branch's origin, its radius there this many times the branch's, fading over this many mm.
_INFUNDIBULUM_FLARE = (1.6, 2.4)
_INFUNDIBULUM_MM = (1.0, 2.0)


def _grow_tree(rng: np.random.Generator, fov: np.ndarray) -> _Tree:
    """A tortuous branching tree inside the box [0, fov]^3 (mm); vessels may leave the box.

    Besides tapering, tortuosity and bifurcations, some vessels make a tight loop (a turn of 240-330 degrees on a
    2-4 mm radius, as in a siphon or a redundant segment) and some side branches start with an infundibulum; both
    are vessel, and both look like a sac to a model that has only learnt "bright blob".
    """
    r_cap = float(fov.min()) / 10  # small fields of view still hold more than one vessel
    roots = []
    entry = np.array([rng.uniform(0.3, 0.7) * fov[0], rng.uniform(0.3, 0.7) * fov[1], 0.0])
    roots.append(
        (
            entry,
            _unit(np.array([0.0, 0.0, 1.0]) + 0.35 * rng.standard_normal(3) * [1, 1, 0]),
            min(rng.uniform(1.5, 2.3), r_cap),
            0,
            0.0,
        )
    )
    if rng.random() < 0.6:  # a second trunk entering through a side face
        axis = int(rng.integers(0, 2))
        p = rng.uniform(0.25, 0.75, 3) * fov
        p[axis] = 0.0
        d = np.zeros(3)
        d[axis] = 1.0
        roots.append((p, _unit(d + 0.4 * rng.standard_normal(3)), min(rng.uniform(0.9, 1.5), r_cap), 1, 0.0))

    tortuosity = rng.uniform(0.01, 0.025)
    branches, bifurcations = [], []
    queue = list(roots)
    while queue and len(branches) < _MAX_BRANCHES:
        p, d, r0, gen, flare = queue.pop(0)
        length = rng.uniform(8.0, 20.0) * (0.5 + 0.5 * min(r0 / 1.5, 1.5))
        n = max(int(length / _DS_MM), 2)
        kicks = rng.normal(0.0, tortuosity, (n, 3))
        loop = None
        if rng.random() < 0.2:  # a tight loop somewhere along the vessel: (first step, steps, turn per step, axis)
            loop_radius = rng.uniform(2.0, 4.0)
            turn = _DS_MM / loop_radius
            steps = int(np.deg2rad(rng.uniform(240, 330)) / turn)
            loop = (int(rng.integers(0, max(n // 2, 1))), steps, turn, _perpendicular(rng, d))
            n += steps
            kicks = np.concatenate([kicks, rng.normal(0.0, tortuosity, (steps, 3))])
        pts = [p.copy()]
        k = np.zeros(3)
        left = False
        for i in range(n):
            if loop is not None and loop[0] <= i < loop[0] + loop[1]:
                normal = loop[3] - loop[3].dot(d) * d  # keep turning towards the same side
                d = _rotate_towards(d, _unit(normal), loop[2])
            else:
                k = 0.95 * k + kicks[i]
                k -= k.dot(d) * d
                d = _unit(d + k * _DS_MM)
            p = p + d * _DS_MM
            pts.append(p.copy())
            if np.any(p < -2 * r0) or np.any(p > fov + 2 * r0):
                left = True
                break
        pts = np.asarray(pts)
        s = np.arange(len(pts)) * _DS_MM
        radii = r0 * (1.0 - rng.uniform(0.05, 0.2) * s / max(s[-1], length))
        if flare:  # infundibulum: radius (1 + flare) * r0 at the origin, the plain vessel a couple of mm on
            radii = radii * (1.0 + flare * np.clip(1.0 - s / rng.uniform(*_INFUNDIBULUM_MM), 0.0, 1.0) ** 1.5)
        branches.append((pts, radii))

        # side branches leave at steep angles with a fraction of the parent radius
        for _ in range(rng.poisson(length / 6.0)):
            j = int(rng.integers(2, max(len(pts) - 2, 3)))
            if j >= len(pts) - 1:
                continue
            rc = radii[j] * rng.uniform(0.3, 0.55)
            if rc >= _R_MIN_MM:
                dj = _unit(pts[j + 1] - pts[j])
                flare_c = rng.uniform(*_INFUNDIBULUM_FLARE) - 1.0 if rng.random() < 0.25 else 0.0
                queue.append(
                    (
                        pts[j],
                        _rotate_towards(dj, _perpendicular(rng, dj), np.deg2rad(rng.uniform(50, 85))),
                        rc,
                        gen + 1,
                        flare_c,
                    )
                )

        r_end = float(radii[-1])
        if left or gen >= 4 or r_end < 1.5 * _R_MIN_MM:
            continue
        # Murray's law r^3 = r1^3 + r2^3, the smaller daughter turning further away from the parent's direction
        q = rng.uniform(0.55, 1.0)
        a1 = (1.0 / (1.0 + q**3)) ** (1.0 / 3.0)
        axis = _perpendicular(rng, d)
        bifurcations.append((p.copy(), d.copy(), r_end))
        for ratio, angle, side in ((a1, rng.uniform(20, 40), 1.0), (q * a1, rng.uniform(35, 65), -1.0)):
            if r_end * ratio >= _R_MIN_MM:
                queue.append(
                    (p.copy(), _rotate_towards(d, side * axis, np.deg2rad(angle)), r_end * ratio, gen + 1, 0.0)
                )
    _add_crossing_vessels(rng, branches, fov)
    return _Tree(branches, bifurcations)


def _add_crossing_vessels(rng: np.random.Generator, branches: list, fov: np.ndarray) -> None:
    """One or two straight-ish vessels that pass in contact with an existing one at a steep angle (vessels
    overlapping in the reconstruction: a bright knot at the contact that is not a sac)."""
    wide = [
        (pts[j], _unit(pts[j + 1] - pts[j]), float(radii[j]))
        for pts, radii in branches
        for j in range(2, len(pts) - 2, 3)
        if radii[j] >= 0.7 and np.all(pts[j] > 2.0) and np.all(pts[j] < fov - 2.0)
    ]
    for _ in range(int(rng.integers(1, 3)) if wide else 0):
        p, d, r = wide[int(rng.integers(len(wide)))]
        rc = rng.uniform(0.5, 1.0) * r
        side = _perpendicular(rng, d)
        direction = _rotate_towards(d, _perpendicular(rng, d), np.deg2rad(rng.uniform(55, 90)))
        direction = _unit(direction - direction.dot(side) * side)  # runs past the vessel, not into it
        contact = p + side * (r + rc) * rng.uniform(0.8, 1.0)
        half = rng.uniform(6.0, 12.0)
        s = np.arange(-half, half + _DS_MM, _DS_MM)
        bend = _perpendicular(rng, direction) * rng.uniform(0.0, 0.02)
        pts = contact + s[:, None] * direction + (s**2)[:, None] * bend
        branches.append((pts, np.full(len(s), rc)))


@dataclass
class _Aneurysm:
    centre: np.ndarray
    axes: np.ndarray  # semi-axes (mm)
    rotation: np.ndarray  # columns: the ellipsoid's axes
    lobes: list  # (centre, radius) of further spherical lobes: a second lobe of a bilobed sac, or a daughter bleb
    fill: float


# Dome (maximal) diameter of the sacs, mm: log-normal, median 5.5 mm, clipped to 2-15 mm; one distribution for every
# centre. Unruptured aneurysms referred for 3DRA are mostly 3-12 mm across with a median near 5-7 mm.
DOME_DIAMETER_MM = {"median": 5.5, "sigma": 0.45, "min": 2.0, "max": 15.0}


def dome_diameter(rng: np.random.Generator) -> float:
    """One draw of :data:`DOME_DIAMETER_MM` (mm)."""
    d = DOME_DIAMETER_MM
    return float(np.clip(d["median"] * np.exp(d["sigma"] * rng.standard_normal()), d["min"], d["max"]))


def _place_aneurysms(rng: np.random.Generator, tree: _Tree, fov: np.ndarray, count: int) -> list[_Aneurysm]:
    """``count`` saccular aneurysms whose sac overlaps the parent vessel through a neck, at apices or on walls,
    inside the box. A dome too large for every site is shrunk step by step until it fits (never below 2 mm), so
    the count is met whenever the tree has a site."""
    walls = [
        (pts[j], _unit(pts[j + 1] - pts[j]), float(radii[j]))
        for pts, radii in tree.branches
        for j in range(1, len(pts) - 1, 4)
        if radii[j] >= 0.6
    ]
    out: list[_Aneurysm] = []
    for _ in range(count):
        R = min(dome_diameter(rng) / 2, float(fov.min()) / 5)
        for attempt in range(200):
            if attempt and attempt % 40 == 0:
                R = max(0.8 * R, DOME_DIAMETER_MM["min"] / 2)
            if tree.bifurcations and (rng.random() < 0.55 or not walls):
                p, d, r = tree.bifurcations[int(rng.integers(len(tree.bifurcations)))]
                u = _unit(d + 0.3 * rng.standard_normal(3))  # the apex: flow impinges along the parent's direction
            elif walls:
                p, d, r = walls[int(rng.integers(len(walls)))]
                u = _perpendicular(rng, d)
            else:
                return out
            axes = R * rng.uniform(0.75, 1.0, 3)
            axes[int(rng.integers(3))] = R  # R is the dome's largest semi-axis
            # Neck width as a fraction of the dome: the sac's centre sits the further out, the narrower the neck.
            neck = rng.uniform(0.3, 0.95)
            c = p + u * (r + axes.min() * np.sqrt(1.0 - neck**2))
            if np.any(c < R + 0.5) or np.any(c > fov - R - 0.5):
                continue
            if any(np.linalg.norm(c - a.centre) < R + a.axes.max() + 1.0 for a in out):
                continue
            rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
            lobes = []
            away = _unit(u + 0.6 * rng.standard_normal(3))  # lobes grow on the dome, away from the neck
            if rng.random() < 0.25:  # bilobed
                lobes.append((c + away * R * rng.uniform(0.6, 0.8), R * rng.uniform(0.5, 0.7)))
            if rng.random() < 0.3:  # a daughter bleb
                lobes.append((c + _unit(away + 0.5 * rng.standard_normal(3)) * R * 0.95, R * rng.uniform(0.25, 0.4)))
            out.append(_Aneurysm(c, axes, rotation, lobes, float(rng.uniform(0.85, 1.0))))
            break
    return out


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


def _rasterise_tree(tree: _Tree, shape: tuple, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _rasterise_aneurysms(aneurysms: list[_Aneurysm], shape: tuple, spacing: np.ndarray):
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


def _acquire(rng, style: CentreStyle, tree: _Tree, aneurysms: list[_Aneurysm], shape: tuple, spacing: np.ndarray):
    """The stored image (style dtype) and the label volume (uint8) of one case on the centre's grid."""
    vdepth, vradius = _rasterise_tree(tree, shape, spacing)
    adepth, afill = _rasterise_aneurysms(aneurysms, shape, spacing)
    label = np.zeros(shape, np.uint8)
    label[adepth > 0] = LABELS["aneurysm"]
    label[vdepth > 0] = LABELS["vessel"]  # the neck belongs to the parent vessel

    h = float(spacing.mean())  # linear partial-volume ramp one voxel wide
    r_ref = 1.5
    vfill = 1.0 - style.distal_fade * np.clip((r_ref - vradius) / (r_ref - _R_MIN_MM), 0.0, 1.0)
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


# ------------------------------------------------------------------------------------------------------- files


def _affine(shape: tuple, spacing: np.ndarray, axcodes: str) -> np.ndarray:
    """Voxel-to-world (mm) matrix; world voxel centres lie at (i + 0.5) * spacing whatever the storage order."""
    A = np.diag([*spacing, 1.0])
    A[:3, 3] = 0.5 * spacing
    if axcodes == "LPS":  # the array's first two axes run backwards in world space
        for ax in (0, 1):
            A[ax, ax] = -spacing[ax]
            A[ax, 3] = (shape[ax] - 0.5) * spacing[ax]
    return A


def _atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    """Write next to the target and rename over it, so an interruption never leaves a half-written file."""
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _case_name(domain: int, index: int) -> str:
    return f"{CENTRES[domain].name}_{index:03d}"


def _anatomy(rng: np.random.Generator, fov: np.ndarray) -> tuple[_Tree, list[_Aneurysm]]:
    """One patient: a vessel tree with one aneurysm, or two (about one patient in five), in the box [0, fov]^3 mm.
    Every 3DRA series is acquired for an aneurysm, so there is always at least one."""
    count = 2 if rng.random() < 0.2 else 1
    for _ in range(20):  # a rare tree without a site that fits (a short, thin one) is grown again
        tree = _grow_tree(rng, fov)
        aneurysms = _place_aneurysms(rng, tree, fov, count)
        if aneurysms:
            return tree, aneurysms
    raise RuntimeError(f"no aneurysm fits a vessel tree in a {fov.tolist()} mm field of view; use a larger size")


def _make_case(out_dir: str, domain: int, index: int, size: int, seed: int) -> dict:
    """Generate and write one case; returns its dataset.json entry. Deterministic in (seed, domain, index)."""
    style = CENTRES[domain]
    rng = np.random.default_rng([seed, domain, index])
    fov = size * REF_SPACING_MM * rng.uniform(0.9, 1.1) * np.ones(3)
    tree, aneurysms = _anatomy(rng, fov)

    shape = tuple(max(int(round(size * m)), 8) for m in style.matrix)
    spacing = fov / np.asarray(shape)
    image, label = _acquire(rng, style, tree, aneurysms, shape, spacing)
    if style.axcodes == "LPS":
        image, label = image[::-1, ::-1].copy(), label[::-1, ::-1].copy()
    affine = _affine(shape, spacing, style.axcodes)

    name = _case_name(domain, index)
    root = Path(out_dir)
    image_rel, label_rel = f"imagesTr/{name}_0000{FILE_ENDING}", f"labelsTr/{name}{FILE_ENDING}"
    _atomic_save(_nifti(label, affine), root / label_rel)
    _atomic_save(_nifti(image, affine), root / image_rel)
    return {
        "case": name,
        "image": f"./{image_rel}",
        "label": f"./{label_rel}",
        "domain": domain,
        "centre": style.name,
        "shape": list(shape),
        "spacing": [round(float(s), 6) for s in spacing],
        "aneurysms": len(aneurysms),
        "dome_diameters_mm": [round(2 * float(a.axes.max()), 3) for a in aneurysms],
        "aneurysm_voxels": int((label == LABELS["aneurysm"]).sum()),
    }


def _complete(out: Path, params: dict) -> bool:
    """Whether ``out`` already holds the dataset these parameters produce (its manifest is written last)."""
    try:
        manifest = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("synth") != params:
        return False
    return all((out / e["image"]).is_file() and (out / e["label"]).is_file() for e in manifest.get("training", []))


# What this generator writes into imagesTr/ and labelsTr/: case files, and the temporary files of an interrupted write.
_OWN_FILE = re.compile(
    rf"(?:{'|'.join(c.name for c in CENTRES)})_\d{{3,}}(?:_0000)?{re.escape(FILE_ENDING)}"
    r"|\..+\.tmp\..+"
)


def _synthesised_params(out: Path) -> dict | None:
    """The settings of the synthesised dataset whose manifest ``out`` holds; None when it holds none."""
    try:
        manifest = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("name") != "gsema-synth":
        return None
    return manifest.get("synth") if isinstance(manifest.get("synth"), dict) else None


def _params(domains: int, cases_per_domain: int, size: int, seed: int) -> dict:
    """What decides a synthesised dataset's bytes, as its manifest records them."""
    return dict(domains=domains, cases_per_domain=cases_per_domain, size=size, seed=seed, version=FORMAT_VERSION)


def _describe(params: dict) -> str:
    return (
        f"{params.get('domains')} centre(s) x {params.get('cases_per_domain')} case(s), size {params.get('size')}, "
        f"seed {params.get('seed')}, format {params.get('version')}"
    )


# Generating one case of the finest centre peaks at about 47 bytes per voxel of its size^3 matrix (tracemalloc over
# the six centres at sizes 64 and 96: float32 fields, label and temporaries), whatever the size.
PEAK_BYTES_PER_VOXEL = 48


def _check_memory(size: int, workers: int) -> int:
    """Refuse a size one case of which cannot be generated in the available memory (``ValueError``), before anything
    is allocated or written; returns the number of worker processes whose cases fit at once."""
    need = PEAK_BYTES_PER_VOXEL * size**3
    available = available_memory()
    if available is None:
        return workers
    if need > available:
        largest = int((available / PEAK_BYTES_PER_VOXEL) ** (1 / 3))
        raise ValueError(
            f"synth: size={size} needs about {need / 2**30:.1f} GiB of memory to generate one case, and "
            f"{available / 2**30:.1f} GiB is available; choose a size of at most {largest}"
        )
    fit = max(1, available // need)
    if workers > fit:
        log.warning(
            "synth: %d worker process(es) would need %.1f GiB, %.1f GiB is available: using %d",
            workers,
            workers * need / 2**30,
            available / 2**30,
            fit,
        )
    return int(min(workers, fit))


def _own_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "synth" in manifest and manifest.get("name") == "gsema-synth"


def _foreign_files(out: Path) -> list[str]:
    """What ``out`` holds that this generator did not write (names relative to it); [] for a new or empty folder."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise NotADirectoryError(f"synth: {out} is a file, not a folder")
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name in ("imagesTr", "labelsTr") and entry.is_dir():
            foreign += [f"{entry.name}/{p.name}" for p in sorted(entry.iterdir()) if not _OWN_FILE.fullmatch(p.name)]
        elif entry.name == "dataset.json" and _own_manifest(entry):
            continue
        elif not (entry.name.startswith(".") and _OWN_FILE.fullmatch(entry.name)):  # dataset.json's temporary file
            foreign.append(entry.name)
    return foreign


def _remove_stale(out: Path, entries: dict[str, dict]) -> None:
    """After a (re)generation imagesTr/ and labelsTr/ hold exactly this dataset: cases of an earlier, larger one (or,
    with ``overwrite``, another dataset's files) would otherwise sit beside it."""
    keep = {Path(e[key]).name for e in entries.values() for key in ("image", "label")}
    stale = [p for sub in ("imagesTr", "labelsTr") for p in (out / sub).iterdir() if p.is_file() and p.name not in keep]
    for path in stale:
        path.unlink()
    if stale:
        log.info("removed %d file(s) of the dataset %s held before", len(stale), out)


def synthesize(
    out_dir: str | os.PathLike,
    *,
    domains: int = 4,
    cases_per_domain: int = 6,
    size: int = 128,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic multi-centre 3DRA dataset in the nnU-Net raw layout and return its folder.

    ``out_dir/imagesTr/{case}_0000.nii.gz``, ``out_dir/labelsTr/{case}.nii.gz`` (0 background, 1 vessel,
    2 aneurysm) and ``out_dir/dataset.json`` (``labels``, ``file_ending``, ``channel_names``, a ``training`` list
    whose entries carry each case's ``domain`` (0 .. domains-1), and the centre styles under ``domains``).
    ``size`` is the matrix of the finest centre; the field of view is ``size * 0.4 mm`` (+-10 % per case) and each
    centre samples it on its own grid (:data:`CENTRES`).

    The bytes depend only on the arguments other than ``workers`` (each case has its own random stream). Files are
    written atomically and the manifest last, so an interrupted run leaves no half-written file and is simply
    redone; a folder that already holds the same dataset is returned at once unless ``overwrite``. A folder that holds
    anything else (another dataset, synthesised with other settings or not, other files) is refused
    (``FileExistsError``) unless ``overwrite``, which replaces the dataset in it: imagesTr/ and labelsTr/ then hold
    exactly the new cases. A ``size`` one case of which would not fit in the available memory
    (:data:`PEAK_BYTES_PER_VOXEL`) is refused before anything is written, and ``workers`` is lowered to what fits.
    ``workers``: processes (default: the CPUs this process may use, at most one per case, for datasets of at least
    four 128^3 cases' worth of voxels; one otherwise, since starting processes costs more than small cases take).
    Where torch is already imported the workers are spawned, which re-imports the calling script: as with any
    Python multiprocessing, a script that calls this needs an ``if __name__ == "__main__":`` guard (without one the
    cases are generated in this process, with a warning).
    """
    if not 1 <= domains <= len(CENTRES):
        raise ValueError(f"domains={domains}: the synthetic benchmark defines 1 to {len(CENTRES)} centres")
    if cases_per_domain < 1:
        raise ValueError(f"cases_per_domain={cases_per_domain}: need at least one case per centre")
    if size < 16:
        raise ValueError(f"size={size}: volumes smaller than 16 voxels cannot hold a vessel tree")
    out = Path(out_dir)
    params = _params(domains, cases_per_domain, size, seed)
    if not overwrite and _complete(out, params):
        log.info("%s already holds this synthetic dataset; nothing to do", out)
        return out
    held = _synthesised_params(out)
    if held is not None and held != params and not overwrite:
        raise FileExistsError(
            f"synth: {out} holds another synthesised dataset ({_describe(held)}); pass --overwrite to replace it "
            f"with this one ({_describe(params)}), or choose another folder"
        )
    foreign = _foreign_files(out)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(
            f"synth: {out} holds files this generator did not write ({shown}); choose a new or empty folder, or "
            f"pass --overwrite to replace the dataset in it"
        )
    jobs = [(str(out), d, i, size, seed) for d in range(domains) for i in range(cases_per_domain)]
    if workers is None:  # starting processes costs seconds: only worth it for real work
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = usable if len(jobs) * size**3 >= 4 * 128**3 else 1
    workers = _check_memory(size, max(1, min(workers, len(jobs))))
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    manifest_path = out / "dataset.json"
    manifest_path.unlink(missing_ok=True)  # the folder is incomplete until the new manifest is written

    log.info(
        "synthesising %d cases (%d centres, size %d, seed %d) into %s with %d process(es)",
        len(jobs),
        domains,
        size,
        seed,
        out,
        workers,
    )
    entries: dict[str, dict] = {}
    with tqdm(total=len(jobs), desc="synth", unit="case", disable=None) as bar:
        if workers == 1:
            for job in jobs:
                e = _make_case(*job)
                entries[e["case"]] = e
                bar.update()
        else:
            # fork starts workers at once; but a parent that imported torch may hold OpenMP thread pools that a
            # forked child must not inherit, so it pays for spawn (a fresh interpreter per worker)
            method = (
                "fork" if "torch" not in sys.modules and "fork" in multiprocessing.get_all_start_methods() else "spawn"
            )
            ctx = multiprocessing.get_context(method)
            try:
                with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                    for fut in cf.as_completed([pool.submit(_make_case, *job) for job in jobs]):
                        e = fut.result()
                        entries[e["case"]] = e
                        bar.update()
            except cf.process.BrokenProcessPool as err:
                # typically a script without an ``if __name__ == "__main__":`` guard, which spawned workers re-run
                log.warning("worker processes failed (%s); generating the remaining cases in this process", err)
            for job in jobs:
                if _case_name(job[1], job[2]) not in entries:
                    e = _make_case(*job)
                    entries[e["case"]] = e
                    bar.update()

    manifest = {
        "name": "gsema-synth",
        "description": "Synthetic multi-centre 3D rotational angiography phantoms (vessel tree + saccular aneurysms)",
        "channel_names": {"0": "3DRA"},
        "labels": dict(LABELS),
        "numTraining": len(entries),
        "file_ending": FILE_ENDING,
        "domains": {str(d): asdict(CENTRES[d]) for d in range(domains)},
        "training": [entries[_case_name(d, i)] for d in range(domains) for i in range(cases_per_domain)],
        "synth": params,
    }
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    _remove_stale(out, entries)
    return out


def builtin_dataset(
    *,
    domains: int = 4,
    cases_per_domain: int = 6,
    size: int = 128,
    seed: int = 0,
    folder: str | os.PathLike | None = None,
) -> Path:
    """The built-in multi-centre dataset with these settings, synthesised on first use and reused afterwards.

    ``folder`` None: a per-user cache folder named after the settings (``$XDG_CACHE_HOME/gsema-fast`` or
    ``~/.cache/gsema-fast``), so training, evaluation and later runs all find the same cases; phantoms of an earlier
    generator format there are rebuilt. A ``folder`` holding phantoms of other settings is refused
    (``FileExistsError``): they may be another run's data.
    """
    params = _params(domains, cases_per_domain, size, seed)
    kwargs = dict(domains=domains, cases_per_domain=cases_per_domain, size=size, seed=seed)
    if folder is None:
        folder = cache_root() / f"phantoms-d{domains}-n{cases_per_domain}-s{size}-seed{seed}"
        held = _synthesised_params(folder)
        if held is not None and held != params:  # only the format can differ in a folder named after the settings
            log.info("rebuilding the phantoms in %s (format %s -> %s)", folder, held.get("version"), FORMAT_VERSION)
            return synthesize(folder, overwrite=True, **kwargs)
        return synthesize(folder, **kwargs)
    held = _synthesised_params(Path(folder))
    if held is not None and held != params:
        raise FileExistsError(
            f"data.synth_dir: {folder} holds phantoms of other settings ({_describe(held)}) than data.synth_* ask "
            f"for ({_describe(params)}); give another folder, or replace them with gsema-fast synth --out {folder} "
            f"--overwrite"
        )
    return synthesize(folder, **kwargs)


def dataset_folder(data) -> Path:
    """The dataset a run's ``data`` settings name: ``data.root``, or the built-in phantoms of its ``synth_*``
    settings (synthesised on first use). ``data``: any object with those attributes (the config's data section)."""
    if data.root is not None:
        root = Path(data.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: {root} is not a folder")
        return root
    return builtin_dataset(
        domains=data.synth_domains,
        cases_per_domain=data.synth_cases_per_domain,
        size=data.synth_size,
        seed=data.synth_seed,
        folder=data.synth_dir,
    )
