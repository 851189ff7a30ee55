"""The training loop: ``train(cfg)`` reads top to bottom.

Data (built-in phantoms or a NIfTI dataset) -> student and teacher -> optimizer and schedule -> for each epoch:
batches of source patches, the simulated target domain on the device, one teacher-student step, a log record every
``train.log_every`` steps (the only host reads), validation of the teacher every ``train.val_every`` epochs,
checkpoints. At the end the teacher (the domain-generalised model) is evaluated on the unseen centre.

Run folder (``train.out_dir``): ``config.yaml`` (resolved), ``log.jsonl`` (one record per log interval and per
validation), ``progress.png``, ``checkpoints/{latest,best,final}.pt``, ``summary.json``; ``tensorboard/`` with
``train.loggers: [jsonl, tensorboard]``. One process at a time
trains in a folder (``.lock``); a folder that holds a run is continued (``resume``) or replaced (``overwrite``),
never mixed with another run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gsema_fast import distributed
from gsema_fast.config import Config, config_from_dict, config_to_dict, resolve_auto, save_config
from gsema_fast.ema import GSEMA
from gsema_fast.files import WriteError, atomic_path, read_checkpoint, write_json
from gsema_fast.losses import DiceCE
from gsema_fast.memory import retain_freed_memory
from gsema_fast.models import build_model, repeated_blocks
from gsema_fast.step import StepContext, bacl_from_config, train_step, updater_from_config

log = logging.getLogger(__name__)

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# ------------------------------------------------------------------------------------------------ building blocks


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_data(cfg: Config, *, rank: int = 0, world_size: int = 1, local_rank: int = 0):
    """Loaders for training patches, validation volumes (held-out cases of the training centres) and the unseen
    centre (``data.test_domain``; None: the dataset's last domain); in a multi-process run, this rank's share."""
    from gsema_fast.data import build_loaders, dataset_folder, load_manifest

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
    test_domain = d.test_domain
    if test_domain is None:
        domains = load_manifest(root, d.manifest, check=False).domains  # build_loaders checks the cases next
        test_domain = domains[-1] if len(domains) > 1 else None
    return build_loaders(
        root,
        manifest=d.manifest,
        train_domains=d.train_domains,
        test_domain=test_domain,
        patch_size=d.patch_size,
        spacing=d.spacing,
        batch_size=d.batch_size,
        samples_per_volume=d.samples_per_volume,
        class_ratios=d.class_ratios,
        clip_percentiles=d.clip_percentiles,
        intensity=d.intensity,
        val_per_domain=d.val_per_domain,
        steps_per_epoch=cfg.train.steps_per_epoch,
        cache=d.cache,
        cache_dir=d.cache_dir,
        num_workers=d.num_workers,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
    )


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
    total = t.epochs * t.steps_per_epoch if t.max_steps is None else min(t.max_steps, t.epochs * t.steps_per_epoch)
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
    amp_dtype = AMP_DTYPES[cfg.train.amp]
    return StepContext(
        student=student,
        teacher=teacher,
        optimizer=build_optimizer(cfg, [p for p in student.parameters() if p.requires_grad]),
        mode=e.mode,
        updater=updater,
        dce=DiceCE(batch=cfg.loss.batch_dice),
        bacl=bacl,
        lambda_sup=cfg.loss.lambda_sup,
        lambda_con=cfg.loss.lambda_con,
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None,
        teacher_terms=cfg.loss.teacher_terms,
        world_size=world_size,
    )


def compile_blocks(ctx: StepContext) -> int:
    """Compile each repeated block of student and teacher with static shapes; equal blocks share compiled code, so
    the first step compiles each distinct block once rather than the whole network."""
    blocks = [block for net in (ctx.student, ctx.teacher) for _, block in repeated_blocks(net)]
    # Every compiled block is one code object to dynamo (Module._call_impl), so each distinct (block, shape, grad
    # mode) is one more entry of one cache: past the default limit of 8 the rest would silently run eager.
    # Room for each block at the student's, the teacher's and the sliding window's batch, with and without grad.
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    # The step walks the encoder's backward twice (its DCE pass keeps the graph for BACL's pass); compiled backward
    # graphs that donate their saved buffers allow only one walk.
    functorch_config.donated_buffer = False
    needed = 6 * len(blocks)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, needed)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 2 * needed)
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def compile_cache_file(cfg: Config, device: torch.device) -> Path | None:
    """Where the compiled code of this run's blocks is kept between runs (None: compilation or its cache is off).

    The file is named after what decides the compiled graphs: torch version, device, model, patch and batch sizes,
    AMP and the sliding window's batch. Inductor's own caches key every graph too, so a stale file only misses."""
    cfg = resolve_auto(cfg, device.type)  # "auto" settings name the same file as their resolved values
    t = cfg.train
    if not t.compile or not t.compile_cache:
        return None
    folder = t.compile_cache_dir
    if folder is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "gsema-fast", "compiled")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = [
        torch.__version__,
        device_name,
        config_to_dict(cfg)["model"],
        cfg.data.patch_size,
        cfg.data.batch_size,
        t.amp,
        cfg.eval.sw_batch_size,
    ]
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(folder).expanduser() / f"{cfg.model.name}-{digest}.bin"


def load_compile_cache(path: Path | None) -> bool:
    """Load compiled code saved by an earlier run; False when there is none (or it cannot be read).

    Inductor's own on-disk cache (generated code, compiled CPU modules, Triton binaries) moves next to the file
    unless ``TORCHINDUCTOR_CACHE_DIR`` is set: its default lives in /tmp, which does not outlast a reboot, and the
    saved artifacts alone still leave the CPU's C++ modules to be rebuilt."""
    if path is None:
        return False
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path.parent / "inductor"))
    if not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as err:  # a file from another torch build: compile afresh and overwrite it
        log.warning("compile cache %s could not be loaded (%s); compiling from scratch", path, err)
        return False
    return True


