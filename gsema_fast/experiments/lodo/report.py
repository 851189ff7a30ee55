"""The tables of a study: its records grouped by row, class, scope and unseen centre, and written as
``lodo_table.md``, ``lodo_table.csv``, ``lodo_effects.csv`` and ``lodo_runs.csv``; and ``lodo_records.json``, the
per-case metrics behind them, from which :func:`rebuild_lodo_table` (``gsema-fast lodo-table``) writes them again."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gsema_fast.evaluation.metrics import METRICS, mean_sd
from gsema_fast.experiments.lodo.stats import (
    COUNTS,
    SCOPES,
    TABLE_METRICS,
    TELEMETRY,
    Run,
    as_float,
    check_runs,
    paired_effect,
)
from gsema_fast.experiments.lodo.study import ABLATION_ROWS, BASELINE_ROW, PAPER_TABLE1
from gsema_fast.files import atomic_path, jsonable, write_csv

_HEADERS = {
    "dice": "DSC (%)",
    "sensitivity": "Sen (%)",
    "jaccard": "Jac (%)",
    "volume_similarity": "VS (%)",
    "hd95": "HD95 (mm)",
    "missed": "missed (%)",
    "false_alarm": "false alarm (%)",
}
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
# How the markdown tables read, above them.
_EXPLANATION = (
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
    "cosine."
)


def write_lodo_table(
    records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike, *, meta: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write the leave-one-domain-out results: ``lodo_table.md``, ``lodo_table.csv``, ``lodo_effects.csv``,
    ``lodo_runs.csv``, and ``lodo_records.json``, from which :func:`rebuild_lodo_table` writes them all again.

    ``records``: one per training run, ``{"row", "test_domain", "seed", "unseen_cases": {case: {class: {metric:
    value}}}, "held_out_cases": {...} (optional), "telemetry": {"aligned", "grad_cos"} (optional), "train_seconds"
    (optional)}``: per case of its unseen centre (and of its training centres' held-out cases), each class's
    :func:`~gsema_fast.evaluation.metrics.case_metrics` (:data:`~gsema_fast.evaluation.metrics.METRICS` and the voxel
    counts ``tp``, ``fp``, ``fn``); other keys are ignored. One statistic everywhere
    (:mod:`~gsema_fast.experiments.lodo.stats`, :meth:`Run.mean`): a table cell is the mean ± sample sd over a row's
    runs of each run's mean over its cases (per centre in the per-centre table); an effect is the same statistic of
    the paired differences from :data:`BASELINE_ROW`, with its 95 % crossed bootstrap interval
    (:func:`~gsema_fast.experiments.lodo.stats.paired_bootstrap`). A class's cells are over the cases whose
    reference holds it; HD95 over those the row found, beside the share it missed. ``meta``: lines of ``key: value``
    printed above the tables.

    The records are checked and become runs; the runs are grouped by row, class, scope and centre (:class:`_Study`);
    the groups give the cells and the effects, which the writer lays out as tables.
    """
    if not records:
        raise ValueError("write_lodo_table: no runs to tabulate")
    runs = check_runs(records)
    records_text = _records_text(records, meta or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = _Study.of(runs)
    effects = study.effects()
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
        tmp.write_text(_markdown(study, effects, meta or {}))
    write_csv(study.cells(), paths["csv"], ["row", "class", "scope", "centre", "metric", "mean", "sd", "n"])
    write_csv(effects, paths["effects"], _EFFECT_COLUMNS)
    run_columns = ["row", "test_domain", "seed", "scope", "class", *TABLE_METRICS, "aligned", "grad_cos"]
    write_csv(_run_lines(runs), paths["runs"], [*run_columns, "train_seconds"])
    return paths


# ------------------------------------------------------------------------------------------------ the group-by
@dataclasses.dataclass(frozen=True)
class _Study:
    """The runs of a study as its tables group them: ``rows`` (the ablation rows in their order, then any other row
    in the order met), ``classes`` and unseen ``centres``."""

    runs: list[Run]
    rows: list[str]
    classes: list[str]
    centres: list[str]

    @classmethod
    def of(cls, runs: list[Run]) -> _Study:
        rows = [r for r in ABLATION_ROWS if any(run.row == r for run in runs)]
        rows += [r for r in dict.fromkeys(run.row for run in runs) if r not in rows]
        classes = list(dict.fromkeys(c for run in runs for c in run.values["unseen"]))
        centres = sorted({run.centre for run in runs}, key=lambda d: (not d.isdigit(), d.zfill(8)))
        return cls(runs, rows, classes, centres)

    @property
    def centre_groups(self) -> list[tuple[str, list[str]]]:
        """``("all", every centre)``, then each centre on its own when there are several (with one, the centre's
        figures are the pooled ones)."""
        return [("all", self.centres)] + ([(c, [c]) for c in self.centres] if len(self.centres) > 1 else [])

    def cell(self, row: str, scope: str, cls: str, metric: str, centre: str | None = None) -> tuple[float, float, int]:
        """Mean, sd and count over the row's runs (on ``centre``, or all) of each run's mean."""
        selected = [run for run in self.runs if run.row == row and (centre is None or run.centre == centre)]
        return mean_sd([run.mean(scope, cls, metric) for run in selected])

    def telemetry(self, row: str, key: str) -> tuple[float, float, int]:
        return mean_sd([run.telemetry[key] for run in self.runs if run.row == row and key in run.telemetry])

    def cells(self) -> list[dict[str, Any]]:
        """``lodo_table.csv``: every row, class, scope, centre (``all`` or one) and metric that some run enters, and
        every pooled unseen-centre cell even when none does."""
        cells = []
        for row in self.rows:
            for cls in self.classes:
                for scope in SCOPES:
                    for label, _ in self.centre_groups:
                        for metric in TABLE_METRICS:
                            mean, sd, n = self.cell(row, scope, cls, metric, None if label == "all" else label)
                            if n or (scope == "unseen" and label == "all"):
                                cells.append(
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
        return cells

    def effects(self) -> list[dict[str, Any]]:
        """``lodo_effects.csv``: every row's paired effect against :data:`BASELINE_ROW` per class, metric and centre
        (``all`` or one) where some pair is defined; none without the baseline row."""
        if not any(run.row == BASELINE_ROW for run in self.runs):
            return []
        return [
            effect
            for row in self.rows
            if row != BASELINE_ROW
            for cls in self.classes
            for metric in TABLE_METRICS
            for label, selected in self.centre_groups
            if (effect := paired_effect(self.runs, row, cls, metric, selected, label)) is not None
        ]


def _run_lines(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """``lodo_runs.csv``: each run's means per scope and class, telemetry and training time."""
    return [
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


# ------------------------------------------------------------------------------------------------ the writer
def _markdown(study: _Study, effects: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """``lodo_table.md``: the meta lines, how to read the tables, a section per class, and the paper's table."""
    lines = ["# Leave-one-domain-out results", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", _EXPLANATION, ""]
    for cls in study.classes:
        lines += _class_section(study, cls, effects)
    lines += _paper_section(study.rows)
    return "\n".join(lines).rstrip() + "\n"


def _class_section(study: _Study, cls: str, effects: Sequence[Mapping[str, Any]]) -> list[str]:
    """A class's table of every row (its metrics, its effect, the held-out score and the gradient telemetry), then
    its Dice per unseen centre."""
    holds = _reference_counts(study.runs, cls)
    absent = any(k < n for (scope, _), (k, n) in holds.items() if scope == "unseen")
    shown = (*METRICS, "missed", *(("false_alarm",) if absent else ()))
    lines = [f"## {cls}", "", _counts_sentence(cls, holds, study.centres), ""]
    lines += [
        "| method | "
        + " | ".join(_HEADERS[m] for m in shown)
        + f" | Δ DSC vs {BASELINE_ROW} [95% CI] | held-out source DSC (%) | aligned (%) | cos | runs |",
        "|---|" + "---|" * (len(shown) + 5),
    ]
    for row in study.rows:
        cells = [_fmt(*study.cell(row, "unseen", cls, m)[:2], 1.0 if m == "hd95" else 100.0) for m in shown]
        held = study.cell(row, "held_out", cls, "dice")
        aligned = study.telemetry(row, "aligned")
        cosine = study.telemetry(row, "grad_cos")
        count = sum(1 for run in study.runs if run.row == row)
        lines.append(
            f"| {row} | " + " | ".join(cells) + f" | {_effect_text(study, row, cls, effects)} | "
            f"{_fmt(held[0], held[1], 100.0)} | {_fmt(aligned[0], aligned[1], 100.0, 1)} | "
            f"{_fmt(cosine[0], cosine[1], 1.0)} | {count} |"
        )
    lines += [
        "",
        f"DSC (%) of {cls} per unseen centre (mean ± sd over seeds):",
        "",
        "| method | " + " | ".join(f"centre {c}" for c in study.centres) + " |",
        "|---|" + "---|" * len(study.centres),
    ]
    for row in study.rows:
        cells = [_fmt(*study.cell(row, "unseen", cls, "dice", c)[:2], 100.0) for c in study.centres]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _effect_text(study: _Study, row: str, cls: str, effects: Sequence[Mapping[str, Any]]) -> str:
    """The row's pooled Dice effect with its interval, * when the interval excludes 0, and over how many paired runs
    when those are not the runs of both cells."""
    effect = next(
        (
            e
            for e in effects
            if e["row"] == row and e["class"] == cls and e["metric"] == "dice" and e["centre"] == "all"
        ),
        None,
    )
    if effect is None or math.isnan(effect["difference"]):
        return "—" if row == BASELINE_ROW else "n/a"
    beyond = effect["ci_low"] > 0 or effect["ci_high"] < 0
    text = f"{100 * effect['difference']:+.2f} [{100 * effect['ci_low']:+.2f}, {100 * effect['ci_high']:+.2f}]" + (
        " *" if beyond else ""
    )
    columns = {study.cell(row, "unseen", cls, "dice")[2], study.cell(BASELINE_ROW, "unseen", cls, "dice")[2]}
    if columns != {effect["runs"]}:
        text += f" ({effect['runs']} paired runs)"
    return text


def _paper_section(rows: Sequence[str]) -> list[str]:
    """The paper's Table 1 for the rows that have a counterpart there."""
    paper_rows = [r for r in rows if r in PAPER_TABLE1]
    if not paper_rows:
        return []
    lines = [
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
    return lines


def _fmt(mean: float, sd: float, scale: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{scale * mean:.{digits}f}"
    return text if math.isnan(sd) else f"{text} ± {scale * sd:.{digits}f}"


def _reference_counts(runs: Sequence[Run], cls: str) -> dict[tuple[str, str], tuple[int, int]]:
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
_CASE_COLUMNS = ("run", "scope", "case", "class", *METRICS, *COUNTS)


def _records_text(records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """``lodo_records.json``: the meta lines, the runs' keys and telemetry, and one line per run, scope, case and
    class with that case's metrics and voxel counts: all a table is computed from, one line per entry (small, and
    readable in a diff)."""
    run_lines, case_lines = [], []
    for index, rec in enumerate(records):
        run = {"row": rec["row"], "test_domain": rec["test_domain"], "seed": rec["seed"]}
        telemetry = {k: v for k, v in rec.get("telemetry", {}).items() if k in TELEMETRY}
        if telemetry:
            run["telemetry"] = telemetry
        if "train_seconds" in rec:
            run["train_seconds"] = rec["train_seconds"]
        run_lines.append(json.dumps(jsonable(run), allow_nan=False))
        for scope, field in SCOPES.items():
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
            "scope": entry["scope"] in SCOPES,
            "case": isinstance(entry["case"], str),
            "class": isinstance(entry["class"], str),
            **{m: entry[m] is None or _is_number(entry[m]) for m in METRICS},
            **{k: _is_int(entry[k]) and entry[k] >= 0 for k in COUNTS},
        }
        bad = next((column for column, ok in checks.items() if not ok), None)
        if bad is not None:
            raise ValueError(f"{path}: cases[{j}]: {bad} is {entry[bad]!r}")
        metrics = {m: as_float(entry[m]) for m in METRICS} | {k: entry[k] for k in COUNTS}
        index, scope, case, cls = entry["run"], entry["scope"], entry["case"], entry["class"]
        records[index].setdefault(SCOPES[scope], {}).setdefault(case, {})[cls] = metrics
    try:
        check_runs(records, name="runs")
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
