"""Segmentation metrics of label volumes and their summaries (numpy; MONAI for the surface distance).

Per-case metrics (:func:`case_metrics`), for every foreground class of the label map, from integer label volumes:

- ``dice`` = 2TP / (2TP + FP + FN), ``jaccard`` = TP / (TP + FP + FN), ``sensitivity`` = TP / (TP + FN),
- ``volume_similarity`` = 1 - |FN - FP| / (2TP + FP + FN),
- ``hd95``: MONAI's 95th-percentile symmetric Hausdorff distance between the two surfaces, in mm (voxel units when
  no spacing is given),
- ``tp``, ``fp``, ``fn`` voxel counts, and ``ref_ml``, ``pred_ml`` volumes (in voxels without a spacing).

Empty masks. A metric whose formula is 0/0 is NaN, never 1.0, so that a case without an aneurysm does not count as
a perfect aneurysm segmentation:

- both non-empty: the formulas; HD95 from MONAI;
- reference empty, prediction not: dice, jaccard and VS 0.0 (all false positive); sensitivity and HD95 NaN;
- reference not empty, prediction empty: dice, jaccard, VS and sensitivity 0.0 (all missed); HD95 NaN;
- both empty: everything NaN.

Means (per domain and overall, :func:`summarize`) skip NaN values and report how many cases each mean is over
(``n``), so a class absent from a case simply does not enter that class's mean. The HD95 of a case in which one of
the two masks is empty is infinite in principle; it is NaN here and left out of the mean, and the false positive or
missed structure shows in the overlap metrics of that case instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

__all__ = ["METRICS", "case_metrics", "mean_dice", "mean_sd", "summarize", "voxel_spacing"]

# Order of the columns in tables and CSV files.
METRICS = ("dice", "sensitivity", "jaccard", "volume_similarity", "hd95")
_BACKGROUND_NAMES = ("background", "bg")


def voxel_spacing(affine: Any) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes of a 4 x 4 voxel-to-world matrix."""
    matrix = np.asarray(affine, dtype=np.float64).reshape(-1, 4, 4)[0]
    return tuple(float(s) for s in np.sqrt((matrix[:3, :3] ** 2).sum(axis=0)))


def _as_label_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(
            f"{name}: expected a 3D label volume (optionally with leading size-1 axes), got shape {tuple(np.shape(x))}"
        )
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{name}: expected integer labels, got non-integer values ({arr.dtype})")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"{name}: expected integer labels, got dtype {arr.dtype}")
    return arr


def _foreground_classes(labels: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"labels: expected a mapping of class name to label value(s), got {labels!r}")
    classes = {}
    for name, value in labels.items():
        values = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
        if not values or not all(isinstance(v, (int, np.integer)) for v in values):
            raise ValueError(f"labels[{name!r}]: expected an integer label value or a list of them, got {value!r}")
        if str(name).lower() in _BACKGROUND_NAMES or values == (0,):
            continue
        classes[str(name)] = tuple(int(v) for v in values)
    if not classes:
        raise ValueError(f"labels: {dict(labels)} names no foreground class")
    return classes


def _mask(arr: np.ndarray, values: tuple[int, ...]) -> np.ndarray:
    return arr == values[0] if len(values) == 1 else np.isin(arr, values)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def _hd95(p: np.ndarray, r: np.ndarray, spacing: Sequence[float]) -> float:
    if not p.any() or not r.any():
        return math.nan
    with warnings.catch_warnings():
        # MONAI's own internal call of a deprecated argument; nothing a user can act on.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
        hd = compute_hausdorff_distance(
            torch.from_numpy(p)[None, None],
            torch.from_numpy(r)[None, None],
            include_background=True,
            percentile=95,
            spacing=list(spacing),
        )
    return float(hd[0, 0])


