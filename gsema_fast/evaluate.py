"""Metrics, full-volume sliding-window prediction and evaluation of checkpoints (experiments: gsema_fast.lodo).

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

Nothing here needs the trainer: ``evaluate`` and ``predict`` work on any checkpoint that follows the trainer's
contract (a dict with ``config``, ``student``, ``teacher``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gsema_fast.files import (
    WriteError,
    atomic_path,
    check_writable,
    first_line,
    jsonable,
    read_checkpoint,
    write_csv,
    write_json,
)

log = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "LoadedCheckpoint",
    "case_metrics",
    "evaluate",
    "load_checkpoint",
    "mean_sd",
    "predict",
    "predict_volume",
    "summarize",
]

# Order of the columns in tables and CSV files.
METRICS = ("dice", "sensitivity", "jaccard", "volume_similarity", "hd95")
_BACKGROUND_NAMES = ("background", "bg")


# --------------------------------------------------------------------------------------------------- inference
def _first_conv_in_channels(net: nn.Module) -> int | None:
    for module in net.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return None


def _logits_of(net: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        # (logits, latent) from gsema_fast.models; a plain segmentation network returns logits alone.
        return out[0] if isinstance(out, (tuple, list)) else out

    return forward


def predict_volume(
    net: nn.Module,
    image: torch.Tensor,
    *,
    roi_size: Sequence[int] | int,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    mode: str = "gaussian",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Logits ``[B, out_channels, D, H, W]`` (float32) of a whole volume ``image [B, C, D, H, W]``.

    MONAI ``sliding_window_inference`` over windows of ``roi_size`` (the training patch size) with ``overlap`` and
    ``mode`` blending (gaussian weights the window centres, where the network saw the most context). Any volume size
    works: a volume smaller than the window is padded, and the last windows of a size that is not a multiple of the
    window step are shifted back inside the volume. Windows run on the network's device, ``sw_batch_size`` at a time;
    the output is assembled on ``image``'s device, so a large volume can stay in host memory while the network runs
    on a GPU. ``amp_dtype`` (``torch.bfloat16`` or ``torch.float16``) autocasts the network on CUDA and is ignored
    on the CPU. The network runs in eval mode under ``torch.no_grad`` and its mode is restored afterwards.
    """
    from monai.inferers import sliding_window_inference

    if image.ndim != 5:
        raise ValueError(f"image: expected a batch [B, C, D, H, W], got shape {tuple(image.shape)}")
    expected = _first_conv_in_channels(net)
    if expected is not None and image.shape[1] != expected:
        raise ValueError(f"image has {image.shape[1]} channel(s) but the network takes {expected}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap={overlap}: expected a fraction in [0, 1)")
    roi = [int(roi_size)] * 3 if isinstance(roi_size, int) else [int(r) for r in roi_size]
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size={roi_size}: expected three positive sizes")
    try:
        net_device = next(net.parameters()).device
    except StopIteration:
        net_device = image.device
    use_amp = amp_dtype is not None and net_device.type == "cuda"
    was_training = net.training
    net.eval()
    try:
        autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
        # no_grad rather than inference_mode: callers may later modify the result in place (inference tensors
        # refuse that outside inference mode).
        with torch.no_grad(), autocast:
            # Padding with the image minimum, as training pads small volumes: no signal outside the field of view.
            logits = sliding_window_inference(
                image,
                roi,
                sw_batch_size,
                _logits_of(net),
                overlap=overlap,
                mode=mode,
                padding_mode="constant",
                cval=float(image.min()) if image.numel() else 0.0,
                sw_device=net_device,
                device=image.device,
                progress=progress,
            )
    finally:
        net.train(was_training)
    logits = torch.as_tensor(logits)
    # A MetaTensor would carry the image's meta into the caller's arithmetic; callers that need it have the image.
    return logits.as_subclass(torch.Tensor).float()


# ------------------------------------------------------------------------------------------------------ metrics
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
    from monai.metrics import compute_hausdorff_distance

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


# -------------------------------------------------------------------------------------------------- checkpoints
# Settings that decide what the network sees; a --config that changes them would feed the weights other inputs.
_PREPROCESSING_KEYS = ("spacing", "clip_percentiles", "intensity")