def save_compile_cache(path: Path | None) -> None:
    """Save everything compiled in this process so far (blocks of every shape and grad mode met)."""
    if path is None:
        return
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(artifacts[0])


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_teacher(
    ctx: StepContext, loader, labels: dict, cfg: Config, device: torch.device, what: str, *, hd95: bool = False
) -> dict:
    """Mean Dice per foreground class of the teacher on whole volumes (sliding window), and per case. In a
    multi-process run ``loader`` holds this rank's share of the cases (or is None) and every rank returns the
    metrics of all cases, gathered."""
    from gsema_fast.evaluate import case_metrics, predict_volume

    net = ctx.teacher
    per_case = []
    for item in tqdm(loader or [], desc=what, leave=False, disable=not is_main_process()):
        image = item["image"].to(device)
        logits = predict_volume(
            net,
            image,
            roi_size=cfg.data.patch_size,
            overlap=cfg.eval.overlap,
            sw_batch_size=cfg.eval.sw_batch_size,
            mode=cfg.eval.mode,
            amp_dtype=ctx.amp_dtype,
        )
        pred = logits.argmax(1)[0].cpu()
        ref = item["label"][0, 0].cpu()
        # Millimetres and millilitres from the volume's affine: without data.spacing the loader only reorients, so
        # these are the numbers `gsema-fast evaluate` computes on the image's own grid.
        affine = np.asarray(item["image"].affine).reshape(-1, 4, 4)[0]
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        metrics = case_metrics(pred, ref, labels, spacing, hd95=hd95)
        per_case.append({"case": item["case"][0], "domain": str(item["domain"][0]), **metrics})
    if distributed.world_size() > 1:
        shares = distributed.all_gather_object(per_case)
        # back to the single-process order: rank r evaluated cases r, r + world, r + 2 world, ...
        longest = max(map(len, shares))
        per_case = [share[i] for i in range(longest) for share in shares if i < len(share)]
    return {"cases": per_case, "mean": _mean_dice(per_case)}


def _mean_dice(per_case: list[dict]) -> dict[str, float]:
    classes = [k for k, v in per_case[0].items() if isinstance(v, dict) and "dice" in v] if per_case else []
    means = {}
    for name in classes:
        values = [c[name]["dice"] for c in per_case if not math.isnan(c[name]["dice"])]
        means[name] = float(np.mean(values)) if values else float("nan")
    return means


