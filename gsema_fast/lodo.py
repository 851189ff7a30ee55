"""Leave-one-centre-out experiments: the paper's ablation rows trained for every unseen centre and seed, scored on
whole volumes, and tabulated with seed spread and paired bootstrap intervals.

Protocol. Each run trains on every centre but its unseen one; the checkpoint it is scored with (``best`` by
default) was chosen on held-out validation cases of its training centres only, and the unseen centre's labels are
read once, by the final evaluation. Nothing about a run's settings is chosen by looking at an unseen centre.

Statistics. A table cell is the mean ± sample sd over runs (unseen centres × seeds) of each run's mean over its
unseen centre's cases. A row's effect is its paired difference from the ``no EMA`` row: the same centre, seed and
case under both rows, so case difficulty and the seed's data order cancel. Its 95 % interval comes from a crossed
bootstrap (:func:`paired_bootstrap`) that resamples seeds and cases at once, since both are samples: the cases of
a centre, and the training randomness a seed stands for. An interval that excludes 0 is an effect beyond the noise
of this many cases and seeds; one that includes 0 is no evidence of an effect either way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsema_fast.checkpoints import result_changes
from gsema_fast.config import Config, TargetTransformConfig, load_config, with_overrides
from gsema_fast.data import Manifest, builtin_dataset, load_manifest
from gsema_fast.evaluate import clear_evaluation, evaluate
from gsema_fast.files import atomic_path, jsonable, read_checkpoint, write_csv, write_json
from gsema_fast.metrics import METRICS, mean_sd
from gsema_fast.train import train

log = logging.getLogger(__name__)

__all__ = [
    "ABLATION_ROWS",
    "BASELINE_ROW",
    "PAPER_TABLE1",
    "PRESETS",
    "Preset",
    "lodo",
    "paired_bootstrap",
    "write_lodo_table",
]

# The components of the simulated target domain T (config section target_transform).
_TARGET_COMPONENTS = tuple(f.name for f in dataclasses.fields(TargetTransformConfig))

# The paper's ablation rows (Table 1), a baseline that never sees the simulated target domain, and the paper's
# nnU-Net baseline, as overrides of the base config. Rows with BACL get loss.lambda_con from the base config (the
# paper's 0.5 if the base turns it off), see _row_overrides.
ABLATION_ROWS: dict[str, tuple[str, ...]] = {
    "no EMA": ("ema.mode=none", "loss.lambda_con=0"),
    "EMA": ("ema.mode=ema", "loss.lambda_con=0"),
    "GS-EMA": ("ema.mode=gsema", "loss.lambda_con=0"),
    "GS-EMA + BACL-V": ("ema.mode=gsema", "bacl.volume=true", "bacl.boundary=false"),
    "GS-EMA + BACL-B": ("ema.mode=gsema", "bacl.volume=false", "bacl.boundary=true"),
    "GS-EMA + BACL": ("ema.mode=gsema", "bacl.volume=true", "bacl.boundary=true"),
    # T off: x_t = x_s, so the two supervised terms are one term counted twice (Adam is blind to the factor 2).
    "no EMA, no T": (
        "ema.mode=none",
        "loss.lambda_con=0",
        *(f"target_transform.{c}.enabled=false" for c in _TARGET_COMPONENTS),
    ),
    "DynUNet (nnU-Net-style)": (
        "model.name=dynunet",
        "model.checkpointing=false",
        "ema.mode=none",
        "loss.lambda_con=0",
    ),
}
# Every effect is a paired difference from this row.
BASELINE_ROW = "no EMA"
_PAPER_LAMBDA_CON = 0.5
# Table 1 of the paper (aneurysm, @neurIST, %, DSC / Sen / Jac / VS), for the rows that have a counterpart here.
PAPER_TABLE1: dict[str, tuple[float, float, float, float]] = {
    "no EMA": (61.52, 55.64, 50.91, 69.01),
    "EMA": (64.71, 62.86, 54.03, 72.64),
    "GS-EMA": (68.49, 72.79, 58.40, 76.63),
    "GS-EMA + BACL-V": (68.49, 72.79, 58.40, 76.63),
    "GS-EMA + BACL-B": (70.62, 75.14, 60.54, 78.22),
    "GS-EMA + BACL": (71.89, 70.88, 62.36, 80.00),
    "DynUNet (nnU-Net-style)": (59.61, 57.51, 47.38, 70.91),
}
_HEADERS = {
    "dice": "DSC (%)",
    "sensitivity": "Sen (%)",
    "jaccard": "Jac (%)",
    "volume_similarity": "VS (%)",
    "hd95": "HD95 (mm)",
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named study: its rows, unseen centres (None: every centre), seeds, and config overrides applied first."""

    rows: tuple[str, ...]
    domains: tuple[str, ...] | None
    seeds: int
    overrides: tuple[str, ...] = ()
    note: str = ""


