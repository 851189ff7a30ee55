"""Running a leave-one-centre-out study: the rows of a study trained for every unseen centre and seed, each run
scored on its unseen centre and on the held-out cases of its training centres, and the tables written.

Protocol. Each run trains on every centre but its unseen one; the checkpoint it is scored with (``best`` by default)
was chosen on held-out validation cases of its training centres only, and the unseen centre's labels are read once,
by the final evaluation. Nothing about a run's settings is chosen by looking at an unseen centre. A run already on
disk is read back only when its checkpoint shows the settings it would be trained with now.
"""

from __future__ import annotations

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

from gsema_fast.config import Config, load_config, replace, with_overrides
from gsema_fast.data import Manifest, builtin_dataset, load_manifest
from gsema_fast.evaluation.evaluate import clear_evaluation, evaluate
from gsema_fast.evaluation.metrics import METRICS
from gsema_fast.experiments.lodo.report import write_lodo_table
from gsema_fast.experiments.lodo.stats import COUNTS, SCOPES, as_float
from gsema_fast.experiments.lodo.study import ABLATION_ROWS, PRESETS, Preset, row_overrides, slug
from gsema_fast.files import atomic_path, jsonable, read_checkpoint, write_json
from gsema_fast.training import train
from gsema_fast.training.checkpoints import result_changes

log = logging.getLogger(__name__)

