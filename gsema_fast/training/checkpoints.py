"""Checkpoints of a run: what they hold (weights, optimizer, schedule, updater, every rank's random streams, the
config and the dataset's identity), writing them atomically, restoring them, which settings a resumed run may
change, and whether a finished run's results are those of given settings."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from gsema_fast import distributed
from gsema_fast.config import Config, absolute_paths, config_from_dict, config_to_dict, resolve_auto
from gsema_fast.data import PREPROCESSING_KEYS, Manifest, dataset_identity, identity_changes
from gsema_fast.ema import GSEMA
from gsema_fast.files import atomic_path
from gsema_fast.models import unwrap_model
from gsema_fast.step import StepContext

log = logging.getLogger(__name__)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` that never leaves a half-written checkpoint; a failed write (full disk) is a ``WriteError``
    naming the file."""
    # Through a Python file object: the system's error (ENOSPC) then comes back as such, where torch's own file
    # writer reports a failed check in its zip container instead.
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        torch.save(obj, handle)


def numpy_rng_state() -> dict:
    """numpy's global random state in plain types (a list of ints for its key), which checkpoints loaded with
    ``weights_only=True`` hold without allow-listing numpy."""
    state = np.random.get_state(legacy=False)
    state["state"] = {**state["state"], "key": state["state"]["key"].tolist()}
    return state


def set_numpy_rng_state(state) -> None:
    """Inverse of :func:`numpy_rng_state`; also takes numpy's own tuple (checkpoints written before)."""
    if isinstance(state, dict):
        state = {**state, "state": {**state["state"], "key": np.asarray(state["state"]["key"], dtype=np.uint32)}}
    np.random.set_state(state)


