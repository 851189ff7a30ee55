"""Checkpoints of a run: what they hold (weights, optimizer, schedule, updater, every rank's random streams),
writing them atomically, restoring them, and which settings a resumed run may change."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from gsema_fast import distributed
from gsema_fast.config import Config, config_from_dict, config_to_dict
from gsema_fast.data import PREPROCESSING_KEYS
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


# Settings a resumed run cannot change: the networks and the state built for them (model, EMA kind, optimizer kind),
# and what decides the cases and what the network sees (dataset, split, preprocessing, seed). Any other change takes
# effect from the checkpoint's step on.
FIXED_ON_RESUME = (
    "model.",
    "ema.mode",
    "optim.name",
    "data.root",
    "data.manifest",
    "data.train_domains",
    "data.test_domain",
    "data.val_per_domain",
    *(f"data.{key}" for key in PREPROCESSING_KEYS),
    "data.synth_",
    "train.seed",
)
_NOT_COMPARED = ("train.out_dir",)  # a run folder may have been moved


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(state: dict, cfg: Config, path: Path) -> list[str]:
    """Compare a resumed run's config with its checkpoint's: a changed setting of :data:`FIXED_ON_RESUME` is
    refused (one ``ValueError`` naming every such field); the other changes are returned as ``key: old -> new``."""
    try:
        saved = config_to_dict(config_from_dict(state["config"]))  # the stored values, normalised as ours are
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"--resume: {path} holds no config this version can read ({err})") from None
    old, new = _flat(saved), _flat(config_to_dict(cfg))
    changed = [k for k in new if old.get(k) != new[k] and not k.startswith(_NOT_COMPARED)]
    fixed = [k for k in changed if k.startswith(FIXED_ON_RESUME)]
    if fixed:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in fixed)
        raise ValueError(
            f"--resume: {path} was trained with other values of settings a run cannot change ({shown}); resume "
            f"with the checkpoint's values, or start a new run (another --out, or --overwrite)"
        )
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed]


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