# Checkpoint entries that hold training state; everything else is small metadata.
_STATE_KEYS = ("config", "student", "teacher", "optimizer", "scheduler", "scaler", "updater", "rng", "target_transform")


@dataclasses.dataclass
class LoadedCheckpoint:
    """A network rebuilt from a checkpoint, in eval mode on ``device``, with the config it was trained with."""

    net: nn.Module
    config: Any  # gsema_fast.config.Config
    path: Path
    weights: str
    step: int | None
    epoch: int | None
    device: torch.device
    amp_dtype: torch.dtype | None = None
    # The checkpoint's other entries (best score, untrained baseline, ...), without weights and optimizer state.
    extra: dict = dataclasses.field(repr=False, default_factory=dict)


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A state dict taken from a compiled or DDP-wrapped module carries these prefixes on every key.
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA device is available")
    return device


def _merge_config(ck_cfg, override, path: Path):
    """The checkpoint's config, with data and eval settings taken from ``override`` where they do not conflict."""
    from gsema_fast.config import config_from_dict, config_to_dict

    if override is None:
        return ck_cfg
    mine, theirs = config_to_dict(ck_cfg), config_to_dict(override)
    conflicts = [
        f"model.{k}: checkpoint {mine['model'][k]!r}, config {theirs['model'][k]!r}"
        for k in mine["model"]
        if mine["model"][k] != theirs["model"].get(k)
    ]
    conflicts += [
        f"data.{k}: checkpoint {mine['data'][k]!r}, config {theirs['data'][k]!r}"
        for k in _PREPROCESSING_KEYS
        if mine["data"][k] != theirs["data"][k]
    ]
    if conflicts:
        raise ValueError(
            f"checkpoint {path} was trained with other model or preprocessing settings than the given "
            f"config; drop --config or make these agree:\n  " + "\n  ".join(conflicts)
        )
    merged = dict(mine)
    merged["data"] = theirs["data"]
    merged["eval"] = theirs["eval"]
    return config_from_dict(merged)


def load_checkpoint(
    path: str | os.PathLike, *, weights: str | None = None, device: str | torch.device | None = None, config=None
) -> LoadedCheckpoint:
    """Rebuild the ``weights`` network (``teacher`` or ``student``; None: the config's ``eval.weights``, by default
    the teacher, the domain-generalised model) of a trainer checkpoint, on ``device`` (None: CUDA if available).

    The model is built from the config stored in the checkpoint (``build_model(cfg.model)``). ``config``: a
    :class:`~gsema_fast.config.Config` whose data and eval sections replace the stored ones (another dataset,
    other inference settings); its model section and preprocessing (``data.spacing``, ``data.clip_percentiles``,
    ``data.intensity``) must equal the checkpoint's. Every failure (missing or unreadable file, missing keys,
    weights that do not fit the stored model config, a conflicting ``config``) raises ``FileNotFoundError`` or
    ``ValueError`` with the file and the reason.
    """
    from gsema_fast.config import config_from_dict
    from gsema_fast.models import build_model

    path = Path(path)
    if weights not in (None, "teacher", "student"):
        raise ValueError(f"weights={weights!r}: expected 'teacher' or 'student'")
    ck = read_checkpoint(path)  # tensors, numbers, strings and containers only: loading runs no code
    if not isinstance(ck, Mapping) or "config" not in ck:
        found = f"keys: {', '.join(map(str, ck))}" if isinstance(ck, Mapping) else f"a {type(ck).__name__}"
        raise ValueError(f"checkpoint {path}: no 'config' entry ({found}); it was not written by gsema-fast train")
    try:
        cfg = config_from_dict(ck["config"])
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: its stored config is not valid here: {err}") from err
    cfg = _merge_config(cfg, config, path)
    weights = weights or cfg.eval.weights
    if weights not in ck:
        raise ValueError(
            f"checkpoint {path}: no {weights!r} weights (keys: {', '.join(map(str, ck))}); it was not "
            f"written by gsema-fast train"
        )
    net = build_model(cfg.model)
    state = _strip_wrappers(ck[weights])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        model = cfg.model
        detail = str(err).split("\n", 1)[-1].strip()
        raise ValueError(
            f"checkpoint {path}: its {weights} weights do not fit the model its config describes (model.name="
            f"{model.name}, feature_size={model.feature_size}, channels={model.channels}, out_channels="
            f"{model.out_channels}); the file mixes weights and config of different models:\n{detail[:1500]}"
        ) from None
    dev = _resolve_device(device)
    net.to(dev).eval()
    return LoadedCheckpoint(
        net,
        cfg,
        path,
        weights,
        ck.get("step"),
        ck.get("epoch"),
        dev,
        _amp_dtype(cfg, dev),
        extra={k: v for k, v in ck.items() if k not in _STATE_KEYS},
    )


