"""Evaluation of a checkpoint on a dataset: whole volumes segmented as in :mod:`gsema_fast.inference`, scored with
:mod:`gsema_fast.evaluation.metrics` on each image's own grid, written as ``summary.json`` and ``metrics.csv`` (and
figures).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gsema_fast.config import Config, EvalConfig, replace
from gsema_fast.data import Case, Manifest, Preprocessing, dataset_folder, load_manifest, run_domains, split_cases
from gsema_fast.evaluation import figures as figs
from gsema_fast.evaluation.metrics import METRICS, case_metrics, summarize, voxel_spacing
from gsema_fast.files import check_writable, jsonable, write_csv, write_json
from gsema_fast.inference.checkpoint import LoadedCheckpoint, load_checkpoint
from gsema_fast.inference.nifti import load_nifti, save_nifti_like
from gsema_fast.inference.postprocess import label_map
from gsema_fast.inference.prediction import eval_settings, segment_case
from gsema_fast.training.runfolder import run_outputs

log = logging.getLogger(__name__)

__all__ = ["clear_evaluation", "evaluate", "evaluation_outputs"]


# What evaluate writes into its folder: the files, and the folders with the endings of the files written into them.
# --overwrite replaces these, and nothing else.
EVALUATION_FILES = ("summary.json", "metrics.csv")
# test: the unseen centre's cases; val: held-out cases of the training centres; all: both
SPLITS = ("test", "val", "all")
EVALUATION_FOLDERS = {"predictions": (".nii.gz", ".nii"), "figures": (".png",)}


def evaluation_outputs(folder: str | os.PathLike) -> list[Path]:
    """The outputs of an evaluation that ``folder`` holds."""
    folder = Path(folder)
    found = [folder / name for name in EVALUATION_FILES if (folder / name).is_file()]
    for sub, endings in EVALUATION_FOLDERS.items():
        if (folder / sub).is_dir():
            found += sorted(p for p in (folder / sub).iterdir() if p.is_file() and p.name.endswith(endings))
    return found


def clear_evaluation(folder: str | os.PathLike) -> list[Path]:
    """Remove the outputs of an evaluation from ``folder`` (other files stay); returns what was removed."""
    removed = evaluation_outputs(folder)
    for path in removed:
        path.unlink()
    for sub in EVALUATION_FOLDERS:
        with contextlib.suppress(OSError):
            (Path(folder) / sub).rmdir()  # only if it is empty now
    return removed


def _check_out(out: Path, *, overwrite: bool) -> list[Path]:
    """An evaluation never lands on a training run's files or on earlier results unless told (``overwrite``);
    returns the earlier results it will replace."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"evaluate: --out {out} is a file; expected a folder")
    run = run_outputs(out)
    if run and not overwrite:
        raise FileExistsError(
            f"evaluate: --out {out} is the folder of a training run ({', '.join(run)}): the evaluation's "
            f"summary.json would replace the run's; choose another --out (by default <run folder>/evaluation_"
            f"<checkpoint name>), or pass --overwrite to replace it"
        )
    previous = evaluation_outputs(out)
    if previous and not overwrite:
        shown = ", ".join(str(p.relative_to(out)) for p in previous[:3]) + (", ..." if len(previous) > 3 else "")
        raise FileExistsError(
            f"evaluate: --out {out} already holds the results of an evaluation ({shown}); pass --overwrite to replace "
            f"them, or choose another --out"
        )
    if previous:
        names = [p.name for p in previous if p.parent == out]
        files = len(previous) - len(names)
        what = ["the training run's summary.json" if run and name == "summary.json" else name for name in names]
        log.warning(
            "--overwrite: the results in %s are replaced (%s)",
            out,
            ", ".join([*what, *([f"{files} prediction/figure file(s)"] if files else [])]),
        )
    return previous


def _check_labels(man: Manifest, loaded: LoadedCheckpoint) -> None:
    """The dataset's label values must mean what they meant to the model: scored under another label map, a class
    would be reported under another's name."""
    trained = loaded.trained_labels
    if trained is not None and trained != dict(man.labels):
        raise ValueError(
            f"evaluate: the label map of {man.path} ({dict(man.labels)}) is not the one {loaded.path} was trained "
            f"with ({trained}): its classes would be scored under other names"
        )
    classes = loaded.config.model.out_channels
    if man.num_classes != classes:
        raise ValueError(
            f"evaluate: {man.path} has {man.num_classes} label values ({dict(man.labels)}) but the network of "
            f"{loaded.path} predicts {classes} classes: its classes would be scored under other names"
        )


def _dataset_root(cfg: Config, data: str | os.PathLike | None) -> tuple[Path, str | None]:
    if data is not None:
        return Path(data), None
    return dataset_folder(cfg.data), cfg.data.manifest if cfg.data.root is not None else None


