"""Prediction: one case segmented on its own grid (:func:`segment_case`), and ``predict``: NIfTI files in, label
maps out, with the refusals that keep outputs off the inputs and off each other."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gsema_fast.config import Config, EvalConfig, replace
from gsema_fast.data import Preprocessing, unwrap_transform_error
from gsema_fast.files import WriteError, check_writable, first_line
from gsema_fast.inference.checkpoint import LoadedCheckpoint, load_checkpoint
from gsema_fast.inference.nifti import load_nifti, save_nifti_like
from gsema_fast.inference.postprocess import label_map
from gsema_fast.inference.window import predict_volume, preprocess_case, to_original_grid

log = logging.getLogger(__name__)


def segment_case(
    loaded: LoadedCheckpoint, transform, item: dict, settings: EvalConfig | None = None
) -> tuple[torch.Tensor, dict]:
    """Preprocess one case (``{"image": path, "case": name}``, optionally ``"label"``), run sliding-window inference
    with ``settings`` (None: the checkpoint config's ``eval`` section), and return class probabilities ``[C, ...]``
    on the image's original grid, and the preprocessed item."""
    data = preprocess_case(transform, item)
    image = data["image"]
    batch = image[None].to(loaded.device)
    cfg = loaded.config
    logits = predict_volume(
        loaded.net,
        batch,
        roi_size=cfg.data.patch_size,
        settings=cfg.eval if settings is None else settings,
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


def eval_settings(cfg: Config, **given: Any) -> EvalConfig:
    """``cfg``'s ``eval`` section with the settings ``given`` that are not None (a command's ``--overlap``, ...),
    checked as the config checks them."""
    return replace(cfg.eval, **{key: value for key, value in given.items() if value is not None})


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


def _postprocess_labels(loaded: LoadedCheckpoint, settings: EvalConfig) -> dict[str, int]:
    """The label map the checkpoint was trained with, which ``eval.postprocess`` names its classes in; checked before
    any file is read, so that a rule naming an unknown class fails at once."""
    labels = loaded.trained_labels
    if labels is None:
        if settings.postprocess:
            raise ValueError(
                f"checkpoint {loaded.path} records no label map (it predates them), so eval.postprocess "
                f"({settings.postprocess.describe()}) cannot name its classes; set eval.postprocess.keep_largest=[] "
                f"and eval.postprocess.attached=[]"
            )
        return {}
    settings.postprocess.check(labels, f"the label map of checkpoint {loaded.path}")
    return labels


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
    overrides=(),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Segment NIfTI files (a file, a folder of them, or a list) and write ``<case>.nii.gz`` label volumes.

    Each output has its input's voxel grid, affine and header (uint8 labels; ``case_0000.nii.gz`` gives
    ``case.nii.gz``). ``probabilities`` also writes ``<case>_probabilities.nii.gz`` (float32, classes along the 4th
    axis). Any volume size works (sliding windows, padding). Outputs already in ``output_dir`` are refused unless
    ``overwrite``; so are an ``output_dir`` that is the folder of an input (or lies inside an input folder), and
    inputs whose outputs would be one file. A file that fails (unreadable, or a network output that is not finite)
    is logged with the reason (one line) and skipped; the others still run; an output that cannot be written
    (read-only folder, full disk) stops the run. ``config`` and ``overrides`` change the inference settings
    (``eval.*``, ``train.amp``) as :func:`~gsema_fast.inference.load_checkpoint` takes them; ``overlap`` and
    ``sw_batch_size`` given win. The label maps are post-processed as ``eval.postprocess`` asks (the checkpoint's,
    unless changed so), by the class names of the label map the checkpoint was trained with. Returns
    ``{"written": [paths], "failed": {input: reason}}``.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file; expected a folder (created if missing)")
    files = _input_files(inputs)
    names = [_case_name(f) for f in files]
    given = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    _refuse_outputs_among_inputs(out, given, files)
    _refuse_existing_outputs(out, _output_names(files, names, probabilities=probabilities), overwrite=overwrite)
    loaded = load_checkpoint(checkpoint, weights=weights, device=device, config=config, overrides=overrides)
    cfg = loaded.config
    settings = eval_settings(cfg, overlap=overlap, sw_batch_size=sw_batch_size)
    labels = _postprocess_labels(loaded, settings)
    check_writable(out)
    transform = Preprocessing.from_config(cfg.data).transforms(labels=None)
    written: list[Path] = []
    failed: dict[str, str] = {}
    log.info("predicting %d file(s) with the %s of %s on %s", len(files), loaded.weights, loaded.path, loaded.device)
    if settings.mirror_axes:
        log.info("test-time mirroring along axes %s", settings.mirror_axes)
    if settings.postprocess:
        log.info("label maps post-processed: %s", settings.postprocess.describe())
    for path, name in tqdm(list(zip(files, names, strict=True)), desc="predict", unit="file", disable=None):
        try:
            probs, _ = segment_case(loaded, transform, {"image": str(path), "case": name}, settings)
            like = load_nifti(path)
            grid = tuple(like.shape[:3])
            if tuple(probs.shape[1:]) != grid:
                raise ValueError(
                    f"the prediction mapped back to the image grid has shape {tuple(probs.shape[1:])}, the image {grid}"
                )
            target = out / f"{name}.nii.gz"
            save_nifti_like(label_map(probs, labels, settings.postprocess), like, target)
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
