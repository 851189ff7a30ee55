"""The training loop: ``train(cfg)`` reads top to bottom.

Set-up (run folder, data, student and teacher, optimizer and schedule, a resumed run's state, compilation) -> for
each epoch: batches of source patches, the simulated target domain on the device, one teacher-student step, a log
record every ``train.log_every`` steps (the only host reads); then validation of the teacher on held-out cases of
the training centres, ``best.pt`` and ``latest.pt`` -> at the end, ``final.pt`` and the chosen teacher scored once
on the unseen centre (``summary.json``, the printed table).

Run folder (``train.out_dir``): ``config.yaml`` (resolved), ``log.jsonl`` (one record per log interval and per
validation), ``progress.png``, ``checkpoints/{latest,best,final}.pt``, ``summary.json``; ``tensorboard/`` with
``train.loggers: [jsonl, tensorboard]``. One process at a time trains in a folder (``.lock``); a folder that holds
a run is continued (``resume``) or replaced (``overwrite``), never mixed with another run.

The building blocks live beside it in :mod:`~gsema_fast.training.build`, :mod:`~gsema_fast.training.compilation`,
:mod:`~gsema_fast.training.checkpoints`, :mod:`~gsema_fast.training.runfolder` and
:mod:`~gsema_fast.training.monitor`; scoring in :mod:`gsema_fast.evaluation.scoring`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gsema_fast import distributed
from gsema_fast.config import Config, config_to_dict, replace, save_config
from gsema_fast.data import Loaders, TargetTransform, dataset_folder, dataset_identity, load_manifest
from gsema_fast.evaluation.figures import draw_layer_agreement, draw_progress
from gsema_fast.evaluation.scoring import score_volumes
from gsema_fast.files import read_checkpoint, write_json
from gsema_fast.memory import retain_freed_memory
from gsema_fast.step import StepContext, train_step
from gsema_fast.training.build import (
    build_context,
    build_data,
    build_scheduler,
    build_target_transform,
    seed_everything,
    total_steps,
    transform_seed,
)
from gsema_fast.training.checkpoints import (
    apply_settings,
    check_resume_dataset,
    restore,
    resume_changes,
    run_config,
    save_checkpoint,
)
from gsema_fast.training.compilation import compile_blocks, compile_cache_file, load_compile_cache, save_compile_cache
from gsema_fast.training.monitor import IntervalLog, build_loggers, format_table
from gsema_fast.training.runfolder import (
    InterruptFlag,
    RunFolderLock,
    check_run_folder,
    clear_run_folder,
    interrupted,
    remove_leftovers,
    truncate_log,
)

log = logging.getLogger(__name__)

__all__ = ["train"]


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, evaluate_unseen: bool = True) -> dict:
    """Train a teacher-student pair as ``cfg`` says; returns ``{"run_dir", "final", "best", "test"}``.

    The run folder (``train.out_dir``) must be empty, or hold a run to continue (``resume``: from its
    ``checkpoints/latest.pt``, saved after every epoch) or to replace (``overwrite``); one process at a time trains
    in it. ``resume`` refuses a change of the settings the checkpoint depends on
    (:data:`~gsema_fast.training.checkpoints.FIXED_ON_RESUME`) and lets every other change take effect; with
    ``train.deterministic`` on the CPU and an unchanged config the resumed run reproduces the uninterrupted run's
    losses. Ctrl-C stops after the step in flight (:class:`~gsema_fast.training.runfolder.TrainingInterrupted`).

    Protocol: ``best.pt`` is the checkpoint with the best validation Dice on held-out cases of the training
    centres. The unseen centre is read once, after training: the best checkpoint's teacher (the final one without
    validation cases) and the untrained teacher are scored on it (``summary.json``, the printed table), unless
    ``evaluate_unseen`` is False (an experiment runner that scores it itself).
    """
    cfg = run_config(cfg)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in the folder, or replace it")
    # Under torchrun: join the process group; each rank takes its own GPU and share of every batch.
    dist_ctx = distributed.setup(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    lock = RunFolderLock(cfg.train.out_dir) if dist_ctx.is_main else None
    interrupt = InterruptFlag()
    try:
        if lock is not None:
            lock.acquire()
        run = _set_up(cfg, dist_ctx, resume=resume, overwrite=overwrite, evaluate_unseen=evaluate_unseen)
        _fit(run, cfg, interrupt)
        return _finish(run, cfg)
    finally:
        interrupt.disarm()
        if lock is not None:
            lock.release()
        distributed.teardown(dist_ctx)


@dataclasses.dataclass
class _Run:
    """Everything the loop's phases share: what was built, and where the run stands."""

    folder: Path
    main: bool
    device: torch.device
    data: Loaders
    transform: TargetTransform
    ctx: StepContext
    scheduler: torch.optim.lr_scheduler.LambdaLR
    interval: IntervalLog
    compile_cache: Path | None
    initial_teacher: dict | None  # host copy of the untrained teacher, kept only when it will be scored
    total_steps: int
    dataset: dict | None = None  # the dataset's identity, recorded in every checkpoint (rank 0's)
    epoch: int = 0
    step: int = 0
    saved_at: int | None = None  # the step of the last latest.pt
    best_score: float = -1.0
    best_val: dict | None = None  # {"step", "dice"} of best.pt
    last_val: dict | None = None
    compile_started: float | None = None  # set until the first (compiling) step has run

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    def extra(self) -> dict:
        """What a checkpoint records of the run's validation history, and the identity of its dataset."""
        return {
            "best_score": self.best_score,
            "best_val": self.best_val,
            "last_val": self.last_val,
            "dataset": self.dataset,
        }


