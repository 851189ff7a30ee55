"""The anatomy of a phantom, in millimetres: a branching vessel tree and the saccular aneurysms on it.

Each case is what a 3DRA series is acquired for: a field of view around one or two saccular aneurysms, in a
branching vessel tree (tapering, tortuous tubes over a few generations). Sacs sit at bifurcation apices or on
vessel walls, with necks from narrow to wide, some lobulated or carrying a daughter bleb; their dome diameters
follow one clinical distribution (:data:`DOME_DIAMETER_MM`: 2-15 mm, median about 5.5 mm). The tree also holds the
structures that a blob detector mistakes for a sac, all labelled vessel: tight vessel loops, vessels crossing in
contact, and infundibula (funnel-shaped dilatations at the origin of a branch). The anatomy is drawn from the same
distribution for every centre; only the acquisition differs (:mod:`gsema_fast.data.phantoms.acquisition`).

Every draw comes from the case's own random stream, in a fixed order: the same stream gives the same patient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABELS = {"background": 0, "vessel": 1, "aneurysm": 2}

DS_MM = 0.4  # centreline step
R_MIN_MM = 0.3  # vessels end below this radius
_MAX_BRANCHES = 64
_MAX_GENERATION = 4  # a vessel of this generation does not bifurcate again


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    v = rng.standard_normal(3)
    return _unit(v - v.dot(d) * d)


def _rotate_towards(d: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """``d`` turned by ``angle`` in the plane spanned by ``d`` and the unit vector ``axis`` (perpendicular to d)."""
    return _unit(np.cos(angle) * d + np.sin(angle) * axis)


@dataclass
class Tree:
    branches: list  # (points [n, 3] mm, radii [n] mm)
    bifurcations: list  # (point, parent direction, parent radius)


# A vessel still to be grown: (origin, direction, radius at the origin, generation, infundibulum flare at the origin).
_Sprout = tuple[np.ndarray, np.ndarray, float, int, float]

# Infundibula: a funnel at a branch's origin, its radius there this many times the branch's, fading over this many mm.
_INFUNDIBULUM_FLARE = (1.6, 2.4)
_INFUNDIBULUM_MM = (1.0, 2.0)


def grow_tree(rng: np.random.Generator, fov: np.ndarray) -> Tree:
    """A tortuous branching tree inside the box [0, fov]^3 (mm); vessels may leave the box.

    Besides tapering, tortuosity and bifurcations, some vessels make a tight loop (a turn of 240-330 degrees on a
    2-4 mm radius, as in a siphon or a redundant segment) and some side branches start with an infundibulum; both
    are vessel, and both look like a sac to a model that has only learnt "bright blob". Vessels grow breadth first
    from the trunks: each one's centreline, then its radii, its side branches, and its two daughters.
    """
    queue = _trunks(rng, fov)
    tortuosity = rng.uniform(0.01, 0.025)
    branches, bifurcations = [], []
    while queue and len(branches) < _MAX_BRANCHES:
        p, d, r0, gen, flare = queue.pop(0)
        length = rng.uniform(8.0, 20.0) * (0.5 + 0.5 * min(r0 / 1.5, 1.5))
        pts, d, left = _centreline(rng, p, d, r0, length, tortuosity, fov)
        radii = _radii(rng, pts, r0, length, flare)
        branches.append((pts, radii))
        queue += _side_branches(rng, pts, radii, length, gen)
        r_end = float(radii[-1])
        if left or gen >= _MAX_GENERATION or r_end < 1.5 * R_MIN_MM:
            continue
        bifurcations.append((pts[-1].copy(), d.copy(), r_end))
        queue += _daughters(rng, pts[-1], d, r_end, gen)
    _add_crossing_vessels(rng, branches, fov)
    return Tree(branches, bifurcations)


def _trunks(rng: np.random.Generator, fov: np.ndarray) -> list[_Sprout]:
    """The vessels entering the field of view: one through the bottom face, and in 60 % of cases a second, thinner
    one through a side face."""
    r_cap = float(fov.min()) / 10  # small fields of view still hold more than one vessel
    entry = np.array([rng.uniform(0.3, 0.7) * fov[0], rng.uniform(0.3, 0.7) * fov[1], 0.0])
    direction = _unit(np.array([0.0, 0.0, 1.0]) + 0.35 * rng.standard_normal(3) * [1, 1, 0])
    trunks = [(entry, direction, min(rng.uniform(1.5, 2.3), r_cap), 0, 0.0)]
    if rng.random() < 0.6:
        axis = int(rng.integers(0, 2))
        p = rng.uniform(0.25, 0.75, 3) * fov
        p[axis] = 0.0
        d = np.zeros(3)
        d[axis] = 1.0
        trunks.append((p, _unit(d + 0.4 * rng.standard_normal(3)), min(rng.uniform(0.9, 1.5), r_cap), 1, 0.0))
    return trunks


def _centreline(
    rng: np.random.Generator,
    p: np.ndarray,
    d: np.ndarray,
    r0: float,
    length: float,
    tortuosity: float,
    fov: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """A vessel's centreline from ``p`` along ``d``: ``length`` mm of a random walk whose direction drifts with
    correlated kicks, in one vessel in five with a tight loop somewhere along it. Returns the points [n, 3], the
    direction at the end, and whether the vessel left the box (it then ends there)."""
    n = max(int(length / DS_MM), 2)
    kicks = rng.normal(0.0, tortuosity, (n, 3))
    loop = None
    if rng.random() < 0.2:  # a tight loop somewhere along the vessel: (first step, steps, turn per step, axis)
        loop_radius = rng.uniform(2.0, 4.0)
        turn = DS_MM / loop_radius
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
            d = _unit(d + k * DS_MM)
        p = p + d * DS_MM
        pts.append(p.copy())
        if np.any(p < -2 * r0) or np.any(p > fov + 2 * r0):
            left = True
            break
    return np.asarray(pts), d, left


def _radii(rng: np.random.Generator, pts: np.ndarray, r0: float, length: float, flare: float) -> np.ndarray:
    """The radius along a centreline: tapering from ``r0``; with an infundibulum (``flare`` > 0), (1 + flare) * r0 at
    the origin, the plain vessel a couple of mm on."""
    s = np.arange(len(pts)) * DS_MM
    radii = r0 * (1.0 - rng.uniform(0.05, 0.2) * s / max(s[-1], length))
    if flare:
        radii = radii * (1.0 + flare * np.clip(1.0 - s / rng.uniform(*_INFUNDIBULUM_MM), 0.0, 1.0) ** 1.5)
    return radii


def _side_branches(rng: np.random.Generator, pts: np.ndarray, radii: np.ndarray, length: float, gen: int) -> list:
    """Side branches leave at steep angles with a fraction of the parent radius, a quarter of them with an
    infundibulum at their origin."""
    sprouts: list[_Sprout] = []
    for _ in range(rng.poisson(length / 6.0)):
        j = int(rng.integers(2, max(len(pts) - 2, 3)))
        if j >= len(pts) - 1:
            continue
        rc = radii[j] * rng.uniform(0.3, 0.55)
        if rc >= R_MIN_MM:
            dj = _unit(pts[j + 1] - pts[j])
            flare = rng.uniform(*_INFUNDIBULUM_FLARE) - 1.0 if rng.random() < 0.25 else 0.0
            direction = _rotate_towards(dj, _perpendicular(rng, dj), np.deg2rad(rng.uniform(50, 85)))
            sprouts.append((pts[j], direction, rc, gen + 1, flare))
    return sprouts


def _daughters(rng: np.random.Generator, p: np.ndarray, d: np.ndarray, r_end: float, gen: int) -> list[_Sprout]:
    """The two daughters of a bifurcation at ``p``: Murray's law r^3 = r1^3 + r2^3, the smaller daughter turning
    further away from the parent's direction."""
    q = rng.uniform(0.55, 1.0)
    a1 = (1.0 / (1.0 + q**3)) ** (1.0 / 3.0)
    axis = _perpendicular(rng, d)
    sprouts: list[_Sprout] = []
    for ratio, angle, side in ((a1, rng.uniform(20, 40), 1.0), (q * a1, rng.uniform(35, 65), -1.0)):
        if r_end * ratio >= R_MIN_MM:
            sprouts.append((p.copy(), _rotate_towards(d, side * axis, np.deg2rad(angle)), r_end * ratio, gen + 1, 0.0))
    return sprouts


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
        s = np.arange(-half, half + DS_MM, DS_MM)
        bend = _perpendicular(rng, direction) * rng.uniform(0.0, 0.02)
        pts = contact + s[:, None] * direction + (s**2)[:, None] * bend
        branches.append((pts, np.full(len(s), rc)))