# ------------------------------------------------------------------------------------------------ checkpoints


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


def _rank_state(transform) -> dict:
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
    ranks = distributed.all_gather_object(_rank_state(transform))
    if is_main_process():
        state = checkpoint_state(ctx, scheduler, transform, cfg, epoch=epoch, step=step, extra=extra)
        if len(ranks) > 1:
            state["ranks"] = ranks
        atomic_save(state, path)
    distributed.barrier()


def checkpoint_state(ctx, scheduler, transform, cfg, *, epoch: int, step: int, extra: dict) -> dict:
    from gsema_fast.models import unwrap_model

    state = {
        "config": config_to_dict(cfg),
        "student": unwrap_model(ctx.student).state_dict(),
        "teacher": unwrap_model(ctx.teacher).state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        "updater": ctx.updater.state_dict() if ctx.updater is not None else None,
        **_rank_state(transform),  # this rank's; save_checkpoint adds every rank's in a multi-process run
        "epoch": epoch,
        "step": step,
    }
    state.update(extra)
    return state


def restore(state: dict, ctx, scheduler, transform) -> None:
    from gsema_fast.models import unwrap_model

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
    "data.spacing",
    "data.clip_percentiles",
    "data.intensity",
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


def truncate_log(path: Path, step: int) -> None:
    """Drop the records written after the checkpoint a run resumes from (and a last line cut short by a kill):
    the resumed run writes those steps again, once."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept))
        log.info("%s: dropped %d record(s) written after step %d, where the run resumes", path, dropped, step)


# ------------------------------------------------------------------------------------------------ the run folder

LOCK_NAME = ".lock"
# What a run writes into its folder; --overwrite removes these (and only these) of the previous run.
RUN_FILES = ("config.yaml", "log.jsonl", "progress.png", "summary.json")
RUN_FOLDERS = ("tensorboard",)
CHECKPOINT_FILES = ("latest.pt", "best.pt", "final.pt")


class RunFolderLock:
    """One training process per run folder, for the whole run: ``fcntl.flock`` on ``<folder>/.lock``, a file that
    names the holder's process and host.

    The kernel drops the lock when its process ends, however it ends, so the lock file of a killed run is simply
    taken over; a second live process is refused, naming the first. Folders this lock created are removed again
    when the run leaves them empty (a run that failed before writing anything)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []

    def acquire(self) -> RunFolderLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"run folder {self.folder} is a file, not a folder")
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise ValueError(
                        f"run folder {self.folder} is in use by {holder} (lock {self.path}); wait for that run to "
                        f"end or choose another --out"
                    ) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self.fd = fd
                else:  # the holder ended and removed the file while this process opened it: lock the new one
                    os.close(fd)
            stale = os.read(self.fd, 256).decode(errors="replace").strip()
            if stale:
                log.info("run folder %s: taking over the lock of %s, which no longer runs", self.folder, stale)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as err:  # a read-only or full file system
            self.release()
            raise WriteError(self.folder, err) from err
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: nobody locks a file that is about to vanish
            os.close(self.fd)
            self.fd = None
        for folder in self.created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


def check_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """A fresh run needs an empty folder, or ``overwrite``; a resumed one its ``checkpoints/latest.pt``."""
    latest = folder / "checkpoints" / "latest.pt"
    if resume:
        if not latest.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {latest}")
        return
    entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME) if folder.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise FileExistsError(
            f"run folder {folder} is not empty ({shown}): pass --resume to continue its run, --overwrite to replace "
            f"it, or choose another --out"
        )