def _amp_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """Autocast type for inference: the run's ``train.amp`` (``auto``: bf16) on CUDA, none on the CPU (where 3D
    convolutions under autocast are far slower than fp32)."""
    if device.type != "cuda":
        return None
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)


# ------------------------------------------------------------------------------------- preprocessing, inversion
def _unwrap_error(err: BaseException) -> BaseException:
    """MONAI re-raises a failing transform as ``RuntimeError("applying transform ...")``, nested once per Compose;
    find the error that names the file and the problem (else the innermost one, where it started)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (ValueError, FileNotFoundError)):
            return seen
        if seen.__cause__ is None:
            return seen
        seen = seen.__cause__
    return err


def _preprocess(transform, item: dict) -> dict:
    try:
        return transform(item)
    except RuntimeError as err:
        found = _unwrap_error(err)
        if found is err:
            raise
        raise found from None


def _to_original_grid(transform, probs: torch.Tensor, image) -> torch.Tensor:
    """Class probabilities ``[C, ...]`` on the preprocessed grid, resampled onto the image's original voxel grid by
    inverting the preprocessing's spatial transforms (orientation, spacing) recorded on ``image``."""
    from monai.data import MetaTensor

    pred = MetaTensor(probs.cpu(), meta=dict(image.meta), applied_operations=list(image.applied_operations))
    return torch.as_tensor(transform.inverse({"image": pred})["image"]).as_subclass(torch.Tensor)


def _segment(
    loaded: LoadedCheckpoint, transform, item: dict, *, overlap: float, sw_batch_size: int, mode: str
) -> tuple[torch.Tensor, dict]:
    """Preprocess one case, run sliding-window inference, and return class probabilities on its original grid."""
    data = _preprocess(transform, item)
    image = data["image"]
    batch = image[None].to(loaded.device)
    cfg = loaded.config
    logits = predict_volume(
        loaded.net,
        batch,
        roi_size=cfg.data.patch_size,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        mode=mode,
        amp_dtype=loaded.amp_dtype,
    )
    probs = torch.softmax(logits[0], dim=0)
    return _to_original_grid(transform, probs, image), data


def _voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def _load_nifti(path: Path):
    import nibabel as nib

    return nib.load(str(path))


def _save_nifti_like(data: np.ndarray, like, path: Path) -> None:
    """``data`` on ``like``'s voxel grid, with its affine and header (data type and scaling set for ``data``)."""
    header = like.header.copy()
    header.set_data_dtype(data.dtype)
    img = type(like)(data, like.affine, header=header)
    # The input's scaling (scl_slope / scl_inter) describes its intensities, not labels or probabilities.
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:  # its name keeps the real ending, from which nibabel picks compression
        img.to_filename(str(tmp))


def _dataset_root(cfg, data: str | os.PathLike | None) -> tuple[Path, str | None]:
    if data is not None:
        return Path(data), None
    from gsema_fast.data import dataset_folder

    return dataset_folder(cfg.data), cfg.data.manifest if cfg.data.root is not None else None