def _select_cases(man: Manifest, cfg: Config, *, split: str, domain) -> tuple[list, list[str]]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    wanted = None
    if domain is not None:
        wanted = [str(d) for d in (domain if isinstance(domain, (list, tuple)) else [domain])]
        unknown = [d for d in wanted if d not in man.domains]
        if unknown:
            raise ValueError(f"domain {unknown[0]!r} has no cases in {man.path}; domains present: {man.domains}")
    trained_on, test_domain = run_domains(man, cfg.data)
    if split == "all":
        cases = [c for c in man.cases if wanted is None or c.domain in wanted]
    elif split == "val":
        # The trainer holds out validation cases with split_cases(seed=train.seed); the same call finds them again.
        held_out = split_cases(
            man, replace(cfg.data, train_domains=trained_on, test_domain=None), seed=cfg.train.seed
        ).val
        cases = [c for c in held_out if wanted is None or c.domain in wanted]
    else:
        wanted = wanted or [test_domain]
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
    overrides=(),
    device: str | torch.device | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    save_predictions: bool = False,
    hd95: bool = True,
    overwrite: bool = False,
    tsne_cases_per_domain: int = 3,
    tsne_patches_per_case: int = 8,
) -> dict[str, Any]:
    """Score a checkpoint's network on whole volumes and write ``summary.json`` and ``metrics.csv`` to ``out_dir``.

    ``data``: dataset folder (default: the one in the checkpoint's config). ``split``: ``test`` (the cases of
    ``domain``, default the checkpoint's unseen centre), ``val`` (the held-out cases of its training centres) or
    ``all``; ``domain`` (a name or list) narrows any split. ``weights``: ``teacher`` (default, via the config's
    ``eval.weights``) or ``student``. Each volume is preprocessed as in training, segmented by sliding-window
    inference (``eval.overlap``, ``eval.sw_batch_size``, ``eval.mode`` unless given; AMP on CUDA per
    ``train.amp``; ``config`` and ``overrides`` change them as :func:`~gsema_fast.inference.load_checkpoint` takes
    them), its class probabilities resampled back to the image's own grid, and scored there against the
    reference with :func:`case_metrics` (spacing from the reference's affine), after ``eval.postprocess`` (whose
    classes the dataset must hold). ``out_dir`` default:
    ``<run folder>/evaluation_<checkpoint name>``; a folder that holds a training run or the results of an evaluation
    is refused unless ``overwrite``, which replaces those results (and a run's ``summary.json``) and nothing else.
    ``save_predictions`` writes label NIfTIs to ``out_dir/predictions``. A dataset whose label map differs from the
    one the checkpoint was trained with (or has another number of classes than its network) is refused.
    ``figures``: per-case MIPs (``figures/<case>.png``) and a t-SNE of teacher latents of up to
    ``tsne_cases_per_domain`` cases of every centre (``figures/tsne.png``), one panel per checkpoint (this one,
    then ``compare``). Returns the summary (as written to ``summary.json``, NaN as None) plus ``out_dir``.
    """
    started = time.perf_counter()
    loaded = load_checkpoint(checkpoint, weights=weights, device=device, config=config, overrides=overrides)
    cfg = loaded.config
    root, manifest = _dataset_root(cfg, data)
    man = load_manifest(root, manifest)
    _check_labels(man, loaded)
    cfg.eval.postprocess.check(man.labels, str(man.path))
    cases, domains = _select_cases(man, cfg, split=split, domain=domain)
    out, previous = _output_folder(loaded, out_dir, overwrite=overwrite, predictions=save_predictions, figures=figures)
    scoring = _Scoring(
        loaded,
        Preprocessing.from_config(cfg.data).transforms(labels=man.labels),
        man,
        out,
        eval_settings(cfg, overlap=overlap, sw_batch_size=sw_batch_size),
        hd95=hd95,
        save_predictions=save_predictions,
        figures=figures,
    )
    records = scoring.cases(cases, split=split, domains=domains)
    summary = _summary(scoring, split, domains, records)
    if figures:
        # The t-SNE is of teacher latents whichever weights were scored.
        first = loaded if loaded.weights == "teacher" else loaded.path
        tsne = dict(cases_per_domain=tsne_cases_per_domain, patches_per_case=tsne_patches_per_case)
        figs.latent_tsne(
            [first, *compare], man, out / "figures" / "tsne.png", device=loaded.device, config=config, **tsne
        )
    summary["seconds"] = time.perf_counter() - started
    _write_results(summary, records, out)
    _remove_unscored(previous, records, out, figures=figures)
    result = jsonable(summary)
    result["out_dir"] = out
    return result


