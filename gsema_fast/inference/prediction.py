"""Inference: checkpoints rebuilt into networks, sliding-window prediction of whole volumes, preprocessing and
mapping back to each image's own grid, scoring a network on a loader of volumes, and ``predict`` to NIfTI.

Nothing here needs the trainer: :func:`load_checkpoint` and :func:`predict` work on any checkpoint that follows the
trainer's contract (a dict with ``config``, ``student``, ``teacher``), and :func:`score_volumes` is what the trainer
validates with, so the loop, ``evaluate`` and ``lodo`` score alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import nn
from tqdm.auto import tqdm

from gsema_fast import distributed
from gsema_fast.config import Config, config_from_dict, config_to_dict
from gsema_fast.data import PREPROCESSING_KEYS, Preprocessing, unwrap_transform_error
from gsema_fast.evaluation.metrics import case_metrics, mean_dice, voxel_spacing
from gsema_fast.files import WriteError, atomic_path, check_writable, first_line, read_checkpoint
from gsema_fast.models import build_model

log = logging.getLogger(__name__)

__all__ = [
    "AMP_DTYPES",
    "LoadedCheckpoint",
    "amp_dtype",
    "load_checkpoint",
    "load_nifti",
    "predict",
    "predict_volume",
    "preprocess_case",
    "save_nifti_like",
    "score_volumes",
    "segment_case",
    "to_original_grid",
]

# Autocast type of each ``train.amp`` setting (``auto`` is resolved per device: bf16 on CUDA, fp32 elsewhere).
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str, device: torch.device, *, inference: bool = False) -> torch.dtype | None:
    """Autocast type of the ``train.amp`` setting ``amp`` on ``device``. ``inference``: none on the CPU whatever the
    setting, where 3D convolutions under autocast are far slower than fp32."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "fp32"
    if amp not in AMP_DTYPES:
        raise ValueError(f"train.amp={amp!r}: expected one of auto, {', '.join(AMP_DTYPES)}")
    if inference and device.type != "cuda":
        return None
    return AMP_DTYPES[amp]


# ---------------------------------------------------------------------------------------- sliding-window inference
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


# ------------------------------------------------------------------------------------------------ checkpoints
# Checkpoint entries that hold training state; everything else is small metadata.
_STATE_KEYS = ("config", "student", "teacher", "optimizer", "scheduler", "scaler", "updater", "rng", "target_transform")


@dataclasses.dataclass
class LoadedCheckpoint:
    """A network rebuilt from a checkpoint, in eval mode on ``device``, with the config it was trained with."""

    net: nn.Module
    config: Config
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


def _merge_config(ck_cfg: Config, override: Config | None, path: Path) -> Config:
    """The checkpoint's config, with data and eval settings taken from ``override`` where they do not conflict
    (a --config that changed the preprocessing would feed the weights other inputs)."""
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
        for k in PREPROCESSING_KEYS
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
        amp_dtype(cfg.train.amp, dev, inference=True),
        extra={k: v for k, v in ck.items() if k not in _STATE_KEYS},
    )


# ------------------------------------------------------------------------------------- preprocessing, inversion
def preprocess_case(transform, item: dict) -> dict:
    """``transform(item)`` (a :meth:`Preprocessing.transforms`); a failing transform raises the error that names
    the file and the problem rather than MONAI's wrapper around it."""
    try:
        return transform(item)
    except RuntimeError as err:
        found = unwrap_transform_error(err)
        if found is err:
            raise
        raise found from None


def to_original_grid(transform, probs: torch.Tensor, image) -> torch.Tensor:
    """Class probabilities ``[C, ...]`` on the preprocessed grid, resampled onto the image's original voxel grid by
    inverting the preprocessing's spatial transforms (orientation, spacing) recorded on ``image``."""
    pred = MetaTensor(probs.cpu(), meta=dict(image.meta), applied_operations=list(image.applied_operations))
    return torch.as_tensor(transform.inverse({"image": pred})["image"]).as_subclass(torch.Tensor)