def _select_cases(man, cfg, *, split: str, domain) -> tuple[list, list[str]]:
    from gsema_fast.data import split_cases

    if split not in ("test", "val", "all"):
        raise ValueError(f"split={split!r}: expected 'test', 'val' or 'all'")
    wanted = None
    if domain is not None:
        wanted = [str(d) for d in (domain if isinstance(domain, (list, tuple)) else [domain])]
        unknown = [d for d in wanted if d not in man.domains]
        if unknown:
            raise ValueError(f"domain {unknown[0]!r} has no cases in {man.path}; domains present: {man.domains}")
    test_domain = cfg.data.test_domain if cfg.data.test_domain is not None else man.domains[-1]
    trained_on = (
        [str(d) for d in cfg.data.train_domains]
        if cfg.data.train_domains is not None
        else [d for d in man.domains if d != str(test_domain)]
    )
    if split == "all":
        cases = [c for c in man.cases if wanted is None or c.domain in wanted]
    elif split == "val":
        # The trainer holds out validation cases with split_cases(seed=train.seed); the same call finds them again.
        held_out = split_cases(
            man, train_domains=trained_on, test_domain=None, val_per_domain=cfg.data.val_per_domain, seed=cfg.train.seed
        ).val
        cases = [c for c in held_out if wanted is None or c.domain in wanted]
    else:
        wanted = wanted or [str(test_domain)]
        seen = [d for d in wanted if d in trained_on]
        if seen:
            log.warning(
                "domain(s) %s were training domains of this checkpoint: their scores are not those of an unseen centre",
                ", ".join(seen),
            )
        cases = [c for c in man.cases if c.domain in wanted]
    if not cases:
        raise ValueError(f"no cases to evaluate in {man.path} (split={split}, domain={domain})")
    return cases, sorted({c.domain for c in cases}, key=man.domains.index)