def rank_state(transform) -> dict:
    """What differs between ranks: random streams and the target transform's generators."""
    return {
        "target_transform": transform.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": numpy_rng_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }


def save_checkpoint(path: Path, ctx, scheduler, transform, cfg, *, epoch: int, step: int, extra: dict) -> None:
    """Every rank calls this (their random states are gathered); rank 0 writes the file."""
    ranks = distributed.all_gather_object(rank_state(transform))
    if distributed.is_main_process():
        state = checkpoint_state(ctx, scheduler, transform, cfg, epoch=epoch, step=step, extra=extra)
        if len(ranks) > 1:
            state["ranks"] = ranks
        atomic_save(state, path)
    distributed.barrier()


def checkpoint_state(ctx, scheduler, transform, cfg, *, epoch: int, step: int, extra: dict) -> dict:
    state = {
        "config": config_to_dict(cfg),
        "student": unwrap_model(ctx.student).state_dict(),
        "teacher": unwrap_model(ctx.teacher).state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        "updater": ctx.updater.state_dict() if ctx.updater is not None else None,
        **rank_state(transform),  # this rank's; save_checkpoint adds every rank's in a multi-process run
        "epoch": epoch,
        "step": step,
    }
    state.update(extra)
    return state


def restore(state: dict, ctx, scheduler, transform) -> None:
    unwrap_model(ctx.student).load_state_dict(state["student"])
    unwrap_model(ctx.teacher).load_state_dict(state["teacher"])
    ctx.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ctx.scaler is not None and state["scaler"] is not None:
        ctx.scaler.load_state_dict(state["scaler"])
    if ctx.updater is not None and state["updater"] is not None:
        ctx.updater.load_state_dict(state["updater"])
    ranks, rank = state.get("ranks", [state]), distributed.rank()
    if len(ranks) != distributed.world_size():
        log.warning(
            "the checkpoint was written by %d rank(s), this run has %d: weights and optimizer resume exactly; ranks "
            "the checkpoint does not know keep fresh random streams",
            len(ranks),
            distributed.world_size(),
        )
    if rank >= len(ranks):
        return
    own = ranks[rank]
    transform.load_state_dict(own["target_transform"])
    random.setstate(own["rng"]["python"])
    set_numpy_rng_state(own["rng"]["numpy"])
    torch.set_rng_state(own["rng"]["torch"].cpu())  # the checkpoint may have been mapped to a GPU
    if own["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in own["rng"]["cuda"]])


def run_config(cfg: Config) -> Config:
    """The config a run is trained with and stores: ``auto`` fields resolved for this machine, dataset paths
    absolute."""
    return absolute_paths(resolve_auto(cfg))


# Where the dataset lies: its recorded identity (gsema_fast.data.identity), not the path, says whether it changed, so a
# dataset moved to another folder is the same dataset.
DATASET_LOCATION = tuple(f"data.{key}" for key in ("root", "manifest", "synth_dir"))
# Settings a resumed run cannot change: the networks and the state built for them (model, EMA kind, optimizer kind),
# and what decides the cases and what the network sees (the dataset, checked by its identity; its split and
# preprocessing; the seed). Any other change takes effect from the checkpoint's step on.
FIXED_ON_RESUME = (
    "model.",
    "ema.mode",
    "optim.name",
    "data.train_domains",
    "data.test_domain",
    "data.val_per_domain",
    *(f"data.{key}" for key in PREPROCESSING_KEYS),
    "data.synth_domains",
    "data.synth_cases_per_domain",
    "data.synth_size",
    "data.synth_seed",
    "train.seed",
)
_NOT_COMPARED = ("train.out_dir",)  # a run folder may have been moved
# Settings that change where files are or how the work is done, never a number a run produces: a finished run made
# with other values of these is still a result of the settings it is reused under (gsema-fast lodo).
NOT_RESULT_SETTINGS = (
    "note",
    "train.out_dir",
    *DATASET_LOCATION,
    "data.cache",
    "data.cache_dir",
    "train.compile_cache",
    "train.compile_cache_dir",
    "train.loggers",
    "train.retain_cpu_memory",
    "train.dist_timeout_s",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _stored_config(state: dict, path: Path, what: str) -> dict:
    """The checkpoint's config as flat ``key: value``, normalised as a config built now is (relative dataset paths
    of checkpoints written before they were stored absolute are taken from the working directory)."""
    try:
        saved = config_from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{what}: {path} holds no config this version can read ({err})") from None
    return _flat(config_to_dict(absolute_paths(saved)))


def _differences(old: dict, cfg: Config, ignored: tuple[str, ...]) -> list[tuple[str, object, object]]:
    new = _flat(config_to_dict(cfg))
    return [(k, old.get(k), new[k]) for k in new if old.get(k) != new[k] and not k.startswith(ignored)]


def _shown(changes: list[tuple[str, object, object]]) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)


def resume_changes(state: dict, cfg: Config, path: Path) -> list[str]:
    """Compare a resumed run's config with its checkpoint's: a changed setting of :data:`FIXED_ON_RESUME` is
    refused (one ``ValueError`` naming every such field); the other changes are returned as ``key: old -> new``.
    A checkpoint without a dataset identity (written by an earlier version) also fixes the dataset's location."""
    changed = _differences(_stored_config(state, path, "--resume"), cfg, _NOT_COMPARED)
    fixed_keys = FIXED_ON_RESUME if "dataset" in state else (*FIXED_ON_RESUME, *DATASET_LOCATION)
    fixed = [c for c in changed if c[0].startswith(fixed_keys)]
    if fixed:
        raise ValueError(
            f"--resume: {path} was trained with other values of settings a run cannot change ({_shown(fixed)}); "
            f"resume with the checkpoint's values, or start a new run (another --out, or --overwrite)"
        )
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in changed]


def check_resume_dataset(state: dict, manifest: Manifest, path: Path) -> dict | None:
    """Refuse to resume on another dataset than the checkpoint's (one ``ValueError`` naming what changed). Returns the
    dataset's identity to store from now on (None when the checkpoint predates identities: then only the dataset's
    location is compared, by :func:`resume_changes`, and a warning says so)."""
    recorded = state.get("dataset")
    if recorded is None:
        log.warning(
            "--resume: %s records no dataset identity (written by an earlier version): only the dataset's location "
            "is compared, not its cases and files",
            path,
        )
        return None
    changes = identity_changes(recorded, manifest)
    if changes:
        raise ValueError(
            f"--resume: the dataset {manifest.path} is not the one {path} was trained on: {'; '.join(changes)}; "
            f"resume on the original data, or start a new run (another --out, or --overwrite)"
        )
    return dataset_identity(manifest, previous=recorded)


def result_changes(state: dict, cfg: Config, manifest: Manifest, path: Path) -> list[str]:
    """What a finished run's checkpoint ``state`` was made with that differs from training ``cfg`` on ``manifest``
    now: every setting that changes its numbers (all but :data:`NOT_RESULT_SETTINGS`, compared after
    :func:`run_config`), and the dataset (cases, domains, file contents). [] when its results are those of these
    settings."""
    changed = _differences(_stored_config(state, path, "run"), run_config(cfg), NOT_RESULT_SETTINGS)
    out = [f"{key}: {old!r} -> {new!r}" for key, old, new in changed]
    if "dataset" not in state:
        out.append("no record of the dataset it was trained on (written by an earlier version)")
    else:
        out += [f"dataset: {change}" for change in identity_changes(state["dataset"], manifest)]
    return out


def apply_settings(ctx: StepContext, scheduler, cfg: Config) -> None:
    """Give the restored optimizer, schedule and GS-EMA updater the config's hyperparameters: their state dicts
    carry the values they were built with, which would silently outlive a change made on resume."""
    o = cfg.optim
    scheduler.base_lrs = [o.lr for _ in ctx.optimizer.param_groups]
    for group, factor in zip(ctx.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = o.lr
        group["lr"] = o.lr * factor(scheduler.last_epoch)  # what the schedule's step would have set
        group["weight_decay"] = o.weight_decay
        if "momentum" in group:
            group["momentum"] = o.momentum
    if isinstance(ctx.updater, GSEMA):
        e = cfg.ema
        ctx.updater.decay_aligned, ctx.updater.decay_conflict = e.decay_aligned, e.decay_conflict
        ctx.updater.rule, ctx.updater.warmup = e.rule, e.warmup