@dataclass
class Aneurysm:
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


def place_aneurysms(rng: np.random.Generator, tree: Tree, fov: np.ndarray, count: int) -> list[Aneurysm]:
    """``count`` saccular aneurysms whose sac overlaps the parent vessel through a neck, at apices or on walls,
    inside the box. A dome too large for every site is shrunk step by step until it fits (never below 2 mm), so
    the count is met whenever the tree has a site."""
    walls = [
        (pts[j], _unit(pts[j + 1] - pts[j]), float(radii[j]))
        for pts, radii in tree.branches
        for j in range(1, len(pts) - 1, 4)
        if radii[j] >= 0.6
    ]
    out: list[Aneurysm] = []
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
            out.append(Aneurysm(c, axes, rotation, lobes, float(rng.uniform(0.85, 1.0))))
            break
    return out


def draw_anatomy(rng: np.random.Generator, fov: np.ndarray) -> tuple[Tree, list[Aneurysm]]:
    """One patient: a vessel tree with one aneurysm, or two (about one patient in five), in the box [0, fov]^3 mm.
    Every 3DRA series is acquired for an aneurysm, so there is always at least one."""
    count = 2 if rng.random() < 0.2 else 1
    for _ in range(20):  # a rare tree without a site that fits (a short, thin one) is grown again
        tree = grow_tree(rng, fov)
        aneurysms = place_aneurysms(rng, tree, fov, count)
        if aneurysms:
            return tree, aneurysms
    raise RuntimeError(f"no aneurysm fits a vessel tree in a {fov.tolist()} mm field of view; use a larger size")