def evaluate(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    domain=None,
    split: str = "test",
    weights: str | None = None,
    out_dir: str | os.PathLike | None = None,
    figures: bool = False,
    compare: Sequence[str | os.PathLike] = (),
    config=None,
    device: str | torch.device | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    save_predictions: bool = False,
    hd95: bool = True,
    tsne_cases_per_domain: int = 3,
    tsne_patches_per_case: int = 8,
) -> dict[str, Any]:
    """Score a checkpoint's network on whole volumes and write ``summary.json`` and ``metrics.csv`` to ``out_dir``.

    ``data``: dataset folder (default: the one in the checkpoint's config). ``split``: ``test`` (the cases of
    ``domain``, default the checkpoint's unseen centre), ``val`` (the held-out cases of its training centres) or
    ``all``; ``domain`` (a name or list) narrows any split. ``weights``: ``teacher`` (default, via the config's
    ``eval.weights``) or ``student``. Each volume is preprocessed as in training, segmented by sliding-window
    inference (``eval.overlap``, ``eval.sw_batch_size``, ``eval.mode`` unless given; AMP on CUDA per
    ``train.amp``), its class probabilities resampled back to the image's own grid, and scored there against the
    reference with :func:`case_metrics` (spacing from the reference's affine). ``out_dir`` default:
    ``<run folder>/evaluation_<checkpoint name>``. ``save_predictions`` writes label NIfTIs to ``out_dir/predictions``.
    ``figures``: per-case MIPs (``figures/<case>.png``) and a t-SNE of teacher latents of up to
    ``tsne_cases_per_domain`` cases of every centre (``figures/tsne.png``), one panel per checkpoint (this one,
    then ``compare``). Returns the summary (as written to ``summary.json``, NaN as None) plus ``out_dir``.
    """
    from tqdm.auto import tqdm

    from gsema_fast.data import load_manifest, preprocess_transforms

    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint, weights=weights, device=device, config=config)
    cfg = loaded.config
    root, manifest = _dataset_root(cfg, data)
    man = load_manifest(root, manifest)
    cases, domains = _select_cases(man, cfg, split=split, domain=domain)
    overlap = cfg.eval.overlap if overlap is None else overlap
    sw_batch_size = cfg.eval.sw_batch_size if sw_batch_size is None else sw_batch_size
    if out_dir is None:
        # The trainer keeps checkpoints in <run>/checkpoints/; results belong beside them, in the run folder.
        run = loaded.path.parent.parent if loaded.path.parent.name == "checkpoints" else loaded.path.parent
        out_dir = run / f"evaluation_{loaded.path.stem}"
    out = check_writable(out_dir)  # before the work, not at its first result
    if save_predictions:
        (out / "predictions").mkdir(exist_ok=True)
    if figures:
        from gsema_fast import figures as figs

        (out / "figures").mkdir(exist_ok=True)
    transform = preprocess_transforms(
        labels=man.labels,
        spacing=cfg.data.spacing,
        clip_percentiles=cfg.data.clip_percentiles,
        intensity=cfg.data.intensity,
    )
    log.info(
        "evaluating the %s of %s (step %s) on %d case(s) of domain(s) %s (%s split) on %s",
        loaded.weights,
        loaded.path,
        loaded.step,
        len(cases),
        ", ".join(domains),
        split,
        loaded.device,
    )

    records = []
    for case in tqdm(cases, desc="evaluate", unit="case", disable=None):
        t0 = time.perf_counter()
        item = {"image": str(case.image), "label": str(case.label), "case": case.name}
        probs, _ = _segment(loaded, transform, item, overlap=overlap, sw_batch_size=sw_batch_size, mode=cfg.eval.mode)
        pred = probs.argmax(0).numpy().astype(np.uint8)
        ref_img = _load_nifti(case.label)
        ref = np.asarray(ref_img.dataobj).astype(np.int64).reshape(ref_img.shape[:3])
        if pred.shape != ref.shape:
            raise ValueError(
                f"case {case.name}: the prediction mapped back to the image grid has shape {pred.shape} "
                f"but the label {case.label} has shape {ref.shape}"
            )
        spacing = _voxel_spacing(ref_img.affine)
        metrics = case_metrics(pred, ref, man.labels, spacing, hd95=hd95)
        record = {
            "case": case.name,
            "domain": case.domain,
            "image": case.image,
            "reference": case.label,
            "spacing": spacing,
            "metrics": metrics,
            "seconds": time.perf_counter() - t0,
        }
        if save_predictions:
            record["prediction"] = out / "predictions" / f"{case.name}{man.file_ending}"
            _save_nifti_like(pred, ref_img, record["prediction"])
        if figures:
            image = np.asarray(_load_nifti(case.image).dataobj, dtype=np.float32).reshape(ref.shape)
            figs.plot_case_mips(
                image,
                pred,
                ref,
                ref_img.affine,
                man.labels,
                out / "figures" / f"{case.name}.png",
                title=f"{case.name} (centre {case.domain}), {loaded.weights} of {loaded.path.name}",
            )
        log.debug("%s: %s", case.name, {c: round(m["dice"], 4) for c, m in metrics.items()})
        records.append(record)

    summary = {
        "checkpoint": loaded.path,
        "weights": loaded.weights,
        "step": loaded.step,
        "epoch": loaded.epoch,
        "dataset": man.path,
        "split": split,
        "domains": domains,
        "labels": man.labels,
        "device": str(loaded.device),
        "inference": {
            "roi_size": list(cfg.data.patch_size),
            "overlap": overlap,
            "sw_batch_size": sw_batch_size,
            "mode": cfg.eval.mode,
        },
        "conventions": "0/0 metrics are NaN (null here) and skipped by the means; n counts the cases in each mean",
        **summarize(records),
        "metric_per_case": records,
    }
    if figures:
        # The t-SNE is of teacher latents whichever weights were scored.
        first = loaded if loaded.weights == "teacher" else loaded.path
        figs.latent_tsne(
            [first, *compare],
            man,
            out / "figures" / "tsne.png",
            cases_per_domain=tsne_cases_per_domain,
            patches_per_case=tsne_patches_per_case,
            device=loaded.device,
            config=config,
        )
    summary["seconds"] = time.perf_counter() - started
    write_json(summary, out / "summary.json")
    rows = [
        {"case": r["case"], "domain": r["domain"], "class": name, **m}
        for r in records
        for name, m in r["metrics"].items()
    ]
    write_csv(rows, out / "metrics.csv", ["case", "domain", "class", *METRICS, "tp", "fp", "fn", "ref_ml", "pred_ml"])
    for name, m in summary["mean"].items():
        log.info(
            "%-10s dice %.4f  sens %.4f  jacc %.4f  vs %.4f  hd95 %.2f mm  (n=%d)",
            name,
            m["dice"],
            m["sensitivity"],
            m["jaccard"],
            m["volume_similarity"],
            m["hd95"],
            summary["n"][name]["dice"],
        )
    log.info("wrote %s and %s (%.1f s)", out / "summary.json", out / "metrics.csv", summary["seconds"])
    result = jsonable(summary)
    result["out_dir"] = out
    return result