def clear_run_folder(folder: Path) -> None:
    """--overwrite: remove the previous run's outputs (other files in the folder stay)."""
    paths = [folder / name for name in RUN_FILES] + [folder / "checkpoints" / name for name in CHECKPOINT_FILES]
    removed = [p for p in paths if p.is_file()]
    for path in removed:
        path.unlink()
    for name in RUN_FOLDERS:  # the event files of the previous run would otherwise mix with the new run's
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)
            removed.append(folder / name)
    if removed:
        log.info("--overwrite: removed %d file(s) of the previous run in %s", len(removed), folder)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the run after a whole step; the message says where it stopped and how to go on."""


class InterruptFlag:
    """While armed, Ctrl-C (SIGINT) asks the loop to stop after the step in flight instead of raising wherever it
    lands, so the run ends with its files whole; a second Ctrl-C raises at once. Only in the main thread of a
    single-process run (under torchrun, signals are torchrun's)."""

    def __init__(self) -> None:
        self.requested = False
        self._armed = False
        self._previous = None

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread() or distributed.world_size() > 1:
            return
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started with Ctrl-C ignored (nohup, &): keep it so
            return
        self._previous = signal.signal(signal.SIGINT, self._handle)
        self._armed = True

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.disarm()

    def disarm(self) -> None:
        if self._armed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._armed = False


def interrupted(step: int, saved_at: int | None, latest: Path) -> TrainingInterrupted:
    if saved_at is None:
        return TrainingInterrupted(f"interrupted at step {step} before the first checkpoint; start again (--overwrite)")
    return TrainingInterrupted(f"interrupted at step {step}; resume with --resume (from step {saved_at}, {latest})")


# ------------------------------------------------------------------------------------------------ logging


class IntervalLog:
    """Sums the step's device scalars between log records; the host reads them once per interval. Records go to
    ``path`` (JSON lines, None: nowhere) and to each of ``loggers`` (``write(record)``, ``figure(name, png, step)``,
    ``close()``)."""

    def __init__(self, path: Path | None, loggers: list = ()) -> None:
        self.path = path
        self.loggers = list(loggers)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # some terms (the teacher's) are computed on some steps only
        self.steps = 0
        self.started = time.perf_counter()
        self.nonfinite_run = 0
        self.data_wait = 0.0  # host seconds spent waiting for the loader in this interval

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.float()
            if k in self.sums:
                self.sums[k] += v
            else:
                self.sums[k] = v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def flush(self, **fields) -> dict:
        """Write one record (every rank calls this: the interval's means are averaged across ranks)."""
        keys = sorted(self.sums)
        if keys:
            means = torch.stack([self.sums[k] / self.counts[k] for k in keys])
            means = distributed.all_reduce_mean(means).tolist()  # the interval's only host read
        values = dict(zip(keys, means, strict=True)) if keys else {}
        skipped = round(values.get("skipped", 0.0) * self.steps)
        self.nonfinite_run = self.nonfinite_run + skipped if skipped == self.steps else skipped
        elapsed = time.perf_counter() - self.started
        record = {
            **fields,
            **values,
            "step_time_s": elapsed / self.steps,
            "data_wait_s": self.data_wait / self.steps,  # of step_time_s: data must not be what limits a step
            "skipped_steps": skipped,
        }
        if torch.cuda.is_available():
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.write(record)
        self.sums, self.counts, self.steps, self.started, self.data_wait = {}, {}, 0, time.perf_counter(), 0.0
        return record

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        for logger in self.loggers:
            logger.write(record)

    def figure(self, name: str, png: Path, step: int) -> None:
        for logger in self.loggers:
            logger.figure(name, png, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(cfg: Config, run_dir: Path, *, resume_step: int | None = None) -> list:
    """The record sinks besides log.jsonl that ``train.loggers`` asks for. ``resume_step``: a resumed run, whose
    earlier records past that step are dropped, as log.jsonl's are."""
    loggers = []
    if "tensorboard" in cfg.train.loggers:
        from gsema_fast.integrations.tensorboard import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir / "tensorboard", purge_step=resume_step))
    return loggers