# ------------------------------------------------------------------------------------------------ set-up


def _set_up(
    cfg: Config, dist_ctx: distributed.Context, *, resume: bool, overwrite: bool, evaluate_unseen: bool
) -> _Run:
    """Check the folder, build data, networks and schedule, restore a resumed run, compile; nothing is written to
    the folder before every check has passed."""
    device, main = dist_ctx.device, dist_ctx.is_main
    if device.type == "cpu" and cfg.train.retain_cpu_memory:
        retain_freed_memory()
    folder = Path(cfg.train.out_dir).expanduser()
    state, changes, identity = _check_folder_and_resumed_run(cfg, folder, main, resume=resume, overwrite=overwrite)
    if cfg.note:
        log.info("%s", cfg.note)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    data = build_data(cfg, rank=dist_ctx.rank, world_size=dist_ctx.world_size, local_rank=dist_ctx.local_rank)
    _log_data(data, cfg, dist_ctx)
    if main and identity is None:
        identity = dataset_identity(data.manifest)
    transform = build_target_transform(cfg, device, rank=dist_ctx.rank)
    ctx = build_context(cfg, device, world_size=dist_ctx.world_size)
    if dist_ctx.rank:  # weights came from rank 0; dropout and other draws differ per rank, as across one batch
        torch.manual_seed(transform_seed(cfg, dist_ctx.rank))
    scheduler = build_scheduler(cfg, ctx.optimizer)
    _log_model(cfg, ctx, device)

    if main:  # only now that data, model and the resumed config passed their checks
        if overwrite:
            clear_run_folder(folder)
        elif resume:
            remove_leftovers(folder)
        save_config(cfg, folder / "config.yaml")
    # Once the folder is settled: a resumed run's sinks drop what was logged after its checkpoint.
    loggers = build_loggers(cfg, folder, resume_step=state["step"] if resume else None) if main else []
    log_path = folder / "log.jsonl" if main and "jsonl" in cfg.train.loggers else None

    # The untrained teacher is scored on the unseen centre only after training (see train's docstring).
    scores_unseen = bool(data.split.test) and evaluate_unseen
    initial_teacher = (
        {k: v.detach().cpu().clone() for k, v in ctx.teacher.state_dict().items()} if scores_unseen else None
    )
    run = _Run(
        folder,
        main,
        device,
        data,
        transform,
        ctx,
        scheduler,
        IntervalLog(log_path, loggers, names={"layer_cos": list(ctx.layers)}),
        compile_cache_file(cfg, device),
        initial_teacher,
        total_steps(cfg),
        dataset=identity,
    )
    if resume:
        _restore(run, cfg, state, changes)
    if cfg.train.compile:
        _start_compiling(run)
    return run


