"""Building a run from its config: random seeds, data loaders, student and teacher with their optimizer, schedule
and step context (:class:`gsema_fast.step.StepContext`), and the target-domain transform. Shared by the training
loop (:mod:`gsema_fast.training.loop`), the step benchmark (:mod:`gsema_fast.training.benchstep`) and, through
``train``, the experiments."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import torch

from gsema_fast import distributed
from gsema_fast.config import Config, replace
from gsema_fast.data import Loaders, TargetTransform, build_loaders, dataset_folder, load_manifest
from gsema_fast.ema import GSEMA
from gsema_fast.inference.window import amp_dtype
from gsema_fast.losses import DiceCE
from gsema_fast.models import build_model
from gsema_fast.step import StepContext, bacl_from_config, updater_from_config

# A prime: the ranks' target-transform seeds (see transform_seed) never meet another run's seeds 0, 1, 2, ...
TRANSFORM_SEED_STRIDE = 7919


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_data(cfg: Config, *, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> Loaders:
    """Loaders for training patches, validation volumes (held-out cases of the training centres) and the unseen
    centre (``data.test_domain``; None: the dataset's last domain); in a multi-process run, this rank's share."""
    d = cfg.data
    # The built-in data is synthesised where missing by one process at a time: rank 0, then the first rank of each
    # other machine (which finds it on a shared file system), then everyone else.
    if rank == 0:
        root = dataset_folder(d)
    distributed.barrier()
    if rank != 0 and local_rank == 0:
        root = dataset_folder(d)
    distributed.barrier()
    if local_rank != 0:
        root = dataset_folder(d)
    if d.test_domain is None:
        domains = load_manifest(root, d.manifest, check=False).domains  # build_loaders checks the cases next
        d = replace(d, test_domain=domains[-1] if len(domains) > 1 else None)
    t = cfg.train
    loaders = build_loaders(root, d, steps_per_epoch=t.steps_per_epoch, seed=t.seed, rank=rank, world_size=world_size)
    # The label maps are post-processed only at validation: a misspelt class is refused now, not after an epoch.
    cfg.eval.postprocess.check(loaders.manifest.labels, str(loaders.manifest.path))
    return loaders


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    # Fused optimizers take the step's skip flag (found_inf) on the device: no host sync for NaN handling.
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, fused=True)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=True)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step: ``step`` (x gamma every step_every_epochs, the paper's schedule), ``cosine``
    (to min_lr over the run) or ``constant``."""
    o, t = cfg.optim, cfg.train
    total = total_steps(cfg)
    floor = o.min_lr / o.lr if o.lr else 0.0

    def factor(step: int) -> float:
        if o.schedule == "step":
            return o.gamma ** ((step // t.steps_per_epoch) // o.step_every_epochs)
        if o.schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_context(cfg: Config, device: torch.device, *, world_size: int = 1) -> StepContext:
    """Student, teacher, optimizer, losses and gradient buffers for ``train_step``. With ``world_size`` > 1 (the
    default process group) every rank starts from rank 0's weights and the step averages gradients across ranks."""
    student = build_model(cfg.model).to(device)
    distributed.broadcast_module_(student)
    e = cfg.ema
    updater = updater_from_config(e, student)
    if updater is None:
        teacher = GSEMA(student).teacher  # a frozen copy that mirrors the student
    else:
        teacher = updater.teacher if isinstance(updater, GSEMA) else updater.module
    teacher.eval()
    bacl = bacl_from_config(cfg.loss, cfg.bacl)
    amp = amp_dtype(cfg.train.amp, device)
    return StepContext(
        student=student,
        teacher=teacher,
        optimizer=build_optimizer(cfg, [p for p in student.parameters() if p.requires_grad]),
        mode=e.mode,
        updater=updater,
        dce=DiceCE.from_config(cfg.loss),
        bacl=bacl,
        lambda_sup=cfg.loss.lambda_sup,
        lambda_con=cfg.loss.lambda_con,
        amp_dtype=amp,
        scaler=torch.amp.GradScaler(device.type) if amp == torch.float16 else None,
        teacher_terms=cfg.loss.teacher_terms,
        world_size=world_size,
    )


def total_steps(cfg: Config) -> int:
    """Optimizer steps of the whole run: ``train.epochs * train.steps_per_epoch``, capped by ``train.max_steps``."""
    t = cfg.train
    return t.epochs * t.steps_per_epoch if t.max_steps is None else min(t.max_steps, t.epochs * t.steps_per_epoch)


def transform_seed(cfg: Config, rank: int = 0) -> int:
    """The seed of rank ``rank``'s target transform: each rank simulates its own target domains, and rank 0 keeps
    the single-process seed."""
    return cfg.train.seed + TRANSFORM_SEED_STRIDE * rank


def build_target_transform(cfg: Config, device: torch.device, *, rank: int = 0) -> TargetTransform:
    """The target-domain simulation T of ``cfg.target_transform`` on ``device``, seeded by :func:`transform_seed`."""
    return TargetTransform.from_config(cfg.target_transform, seed=transform_seed(cfg, rank)).to(device)