def segment_case(
    loaded: LoadedCheckpoint, transform, item: dict, *, overlap: float, sw_batch_size: int, mode: str
) -> tuple[torch.Tensor, dict]:
    """Preprocess one case (``{"image": path, "case": name}``, optionally ``"label"``), run sliding-window inference,
    and return class probabilities ``[C, ...]`` on the image's original grid, and the preprocessed item."""
    data = preprocess_case(transform, item)
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
    bad = int((~torch.isfinite(probs)).sum())
    if bad:  # nothing can be computed from it: a label map of argmax over NaN would be a silent background
        raise ValueError(
            f"case {item.get('case', item['image'])}: the network's output is not finite in {bad} of {probs.numel()} "
            f"values; no segmentation can be computed from it"
        )
    return to_original_grid(transform, probs, image), data


def load_nifti(path: str | os.PathLike):
    """The nibabel image at ``path`` (data read lazily)."""
    return nib.load(str(path))


def save_nifti_like(data: np.ndarray, like, path: Path) -> None:
    """``data`` on ``like``'s voxel grid, with its affine and header (data type and scaling set for ``data``)."""
    header = like.header.copy()
    header.set_data_dtype(data.dtype)
    img = type(like)(data, like.affine, header=header)
    # The input's scaling (scl_slope / scl_inter) describes its intensities, not labels or probabilities.
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:  # its name keeps the real ending, from which nibabel picks compression
        img.to_filename(str(tmp))


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


def _refuse_outputs_among_inputs(out: Path, inputs: Sequence[Path], files: Sequence[Path]) -> None:
    """An output folder that is the folder of an input, or lies inside an input folder, would mix label maps with the
    scans (and a label map named like its scan would replace it); a run on that folder would read them as inputs."""
    where = out.resolve()
    folders = [p.resolve() for p in inputs if p.is_dir()]
    for folder in dict.fromkeys([*folders, *(f.parent.resolve() for f in files)]):
        if where == folder or (folder in folders and folder in where.parents):
            inside = "is the folder" if where == folder else "lies inside the folder"
            raise ValueError(
                f"--output {out} {inside} {folder} of the inputs: the label maps would land among the scans (and be "
                f"read as inputs next time); choose an output folder outside it"
            )


def _output_names(files: Sequence[Path], names: Sequence[str], *, probabilities: bool) -> list[str]:
    """Every output's file name; refuses inputs whose outputs would be one file (``a.nii`` and ``a.nii.gz``, or
    ``a``'s probabilities and the label map of ``a_probabilities``)."""
    owners: dict[str, list[str]] = {}
    for path, name in zip(files, names, strict=True):
        owners.setdefault(f"{name}.nii.gz", []).append(f"the label map of {path}")
        if probabilities:
            owners.setdefault(f"{name}_probabilities.nii.gz", []).append(f"the probabilities of {path}")
    for target, who in owners.items():
        if len(who) > 1:
            raise ValueError(
                f"inputs would overwrite each other's outputs: {target} would be {' and '.join(who)}; rename an "
                f"input, or predict them into separate --output folders"
            )
    return list(owners)


