"""Leave-one-centre-out experiments: the paper's ablation rows trained for every unseen centre and seed, scored on
whole volumes, and tabulated with seed spread and paired bootstrap intervals.

Protocol. Each run trains on every centre but its unseen one; the checkpoint it is scored with (``best`` by
default) was chosen on held-out validation cases of its training centres only, and the unseen centre's labels are
read once, by the final evaluation. Nothing about a run's settings is chosen by looking at an unseen centre.

Statistics. One statistic for every cell and effect: each run's mean over its cases, then the mean over runs
(unseen centres × seeds, each run weighing the same), ± the sample sd of the run means in a cell. A class's cells
and effects are over the cases whose reference holds the class; HD95 over those a row found (an empty prediction
has no surface distance), beside the share of cases it missed. A row's effect is its paired difference from the
``no EMA`` row: the same centre, seed and case under both rows, so case difficulty and the seed's data order
cancel, and with the same runs in both rows it equals the difference of their cells. Its 95 % interval comes from
a crossed bootstrap (:func:`paired_bootstrap`) that resamples seeds and cases at once, since both are samples:
the cases of a centre, and the training randomness a seed stands for. An interval that excludes 0 is an effect
beyond the noise of this many cases and seeds; one that includes 0 is no evidence of an effect either way. The
per-case metrics behind a study are kept in ``lodo_records.json``, from which :func:`rebuild_lodo_table` (``gsema-fast
lodo-table``) writes its tables again.
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

from gsema_fast.config import Config, TargetTransformConfig, load_config, with_overrides
from gsema_fast.data import Manifest, builtin_dataset, load_manifest
from gsema_fast.evaluation.evaluate import clear_evaluation, evaluate
from gsema_fast.evaluation.metrics import METRICS, mean_sd
from gsema_fast.files import atomic_path, jsonable, read_checkpoint, write_csv, write_json
from gsema_fast.training.checkpoints import result_changes
from gsema_fast.training.loop import train

log = logging.getLogger(__name__)

__all__ = [
    "ABLATION_ROWS",
    "BASELINE_ROW",
    "DETECTION",
    "PAPER_TABLE1",
    "PRESETS",
    "RECORDS_FILE",
    "TABLE_METRICS",
    "Preset",
    "lodo",
    "paired_bootstrap",
    "read_lodo_records",
    "rebuild_lodo_table",
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
# What the tables add to the overlap metrics: detection, defined where those are not (see _case_values). A case
# whose reference holds the class is *missed* when nothing of it was predicted (its HD95 is undefined); a case
# whose reference lacks the class enters no overlap metric and is a *false alarm* when some of it was predicted.
DETECTION = ("missed", "false_alarm")
TABLE_METRICS = (*METRICS, *DETECTION)
_HEADERS = {
    "dice": "DSC (%)",
    "sensitivity": "Sen (%)",
    "jaccard": "Jac (%)",
    "volume_similarity": "VS (%)",
    "hd95": "HD95 (mm)",
    "missed": "missed (%)",
    "false_alarm": "false alarm (%)",
}
# The voxel counts of a case's metrics that say whether its reference and its prediction hold a class.
_COUNTS = ("tp", "fp", "fn")
# Where a run record keeps its per-case metrics, by scope: the unseen centre, the training centres' held-out cases.
_SCOPES = {"unseen": "unseen_cases", "held_out": "held_out_cases"}
_TELEMETRY = ("aligned", "grad_cos")
# The per-case parts of a run record: in lodo_records.json, not in the runs.jsonl journal.
_CASE_KEYS = tuple(_SCOPES.values())
_EFFECT_COLUMNS = (
    "row",
    "baseline",
    "class",
    "centre",
    "metric",
    "difference",
    "ci_low",
    "ci_high",
    "row_mean",
    "baseline_mean",
    "runs",
    "pairs",
)


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
@dataclasses.dataclass(frozen=True)
class _Run:
    """One run of a table, checked: its keys and, per scope (``unseen``, ``held_out``) and class, every case's
    :func:`_case_values`."""

    row: str
    centre: str
    seed: int
    values: dict[str, dict[str, dict[str, dict[str, float]]]]  # scope -> class -> case -> metric -> value
    telemetry: dict[str, float]
    train_seconds: float

    def mean(self, scope: str, cls: str, metric: str) -> float:
        """The run's mean over the cases that enter ``metric`` (NaN when none does): the number a table cell
        averages over runs, and the statistic the paired bootstrap recomputes per run."""
        cases = self.values.get(scope, {}).get(cls, {})
        return mean_sd([v[metric] for v in cases.values()])[0]


def _case_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """What one case contributes to one class: every :data:`TABLE_METRICS` value, NaN where the case does not enter.

    The reference holds the class: the overlap metrics as scored, HD95 where the prediction holds some of the class
    too (an empty prediction has no surface distance), *missed* 1 for an empty prediction, else 0. The reference
    lacks the class: no overlap metric (the case enters neither row of a comparison, nor any column), *false alarm*
    1 if anything of the class was predicted, else 0.
    """
    reference = metrics["tp"] + metrics["fn"] > 0
    predicted = metrics["tp"] + metrics["fp"] > 0
    out = {m: (_as_float(metrics[m]) if reference else math.nan) for m in METRICS}
    if not predicted:
        out["hd95"] = math.nan
    out["missed"] = float(not predicted) if reference else math.nan
    out["false_alarm"] = math.nan if reference else float(predicted)
    return out


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _check_runs(records: Sequence[Mapping[str, Any]], *, name: str = "records") -> list[_Run]:
    """The records as runs, or a ValueError naming the first record (``name[i]``) that is not one run of a study."""
    runs: list[_Run] = []
    first: dict[tuple[str, str, int], int] = {}
    reference: dict[tuple[str, str], tuple[bool, str]] = {}
    for i, rec in enumerate(records):
        missing = next((k for k in ("row", "test_domain", "seed", "unseen_cases") if k not in rec), None)
        if missing is not None:
            raise ValueError(f"{name}[{i}]: no {missing!r}; expected a run of lodo with its per-case metrics")
        if isinstance(rec["seed"], bool) or not isinstance(rec["seed"], (int, np.integer)):
            raise ValueError(f"{name}[{i}]: seed={rec['seed']!r}; expected an integer")
        key = (str(rec["row"]), str(rec["test_domain"]), int(rec["seed"]))
        where = f"{name}[{i}] ({key[0]!r}, centre {key[1]}, seed {key[2]})"
        if key in first:
            raise ValueError(f"{where}: the same run as {name}[{first[key]}]; each row, centre and seed once")
        first[key] = i
        values: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
        for scope, field in _SCOPES.items():
            if field not in rec:
                continue
            cases = rec[field]
            if not isinstance(cases, Mapping) or not cases:
                raise ValueError(f"{where}: {field} is {cases!r}; expected {{case: {{class: {{metric: value}}}}}}")
            for case, classes in cases.items():
                if not isinstance(classes, Mapping) or not all(isinstance(m, Mapping) for m in classes.values()):
                    raise ValueError(
                        f"{where}: {field}[{case!r}] is {classes!r}; expected {{class: {{metric: value}}}}"
                    )
                for cls, metrics in classes.items():
                    lacking = next((k for k in (*METRICS, *_COUNTS) if k not in metrics), None)
                    if lacking is None:
                        lacking = next((k for k in _COUNTS if not isinstance(metrics[k], (int, np.integer))), None)
                    if lacking is not None:
                        raise ValueError(
                            f"{where}: {field}[{case!r}][{cls!r}] has no {lacking!r} (a voxel count for "
                            f"{', '.join(_COUNTS)}; a value or null for {', '.join(METRICS)})"
                        )
                    # A case's reference is one label map: it holds a class in every run or in none.
                    holds = metrics["tp"] + metrics["fn"] > 0
                    seen = reference.setdefault((str(case), str(cls)), (holds, where))
                    if seen[0] != holds:
                        raise ValueError(
                            f"{where}: the reference of case {case!r} {'holds' if holds else 'lacks'} {cls!r}, "
                            f"but not in {seen[1]}: records of different datasets"
                        )
                    values.setdefault(scope, {}).setdefault(str(cls), {})[str(case)] = _case_values(metrics)
        telemetry = {k: float(v) for k, v in rec.get("telemetry", {}).items() if k in _TELEMETRY}
        runs.append(_Run(*key, values, telemetry, _as_float(rec.get("train_seconds"))))
    return runs


def _identity_draw(n: int) -> np.ndarray:
    return np.arange(n)[None, :]


def _run_means_summed(d: np.ndarray, seed_draw: np.ndarray, case_draw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per resample (a row of ``seed_draw`` and ``case_draw``): the sum over the drawn runs of each run's mean over
    its drawn cases, and how many drawn runs had a defined case. ``d``: ``[seeds, cases]``, NaN where undefined."""
    cells = d[seed_draw[:, :, None], case_draw[:, None, :]]  # [resamples, seeds, cases]
    ok = np.isfinite(cells)
    counts = ok.sum(axis=2)
    sums = np.where(ok, cells, 0.0).sum(axis=2)
    has = counts > 0
    return np.where(has, sums / np.maximum(counts, 1), 0.0).sum(axis=1), has.sum(axis=1)