def _output_folder(
    loaded: LoadedCheckpoint, out_dir: str | os.PathLike | None, *, overwrite: bool, predictions: bool, figures: bool
) -> tuple[Path, list[Path]]:
    """The folder the results go to (default: beside the run's checkpoints), checked and made writable before the
    work rather than at its first result, with the subfolders asked for; and the earlier results it will replace."""
    if out_dir is None:
        # The trainer keeps checkpoints in <run>/checkpoints/; results belong beside them, in the run folder.
        run = loaded.path.parent.parent if loaded.path.parent.name == "checkpoints" else loaded.path.parent
        out_dir = run / f"evaluation_{loaded.path.stem}"
    previous = _check_out(Path(out_dir), overwrite=overwrite)
    out = check_writable(out_dir)
    if predictions:
        (out / "predictions").mkdir(exist_ok=True)
    if figures:
        (out / "figures").mkdir(exist_ok=True)
    return out, previous


@dataclasses.dataclass(frozen=True)
class _Scoring:
    """How every case of an evaluation is segmented and scored, and what is written for it."""

    loaded: LoadedCheckpoint
    transform: Any  # the preprocessing (a MONAI Compose), inverted to map predictions back
    manifest: Manifest
    out: Path
    settings: EvalConfig  # the sliding window's
    hd95: bool
    save_predictions: bool
    figures: bool

    def cases(self, cases: Sequence[Case], *, split: str, domains: Sequence[str]) -> list[dict[str, Any]]:
        loaded = self.loaded
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
        if self.settings.mirror_axes:
            log.info("test-time mirroring along axes %s", self.settings.mirror_axes)
        if self.settings.postprocess:
            log.info("label maps post-processed before scoring: %s", self.settings.postprocess.describe())
        return [self.case(case) for case in tqdm(cases, desc="evaluate", unit="case", disable=None)]

    def case(self, case: Case) -> dict[str, Any]:
        """One case segmented, mapped back to its own grid and scored against its reference there (spacing from the
        reference's affine); its prediction and figure written when asked for."""
        t0 = time.perf_counter()
        loaded, labels = self.loaded, self.manifest.labels
        item = {"image": str(case.image), "label": str(case.label), "case": case.name}
        probs, _ = segment_case(loaded, self.transform, item, self.settings)
        pred = label_map(probs, labels, self.settings.postprocess)
        ref_img = load_nifti(case.label)
        ref = np.asarray(ref_img.dataobj).astype(np.int64).reshape(ref_img.shape[:3])
        if pred.shape != ref.shape:
            raise ValueError(
                f"case {case.name}: the prediction mapped back to the image grid has shape {pred.shape} "
                f"but the label {case.label} has shape {ref.shape}"
            )
        spacing = voxel_spacing(ref_img.affine)
        metrics = case_metrics(pred, ref, labels, spacing, hd95=self.hd95)
        record = {
            "case": case.name,
            "domain": case.domain,
            "image": case.image,
            "reference": case.label,
            "spacing": spacing,
            "metrics": metrics,
            "seconds": time.perf_counter() - t0,
        }
        if self.save_predictions:
            record["prediction"] = self.out / "predictions" / f"{case.name}{self.manifest.file_ending}"
            save_nifti_like(pred, ref_img, record["prediction"])
        if self.figures:
            image = np.asarray(load_nifti(case.image).dataobj, dtype=np.float32).reshape(ref.shape)
            figs.plot_case_mips(
                image,
                pred,
                ref,
                ref_img.affine,
                labels,
                self.out / "figures" / f"{case.name}.png",
                title=f"{case.name} (centre {case.domain}), {loaded.weights} of {loaded.path.name}",
            )
        log.debug("%s: %s", case.name, {c: round(m["dice"], 4) for c, m in metrics.items()})
        return record


def _summary(scoring: _Scoring, split: str, domains: list[str], records: list[dict]) -> dict[str, Any]:
    """``summary.json`` (without its ``seconds``): what was scored with what, the means, and every case."""
    loaded, man = scoring.loaded, scoring.manifest
    return {
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
            "roi_size": list(loaded.config.data.patch_size),
            "overlap": scoring.settings.overlap,
            "sw_batch_size": scoring.settings.sw_batch_size,
            "mode": scoring.settings.mode,
            "mirror_axes": list(scoring.settings.mirror_axes),
            "postprocess": scoring.settings.postprocess.model_dump(),
        },
        "conventions": "0/0 metrics are NaN (null here) and skipped by the means; n counts the cases in each mean",
        **summarize(records),
        "metric_per_case": records,
    }


def _write_results(summary: dict[str, Any], records: list[dict], out: Path) -> None:
    """``summary.json`` and ``metrics.csv`` (a line per case and class), and the means in the log."""
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


def _remove_unscored(previous: list[Path], records: list[dict], out: Path, *, figures: bool) -> None:
    """Earlier predictions and figures of cases this evaluation did not score would sit beside its own: removed only
    now that its results are whole, so a failed evaluation leaves the earlier one as it was."""
    written = {out / "figures" / "tsne.png", *(r.get("prediction") for r in records)}
    written |= {out / "figures" / f"{r['case']}.png" for r in records} if figures else set()
    stale = [p for p in previous if p.parent != out and p not in written]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.warning("--overwrite: removed %d earlier file(s) of cases not scored now (%s)", len(stale), stale[0].name)