def draw_progress(log_path: Path, out_path: Path) -> None:
    """progress.png: losses, validation Dice, aligned fraction and learning rate against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    for key in ("total", "dce_student_src", "dce_student_trg", "dce_teacher_trg", "bacl"):
        if train and key in train[0]:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax.set(title="losses", xlabel="step")
    ax = axes[0, 1]
    for key in sorted({k for r in val for k in r.get("dice", {})}):
        ax.plot([r["step"] for r in val], [r["dice"].get(key, float("nan")) for r in val], marker="o", label=key)
    ax.set(title="validation Dice (teacher)", xlabel="step", ylim=(0, 1))
    ax = axes[1, 0]
    if train and "aligned" in train[0]:
        ax.plot([r["step"] for r in train], [r["aligned"] for r in train], label="aligned fraction")
        ax.plot([r["step"] for r in train], [r["grad_cos"] for r in train], label="cos(g_src, g_trg)")
    ax.set(title="gradient agreement", xlabel="step")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax = axes[1, 1]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(title="learning rate", xlabel="step", yscale="log")
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _format_table(title: str, rows: dict[str, dict[str, float]]) -> str:
    classes = sorted({c for r in rows.values() for c in r})
    width = max(len(name) for name in rows) + 2
    lines = [title, " " * width + "".join(f"{c:>12s}" for c in classes)]
    for name, r in rows.items():
        lines.append(f"{name:{width}s}" + "".join(f"{r.get(c, float('nan')):12.3f}" for c in classes))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the loop


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, evaluate_unseen: bool = True) -> dict:
    """Train a teacher-student pair as ``cfg`` says; returns ``{"run_dir", "final", "best", "test"}``.

    The run folder (``train.out_dir``) must be empty, or hold a run to continue (``resume``: from its
    ``checkpoints/latest.pt``, saved after every epoch) or to replace (``overwrite``); one process at a time trains
    in it. ``resume`` refuses a change of the settings the checkpoint depends on (:data:`FIXED_ON_RESUME`) and lets
    every other change take effect; with ``train.deterministic`` on the CPU and an unchanged config the resumed run
    reproduces the uninterrupted run's losses. Ctrl-C stops after the step in flight (``TrainingInterrupted``).

    Protocol: ``best.pt`` is the checkpoint with the best validation Dice on held-out cases of the training
    centres. The unseen centre is read once, after training: the best checkpoint's teacher (the final one without
    validation cases) and the untrained teacher are scored on it (``summary.json``, the printed table), unless
    ``evaluate_unseen`` is False (an experiment runner that scores it itself).
    """
    cfg = resolve_auto(cfg)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in the folder, or replace it")
    # Under torchrun: join the process group; each rank takes its own GPU and share of every batch.
    dist_ctx = distributed.setup(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    lock = RunFolderLock(cfg.train.out_dir) if dist_ctx.is_main else None
    interrupt = InterruptFlag()
    try:
        if lock is not None:
            lock.acquire()
        return _train(
            cfg, dist_ctx, resume=resume, overwrite=overwrite, interrupt=interrupt, evaluate_unseen=evaluate_unseen
        )
    finally:
        interrupt.disarm()
        if lock is not None:
            lock.release()
        distributed.teardown(dist_ctx)


def _train(
    cfg: Config,
    dist_ctx: distributed.Context,
    *,
    resume: bool,
    overwrite: bool,
    interrupt: InterruptFlag,
    evaluate_unseen: bool,
) -> dict:
    device, main = dist_ctx.device, dist_ctx.is_main
    if device.type == "cpu" and cfg.train.retain_cpu_memory:
        retain_freed_memory()
    run_dir = Path(cfg.train.out_dir).expanduser()
    ckpt_dir = run_dir / "checkpoints"
    latest = ckpt_dir / "latest.pt"
    if resume and not latest.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {latest}")
    if main:
        check_run_folder(run_dir, resume=resume, overwrite=overwrite)
    if resume:
        # On the CPU: random-generator states must stay there; weights and optimizer state are copied to the device
        # by their load_state_dict. Read (and the config checked) before anything is built or written.
        state = read_checkpoint(latest)
        changes = resume_changes(state, cfg, latest)
    if cfg.note:
        log.info("%s", cfg.note)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    data = build_data(cfg, rank=dist_ctx.rank, world_size=dist_ctx.world_size, local_rank=dist_ctx.local_rank)
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
    labels = dict(data.manifest.labels)
    from gsema_fast.data import TargetTransform

    # each rank simulates its own target domains (rank 0 keeps the single-process seed)
    transform_seed = cfg.train.seed + 7919 * dist_ctx.rank
    transform = TargetTransform(seed=transform_seed, **config_to_dict(cfg)["target_transform"]).to(device)
    ctx = build_context(cfg, device, world_size=dist_ctx.world_size)
    if dist_ctx.rank:  # weights came from rank 0; dropout and other draws differ per rank, as across one batch
        torch.manual_seed(transform_seed)
    scheduler = build_scheduler(cfg, ctx.optimizer)
    log.info(
        "model %s (%.1fM parameters), ema.mode %s, bacl %s, amp %s, device %s",
        cfg.model.name,
        sum(p.numel() for p in ctx.student.parameters()) / 1e6,
        cfg.ema.mode,
        "off" if ctx.bacl is None else ctx.bacl.extra_repr(),
        cfg.train.amp,
        device,
    )

    if main:  # only now that data, model and the resumed config passed their checks
        if overwrite:
            clear_run_folder(run_dir)
        save_config(cfg, run_dir / "config.yaml")
    # Once the folder is settled: a resumed run's sinks drop what was logged after its checkpoint.
    loggers = build_loggers(cfg, run_dir, resume_step=state["step"] if resume else None) if main else []

    # The untrained teacher is scored on the unseen centre only after training (see train's docstring).
    scores_unseen = bool(data.split.test) and evaluate_unseen
    # a host copy of the initial weights, kept only when it will be scored (SwinUNETR F=48: 250 MB)
    initial_teacher = (
        {k: v.detach().cpu().clone() for k, v in ctx.teacher.state_dict().items()} if scores_unseen else None
    )
    epoch, step, best_score, best_val, last_val = 0, 0, -1.0, None, None
    if resume:
        restore(state, ctx, scheduler, transform)
        epoch, step, best_score = state["epoch"], state["step"], state["best_score"]
        best_val, last_val = state.get("best_val"), state["last_val"]  # older checkpoints have no best_val
        log.info("resumed from %s at epoch %d, step %d", latest, epoch, step)
        if changes:
            apply_settings(ctx, scheduler, cfg)
            log.info("changed settings take effect from step %d: %s", step, "; ".join(changes))
        if main:
            truncate_log(run_dir / "log.jsonl", step)
        del state

    compile_cache = compile_cache_file(cfg, device)
    if cfg.train.compile:
        started = time.perf_counter()
        warm = load_compile_cache(compile_cache)
        log.info(
            "compiling %d blocks (static shapes, %s); the first step includes compilation",
            compile_blocks(ctx),
            f"warm from {compile_cache}" if warm else "cold",
        )
        compile_started = started
    else:
        compile_started = None

    log_path = run_dir / "log.jsonl" if main and "jsonl" in cfg.train.loggers else None
    interval = IntervalLog(log_path, loggers)
    total_steps = cfg.train.epochs * cfg.train.steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not main, dynamic_ncols=True)
    stopped, saved_at = None, step if resume else None
    interrupt.arm()
    while epoch < cfg.train.epochs and step < total_steps and stopped is None:
        data.set_epoch(epoch)
        ctx.student.train()
        waited = time.perf_counter()
        for batch in data.train:
            interval.data_wait += time.perf_counter() - waited
            x_s = batch["image"].to(device, non_blocking=True)
            y_s = batch["label"].to(device, non_blocking=True)
            x_t, y_t = transform(x_s, y_s)
            # The teacher's DCE terms are only logged: compute them on the last step of each log interval.
            logging_step = (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps
            metrics = train_step(ctx, x_s, y_s, x_t, y_t, teacher_logits=cfg.loss.teacher_terms and logging_step)
            scheduler.step()
            interval.add(metrics)
            step += 1
            bar.update(1)
            if compile_started is not None:
                log.info("first step (with compilation) took %.1f s", time.perf_counter() - compile_started)
                compile_started = None
                if main:
                    save_compile_cache(compile_cache)
            if step % cfg.train.log_every == 0 or step == total_steps:
                record = interval.flush(kind="train", step=step, epoch=epoch, lr=scheduler.get_last_lr()[0])
                bar.set_postfix(loss=f"{record['total']:.3f}", aligned=f"{record.get('aligned', float('nan')):.2f}")
                if record["skipped_steps"]:
                    log.warning(
                        "step %d: %d step(s) with a non-finite loss or gradient were skipped",
                        step,
                        record["skipped_steps"],
                    )
                if interval.nonfinite_run >= cfg.train.max_nonfinite_steps:
                    stopped = RuntimeError(
                        f"stopped after {interval.nonfinite_run} consecutive steps with a non-finite loss or gradient "
                        f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); the last good checkpoint is "
                        f"{latest if latest.exists() else 'not written yet'}"
                    )
                    break
            if interrupt.requested:
                stopped = interrupted(step, saved_at, latest)
                break
            if step >= total_steps:
                break
            waited = time.perf_counter()
        if stopped is not None:
            break
        epoch += 1
        last = epoch >= cfg.train.epochs or step >= total_steps
        extra = {"best_score": best_score, "best_val": best_val, "last_val": last_val}
        if data.split.val and ((cfg.train.val_every and epoch % cfg.train.val_every == 0) or last):
            val = evaluate_teacher(ctx, data.val, labels, cfg, device, "validation")
            last_val = extra["last_val"] = val["mean"]
            interval.write({"kind": "val", "step": step, "epoch": epoch, "dice": val["mean"]})
            score = float(np.nanmean(list(val["mean"].values()))) if val["mean"] else float("nan")
            log.info("epoch %d: validation Dice (teacher) %s", epoch, {k: round(v, 3) for k, v in val["mean"].items()})
            if score > best_score:  # the same on every rank: the metrics were gathered
                best_score = extra["best_score"] = score
                best_val = extra["best_val"] = {"step": step, "dice": val["mean"]}
                save_checkpoint(
                    ckpt_dir / "best.pt", ctx, scheduler, transform, cfg, epoch=epoch, step=step, extra=extra
                )
        save_checkpoint(latest, ctx, scheduler, transform, cfg, epoch=epoch, step=step, extra=extra)
        saved_at = step
        if main:
            if log_path is not None and log_path.exists():
                draw_progress(log_path, run_dir / "progress.png")
                interval.figure("progress", run_dir / "progress.png", step)
    bar.close()
    interrupt.disarm()
    if stopped is not None:
        raise stopped

    final = ckpt_dir / "final.pt"
    extra = {"best_score": best_score, "best_val": best_val, "last_val": last_val}
    save_checkpoint(final, ctx, scheduler, transform, cfg, epoch=epoch, step=step, extra=extra)
    best = ckpt_dir / "best.pt"
    result = {"run_dir": run_dir, "final": final, "best": best if best.exists() else None, "test": None}
    untrained = None
    if scores_unseen:
        if result["best"] is not None:
            ctx.teacher.load_state_dict(read_checkpoint(best)["teacher"])
            chosen = f"best on held-out training-centre cases, step {best_val['step']}"
        else:
            chosen = f"final, step {step}: no validation cases to choose by"
        test = evaluate_teacher(ctx, data.test, labels, cfg, device, "teacher, unseen centre", hd95=True)
        ctx.teacher.load_state_dict(initial_teacher)
        untrained = evaluate_teacher(ctx, data.test, labels, cfg, device, "untrained teacher, unseen centre")["mean"]
        result["test"] = test
        rows = {"untrained teacher, unseen centre": untrained, f"teacher ({chosen}), unseen centre": test["mean"]}
        if best_val:
            rows["the same teacher, held-out training-centre cases"] = best_val["dice"]
        table = _format_table(
            f"Dice after {step} steps (ema.mode {cfg.ema.mode}); unseen centre {data.split.test_domain}, "
            f"{len(test['cases'])} cases",
            rows,
        )
        if main:
            log.info("\n%s", table)
    if main:
        summary = {
            "test_domain": data.split.test_domain,  # None: the dataset had no unseen centre
            "checkpoint": str(result["best"] or final),
            "untrained": untrained,
            "test": result["test"],
            "validation": best_val,
            "steps": step,
            "config": config_to_dict(cfg),
        }
        write_json(summary, run_dir / "summary.json")  # strict JSON: a NaN Dice (no such class) is null
    if main:
        save_compile_cache(compile_cache)  # now with the evaluation's shapes too
    interval.close()
    return result
