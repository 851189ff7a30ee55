"""The statistics of a study: its runs checked, what each case contributes, and the paired bootstrap.

One statistic for every cell and effect: each run's mean over its cases, then the mean over runs (unseen centres ×
seeds, each run weighing the same), ± the sample sd of the run means in a cell. A class's cells and effects are over
the cases whose reference holds the class; HD95 over those a row found (an empty prediction has no surface
distance), beside the share of cases it missed. A row's effect is its paired difference from the ``no EMA`` row: the
same centre, seed and case under both rows, so case difficulty and the seed's data order cancel, and with the same
runs in both rows it equals the difference of their cells. Its 95 % interval comes from a crossed bootstrap
(:func:`paired_bootstrap`) that resamples seeds and cases at once, since both are samples: the cases of a centre, and
the training randomness a seed stands for. An interval that excludes 0 is an effect beyond the noise of this many
cases and seeds; one that includes 0 is no evidence of an effect either way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gsema_fast.evaluation.metrics import METRICS, mean_sd
from gsema_fast.experiments.lodo.study import BASELINE_ROW

# What the tables add to the overlap metrics: detection, defined where those are not (see _case_values). A case
# whose reference holds the class is *missed* when nothing of it was predicted (its HD95 is undefined); a case
# whose reference lacks the class enters no overlap metric and is a *false alarm* when some of it was predicted.
DETECTION = ("missed", "false_alarm")
TABLE_METRICS = (*METRICS, *DETECTION)
# The voxel counts of a case's metrics that say whether its reference and its prediction hold a class.
COUNTS = ("tp", "fp", "fn")
# Where a run record keeps its per-case metrics, by scope: the unseen centre, the training centres' held-out cases.
SCOPES = {"unseen": "unseen_cases", "held_out": "held_out_cases"}
TELEMETRY = ("aligned", "grad_cos")


@dataclasses.dataclass(frozen=True)
class Run:
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
    out = {m: (as_float(metrics[m]) if reference else math.nan) for m in METRICS}
    if not predicted:
        out["hd95"] = math.nan
    out["missed"] = float(not predicted) if reference else math.nan
    out["false_alarm"] = math.nan if reference else float(predicted)
    return out


def as_float(value: Any) -> float:
    """A metric as a float: JSON's null (a 0/0 metric) as NaN."""
    return math.nan if value is None else float(value)


def check_runs(records: Sequence[Mapping[str, Any]], *, name: str = "records") -> list[Run]:
    """The records as runs, or a ValueError naming the first record (``name[i]``) that is not one run of a study."""
    runs: list[Run] = []
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
        for scope, field in SCOPES.items():
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
                    lacking = next((k for k in (*METRICS, *COUNTS) if k not in metrics), None)
                    if lacking is None:
                        lacking = next((k for k in COUNTS if not isinstance(metrics[k], (int, np.integer))), None)
                    if lacking is not None:
                        raise ValueError(
                            f"{where}: {field}[{case!r}][{cls!r}] has no {lacking!r} (a voxel count for "
                            f"{', '.join(COUNTS)}; a value or null for {', '.join(METRICS)})"
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
        telemetry = {k: float(v) for k, v in rec.get("telemetry", {}).items() if k in TELEMETRY}
        runs.append(Run(*key, values, telemetry, as_float(rec.get("train_seconds"))))
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
    runs: Sequence[Run], row: str, cls: str, metric: str, centres: Sequence[str]
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


def paired_effect(
    runs: Sequence[Run], row: str, cls: str, metric: str, centres: Sequence[str], label: str
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