def _check_folder_and_resumed_run(
    cfg: Config, folder: Path, main: bool, *, resume: bool, overwrite: bool
) -> tuple[dict | None, list[str], dict | None]:
    """The run folder checked, and a resumed run's checkpoint read, its config and dataset checked, before anything
    is built or written: ``(state, changed settings, dataset identity)``, all empty for a fresh run."""
    latest = folder / "checkpoints" / "latest.pt"
    if resume and not latest.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {latest}")
    if main:
        check_run_folder(folder, resume=resume, overwrite=overwrite)
    if not resume:
        return None, [], None
    # On the CPU: random-generator states must stay there; weights and optimizer state are copied to the device by
    # their load_state_dict.
    state = read_checkpoint(latest)
    changes = resume_changes(state, cfg, latest)
    identity = None
    if main:
        manifest = load_manifest(dataset_folder(cfg.data), cfg.data.manifest)
        identity = check_resume_dataset(state, manifest, latest)
    return state, changes, identity


def _log_model(cfg: Config, ctx: StepContext, device: torch.device) -> None:
    log.info(
        "model %s (%.1fM parameters), ema.mode %s, bacl %s, amp %s, device %s",
        cfg.model.name,
        sum(p.numel() for p in ctx.student.parameters()) / 1e6,
        cfg.ema.mode,
        "off" if ctx.bacl is None else ctx.bacl.extra_repr(),
        cfg.train.amp,
        device,
    )
    if cfg.loss.recall_weight:
        log.info("recall term for label values %s, weight %g", cfg.loss.recall_classes, cfg.loss.recall_weight)
    small = cfg.data.small_components
    if small.ratio:
        log.info(
            "patches also centred on components of label %d under %g mm^3, weight %g",
            small.label,
            small.below_mm3,
            small.ratio,
        )
    if _mirrors_only_at_the_end(cfg):
        log.info("scoring mirrors the volumes along axes %s; validation during training does not", cfg.eval.mirror_axes)
    elif cfg.eval.mirror_axes:
        log.info("validation and scoring mirror the volumes along axes %s", cfg.eval.mirror_axes)
    if cfg.eval.postprocess:
        log.info("label maps post-processed before scoring: %s", cfg.eval.postprocess.describe())


def _restore(run: _Run, cfg: Config, state: dict, changes: list[str]) -> None:
    """A resumed run's weights, optimizer, schedule, transform and counters; the settings it changed take effect; its
    log is cut back to the checkpoint."""
    restore(state, run.ctx, run.scheduler, run.transform)
    run.epoch, run.step, run.saved_at = state["epoch"], state["step"], state["step"]
    run.best_score, run.last_val = state["best_score"], state["last_val"]
    run.best_val = state.get("best_val")  # older checkpoints have no best_val
    log.info("resumed from %s at epoch %d, step %d", run.checkpoints / "latest.pt", run.epoch, run.step)
    if changes:
        apply_settings(run.ctx, run.scheduler, cfg)
        log.info("changed settings take effect from step %d: %s", run.step, "; ".join(changes))
    if run.main:
        truncate_log(run.folder / "log.jsonl", run.step)


def _start_compiling(run: _Run) -> None:
    """Compile the networks' blocks (the first step pays for it), from the compile cache when it is warm."""
    run.compile_started = time.perf_counter()
    warm = load_compile_cache(run.compile_cache)
    log.info(
        "compiling %d blocks (static shapes, %s); the first step includes compilation",
        compile_blocks(run.ctx),
        f"warm from {run.compile_cache}" if warm else "cold",
    )


def _log_data(data: Loaders, cfg: Config, dist_ctx: distributed.Context) -> None:
    if not data.split.test:
        log.warning(
            "no unseen centre: %s has the one domain %s, so the run trains and validates on it and evaluates nothing "
            "on an unseen centre (summary.json records none)",
            data.manifest.path,
            data.split.train_domains[0],
        )
    if dist_ctx.distributed:
        log.info(
            "%d ranks x batch %d = global batch %d",
            dist_ctx.world_size,
            cfg.data.batch_size,
            dist_ctx.world_size * cfg.data.batch_size,
        )
    log.info(
        "data: train domains %s (%d cases), validation %d cases, unseen domain %s (%d cases)",
        data.split.train_domains,
        len(data.split.train),
        len(data.split.val),
        data.split.test_domain,
        len(data.split.test),
    )


# ------------------------------------------------------------------------------------------------ the loop


def _fit(run: _Run, cfg: Config, interrupt: InterruptFlag) -> None:
    """Epochs of steps, each followed by validation and checkpoints, until the configured steps are done. Ctrl-C
    and a run of non-finite steps end it by raising (after the bar is closed)."""
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", disable=not run.main, dynamic_ncols=True)
    interrupt.arm()
    try:
        while run.epoch < cfg.train.epochs and run.step < run.total_steps:
            _train_epoch(run, cfg, bar, interrupt)
            run.epoch += 1
            _end_epoch(run, cfg)
    finally:
        bar.close()
        interrupt.disarm()