_METHOD_ROWS = tuple(r for r in ABLATION_ROWS if r != "DynUNet (nnU-Net-style)")
PRESETS: dict[str, Preset] = {
    # 7 rows x 3 seeds on the unseen centre D of the demo's phantoms, at the demo's network and patch size with a
    # quarter of its 4000 steps: about an hour on 2 CPU cores.
    "quick": Preset(
        rows=_METHOD_ROWS,
        domains=("3",),
        seeds=3,
        overrides=("train.epochs=2", "train.steps_per_epoch=500", "train.val_every=1"),
        note="CPU-sized: the demo config with 1000 steps per run, unseen centre D only",
    ),
    # Every row, every centre, 5 seeds, at the config's own length (for a GPU: --config gpu).
    "full": Preset(rows=tuple(ABLATION_ROWS), domains=None, seeds=5, note="every row, every centre, 5 seeds"),
}


def _slug(name: str) -> str:
    out = "".join(ch.lower() if ch.isalnum() else "-" for ch in name)
    return "-".join(part for part in out.split("-") if part)


def _row_overrides(row: str, base: Config) -> tuple[str, ...]:
    overrides = ABLATION_ROWS[row]
    if "loss.lambda_con=0" not in overrides and base.loss.lambda_con == 0:
        overrides = (*overrides, f"loss.lambda_con={_PAPER_LAMBDA_CON}")
    return overrides


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    return f"CPU ({torch.get_num_threads()} threads)"