def _refuse_existing_outputs(out: Path, targets: Sequence[str], *, overwrite: bool) -> None:
    existing = [t for t in targets if (out / t).exists()]
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
    ``overwrite``; so are an ``output_dir`` that is the folder of an input (or lies inside an input folder), and
    inputs whose outputs would be one file. A file that fails (unreadable, or a network output that is not finite)
    is logged with the reason (one line) and skipped; the others still run; an output that cannot be written
    (read-only folder, full disk) stops the run. Returns ``{"written": [paths], "failed": {input: reason}}``.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; expected a folder (created if missing)")
    files = _input_files(inputs)
    names = [_case_name(f) for f in files]
    given = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    _refuse_outputs_among_inputs(out, given, files)
    _refuse_existing_outputs(out, _output_names(files, names, probabilities=probabilities), overwrite=overwrite)
    loaded = load_checkpoint(checkpoint, weights=weights, device=device, config=config)
    cfg = loaded.config
    check_writable(out)
    overlap = cfg.eval.overlap if overlap is None else overlap
    sw_batch_size = cfg.eval.sw_batch_size if sw_batch_size is None else sw_batch_size
    transform = Preprocessing.from_config(cfg.data).transforms(labels=None)
    written: list[Path] = []
    failed: dict[str, str] = {}
    log.info("predicting %d file(s) with the %s of %s on %s", len(files), loaded.weights, loaded.path, loaded.device)
    for path, name in tqdm(list(zip(files, names, strict=True)), desc="predict", unit="file", disable=None):
        try:
            probs, _ = segment_case(
                loaded,
                transform,
                {"image": str(path), "case": name},
                overlap=overlap,
                sw_batch_size=sw_batch_size,
                mode=cfg.eval.mode,
            )
            like = load_nifti(path)
            grid = tuple(like.shape[:3])
            if tuple(probs.shape[1:]) != grid:
                raise ValueError(
                    f"the prediction mapped back to the image grid has shape {tuple(probs.shape[1:])}, the image {grid}"
                )
            target = out / f"{name}.nii.gz"
            save_nifti_like(probs.argmax(0).numpy().astype(np.uint8), like, target)
            written.append(target)
            if probabilities:
                target = out / f"{name}_probabilities.nii.gz"
                save_nifti_like(np.ascontiguousarray(probs.permute(1, 2, 3, 0).numpy(), dtype=np.float32), like, target)
                written.append(target)
        except WriteError:
            raise
        except Exception as err:  # one bad file must not stop the others; the reason is reported
            reason = first_line(unwrap_transform_error(err))
            log.error("%s: failed: %s", path, reason)
            failed[str(path)] = reason
    log.info("wrote %d file(s) to %s; %d input(s) failed", len(written), out, len(failed))
    return {"written": written, "failed": failed}


# ------------------------------------------------------------------------------------------ scoring in the loop
def score_volumes(
    net: nn.Module,
    loader,
    labels: Mapping[str, Any],
    cfg: Config,
    *,
    amp: torch.dtype | None = None,
    hd95: bool = False,
    desc: str = "score",
) -> dict:
    """Metrics of ``net`` on whole preprocessed volumes (a :func:`gsema_fast.data.volume_loader`), by sliding window
    with the config's patch size and ``eval`` settings: ``{"cases": [{"case", "domain", class: metrics}], "mean":
    {class: mean Dice}}``, in mm and ml from each volume's affine (the numbers ``evaluate`` computes on the image's
    own grid when ``data.spacing`` is None). In a multi-process run ``loader`` holds this rank's share of the cases
    (or is None) and every rank returns the metrics of all cases, gathered, in the single-process order."""
    try:
        device = next(net.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    per_case = []
    for item in tqdm(loader or [], desc=desc, leave=False, disable=not distributed.is_main_process()):
        logits = predict_volume(
            net,
            item["image"].to(device),
            roi_size=cfg.data.patch_size,
            overlap=cfg.eval.overlap,
            sw_batch_size=cfg.eval.sw_batch_size,
            mode=cfg.eval.mode,
            amp_dtype=amp,
        )
        spacing = voxel_spacing(np.asarray(item["image"].affine))
        metrics = case_metrics(logits.argmax(1)[0].cpu(), item["label"][0, 0].cpu(), labels, spacing, hd95=hd95)
        per_case.append({"case": item["case"][0], "domain": str(item["domain"][0]), **metrics})
    if distributed.world_size() > 1:
        shares = distributed.all_gather_object(per_case)
        # rank r scored cases r, r + world, r + 2 world, ...
        longest = max(map(len, shares))
        per_case = [share[i] for i in range(longest) for share in shares if i < len(share)]
    return {"cases": per_case, "mean": mean_dice(per_case)}