def _train_epoch(run: _Run, cfg: Config, bar: tqdm, interrupt: InterruptFlag) -> None:
    ctx, device = run.ctx, run.device
    run.data.set_epoch(run.epoch)
    ctx.student.train()
    waited = time.perf_counter()
    for batch in run.data.train:
        run.interval.data_wait += time.perf_counter() - waited
        x_s = batch["image"].to(device, non_blocking=True)
        y_s = batch["label"].to(device, non_blocking=True)
        x_t, y_t = run.transform(x_s, y_s)
        # The teacher's DCE terms are only logged: compute them on the last step of each log interval.
        logging_step = (run.step + 1) % cfg.train.log_every == 0 or run.step + 1 == run.total_steps
        metrics = train_step(
            ctx,
            x_s,
            y_s,
            x_t,
            y_t,
            teacher_logits=cfg.loss.teacher_terms and logging_step,
            layers=cfg.train.layer_agreement and logging_step,
        )
        run.scheduler.step()
        run.interval.add(metrics)
        run.step += 1
        bar.update(1)
        if run.compile_started is not None:
            log.info("first step (with compilation) took %.1f s", time.perf_counter() - run.compile_started)
            run.compile_started = None
            if run.main:
                save_compile_cache(run.compile_cache)
        if run.step % cfg.train.log_every == 0 or run.step == run.total_steps:
            _log_interval(run, cfg, bar)
        if distributed.any_rank(interrupt.requested):  # every rank stops after the same step
            raise interrupted(run.step, run.saved_at, run.checkpoints / "latest.pt")
        if run.step >= run.total_steps:
            return
        waited = time.perf_counter()


def _log_interval(run: _Run, cfg: Config, bar: tqdm) -> None:
    record = run.interval.flush(kind="train", step=run.step, epoch=run.epoch, lr=run.scheduler.get_last_lr()[0])
    bar.set_postfix(loss=f"{record['total']:.3f}", aligned=f"{record.get('aligned', float('nan')):.2f}")
    if record["skipped_steps"]:
        log.warning(
            "step %d: %d step(s) with a non-finite loss or gradient were skipped", run.step, record["skipped_steps"]
        )
    if run.interval.nonfinite_run >= cfg.train.max_nonfinite_steps:
        latest = run.checkpoints / "latest.pt"
        raise RuntimeError(
            f"stopped after {run.interval.nonfinite_run} consecutive steps with a non-finite loss or gradient "
            f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); the last good checkpoint is "
            f"{latest if latest.exists() else 'not written yet'}"
        )


def _end_epoch(run: _Run, cfg: Config) -> None:
    """Validate the teacher (best.pt when it improved), save latest.pt, redraw progress.png."""
    last = run.epoch >= cfg.train.epochs or run.step >= run.total_steps
    if run.data.split.val and ((cfg.train.val_every and run.epoch % cfg.train.val_every == 0) or last):
        online = _online_validation(cfg)
        val = score_volumes(
            run.ctx.teacher, run.data.val, run.data.manifest.labels, online, amp=run.ctx.amp_dtype, desc="validation"
        )
        run.last_val = val["mean"]
        record = {"kind": "val", "step": run.step, "epoch": run.epoch, "dice": val["mean"]}
        if cfg.train.val_student and cfg.ema.mode != "none":  # without an EMA the teacher mirrors the student
            student = score_volumes(
                run.ctx.student, run.data.val, run.data.manifest.labels, online, amp=run.ctx.amp_dtype, desc="student"
            )
            record["student_dice"] = student["mean"]
        run.interval.write(record)
        score = float(np.nanmean(list(val["mean"].values()))) if val["mean"] else float("nan")
        log.info("epoch %d: validation Dice (teacher) %s", run.epoch, _rounded(val["mean"]))
        if "student_dice" in record:
            log.info("epoch %d: validation Dice (student) %s", run.epoch, _rounded(record["student_dice"]))
        if score > run.best_score:  # the same on every rank: the metrics were gathered
            run.best_score, run.best_val = score, {"step": run.step, "dice": val["mean"]}
            _save(run, cfg, run.checkpoints / "best.pt")
    _save(run, cfg, run.checkpoints / "latest.pt")
    run.saved_at = run.step
    if run.main and run.interval.path is not None and run.interval.path.exists():
        draw_progress(run.interval.path, run.folder / "progress.png")
        run.interval.figure("progress", run.folder / "progress.png", run.step)
        if draw_layer_agreement(run.interval.path, run.folder / "layer_agreement.png"):
            run.interval.figure("layer_agreement", run.folder / "layer_agreement.png", run.step)