def _input_files(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.name.endswith((".nii.gz", ".nii")) and p.is_file())
            if not found:
                raise ValueError(f"input folder {path} holds no .nii or .nii.gz file")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return files


def _case_name(path: Path) -> str:
    name = path.name
    for ending in (".nii.gz", ".nii"):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    # nnU-Net names the first channel of case X "X_0000"; its prediction is "X".
    return name.removesuffix("_0000")


def _refuse_existing_outputs(out: Path, names: Sequence[str], *, probabilities: bool, overwrite: bool) -> None:
    suffixes = ("", "_probabilities") if probabilities else ("",)
    existing = [f"{n}{s}.nii.gz" for n in names for s in suffixes if (out / f"{n}{s}.nii.gz").exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise FileExistsError(
            f"--output {out} already holds {len(existing)} of the outputs ({shown}); pass --overwrite to replace them"
        )


def predict(
    checkpoint: str | os.PathLike,
    inputs,
    output_dir: str | os.PathLike,
    *,
    probabilities: bool = False,
    weights: str | None = None,
    device: str | torch.device | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    config=None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Segment NIfTI files (a file, a folder of them, or a list) and write ``<case>.nii.gz`` label volumes.

    Each output has its input's voxel grid, affine and header (uint8 labels; ``case_0000.nii.gz`` gives
    ``case.nii.gz``). ``probabilities`` also writes ``<case>_probabilities.nii.gz`` (float32, classes along the 4th
    axis). Any volume size works (sliding windows, padding). Outputs already in ``output_dir`` are refused unless
    ``overwrite``. A file that fails is logged with the reason (one line) and skipped; the others still run; an
    output that cannot be written (read-only folder, full disk) stops the run. Returns ``{"written": [paths],
    "failed": {input: reason}}``.
    """
    from tqdm.auto import tqdm

    from gsema_fast.data import preprocess_transforms

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; expected a folder (created if missing)")
    files = _input_files(inputs)
    _refuse_existing_outputs(out, [_case_name(f) for f in files], probabilities=probabilities, overwrite=overwrite)
    loaded = load_checkpoint(checkpoint, weights=weights, device=device, config=config)
    cfg = loaded.config
    check_writable(out)
    overlap = cfg.eval.overlap if overlap is None else overlap
    sw_batch_size = cfg.eval.sw_batch_size if sw_batch_size is None else sw_batch_size
    transform = preprocess_transforms(
        labels=None, spacing=cfg.data.spacing, clip_percentiles=cfg.data.clip_percentiles, intensity=cfg.data.intensity
    )
    names = [_case_name(f) for f in files]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"inputs would overwrite each other's outputs: case name(s) {clashes} occur more than once")
    written: list[Path] = []
    failed: dict[str, str] = {}
    log.info("predicting %d file(s) with the %s of %s on %s", len(files), loaded.weights, loaded.path, loaded.device)
    for path, name in tqdm(list(zip(files, names, strict=True)), desc="predict", unit="file", disable=None):
        try:
            probs, _ = _segment(
                loaded,
                transform,
                {"image": str(path), "case": name},
                overlap=overlap,
                sw_batch_size=sw_batch_size,
                mode=cfg.eval.mode,
            )
            like = _load_nifti(path)
            grid = tuple(like.shape[:3])
            if tuple(probs.shape[1:]) != grid:
                raise ValueError(
                    f"the prediction mapped back to the image grid has shape {tuple(probs.shape[1:])}, the image {grid}"
                )
            target = out / f"{name}.nii.gz"
            _save_nifti_like(probs.argmax(0).numpy().astype(np.uint8), like, target)
            written.append(target)
            if probabilities:
                target = out / f"{name}_probabilities.nii.gz"
                _save_nifti_like(
                    np.ascontiguousarray(probs.permute(1, 2, 3, 0).numpy(), dtype=np.float32), like, target
                )
                written.append(target)
        except WriteError:
            raise
        except Exception as err:  # one bad file must not stop the others; the reason is reported
            reason = first_line(_unwrap_error(err))
            log.error("%s: failed: %s", path, reason)
            failed[str(path)] = reason
    log.info("wrote %d file(s) to %s; %d input(s) failed", len(written), out, len(failed))
    return {"written": written, "failed": failed}