def _mean_of_run_means(values: Mapping[str, np.ndarray]) -> float:
    """Each run's mean over its defined cases, then the mean over the runs that have one: a table cell's statistic
    for ``{centre: [seeds, cases]}`` arrays."""
    total = runs = 0.0
    for d in values.values():
        s, n = _run_means_summed(d, _identity_draw(d.shape[0]), _identity_draw(d.shape[1]))
        total, runs = total + s[0], runs + n[0]
    return float(total / runs) if runs else math.nan


def paired_bootstrap(
    diffs: Mapping[str, np.ndarray], *, confidence: float = 0.95, resamples: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean paired difference, as a table cell weighs it, and its percentile bootstrap interval, resampling seeds
    and cases together.

    ``diffs``: per unseen centre, an array ``[seeds, cases]`` of paired differences (row minus baseline) on the same
    centre, seed and case; NaN where the pair does not enter (a whole row of NaN: no paired run for that seed at that
    centre). Row ``i`` of every centre is the same seed. The statistic is the table cells' own: each run's (centre
    and seed's) mean over its defined cases, then the mean over runs, each run weighing the same whatever its number
    of cases. Each resample draws, with replacement, the seeds (one draw shared by every centre, as a seed is one
    training randomness) and, per centre, its cases (one draw shared by that centre's seeds: the same case under
    every seed), and recomputes that statistic; a resample in which no drawn run has a defined case is left out.
    A crossed design: ``scipy.stats.bootstrap`` resamples a single axis, which would treat the same case under
    three seeds as three independent cases and give too narrow an interval. Returns ``(estimate, low, high)``;
    all NaN when no pair is defined.
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
        raise ValueError(f"diffs: every centre needs the same number of seed rows, got {sorted(seeds)}")
    estimate = _mean_of_run_means(arrays)
    if math.isnan(estimate):
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    n_seeds = seeds.pop()
    seed_draw = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    total = np.zeros(resamples)
    runs = np.zeros(resamples)
    for d in arrays.values():
        sums, counts = _run_means_summed(d, seed_draw, rng.integers(0, d.shape[1], size=(resamples, d.shape[1])))
        total += sums
        runs += counts
    stats = total[runs > 0] / runs[runs > 0]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return estimate, float(low), float(high)


def _paired_values(
    runs: Sequence[_Run], row: str, cls: str, metric: str, centres: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The row's and the baseline's values on the unseen centres, ``{centre: [seeds, cases]}`` each, on the seeds
    and cases both rows have there, NaN wherever either is undefined, so that both sides hold the same pairs."""
    cases_of = {(r.row, r.centre, r.seed): r.values.get("unseen", {}).get(cls, {}) for r in runs}
    paired = {(c, s) for (rw, c, s) in cases_of if rw == row and c in centres and (BASELINE_ROW, c, s) in cases_of}
    seeds = sorted({s for _, s in paired})
    row_values: dict[str, np.ndarray] = {}
    base_values: dict[str, np.ndarray] = {}
    for centre in centres:
        both = [
            (cases_of[(row, centre, s)], cases_of[(BASELINE_ROW, centre, s)]) for s in seeds if (centre, s) in paired
        ]
        if not both:
            continue
        cases = sorted(set.intersection(*(set(a) & set(b) for a, b in both)))
        if not cases:
            continue
        a = np.full((len(seeds), len(cases)), np.nan)
        b = np.full((len(seeds), len(cases)), np.nan)
        for i, s in enumerate(seeds):
            if (centre, s) in paired:
                a[i] = [cases_of[(row, centre, s)][k][metric] for k in cases]
                b[i] = [cases_of[(BASELINE_ROW, centre, s)][k][metric] for k in cases]
        defined = np.isfinite(a) & np.isfinite(b)
        row_values[centre] = np.where(defined, a, np.nan)
        base_values[centre] = np.where(defined, b, np.nan)
    return row_values, base_values


def _effect(
    runs: Sequence[_Run], row: str, cls: str, metric: str, centres: Sequence[str], label: str
) -> dict[str, Any] | None:
    """The row's paired effect against :data:`BASELINE_ROW` on ``centres`` (``label``: ``all`` or the centre), as a
    ``lodo_effects.csv`` line; None when no pair is defined."""
    row_values, base_values = _paired_values(runs, row, cls, metric, centres)
    pairs = int(sum(np.isfinite(a).sum() for a in row_values.values()))
    if not pairs:
        return None
    difference, low, high = paired_bootstrap({c: row_values[c] - base_values[c] for c in row_values})
    return {
        "row": row,
        "baseline": BASELINE_ROW,
        "class": cls,
        "centre": label,
        "metric": metric,
        "difference": difference,
        "ci_low": low,
        "ci_high": high,
        "row_mean": _mean_of_run_means(row_values),
        "baseline_mean": _mean_of_run_means(base_values),
        "runs": int(sum(np.isfinite(a).any(axis=1).sum() for a in row_values.values())),
        "pairs": pairs,
    }


# ------------------------------------------------------------------------------------------------ tables
def write_lodo_table(
    records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *, meta: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write the leave-one-domain-out results: ``lodo_table.md``, ``lodo_table.csv``, ``lodo_effects.csv``,
    ``lodo_runs.csv``, and ``lodo_records.json``, from which :func:`rebuild_lodo_table` writes them all again.

    ``records``: one per training run, ``{"row", "test_domain", "seed", "unseen_cases": {case: {class: {metric:
    value}}}, "held_out_cases": {...} (optional), "telemetry": {"aligned", "grad_cos"} (optional), "train_seconds"
    (optional)}``: per case of its unseen centre (and of its training centres' held-out cases), each class's
    :func:`~gsema_fast.evaluation.metrics.case_metrics` (:data:`~gsema_fast.evaluation.metrics.METRICS` and the voxel
    counts ``tp``, ``fp``, ``fn``); other keys are ignored. One statistic everywhere (:func:`_case_values`,
    :meth:`_Run.mean`): a table cell is the mean ± sample sd over a row's runs of each run's mean over its cases (per
    centre in the per-centre table); an effect is the same statistic of the paired differences from
    :data:`BASELINE_ROW`, with its 95 % crossed bootstrap interval (:func:`paired_bootstrap`). A class's cells are
    over the cases whose reference holds it; HD95 over those the row found, beside the share it missed. ``meta``:
    lines of ``key: value`` printed above the tables.
    """
    if not records:
        raise ValueError("write_lodo_table: no runs to tabulate")
    runs = _check_runs(records)
    records_text = _records_text(records, meta or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = [r for r in ABLATION_ROWS if any(run.row == r for run in runs)]
    order += [r for r in dict.fromkeys(run.row for run in runs) if r not in order]
    classes = list(dict.fromkeys(c for run in runs for c in run.values["unseen"]))
    centres = sorted({run.centre for run in runs}, key=lambda d: (not d.isdigit(), d.zfill(8)))
    # Per centre as well when there are several (with one, the centre's figures are the pooled ones).
    scopes_by_centre = [("all", centres)] + ([(c, [c]) for c in centres] if len(centres) > 1 else [])
    with_baseline = any(run.row == BASELINE_ROW for run in runs)

    def cell(row: str, scope: str, cls: str, metric: str, centre: str | None = None) -> tuple[float, float, int]:
        return mean_sd(
            [
                run.mean(scope, cls, metric)
                for run in runs
                if run.row == row and (centre is None or run.centre == centre)
            ]
        )

    def telemetry(row: str, key: str) -> list[float]:
        return [run.telemetry[key] for run in runs if run.row == row and key in run.telemetry]

    summary_rows: list[dict[str, Any]] = []
    for row in order:
        for cls in classes:
            for scope in _SCOPES:
                for label, _ in scopes_by_centre:
                    for metric in TABLE_METRICS:
                        mean, sd, n = cell(row, scope, cls, metric, None if label == "all" else label)
                        if n or (scope == "unseen" and label == "all"):
                            summary_rows.append(
                                {
                                    "row": row,
                                    "class": cls,
                                    "scope": scope,
                                    "centre": label,
                                    "metric": metric,
                                    "mean": mean,
                                    "sd": sd,
                                    "n": n,
                                }
                            )
    effect_rows = [
        effect
        for row in order
        if with_baseline and row != BASELINE_ROW
        for cls in classes
        for metric in TABLE_METRICS
        for label, selected in scopes_by_centre
        if (effect := _effect(runs, row, cls, metric, selected, label)) is not None
    ]

    lines = ["# Leave-one-domain-out results", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "Each cell: each run's mean over the unseen centre's cases, then the mean ± sd over runs (every unseen "
        "centre × every seed; each run weighs the same). A class's cells are over the cases whose reference holds "
        "the class (counted under each heading): a case without it enters no row. *missed*: share of those cases "
        "in which nothing of the class was predicted; HD95 is over the cases the row found (an empty prediction has "
        "no surface distance), so read it beside *missed*. *held-out source*: the same model and statistic on "
        f"held-out cases of its training centres. *Δ DSC vs {BASELINE_ROW}*: the same statistic of the paired "
        "differences (same centre, seed and case), in DSC points: with the same runs in both rows it is the "
        "difference of their DSC cells (else it says over how many paired runs); its 95 % percentile bootstrap "
        "interval resamples seeds and cases together; * marks an interval that excludes 0. `lodo_effects.csv` has "
        "every metric's Δ, HD95's over the cases both rows found, with both rows' means on those pairs. *aligned*: "
        "share of steps whose source and target gradients agreed (GS-EMA updated the teacher); *cos*: their mean "
        "cosine.",
        "",
    ]
    for cls in classes:
        holds = _reference_counts(runs, cls)
        absent = any(k < n for (scope, _), (k, n) in holds.items() if scope == "unseen")
        shown = (*METRICS, "missed", *(("false_alarm",) if absent else ()))
        lines += [f"## {cls}", "", _counts_sentence(cls, holds, centres), ""]
        lines += [
            "| method | "
            + " | ".join(_HEADERS[m] for m in shown)
            + f" | Δ DSC vs {BASELINE_ROW} [95% CI] | held-out source DSC (%) | aligned (%) | cos | runs |",
            "|---|" + "---|" * (len(shown) + 5),
        ]
        for row in order:
            cells = [_fmt(*cell(row, "unseen", cls, m)[:2], 1.0 if m == "hd95" else 100.0) for m in shown]
            effect = next(
                (
                    e
                    for e in effect_rows
                    if e["row"] == row and e["class"] == cls and e["metric"] == "dice" and e["centre"] == "all"
                ),
                None,
            )
            if effect is None or math.isnan(effect["difference"]):
                effect_text = "—" if row == BASELINE_ROW else "n/a"
            else:
                beyond = effect["ci_low"] > 0 or effect["ci_high"] < 0
                effect_text = (
                    f"{100 * effect['difference']:+.2f} [{100 * effect['ci_low']:+.2f}, "
                    f"{100 * effect['ci_high']:+.2f}]" + (" *" if beyond else "")
                )
                columns = {cell(row, "unseen", cls, "dice")[2], cell(BASELINE_ROW, "unseen", cls, "dice")[2]}
                if columns != {effect["runs"]}:
                    effect_text += f" ({effect['runs']} paired runs)"
            held = cell(row, "held_out", cls, "dice")
            aligned = mean_sd(telemetry(row, "aligned"))
            cosine = mean_sd(telemetry(row, "grad_cos"))
            count = sum(1 for run in runs if run.row == row)
            lines.append(
                f"| {row} | " + " | ".join(cells) + f" | {effect_text} | {_fmt(held[0], held[1], 100.0)} | "
                f"{_fmt(aligned[0], aligned[1], 100.0, 1)} | {_fmt(cosine[0], cosine[1], 1.0)} | {count} |"
            )
        lines += [
            "",
            f"DSC (%) of {cls} per unseen centre (mean ± sd over seeds):",
            "",
            "| method | " + " | ".join(f"centre {c}" for c in centres) + " |",
            "|---|" + "---|" * len(centres),
        ]
        for row in order:
            cells = [_fmt(*cell(row, "unseen", cls, "dice", c)[:2], 100.0) for c in centres]
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
        "records": out / RECORDS_FILE,
    }
    with atomic_path(paths["records"]) as tmp:
        tmp.write_text(records_text)
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text("\n".join(lines).rstrip() + "\n")
    write_csv(summary_rows, paths["csv"], ["row", "class", "scope", "centre", "metric", "mean", "sd", "n"])
    write_csv(effect_rows, paths["effects"], _EFFECT_COLUMNS)
    run_rows = [
        {
            "row": run.row,
            "test_domain": run.centre,
            "seed": run.seed,
            "scope": scope,
            "class": cls,
            **{m: run.mean(scope, cls, m) for m in TABLE_METRICS},
            "aligned": run.telemetry.get("aligned", math.nan),
            "grad_cos": run.telemetry.get("grad_cos", math.nan),
            "train_seconds": run.train_seconds,
        }
        for run in runs
        for scope, by_class in run.values.items()
        for cls in by_class
    ]
    write_csv(
        run_rows,
        paths["runs"],
        ["row", "test_domain", "seed", "scope", "class", *TABLE_METRICS, "aligned", "grad_cos", "train_seconds"],
    )
    return paths


def _reference_counts(runs: Sequence[_Run], cls: str) -> dict[tuple[str, str], tuple[int, int]]:
    """How many distinct cases hold ``cls`` in their reference, of how many: ``("unseen", centre)`` per unseen
    centre, ``("held_out", "")`` over every run's held-out cases."""
    seen: dict[tuple[str, str], dict[str, bool]] = {}
    for run in runs:
        for scope, by_class in run.values.items():
            group = (scope, run.centre if scope == "unseen" else "")
            for case, values in by_class.get(cls, {}).items():
                seen.setdefault(group, {})[case] = not math.isnan(values["missed"])
    return {group: (sum(cases.values()), len(cases)) for group, cases in seen.items()}


def _counts_sentence(cls: str, holds: Mapping[tuple[str, str], tuple[int, int]], centres: Sequence[str]) -> str:
    unseen = [f"{c}, {holds['unseen', c][0]} of {holds['unseen', c][1]}" for c in centres if ("unseen", c) in holds]
    text = f"Cases with {cls} in the reference: unseen centre{'s' if len(unseen) > 1 else ''} " + "; ".join(unseen)
    if ("held_out", "") in holds:
        held, total = holds["held_out", ""]
        text += f"; held-out cases of the training centres, {held} of {total}"
    if any(k < n for k, n in holds.values()):
        text += (
            f". The others are in no {cls} cell and no effect but *false alarm*, the share of them in which some "
            f"{cls} was predicted"
        )
    return text + "."


# ------------------------------------------------------------------------------------------------ records
RECORDS_FILE = "lodo_records.json"
_RECORDS_FORMAT = "gsema-fast lodo records"
_RECORDS_VERSION = 1
_CASE_COLUMNS = ("run", "scope", "case", "class", *METRICS, *_COUNTS)


def _records_text(records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """``lodo_records.json``: the meta lines, the runs' keys and telemetry, and one line per run, scope, case and
    class with that case's metrics and voxel counts: all a table is computed from, one line per entry (small, and
    readable in a diff)."""
    run_lines, case_lines = [], []
    for index, rec in enumerate(records):
        run = {"row": rec["row"], "test_domain": rec["test_domain"], "seed": rec["seed"]}
        telemetry = {k: v for k, v in rec.get("telemetry", {}).items() if k in _TELEMETRY}
        if telemetry:
            run["telemetry"] = telemetry
        if "train_seconds" in rec:
            run["train_seconds"] = rec["train_seconds"]
        run_lines.append(json.dumps(jsonable(run), allow_nan=False))
        for scope, field in _SCOPES.items():
            for case, by_class in rec.get(field, {}).items():
                for cls, metrics in by_class.items():
                    line = [index, scope, case, cls, *(metrics[k] for k in _CASE_COLUMNS[4:])]
                    case_lines.append(json.dumps(jsonable(line), allow_nan=False))
    head = {"format": _RECORDS_FORMAT, "version": _RECORDS_VERSION, "meta": dict(meta), "case_columns": _CASE_COLUMNS}
    lines = ["{"] + [f"{json.dumps(k)}: {json.dumps(jsonable(v), allow_nan=False)}," for k, v in head.items()]
    lines += ['"runs": [', ",\n".join(run_lines), "],", '"cases": [', ",\n".join(case_lines), "]", "}"]
    return "\n".join(lines) + "\n"


def read_lodo_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The runs and meta lines of a ``lodo_records.json``, as :func:`write_lodo_table` takes them; a ValueError
    names the file and the first entry that is not as written there."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from err
    if not isinstance(data, dict) or data.get("format") != _RECORDS_FORMAT:
        raise ValueError(f'{path}: not a lodo records file (expected "format": "{_RECORDS_FORMAT}")')
    if data.get("version") != _RECORDS_VERSION:
        raise ValueError(f"{path}: version {data.get('version')!r}; this gsema-fast reads version {_RECORDS_VERSION}")
    if data.get("case_columns") != list(_CASE_COLUMNS):
        raise ValueError(f"{path}: case_columns {data.get('case_columns')!r}; expected {list(_CASE_COLUMNS)}")
    meta = data.get("meta")
    if not isinstance(meta, dict) or not all(isinstance(v, (str, int, float)) for v in meta.values()):
        raise ValueError(f"{path}: meta: expected an object of text or number values, got {meta!r}")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{path}: runs: expected a non-empty list")
    records = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not all(k in run for k in ("row", "test_domain", "seed")):
            raise ValueError(f'{path}: runs[{i}] is {run!r}; expected {{"row", "test_domain", "seed", ...}}')
        records.append(dict(run))
    cases = data.get("cases")
    if not isinstance(cases, list):
        raise ValueError(f"{path}: cases: expected a list")
    for j, line in enumerate(cases):
        if not isinstance(line, list) or len(line) != len(_CASE_COLUMNS):
            raise ValueError(f"{path}: cases[{j}]: expected a list of {', '.join(_CASE_COLUMNS)}")
        entry = dict(zip(_CASE_COLUMNS, line, strict=True))
        checks = {
            "run": _is_int(entry["run"]) and 0 <= entry["run"] < len(records),
            "scope": entry["scope"] in _SCOPES,
            "case": isinstance(entry["case"], str),
            "class": isinstance(entry["class"], str),
            **{m: entry[m] is None or _is_number(entry[m]) for m in METRICS},
            **{k: _is_int(entry[k]) and entry[k] >= 0 for k in _COUNTS},
        }
        bad = next((column for column, ok in checks.items() if not ok), None)
        if bad is not None:
            raise ValueError(f"{path}: cases[{j}]: {bad} is {entry[bad]!r}")
        metrics = {m: _as_float(entry[m]) for m in METRICS} | {k: entry[k] for k in _COUNTS}
        index, scope, case, cls = entry["run"], entry["scope"], entry["case"], entry["class"]
        records[index].setdefault(_SCOPES[scope], {}).setdefault(case, {})[cls] = metrics
    try:
        _check_runs(records, name="runs")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return records, meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rebuild_lodo_table(records_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write a study's tables again from its ``lodo_records.json`` alone (no run folder, no training): the same
    files, byte for byte, that :func:`lodo` wrote beside it. Refuses an ``out_dir`` whose ``lodo_records.json``
    holds other runs (nothing written)."""
    records, meta = read_lodo_records(records_path)
    target = Path(out_dir) / RECORDS_FILE
    if (
        target.exists()
        and not target.samefile(records_path)
        and target.read_bytes() != _records_text(records, meta).encode()
    ):
        raise ValueError(f"{target} holds other runs than {records_path}; choose another folder (nothing written)")
    return write_lodo_table(records, out_dir, meta=meta)


# ------------------------------------------------------------------------------------------------ runs
def _summary_means(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {
        cls: {m: (math.nan if v is None else float(v)) for m, v in metrics.items()}
        for cls, metrics in summary["mean"].items()
    }


def _summary_cases(summary: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per case and class: the metrics and the voxel counts (which say whether reference and prediction hold the
    class) of an evaluation's ``summary.json``."""
    return {
        r["case"]: {
            cls: {m: _as_float(metrics[m]) for m in METRICS} | {k: int(metrics[k]) for k in _COUNTS}
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
        self.lines[key] = json.dumps(jsonable({k: v for k, v in record.items() if k not in _CASE_KEYS}))
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
            val = json.loads(val_json.read_text())
            record["held_out"] = _summary_means(val)
            record["held_out_cases"] = _summary_cases(val)
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
        val = evaluate(ck, split="val", out_dir=run_dir / "evaluation-val")
        record["held_out"] = _summary_means(val)
        record["held_out_cases"] = _summary_cases(val)
    record["telemetry"] = _telemetry(run_dir / "log.jsonl")
    timing = {"train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t0, "checkpoint": str(ck)}
    write_json(timing, run_dir / _TIMING)
    record.update(timing)
    return record