def case_metrics(
    pred: Any, ref: Any, labels: Mapping[str, Any], spacing: Sequence[float] | None = None, *, hd95: bool = True
) -> dict[str, dict[str, float]]:
    """Per-class metrics of one case: ``{class: {"dice", "sensitivity", "jaccard", "volume_similarity", "hd95",
    "tp", "fp", "fn", "ref_ml", "pred_ml"}}``.

    ``pred``, ``ref``: integer label volumes of the same shape (numpy or torch; leading size-1 axes are dropped).
    ``labels``: class name -> label value, or a list of values scored as one region (``{"vessel": 1,
    "aneurysm": 2, "vessel+aneurysm": [1, 2]}``); background (value 0 or the name ``background``) is skipped.
    ``spacing``: voxel size in mm along the three axes (HD95 in mm, volumes in ml); None: voxel units.
    ``hd95=False`` skips the surface distance (the costly part) and reports NaN.
    Empty reference and/or prediction: see the module docstring (0/0 gives NaN, never 1.0).
    """
    p_arr = _as_label_array(pred, "pred")
    r_arr = _as_label_array(ref, "ref")
    if p_arr.shape != r_arr.shape:
        raise ValueError(f"pred has shape {p_arr.shape} but ref has shape {r_arr.shape}")
    if spacing is None:
        spacing = (1.0, 1.0, 1.0)
        voxel_ml = 1.0
    else:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing={spacing}: expected three positive voxel sizes in mm")
        voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    out: dict[str, dict[str, float]] = {}
    for name, values in _foreground_classes(labels).items():
        p = _mask(p_arr, values)
        r = _mask(r_arr, values)
        tp = int(np.count_nonzero(p & r))
        n_p = int(np.count_nonzero(p))
        n_r = int(np.count_nonzero(r))
        fp, fn = n_p - tp, n_r - tp
        union_ish = 2 * tp + fp + fn
        out[name] = {
            "dice": _ratio(2 * tp, union_ish),
            "sensitivity": _ratio(tp, tp + fn),
            "jaccard": _ratio(tp, tp + fp + fn),
            "volume_similarity": 1.0 - _ratio(abs(fn - fp), union_ish) if union_ish else math.nan,
            "hd95": _hd95(p, r, spacing) if hd95 else math.nan,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "ref_ml": n_r * voxel_ml,
            "pred_ml": n_p * voxel_ml,
        }
    return out


def _finite_values(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation of the non-NaN values, and how many there were."""
    kept = _finite_values(values)
    if not kept:
        return math.nan, math.nan, 0
    mean = float(np.mean(kept))
    sd = float(np.std(kept, ddof=1)) if len(kept) > 1 else math.nan
    return mean, sd, len(kept)


def _class_means(per_case: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    classes = list(per_case[0]) if per_case else []
    mean: dict[str, dict[str, float]] = {}
    sd: dict[str, dict[str, float]] = {}
    count: dict[str, dict[str, int]] = {}
    for name in classes:
        mean[name], sd[name], count[name] = {}, {}, {}
        for metric in METRICS:
            m, s, n = mean_sd([case[name][metric] for case in per_case])
            mean[name][metric], sd[name][metric], count[name][metric] = m, s, n
    foreground = {metric: mean_sd([mean[c][metric] for c in classes])[0] for metric in METRICS}
    return {"mean": mean, "sd": sd, "n": count, "foreground_mean": foreground}


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over cases, overall and per domain, from ``[{"case", "domain", "metrics": case_metrics(...)}, ...]``.

    Returns ``{"mean": {class: {metric: value}}, "sd": ..., "n": {class: {metric: cases counted}},
    "foreground_mean": {metric: mean over classes}, "per_domain": {domain: the same four keys}}``. NaN values
    (0/0 cases, see the module docstring) are skipped; a mean over no value is NaN with ``n`` 0.
    """
    out = _class_means([r["metrics"] for r in records])
    domains: dict[str, list] = {}
    for r in records:
        domains.setdefault(str(r["domain"]), []).append(r["metrics"])
    out["per_domain"] = {d: _class_means(cases) for d, cases in domains.items()}
    return out


def mean_dice(per_case: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean Dice per class over cases ``[{"case", "domain", class: {"dice", ...}, ...}]``, NaN cases skipped."""
    classes = [k for k, v in per_case[0].items() if isinstance(v, Mapping) and "dice" in v] if per_case else []
    return {name: mean_sd([c[name]["dice"] for c in per_case])[0] for name in classes}