def _mirrors_only_at_the_end(cfg: Config) -> bool:
    """Scoring mirrors (``eval.mirror_axes``) but validation during training does not (``train.val_mirror`` off)."""
    return bool(cfg.eval.mirror_axes) and not cfg.train.val_mirror


def _online_validation(cfg: Config) -> Config:
    """The settings validation during training scores with."""
    return replace(cfg, eval=replace(cfg.eval, mirror_axes=[])) if _mirrors_only_at_the_end(cfg) else cfg


def _rounded(dice: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in dice.items()}


def _save(run: _Run, cfg: Config, path: Path) -> None:
    save_checkpoint(path, run.ctx, run.scheduler, run.transform, cfg, epoch=run.epoch, step=run.step, extra=run.extra())


# ------------------------------------------------------------------------------------------------ the end


def _finish(run: _Run, cfg: Config) -> dict:
    """final.pt; the chosen and the untrained teacher scored once on the unseen centre; summary.json."""
    final = run.checkpoints / "final.pt"
    _save(run, cfg, final)
    best = run.checkpoints / "best.pt"
    result = {"run_dir": run.folder, "final": final, "best": best if best.exists() else None, "test": None}
    untrained = None
    if run.initial_teacher is not None:
        result["test"], untrained, result["validation"] = _score_unseen(run, cfg, best=result["best"])
        test = {"dice": result["test"]["mean"], "untrained_dice": untrained}
        run.interval.write({"kind": "test", "step": run.step, "epoch": run.epoch, **test})
    if run.main:
        summary = {
            "test_domain": run.data.split.test_domain,  # None: the dataset had no unseen centre
            "checkpoint": str(result["best"] or final),
            "untrained": untrained,
            "test": result["test"],
            "validation": result.get("validation", run.best_val),
            "steps": run.step,
            "config": config_to_dict(cfg),
        }
        write_json(summary, run.folder / "summary.json")  # strict JSON: a NaN Dice (no such class) is null
        save_compile_cache(run.compile_cache)  # now with the evaluation's shapes too
    run.interval.close()
    return result


def _score_unseen(run: _Run, cfg: Config, *, best: Path | None) -> tuple[dict, dict, dict | None]:
    """The chosen teacher's and the untrained one's scores on the unseen centre, and the chosen teacher's held-out
    validation record (scored again, mirrored, where validation during training did not mirror)."""
    teacher, labels = run.ctx.teacher, run.data.manifest.labels
    if best is not None:
        teacher.load_state_dict(read_checkpoint(best)["teacher"])
        chosen = f"best on held-out training-centre cases, step {run.best_val['step']}"
    else:
        chosen = f"final, step {run.step}: no validation cases to choose by"
    amp = run.ctx.amp_dtype
    test = score_volumes(teacher, run.data.test, labels, cfg, amp=amp, hd95=True, desc="teacher, unseen centre")
    validation = run.best_val
    if validation and best is not None and _mirrors_only_at_the_end(cfg):
        heldout = score_volumes(teacher, run.data.val, labels, cfg, amp=amp, desc="teacher, held-out, mirrored")
        validation = {**validation, "dice": heldout["mean"], "dice_without_mirroring": validation["dice"]}
    teacher.load_state_dict(run.initial_teacher)
    untrained = score_volumes(teacher, run.data.test, labels, cfg, amp=amp, desc="untrained teacher, unseen centre")
    rows = {"untrained teacher, unseen centre": untrained["mean"], f"teacher ({chosen}), unseen centre": test["mean"]}
    if validation:
        rows["the same teacher, held-out training-centre cases"] = validation["dice"]
    if run.main:
        title = (
            f"Dice after {run.step} steps (ema.mode {cfg.ema.mode}); unseen centre {run.data.split.test_domain}, "
            f"{len(test['cases'])} cases"
        )
        log.info("\n%s", format_table(title, rows))
    return test, untrained["mean"], validation