def _fmt(mean: float, sd: float, scale: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{scale * mean:.{digits}f}"
    return text if math.isnan(sd) else f"{text} ± {scale * sd:.{digits}f}"


# ------------------------------------------------------------------------------------------------ statistics
def paired_bootstrap(
    diffs: Mapping[str, np.ndarray], *, confidence: float = 0.95, resamples: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean paired difference and its percentile bootstrap interval, resampling seeds and cases together.

    ``diffs``: per unseen centre, an array ``[seeds, cases]`` of paired differences (row minus baseline; NaN where
    a metric is undefined, skipped). Each resample draws, with replacement, the seeds (one draw shared by every
    centre, as a seed is one training randomness) and, per centre, its cases, and takes the mean over all drawn
    (centre, seed, case) cells. A crossed design: ``scipy.stats.bootstrap`` resamples a single axis, which would
    treat the same case under three seeds as three independent cases and give too narrow an interval.
    Returns ``(mean, low, high)``; all NaN when there is no finite difference.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: expected a value in (0, 1)")
    if resamples < 1:
        raise ValueError(f"resamples={resamples}: expected at least 1")
    arrays = {c: np.asarray(d, dtype=np.float64) for c, d in diffs.items()}
    for centre, d in arrays.items():
        if d.ndim != 2 or d.size == 0:
            raise ValueError(f"diffs[{centre!r}] has shape {d.shape}: expected a non-empty [seeds, cases] array")
    seeds = {d.shape[0] for d in arrays.values()}
    if len(seeds) != 1:
        raise ValueError(f"diffs: every centre needs the same number of seeds, got {sorted(seeds)}")
    finite = np.concatenate([d[np.isfinite(d)] for d in arrays.values()])
    if finite.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    n_seeds = seeds.pop()
    seed_draw = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    total = np.zeros(resamples)
    count = np.zeros(resamples)
    for d in arrays.values():
        case_draw = rng.integers(0, d.shape[1], size=(resamples, d.shape[1]))
        cells = d[seed_draw[:, :, None], case_draw[:, None, :]]  # [resamples, seeds, cases]
        ok = np.isfinite(cells)
        total += np.where(ok, cells, 0.0).sum(axis=(1, 2))
        count += ok.sum(axis=(1, 2))
    stats = total[count > 0] / count[count > 0]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(finite.mean()), float(low), float(high)


def _paired_diffs(records: Sequence[Mapping[str, Any]], row: str, cls: str, metric: str) -> dict[str, np.ndarray]:
    """``{centre: [seeds, cases]}`` of ``row`` minus the baseline on the same centre, seed and case; the seeds and
    cases that both rows have."""
    by_key = {(r["row"], str(r["test_domain"]), r["seed"]): r for r in records if "unseen_cases" in r}
    out = {}
    for centre in sorted({str(r["test_domain"]) for r in records}):
        seeds = sorted(s for (rw, c, s) in by_key if rw == row and c == centre and (BASELINE_ROW, c, s) in by_key)
        if not seeds:
            continue
        pairs = [
            (by_key[(row, centre, s)]["unseen_cases"], by_key[(BASELINE_ROW, centre, s)]["unseen_cases"]) for s in seeds
        ]
        cases = sorted(set.intersection(*(set(a) & set(b) for a, b in pairs)))
        if not cases:
            continue
        out[centre] = np.array(
            [[_metric(a[k], cls, metric) - _metric(b[k], cls, metric) for k in cases] for a, b in pairs]
        )
    return out


def _metric(case: Mapping[str, Any], cls: str, metric: str) -> float:
    value = case.get(cls, {}).get(metric)
    return math.nan if value is None else float(value)


# ------------------------------------------------------------------------------------------------ tables
def write_lodo_table(
    records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *, meta: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write the leave-one-domain-out results: ``lodo_table.md``, ``lodo_table.csv``, ``lodo_effects.csv`` and
    ``lodo_runs.csv``.

    ``records``: one per training run, ``{"row", "test_domain", "seed", "unseen": {class: {metric: value}},
    "held_out": {...} (optional), "unseen_cases": {case: {class: {metric: value}}} (optional, for the paired
    effects), "telemetry": {"aligned", "grad_cos"} (optional), "train_seconds" (optional)}``, where ``unseen`` and
    ``held_out`` hold that run's means over the cases of its unseen centre and of its training centres' held-out
    cases. Each table cell is the mean ± sample sd over the runs of a row (all seeds and centres; NaN runs
    skipped); the per-centre table averages over seeds only; the effect column is the paired difference from
    :data:`BASELINE_ROW` with its 95 % crossed bootstrap interval (:func:`paired_bootstrap`). ``meta``: lines of
    ``key: value`` printed above the tables.
    """
    if not records:
        raise ValueError("write_lodo_table: no runs to tabulate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = [r for r in ABLATION_ROWS if any(rec["row"] == r for rec in records)]
    order += [r for r in dict.fromkeys(rec["row"] for rec in records) if r not in order]
    classes = list(dict.fromkeys(c for rec in records for c in rec["unseen"]))
    centres = sorted({str(rec["test_domain"]) for rec in records}, key=lambda d: (not d.isdigit(), d.zfill(8)))
    with_baseline = any(rec["row"] == BASELINE_ROW for rec in records)

    def values(row: str, cls: str, metric: str, scope: str = "unseen", centre: str | None = None) -> list[float]:
        return [
            rec[scope][cls][metric]
            for rec in records
            if rec["row"] == row
            and scope in rec
            and cls in rec[scope]
            and (centre is None or str(rec["test_domain"]) == centre)
        ]

    def telemetry(row: str, key: str) -> list[float]:
        return [rec["telemetry"][key] for rec in records if rec["row"] == row and key in rec.get("telemetry", {})]

    lines = ["# Leave-one-domain-out results", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "Each cell: mean ± sd over runs (every unseen centre × every seed) of the run's mean over the "
        "unseen centre's cases; *held-out source* is the same model on held-out cases of its training centres. "
        f"*Δ DSC vs {BASELINE_ROW}*: the paired difference (same centre, seed and case) in DSC points, with its "
        "95 % bootstrap interval over seeds and cases; * marks an interval that excludes 0. *aligned*: share "
        "of steps whose source and target gradients agreed (GS-EMA updated the teacher); *cos*: their mean "
        "cosine.",
        "",
    ]
    summary_rows: list[dict[str, Any]] = []
    effect_rows: list[dict[str, Any]] = []
    for cls in classes:
        lines += [
            f"## {cls}",
            "",
            "| method | "
            + " | ".join(_HEADERS[m] for m in METRICS)
            + f" | Δ DSC vs {BASELINE_ROW} [95% CI] | held-out source DSC (%) | aligned (%) | cos | runs |",
            "|---|" + "---|" * (len(METRICS) + 5),
        ]
        for row in order:
            cells = []
            for metric in METRICS:
                mean, sd, n = mean_sd(values(row, cls, metric))
                summary_rows.append(
                    {"row": row, "class": cls, "scope": "unseen", "metric": metric, "mean": mean, "sd": sd, "n": n}
                )
                cells.append(_fmt(mean, sd, 1.0 if metric == "hd95" else 100.0))
                held = mean_sd(values(row, cls, metric, "held_out"))
                if held[2]:
                    summary_rows.append(
                        {
                            "row": row,
                            "class": cls,
                            "scope": "held_out",
                            "metric": metric,
                            "mean": held[0],
                            "sd": held[1],
                            "n": held[2],
                        }
                    )
                if with_baseline and row != BASELINE_ROW:
                    diffs = _paired_diffs(records, row, cls, metric)
                    if diffs:
                        effect, low, high = paired_bootstrap(diffs)
                        effect_rows.append(
                            {
                                "row": row,
                                "baseline": BASELINE_ROW,
                                "class": cls,
                                "metric": metric,
                                "difference": effect,
                                "ci_low": low,
                                "ci_high": high,
                                "pairs": int(sum(d.size for d in diffs.values())),
                            }
                        )
            effect = next(
                (e for e in effect_rows if e["row"] == row and e["class"] == cls and e["metric"] == "dice"), None
            )
            if effect is None or math.isnan(effect["difference"]):
                effect_text = "—" if row == BASELINE_ROW else "n/a"
            else:
                beyond = effect["ci_low"] > 0 or effect["ci_high"] < 0
                effect_text = (
                    f"{100 * effect['difference']:+.2f} [{100 * effect['ci_low']:+.2f}, "
                    f"{100 * effect['ci_high']:+.2f}]" + (" *" if beyond else "")
                )
            held = mean_sd(values(row, cls, "dice", "held_out"))
            aligned = mean_sd(telemetry(row, "aligned"))
            cosine = mean_sd(telemetry(row, "grad_cos"))
            runs = sum(1 for rec in records if rec["row"] == row)
            lines.append(
                f"| {row} | " + " | ".join(cells) + f" | {effect_text} | {_fmt(held[0], held[1], 100.0)} | "
                f"{_fmt(aligned[0], aligned[1], 100.0, 1)} | {_fmt(cosine[0], cosine[1], 1.0)} | {runs} |"
            )
        lines += [
            "",
            f"DSC (%) of {cls} per unseen centre (mean ± sd over seeds):",
            "",
            "| method | " + " | ".join(f"centre {c}" for c in centres) + " |",
            "|---|" + "---|" * len(centres),
        ]
        for row in order:
            cells = [_fmt(*mean_sd(values(row, cls, "dice", centre=c))[:2], 100.0) for c in centres]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    paper_rows = [r for r in order if r in PAPER_TABLE1]
    if paper_rows:
        lines += [
            "## The paper's Table 1 (aneurysm; @neurIST 3DRA, four centres; %)",
            "",
            "| method | DSC | Sen | Jac | VS |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r} | " + " | ".join(f"{v:.2f}" for v in PAPER_TABLE1[r]) + " |" for r in paper_rows]
        lines += [
            "",
            "The paper's BACL-V row repeats its GS-EMA numbers exactly. The paper lists nnUNet as a "
            "baseline; the DynUNet row here is MONAI's nnU-Net-style network trained with this project's "
            "loop, not the nnU-Net framework.",
            "",
        ]
    paths = {
        "markdown": out / "lodo_table.md",
        "csv": out / "lodo_table.csv",
        "effects": out / "lodo_effects.csv",
        "runs": out / "lodo_runs.csv",
    }
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text("\n".join(lines).rstrip() + "\n")
    write_csv(summary_rows, paths["csv"], ["row", "class", "scope", "metric", "mean", "sd", "n"])
    write_csv(
        effect_rows,
        paths["effects"],
        ["row", "baseline", "class", "metric", "difference", "ci_low", "ci_high", "pairs"],
    )
    run_rows = []
    for rec in records:
        for scope in ("unseen", "held_out"):
            for cls, metrics in rec.get(scope, {}).items():
                run_rows.append(
                    {
                        "row": rec["row"],
                        "test_domain": rec["test_domain"],
                        "seed": rec["seed"],
                        "scope": scope,
                        "class": cls,
                        **{m: metrics.get(m, math.nan) for m in METRICS},
                        "aligned": rec.get("telemetry", {}).get("aligned", math.nan),
                        "grad_cos": rec.get("telemetry", {}).get("grad_cos", math.nan),
                        "train_seconds": rec.get("train_seconds", math.nan),
                    }
                )
    write_csv(
        run_rows,
        paths["runs"],
        ["row", "test_domain", "seed", "scope", "class", *METRICS, "aligned", "grad_cos", "train_seconds"],
    )
    return paths


# ------------------------------------------------------------------------------------------------ runs
def _summary_means(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {
        cls: {m: (math.nan if v is None else float(v)) for m, v in metrics.items()}
        for cls, metrics in summary["mean"].items()
    }


def _summary_cases(summary: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    return {
        r["case"]: {
            cls: {
                m: (math.nan if m_value is None else float(m_value)) for m, m_value in metrics.items() if m in METRICS
            }
            for cls, metrics in r["metrics"].items()
        }
        for r in summary["metric_per_case"]
    }


def _telemetry(log_path: Path) -> dict[str, float]:
    """Mean aligned fraction and gradient cosine over a run's training log (GS-EMA runs log both)."""
    if not log_path.is_file():
        return {}
    aligned, cosine = [], []
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            if record.get("aligned") is not None:
                aligned.append(record["aligned"])
            if record.get("grad_cos") is not None:
                cosine.append(record["grad_cos"])
    out = {}
    if aligned:
        out["aligned"] = float(np.mean(aligned))
    if cosine:
        out["grad_cos"] = float(np.mean(cosine))
    return out


def lodo(
    config=None,
    *,
    preset: str | None = None,
    seeds: int | None = None,
    ablation: bool = False,
    rows: Sequence[str] | None = None,
    domains: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    checkpoint: str = "best",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Leave-one-domain-out: for each centre, train on all the others and evaluate on it; write the tables.

    ``config``: a :class:`~gsema_fast.config.Config`, a YAML file or a shipped config name (default: demo);
    ``overrides``: ``--set`` strings, applied after the preset's. ``preset``: a :data:`PRESETS` name, giving the
    rows, unseen centres, seeds and overrides of a study; ``rows``, ``domains`` and ``seeds`` given here win.
    Without a preset: every :data:`ABLATION_ROWS` entry with ``ablation`` (else one row, the config as given),
    every centre of the dataset, one seed. Seeds are ``train.seed``, ``train.seed + 1``, ... Each run lives in
    ``out_dir/<row>/centre-<d>/seed-<s>/`` (default ``out_dir``: ``<train.out_dir>/lodo``); its ``checkpoint``
    (``best``, chosen on the training centres' held-out validation cases, falling back to ``final`` without
    them; or ``final``) is scored on the unseen centre (``evaluation/``) and on the held-out cases of its training
    centres (``evaluation-val/``). A run whose two evaluations exist is not repeated, so an interrupted study
    resumes where it stopped; but only after its checkpoint shows it was made with the settings it would be trained
    with now (every setting that changes its numbers, the dataset's cases and files, the seed, the evaluated
    checkpoint): a folder holding a run made otherwise is refused (``ValueError`` naming the differences), or with
    ``overwrite`` trained again. ``out_dir/runs.jsonl`` lists every run in the folder once. The built-in phantoms
    (``data.root: null``) are synthesised once into ``data.synth_dir`` (default ``out_dir/synth``). Returns
    ``{"records", "tables" (paths), "out_dir"}``.
    """
    if checkpoint not in ("final", "best"):
        raise ValueError(f"checkpoint={checkpoint!r}: expected 'final' or 'best'")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {', '.join(PRESETS)}")
    study = PRESETS[preset] if preset is not None else None
    if seeds is None:
        seeds = study.seeds if study else 1
    if seeds < 1:
        raise ValueError(f"seeds={seeds}: expected at least 1")
    overrides = (*(study.overrides if study else ()), *overrides)
    base = with_overrides(config, *overrides) if isinstance(config, Config) else load_config(config, overrides)
    if rows is None:
        rows = list(study.rows) if study else list(ABLATION_ROWS) if ablation else ["as configured"]
    else:
        # A row by its name or by its folder name ("GS-EMA + BACL" or gs-ema-bacl), which needs no shell quoting.
        by_slug = {_slug(r): r for r in ABLATION_ROWS}
        unknown = [r for r in rows if r not in ABLATION_ROWS and _slug(r) not in by_slug]
        if unknown:
            raise ValueError(
                f"rows: {unknown[0]!r} is not an ablation row; choose from "
                f"{', '.join(f'{r!r} ({_slug(r)})' for r in ABLATION_ROWS)}"
            )
        rows = [r if r in ABLATION_ROWS else by_slug[_slug(r)] for r in rows]
    if domains is None and study is not None and study.domains is not None:
        domains = list(study.domains)
    root_out = Path(out_dir) if out_dir is not None else Path(base.train.out_dir) / "lodo"
    root_out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    root = base.data.root
    if root is None:
        synth_dir = Path(base.data.synth_dir) if base.data.synth_dir else root_out / "synth"
        builtin_dataset(
            domains=base.data.synth_domains,
            cases_per_domain=base.data.synth_cases_per_domain,
            size=base.data.synth_size,
            seed=base.data.synth_seed,
            folder=synth_dir,
        )
        root = str(synth_dir)
    man = load_manifest(root, base.data.manifest)
    centres = [str(d) for d in domains] if domains is not None else man.domains
    missing = [d for d in centres if d not in man.domains]
    if missing:
        raise ValueError(f"domains: {missing[0]!r} has no cases in {man.path}; domains present: {man.domains}")
    seed_list = [base.train.seed + k for k in range(seeds)]

    runs = [(row, d, s) for row in rows for d in centres for s in seed_list]
    log.info(
        "leave-one-domain-out: %d row(s) x %d centre(s) x %d seed(s) = %d training run(s) into %s",
        len(rows),
        len(centres),
        len(seed_list),
        len(runs),
        root_out,
    )
    records: list[dict[str, Any]] = []
    journal = _RunList(root_out / "runs.jsonl")
    for k, (row, centre, seed) in enumerate(runs, 1):
        run_dir = root_out / _slug(row) / f"centre-{_slug(centre)}" / f"seed-{seed}"
        record = _lodo_run(
            root,
            man,
            row,
            centre,
            seed,
            run_dir,
            base=base,
            checkpoint=checkpoint,
            overwrite=overwrite,
            tag=f"{k}/{len(runs)}",
        )
        records.append(record)
        journal.put(record)
    meta = {
        "config": (
            str(config) if isinstance(config, (str, os.PathLike)) else "demo" if config is None else "a Config object"
        )
        + (f" with {', '.join(overrides)}" if overrides else ""),
        "preset": f"{preset} ({study.note})" if study else "none",
        "dataset": f"{man.path} ({len(man.cases)} cases, centres {', '.join(man.domains)})",
        "model": f"{base.model.name} (rows may override), patch {list(base.data.patch_size)}",
        "training": f"{base.train.epochs} epochs x {base.train.steps_per_epoch} steps, max_steps "
        f"{base.train.max_steps}, batch {base.data.batch_size}",
        "seeds": ", ".join(map(str, seed_list)),
        "unseen centres": ", ".join(centres),
        "evaluated checkpoint": f"{checkpoint} (chosen on held-out cases of the training centres)"
        if checkpoint == "best"
        else checkpoint,
        "device": _device_name(),
        "wall time": f"{(time.perf_counter() - started) / 60:.1f} min (runs already on disk are not re-timed)",
    }
    tables = write_lodo_table(records, root_out, meta=meta)
    log.info("wrote %s", tables["markdown"])
    return {"records": records, "tables": tables, "out_dir": root_out}


class _RunList:
    """``runs.jsonl``: one line per run of the study folder (a rerun replaces its run's line), rewritten whole after
    each run so that an interrupted study leaves the lines of the runs it finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: dict[tuple, str] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    key = (record["row"], str(record["test_domain"]), record["seed"])
                except (ValueError, TypeError, KeyError):  # a line cut short by a kill: its run is listed again
                    continue
                self.lines[key] = line

    def put(self, record: Mapping[str, Any]) -> None:
        key = (record["row"], str(record["test_domain"]), record["seed"])
        self.lines[key] = json.dumps(jsonable({k: v for k, v in record.items() if k != "unseen_cases"}))
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in self.lines.values()))


# What lodo writes into a run folder beside the run's own files.
_EVALUATIONS = ("evaluation", "evaluation-val")
_TIMING = "lodo_timing.json"


def _evaluated_checkpoint(run_dir: Path, summary_path: Path) -> tuple[Path, int | None]:
    """The checkpoint an evaluation of the run scored, and the step it scored (the folder may have been moved)."""
    summary = json.loads(summary_path.read_text())
    path = Path(summary["checkpoint"])
    if not path.is_file():
        path = run_dir / "checkpoints" / path.name
    return path, summary.get("step")


def _settings_problems(
    run_dir: Path, cfg: Config, man: Manifest, checkpoint: str, evaluated: tuple[Path, ...]
) -> list[str]:
    """Why the run in ``run_dir`` is not a run of ``cfg`` on ``man``, scored at its ``checkpoint``: [] when it is (or
    when the folder holds no checkpoint at all: nothing there to lose). ``evaluated``: its evaluation summaries."""
    if evaluated:
        try:
            scored = {_evaluated_checkpoint(run_dir, path) for path in evaluated}
        except (ValueError, KeyError, TypeError) as err:
            return [f"an evaluation summary in it is unreadable ({err})"]
        if len(scored) > 1:
            return [f"its evaluations scored different checkpoints ({sorted(str(p) for p, _ in scored)})"]
        path, step = scored.pop()
        if not path.is_file():
            return [f"the checkpoint its evaluation scored, {path}, is gone"]
        best = run_dir / "checkpoints" / "best.pt"
        wanted = "best" if checkpoint == "best" and best.is_file() else "final"
        if path.stem != wanted:
            return [f"its evaluation scored {path.name}, this study scores {wanted}.pt (--use {checkpoint})"]
    else:
        path, step = run_dir / "checkpoints" / "latest.pt", None
        if not path.is_file():
            return []
    state = read_checkpoint(path, lazy=True)
    problems = result_changes(state, cfg, man, path)
    if step is not None and state.get("step") != step:
        problems.append(f"its evaluation scored step {step} of {path.name}, which now holds step {state.get('step')}")
    return problems


def _lodo_run(
    root: str,
    man: Manifest,
    row: str,
    centre: str,
    seed: int,
    run_dir: Path,
    *,
    base: Config,
    checkpoint: str,
    overwrite: bool,
    tag: str,
) -> dict[str, Any]:
    test_json = run_dir / "evaluation" / "summary.json"
    val_json = run_dir / "evaluation-val" / "summary.json"
    # Without held-out validation cases (data.val_per_domain: 0) there is no source-centre score to compare with.
    with_val = base.data.val_per_domain > 0
    record: dict[str, Any] = {"row": row, "test_domain": centre, "seed": seed, "run_dir": str(run_dir)}
    # The run's own data and folder are set as values (a path is not YAML), the row's settings as overrides. Every
    # centre but the unseen one trains.
    data = dataclasses.replace(base.data, root=root, train_domains=None, test_domain=centre)
    run = dataclasses.replace(base, data=data, train=dataclasses.replace(base.train, out_dir=str(run_dir), seed=seed))
    cfg = with_overrides(run, *(_row_overrides(row, base) if row in ABLATION_ROWS else ()))

    evaluated = test_json.is_file() and (val_json.is_file() or not with_val)
    summaries = (test_json, val_json) if evaluated and with_val else (test_json,) if evaluated else ()
    problems = _settings_problems(run_dir, cfg, man, checkpoint, summaries)
    if evaluated and not problems:
        log.info("[%s] %s, unseen centre %s, seed %d: already evaluated in %s", tag, row, centre, seed, run_dir)
        test = json.loads(test_json.read_text())
        record["unseen"] = _summary_means(test)
        record["unseen_cases"] = _summary_cases(test)
        if with_val:
            record["held_out"] = _summary_means(json.loads(val_json.read_text()))
        record["telemetry"] = _telemetry(run_dir / "log.jsonl")
        timing = run_dir / _TIMING
        if timing.is_file():
            record.update(json.loads(timing.read_text()))
        return record
    if problems:
        what = "a finished run" if evaluated else "an unfinished run"
        if not overwrite:
            raise ValueError(
                f"lodo: {run_dir} holds {what} made with other settings than this study's ({'; '.join(problems)}): "
                f"its results are not this study's; pass --overwrite to train it again, or choose another --out"
            )
        log.warning("[%s] --overwrite: %s holds %s made with other settings (%s): training it again", tag, run_dir,
                    what, "; ".join(problems))  # fmt: skip
    # Whatever lodo wrote for an earlier run in this folder goes before it is trained again: results of the run being
    # replaced must never be read back as the new run's.
    removed = [p for name in _EVALUATIONS for p in clear_evaluation(run_dir / name)]
    if (run_dir / _TIMING).is_file():
        (run_dir / _TIMING).unlink()
        removed.append(run_dir / _TIMING)
    if removed:
        log.info("[%s] removed %d evaluation file(s) of the earlier run in %s", tag, len(removed), run_dir)

    log.info("[%s] %s, unseen centre %s, seed %d: training into %s", tag, row, centre, seed, run_dir)
    t0 = time.perf_counter()
    # The trainer's own end-of-run evaluation would read the unseen centre a second time: lodo scores it below. A run
    # folder without both evaluations is an interrupted run: it is started again.
    result = train(cfg, overwrite=True, evaluate_unseen=False)
    train_seconds = time.perf_counter() - t0
    ck = result["best"] if checkpoint == "best" and result.get("best") else result["final"]
    t0 = time.perf_counter()
    test = evaluate(ck, domain=centre, split="test", out_dir=run_dir / "evaluation")
    record["unseen"] = _summary_means(test)
    record["unseen_cases"] = _summary_cases(test)
    if with_val:
        record["held_out"] = _summary_means(evaluate(ck, split="val", out_dir=run_dir / "evaluation-val"))
    record["telemetry"] = _telemetry(run_dir / "log.jsonl")
    timing = {"train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t0, "checkpoint": str(ck)}
    write_json(timing, run_dir / _TIMING)
    record.update(timing)
    return record