# The per-case parts of a run record: in lodo_records.json, not in the runs.jsonl journal.
_CASE_KEYS = tuple(SCOPES.values())
# What lodo writes into a run folder beside the run's own files.
_EVALUATIONS = ("evaluation", "evaluation-val")
CHECKPOINTS = ("final", "best")  # which of a run's checkpoints is scored
_TIMING = "lodo_timing.json"


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
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint={checkpoint!r}: expected one of {', '.join(CHECKPOINTS)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {', '.join(PRESETS)}")
    study = PRESETS[preset] if preset is not None else None
    if seeds is None:
        seeds = study.seeds if study else 1
    if seeds < 1:
        raise ValueError(f"seeds={seeds}: expected at least 1")
    overrides = (*(study.overrides if study else ()), *overrides)
    base = with_overrides(config, *overrides) if isinstance(config, Config) else load_config(config, overrides)
    rows = _study_rows(rows, study, ablation=ablation)
    if domains is None and study is not None and study.domains is not None:
        domains = list(study.domains)
    root_out = Path(out_dir) if out_dir is not None else Path(base.train.out_dir) / "lodo"
    root_out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    root, man = _study_dataset(base, root_out)
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
    records = _run_study(runs, root, man, root_out, base=base, checkpoint=checkpoint, overwrite=overwrite)
    meta = _meta(config, overrides, preset, study, man, base, seed_list, centres, checkpoint)
    meta["wall time"] = f"{(time.perf_counter() - started) / 60:.1f} min (runs already on disk are not re-timed)"
    tables = write_lodo_table(records, root_out, meta=meta)
    log.info("wrote %s", tables["markdown"])
    return {"records": records, "tables": tables, "out_dir": root_out}


def _study_rows(rows: Sequence[str] | None, study: Preset | None, *, ablation: bool) -> list[str]:
    """The rows to train: those given (by name or by folder name: "GS-EMA + BACL" or gs-ema-bacl, which needs no
    shell quoting), else the preset's, else every ablation row with ``ablation``, else the config as given."""
    if rows is None:
        return list(study.rows) if study else list(ABLATION_ROWS) if ablation else ["as configured"]
    by_slug = {slug(r): r for r in ABLATION_ROWS}
    unknown = [r for r in rows if r not in ABLATION_ROWS and slug(r) not in by_slug]
    if unknown:
        raise ValueError(
            f"rows: {unknown[0]!r} is not an ablation row; choose from "
            f"{', '.join(f'{r!r} ({slug(r)})' for r in ABLATION_ROWS)}"
        )
    return [r if r in ABLATION_ROWS else by_slug[slug(r)] for r in rows]


def _study_dataset(base: Config, root_out: Path) -> tuple[str, Manifest]:
    """The study's dataset folder and manifest: ``data.root``, or the built-in phantoms, synthesised once into
    ``data.synth_dir`` (default ``<study folder>/synth``)."""
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
    return root, load_manifest(root, base.data.manifest)


def _run_study(
    runs: Sequence[tuple[str, str, int]], root: str, man: Manifest, root_out: Path, **settings
) -> list[dict[str, Any]]:
    """Every run ``(row, unseen centre, seed)`` in turn, each listed in ``runs.jsonl`` as soon as it is done."""
    records: list[dict[str, Any]] = []
    journal = _RunList(root_out / "runs.jsonl")
    for k, (row, centre, seed) in enumerate(runs, 1):
        run_dir = root_out / slug(row) / f"centre-{slug(centre)}" / f"seed-{seed}"
        record = _lodo_run(root, man, row, centre, seed, run_dir, tag=f"{k}/{len(runs)}", **settings)
        records.append(record)
        journal.put(record)
    return records


def _meta(
    config,
    overrides: Sequence[str],
    preset: str | None,
    study: Preset | None,
    man: Manifest,
    base: Config,
    seed_list: Sequence[int],
    centres: Sequence[str],
    checkpoint: str,
) -> dict[str, str]:
    """The lines printed above the tables: what was run, on what, how long (``wall time`` is added by the caller)."""
    return {
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
    }


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    return f"CPU ({torch.get_num_threads()} threads)"


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
    """One run of the study: read back from ``run_dir`` when it was made with this study's settings and scored,
    else (after its earlier results are removed) trained and scored; its record."""
    test_json = run_dir / "evaluation" / "summary.json"
    val_json = run_dir / "evaluation-val" / "summary.json"
    # Without held-out validation cases (data.val_per_domain: 0) there is no source-centre score to compare with.
    with_val = base.data.val_per_domain > 0
    record: dict[str, Any] = {"row": row, "test_domain": centre, "seed": seed, "run_dir": str(run_dir)}
    # The run's own data and folder are set as values (a path is not YAML), the row's settings as overrides. Every
    # centre but the unseen one trains.
    data = replace(base.data, root=root, train_domains=None, test_domain=centre)
    run = replace(base, data=data, train=replace(base.train, out_dir=str(run_dir), seed=seed))
    cfg = with_overrides(run, *(row_overrides(row, base) if row in ABLATION_ROWS else ()))

    evaluated = test_json.is_file() and (val_json.is_file() or not with_val)
    summaries = (test_json, val_json) if evaluated and with_val else (test_json,) if evaluated else ()
    problems = _settings_problems(run_dir, cfg, man, checkpoint, summaries)
    if evaluated and not problems:
        log.info("[%s] %s, unseen centre %s, seed %d: already evaluated in %s", tag, row, centre, seed, run_dir)
        return _read_back(record, run_dir, test_json, val_json if with_val else None)
    if problems:
        what = "a finished run" if evaluated else "an unfinished run"
        if not overwrite:
            raise ValueError(
                f"lodo: {run_dir} holds {what} made with other settings than this study's ({'; '.join(problems)}): "
                f"its results are not this study's; pass --overwrite to train it again, or choose another --out"
            )
        log.warning("[%s] --overwrite: %s holds %s made with other settings (%s): training it again", tag, run_dir,
                    what, "; ".join(problems))  # fmt: skip
    _clear_earlier_results(run_dir, tag)
    log.info("[%s] %s, unseen centre %s, seed %d: training into %s", tag, row, centre, seed, run_dir)
    return _train_and_score(record, cfg, run_dir, centre, checkpoint=checkpoint, with_val=with_val)


def _read_back(record: dict[str, Any], run_dir: Path, test_json: Path, val_json: Path | None) -> dict[str, Any]:
    """A finished run's record from its folder: its evaluations, telemetry and timing."""
    test = json.loads(test_json.read_text())
    record["unseen"] = _summary_means(test)
    record["unseen_cases"] = _summary_cases(test)
    if val_json is not None:
        val = json.loads(val_json.read_text())
        record["held_out"] = _summary_means(val)
        record["held_out_cases"] = _summary_cases(val)
    record["telemetry"] = _telemetry(run_dir / "log.jsonl")
    timing = run_dir / _TIMING
    if timing.is_file():
        record.update(json.loads(timing.read_text()))
    return record


def _clear_earlier_results(run_dir: Path, tag: str) -> None:
    """Whatever lodo wrote for an earlier run in this folder goes before it is trained again: results of the run being
    replaced must never be read back as the new run's."""
    removed = [p for name in _EVALUATIONS for p in clear_evaluation(run_dir / name)]
    if (run_dir / _TIMING).is_file():
        (run_dir / _TIMING).unlink()
        removed.append(run_dir / _TIMING)
    if removed:
        log.info("[%s] removed %d evaluation file(s) of the earlier run in %s", tag, len(removed), run_dir)


def _train_and_score(
    record: dict[str, Any], cfg: Config, run_dir: Path, centre: str, *, checkpoint: str, with_val: bool
) -> dict[str, Any]:
    """Train the run, then score its ``checkpoint`` on the unseen centre and on the training centres' held-out cases;
    the timing is kept beside the run."""
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
            cls: {m: as_float(metrics[m]) for m in METRICS} | {k: int(metrics[k]) for k in COUNTS}
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
