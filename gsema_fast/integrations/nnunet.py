"""GS-EMA inside nnU-Net v2 (extra ``gsema-fast[nnunet]``): the trainer :class:`nnUNetTrainerGSEMA`, its ready-made
variants (:data:`TRAINERS`), :func:`write_trainer_file` (``gsema-fast nnunet-trainers``) and :func:`run_training`
(``gsema-fast nnunet-train``).

The trainer keeps everything of nnU-Net (plans, preprocessing, data augmentation, deep supervision and its loss, SGD
with the poly schedule and gradient clipping, validation, checkpoints, export) and replaces its ``train_step`` with
the package's GS-EMA step (:func:`gsema_fast.step.train_step`): per batch the simulated target domain
``T(x, y)`` (:class:`gsema_fast.data.TargetTransform`, on the training device; the deep-supervision targets of
``T(y)`` are downsampled as nnU-Net downsamples its own), the student on both batches, the teacher's latent, nnU-Net's
loss on each, BACL on an encoder latent (the stride-4 stage by default), three backward passes that add up to one,
``grad_stats``, the optimizer step and the teacher update decided on the device. Nothing in the step reads the
device; the per-step values are read once per epoch.

The teacher is the model: validation (the pseudo Dice of each epoch and the final validation) runs on it, and
checkpoints hold it as ``network_weights`` under the nnU-Net trainer the network comes from (``nnUNetTrainer``), so
``nnUNetv2_predict -tr nnUNetTrainerGSEMA ...`` loads it as a plain nnU-Net model without knowing this package. The
student, the GS-EMA counters, the run's settings and lengths and the target transform's random streams are saved
beside it (``checkpoint["gsema"]``) and resumed with ``--c``.

A run never replaces another: a fresh training into a fold folder that holds checkpoints is refused (``--c``
continues it; another trainer name, such as a variant, trains beside it; ``nnunet-train --overwrite`` replaces it).
Nothing is written to the folder (not even nnU-Net's training log) before the run is accepted.

Single process only (no ``-num_gpus``), 3D configurations without a cascade, and nnU-Net's U-Nets (a network with an
``encoder`` returning its skips and a ``decoder``); torch.compile is off (nnU-Net compiles the whole network, the step
calls encoder and decoder on their own).
"""

from __future__ import annotations

import contextlib
import inspect
import multiprocessing
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gsema_fast.config import Config, config_to_dict, parse_override, with_overrides
from gsema_fast.data.target import TargetTransform
from gsema_fast.ema import GSEMA
from gsema_fast.files import atomic_path
from gsema_fast.integrations import optional_imports
from gsema_fast.step import StepContext, bacl_from_config, train_step, updater_from_config

with optional_imports("nnunet", "gsema_fast.integrations.nnunet"):
    import nnunetv2
    import nnunetv2.paths
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

__all__ = [
    "TRAINERS",
    "ClippedSGD",
    "LatentUNet",
    "build_trainer",
    "deep_supervision_targets",
    "epoch_summary",
    "method_config",
    "nnUNetTrainerGSEMA",
    "nnUNetTrainerGSEMA_5epochs",
    "nnUNetTrainerGSEMA_noBACL",
    "nnUNetTrainerGSEMA_sign",
    "run_training",
    "trainer_class_by_name",
    "write_trainer_file",
]

# The config sections that describe the method; nnU-Net's plans describe everything else.
METHOD_KEYS = ("ema", "loss", "bacl", "target_transform", "train.seed")
# The per-epoch values the trainer adds to nnU-Net's log (and to its checkpoints' logging state).
LOG_KEYS = ("gsema_aligned_fraction", "gsema_grad_cos", "gsema_dce_target", "gsema_bacl", "gsema_skipped_steps")
# nnU-Net's epoch lengths, by attribute name: saved with a run and continued by --c.
LENGTHS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch")
# The checkpoints that make a fold folder hold a run, and what else nnU-Net writes there for one.
RUN_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
RUN_FILES = ("progress.png", "debug.json")
CUDA = torch.device("cuda")
# nnU-Net's folders, as it names its environment variables
RAW, PREPROCESSED, EXT_TRAINER = "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_extTrainer"
# nnU-Net's line for a new best checkpoint; its "EMA" is an average over epochs of the (teacher's) pseudo Dice.
BEST_EMA_LINE = "Yayy! New best EMA pseudo Dice"
BEST_EMA_NOTE = "(EMA: nnU-Net's average over epochs of the teacher's pseudo Dice, not the GS-EMA teacher itself)"


class LatentUNet(nn.Module):
    """An nnU-Net U-Net as the step calls it: ``forward(x)`` gives ``(outputs, latent)`` with ``latent`` the output
    of encoder stage ``stage``; ``forward_latent(x)`` runs the encoder only that far. It adds no parameters: the
    wrapped network's are the ones trained and saved."""

    def __init__(self, network: nn.Module, stage: int) -> None:
        super().__init__()
        if not (hasattr(network, "encoder") and hasattr(network, "decoder")):
            raise ValueError(
                f"nnUNetTrainerGSEMA needs one of nnU-Net's U-Nets (an encoder returning its skips and a decoder), "
                f"got {type(network).__name__}"
            )
        self.network = network
        self.stage = stage

    def forward(self, x: torch.Tensor) -> tuple[object, torch.Tensor]:
        skips = self.network.encoder(x)
        return self.network.decoder(skips), skips[self.stage]

    def forward_latent(self, x: torch.Tensor) -> torch.Tensor:
        encoder = self.network.encoder
        stages = getattr(encoder, "stages", None)
        if stages is None:
            return encoder(x)[self.stage]
        if getattr(encoder, "stem", None) is not None:
            x = encoder.stem(x)
        for stage in stages[: self.stage + 1]:
            x = stage(x)
        return x


def deep_supervision_targets(full: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The targets of every output for a full-resolution label batch ``full``, shaped like ``like`` (the source
    batch's targets): nnU-Net's own rule (``DownsampleSegForDSTransform``), nearest-exact interpolation."""
    return [full] + [F.interpolate(full.float(), size=t.shape[2:], mode="nearest-exact").to(t.dtype) for t in like[1:]]


class ClippedSGD(torch.optim.SGD):
    """SGD whose ``step`` first clips the gradient norm, as nnU-Net's ``train_step`` does before its step; on the
    device (no host sync), so the fused optimizer can still skip a non-finite step by its ``found_inf``."""

    def __init__(self, params, *, max_norm: float, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_norm = float(max_norm)

    def step(self, closure=None):
        grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, self.max_norm)
        return super().step(closure)


def method_config(overrides: Sequence[str] = (), *, base: Config | None = None) -> Config:
    """``base`` (default: the package's defaults, which are the paper's settings) with ``--set`` overrides of the
    method's sections only (:data:`METHOD_KEYS`)."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'a.b=c' strings, got the string {overrides!r}")
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if not any(key == k or key.startswith(k + ".") for k in METHOD_KEYS):
            raise ValueError(
                f"--set {text}: nnunet-train takes only {', '.join(k + '.*' for k in METHOD_KEYS[:-1])} and "
                f"train.seed; nnU-Net's plans decide the rest"
            )
    cfg = with_overrides(Config() if base is None else base, *overrides)
    if cfg.ema.mode != "gsema":
        raise ValueError(f"ema.mode: nnUNetTrainerGSEMA trains with 'gsema', got {cfg.ema.mode!r}")
    return cfg


def _method_dict(cfg: Config) -> dict:
    d = config_to_dict(cfg)
    return {**{k: d[k] for k in METHOD_KEYS[:-1]}, "train.seed": cfg.train.seed}


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _first_difference(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif x != y:
            return f"{prefix}{key}: checkpoint {x!r}, now {y!r}"
    return None


def epoch_summary(per_step: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The per-epoch values the trainer logs (:data:`LOG_KEYS`) from its steps' outputs, one array over the epoch's
    steps per key (``aligned``, ``grad_cos``, ``skipped``, ``dce_student_trg`` and, with BACL, ``bacl``).

    The mean cosine is over every step whose gradients were finite, aligned or not: it is what the aligned/conflict
    decision reads, and an epoch of conflicts has a (negative) mean too; NaN only when no step had one.
    """
    steps = len(per_step["aligned"])
    if steps == 0:
        raise ValueError("epoch_summary: no steps")
    cosines = np.asarray(per_step["grad_cos"], dtype=np.float64)
    cosines = cosines[np.isfinite(cosines)]
    return {
        "gsema_aligned_fraction": float(np.sum(per_step["aligned"])) / steps,
        "gsema_grad_cos": float(cosines.mean()) if cosines.size else float("nan"),
        "gsema_dce_target": float(np.mean(per_step["dce_student_trg"])),
        "gsema_bacl": float(np.mean(per_step["bacl"])) if "bacl" in per_step else float("nan"),
        "gsema_skipped_steps": int(np.sum(per_step["skipped"])),
    }


class nnUNetTrainerGSEMA(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming of trainers)
    """nnU-Net's trainer with GS-EMA, a teacher that is validated and exported, and BACL (see the module docstring).

    A variant is a subclass, as with nnU-Net's own trainers: ``gsema_overrides`` (class attribute) holds its method
    settings as ``--set`` strings (:func:`method_config`: ``ema.*``, ``loss.*``, ``bacl.*``, ``target_transform.*``,
    ``train.seed``), and its ``__init__``, with nnU-Net's signature, sets nnU-Net's attributes (``num_epochs``, ...).
    Other settings are attributes to set before ``initialize()``: ``gsema_config`` (the whole
    :class:`gsema_fast.config.Config`) and ``gsema_latent_stage`` (the encoder stage BACL reads; None: the first stage
    at stride 4 or more). :meth:`configure_run` adds one run's settings on top (``nnunet-train``'s options).
    """

    gsema_overrides: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # nnU-Net records its init arguments (my_init_kwargs, kept in its checkpoints) by looking up each parameter
        # name of type(self).__init__ among its own locals: an __init__(self, *args, **kwargs) would send it looking
        # for 'args'. Such a variant takes nnU-Net's arguments, so it gets nnU-Net's signature.
        init = cls.__dict__.get("__init__")
        if init is not None:
            kinds = {p.kind for p in inspect.signature(init).parameters.values()}
            if kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
                init.__signature__ = inspect.signature(nnUNetTrainerGSEMA.__init__)

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = CUDA,  # nnU-Net records these arguments by name: its signature, unchanged
    ) -> None:
        # nnU-Net's training log waits until the run is accepted (a refused one leaves no log behind): the lines
        # are kept here, shown on the console as nnU-Net shows them, and written when the run starts.
        self._held_log: list[str] | None = []
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.gsema_config = method_config(self.gsema_overrides)
        self.gsema_latent_stage: int | None = None
        self.gsema_overwrite = False
        self.teacher: nn.Module | None = None
        self.gsema: GSEMA | None = None
        self.target_transform: TargetTransform | None = None
        self.step_context: StepContext | None = None
        self._run_overrides: tuple[str, ...] = ()  # this run's --set, on top of the variant's
        self._explicit_lengths: dict[str, int] = {}  # lengths this command set (they win over the checkpoint's)
        self._variant_lengths: dict[str, int] | None = None  # the lengths the variant itself sets
        self._resumed: dict | None = None  # the GS-EMA state of the checkpoint loaded, if any
        # nnU-Net 2.8 logs through a MetaLogger around the per-epoch history, earlier versions keep it themselves
        history = getattr(self.logger, "local_logger", self.logger).my_fantastic_logging
        for key in LOG_KEYS:
            history.setdefault(key, [])

    def configure_run(
        self,
        *,
        overrides: Sequence[str] = (),
        lengths: Mapping[str, int] | None = None,
        overwrite: bool = False,
    ) -> None:
        """One run's settings on top of the variant's, before ``initialize()`` (what ``nnunet-train`` passes):
        ``overrides``, ``--set`` strings of the method; ``lengths``, nnU-Net's epoch lengths by attribute name
        (:data:`LENGTHS`); ``overwrite``: a fresh run may replace the run in its folder. Settings and lengths are saved
        with the run, and ``--c`` continues with them unless given again (other settings than the run's are refused;
        other lengths are taken)."""
        if self.was_initialized:
            raise ValueError("configure_run: call it before initialize()")
        lengths = dict(lengths or {})
        for key, value in lengths.items():
            if key not in LENGTHS:
                raise ValueError(f"lengths: expected keys among {LENGTHS}, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a whole number of at least 1, got {value!r}")
        self.gsema_config = method_config(overrides, base=self.gsema_config)
        self._run_overrides = tuple(overrides)
        self._variant_lengths = self._lengths()
        for key, value in lengths.items():
            setattr(self, key, value)
        self._explicit_lengths = lengths
        self.gsema_overwrite = bool(overwrite)

    def _lengths(self) -> dict[str, int]:
        return {key: int(getattr(self, key)) for key in LENGTHS}

    # ------------------------------------------------------------------------------------------- nnU-Net's log

    def print_to_log_file(self, *args, also_print_to_console: bool = True, add_timestamp: bool = True) -> None:
        if args and isinstance(args[0], str) and args[0].startswith(BEST_EMA_LINE):
            args = (f"{args[0]} {BEST_EMA_NOTE}", *args[1:])
        held = getattr(self, "_held_log", None)
        if held is None or self.local_rank != 0:
            super().print_to_log_file(*args, also_print_to_console=also_print_to_console, add_timestamp=add_timestamp)
            return
        if add_timestamp:
            args = (f"{datetime.now()}:", *args)
        held.append("".join(f"{a} " for a in args) + "\n")  # nnU-Net's line format
        log_file, self.log_file = self.log_file, os.devnull  # nnU-Net's console output now, the file later
        try:
            super().print_to_log_file(*args, also_print_to_console=also_print_to_console, add_timestamp=False)
        finally:
            self.log_file = log_file

    def _release_log(self) -> None:
        held, self._held_log = self._held_log, None
        if held and self.local_rank == 0:
            with open(self.log_file, "a+") as log:
                log.writelines(held)

    # ------------------------------------------------------------------------------------------- set-up

    def _do_i_compile(self) -> bool:
        # nnU-Net compiles the whole network's forward, which the step never calls (it runs encoder and decoder)
        return False

    def configure_optimizers(self):
        # nnU-Net's optimizer and schedule, fused (a non-finite step is skipped on the device) and clipping in step()
        optimizer = ClippedSGD(
            self.network.parameters(),
            max_norm=12,
            lr=self.initial_lr,
            weight_decay=self.weight_decay,
            momentum=0.99,
            nesterov=True,
            fused=True,
        )
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def latent_stage(self) -> int:
        strides = np.cumprod(np.asarray(self.configuration_manager.pool_op_kernel_sizes), axis=0).max(axis=1)
        if self.gsema_latent_stage is not None:
            if not 0 <= self.gsema_latent_stage < len(strides):
                raise ValueError(
                    f"gsema_latent_stage: expected an encoder stage in [0, {len(strides) - 1}], "
                    f"got {self.gsema_latent_stage}"
                )
            return self.gsema_latent_stage
        return int(np.argmax(strides >= 4)) if (strides >= 4).any() else len(strides) - 1

    def initialize(self) -> None:
        if len(self.configuration_manager.patch_size) != 3:
            raise ValueError(f"nnUNetTrainerGSEMA trains 3D configurations, got {self.configuration_name!r}")
        if self.is_cascaded:
            raise ValueError(f"nnUNetTrainerGSEMA does not train cascade stages, got {self.configuration_name!r}")
        if self.is_ddp:
            raise ValueError("nnUNetTrainerGSEMA trains in a single process (no -num_gpus)")
        cfg = self.gsema_config
        if cfg.ema.mode != "gsema":
            raise ValueError(f"ema.mode: nnUNetTrainerGSEMA trains with 'gsema', got {cfg.ema.mode!r}")
        super().initialize()
        stage = self.latent_stage()
        self.gsema = updater_from_config(cfg.ema, self.network)
        self.teacher = self.gsema.teacher.eval()
        self.target_transform = TargetTransform.from_config(cfg.target_transform, seed=cfg.train.seed)
        bacl = bacl_from_config(cfg.loss, cfg.bacl)
        self.step_context = StepContext(
            student=LatentUNet(self.network, stage),
            teacher=LatentUNet(self.teacher, stage),
            optimizer=self.optimizer,
            mode="gsema",
            updater=self.gsema,
            dce=self.loss,  # nnU-Net's Dice + CE, with its deep-supervision weights
            bacl=bacl,
            lambda_sup=cfg.loss.lambda_sup,
            lambda_con=cfg.loss.lambda_con,
            amp_dtype=torch.float16 if self.device.type == "cuda" else None,  # nnU-Net's autocast
            scaler=self.grad_scaler,
            teacher_terms=False,  # the teacher's loss is what validation measures
        )

    def _accept_run(self) -> None:
        """Refuse a run that would replace another or continue one with other settings, before anything is
        written; with ``gsema_overwrite``, remove the previous run's files (and only those)."""
        folder = Path(self.output_folder)
        if self._resumed is not None:
            differs = _first_difference(self._resumed["config"], _method_dict(self.gsema_config))
            if differs:
                raise ValueError(
                    f"{folder}: the run there was trained with other GS-EMA settings ({differs}); --c continues a run "
                    f"with its own settings (leave out --set), and other settings train under another trainer name "
                    f"(-tr, e.g. one of gsema-fast's variants or your own)"
                )
            return
        existing = [name for name in RUN_CHECKPOINTS if (folder / name).is_file()]
        if not existing:
            return
        if not self.gsema_overwrite:
            raise FileExistsError(
                f"{folder} holds a run of {type(self).__name__} ({', '.join(existing)}): continue it with --c, train "
                f"other settings under another trainer name (-tr; nnU-Net keeps each trainer's runs apart), or replace "
                f"it (gsema-fast nnunet-train --overwrite)"
            )
        for name in (*RUN_CHECKPOINTS, *RUN_FILES):
            (folder / name).unlink(missing_ok=True)
        for log in folder.glob("training_log_*.txt"):
            log.unlink()
        shutil.rmtree(folder / "validation", ignore_errors=True)
        self.print_to_log_file(f"GS-EMA: replaced the previous run in {folder} (--overwrite)")

    def on_train_start(self) -> None:
        self._accept_run()
        self._release_log()
        if self._variant_lengths is None:
            self._variant_lengths = self._lengths()
        super().on_train_start()
        if int(self.gsema.step) == 0:  # a fresh run: the student may hold -pretrained_weights by now
            self.teacher.load_state_dict(self.network.state_dict())
        e, loss = self.gsema_config.ema, self.gsema_config.loss
        self.print_to_log_file(
            f"GS-EMA: rule {e.rule}, decay aligned {e.decay_aligned}, conflict {e.decay_conflict}, warm-up {e.warmup}; "
            f"lambda_sup {loss.lambda_sup}, lambda_con {loss.lambda_con}, BACL on encoder stage "
            f"{self.step_context.student.stage}; {self.num_epochs} epochs of {self.num_iterations_per_epoch} steps. "
            f"The teacher is validated and exported: nnU-Net's pseudo Dice below is the teacher's"
        )

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        super().set_deep_supervision_enabled(enabled)
        if self.teacher is not None:
            self.teacher.decoder.deep_supervision = enabled

    @contextlib.contextmanager
    def teacher_as_network(self) -> Iterator[None]:
        """nnU-Net's own validation, export and checkpointing read ``self.network``: let them read the teacher."""
        student, self.network = self.network, self.teacher
        try:
            yield
        finally:
            self.network = student

    # ------------------------------------------------------------------------------------------- training

    def train_step(self, batch: dict) -> dict:
        x_s = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        deep = isinstance(target, list)  # deep supervision: one target per output, full resolution first
        y_s = [t.to(self.device, non_blocking=True) for t in (target if deep else [target])]
        x_t, full = self.target_transform(x_s, y_s[0])
        y_t = deep_supervision_targets(full, y_s)
        if not deep:
            y_s, y_t = y_s[0], y_t[0]
        self.step_context.point_grads_at(self.step_context.grads_a)  # in case anything reset .grad
        return train_step(self.step_context, x_s, y_s, x_t, y_t, teacher_logits=False)

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        keys = ("dce_student_src", "dce_student_trg", "aligned", "grad_cos", "skipped", "bacl")
        keys = [k for k in keys if k in train_outputs[0]]
        per_step = torch.stack([torch.stack([o[k].float() for k in keys]) for o in train_outputs]).cpu().numpy()
        values = dict(zip(keys, per_step.T, strict=True))  # the epoch's one host read of the step's values
        # nnU-Net's train loss stays what it is in a plain run: its loss on the (source) batch
        super().on_train_epoch_end([{"loss": v} for v in values["dce_student_src"]])
        logged = epoch_summary(values)
        for key, value in logged.items():
            self.logger.log(key, value, self.current_epoch)
        skipped = logged["gsema_skipped_steps"]
        self.print_to_log_file(
            f"GS-EMA: {int(values['aligned'].sum())} of {len(train_outputs)} steps aligned (teacher updated), mean "
            f"cos(g_src, g_trg) {logged['gsema_grad_cos']:.4f}, target loss {logged['gsema_dce_target']:.4f}, BACL "
            f"{logged['gsema_bacl']:.4f}" + (f", {skipped} non-finite steps skipped" if skipped else "")
        )

    # ------------------------------------------------------------------------------------------- the teacher

    def validation_step(self, batch: dict) -> dict:
        with self.teacher_as_network():
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        self._release_log()  # --val: validating a finished run is a run of its own
        with self.teacher_as_network():
            super().perform_actual_validation(save_probabilities)

    def nnunet_trainer_name(self) -> str:
        """The nnU-Net trainer the network comes from (this class builds nnU-Net's network unchanged), which is the
        one ``nnUNetv2_predict`` needs to find in its own package."""
        return next(cls.__name__ for cls in type(self).__mro__ if cls.__module__.startswith("nnunetv2."))

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)
            return
        with atomic_path(filename) as tmp:
            with self.teacher_as_network():
                super().save_checkpoint(str(tmp))
            checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
            checkpoint["trainer_name"] = self.nnunet_trainer_name()
            counters = {k: v for k, v in self.gsema.state_dict().items() if k != "teacher"}  # the teacher is above
            checkpoint["gsema"] = {
                "trainer": type(self).__name__,
                "student": self.network.state_dict(),
                "ema": counters,
                "target_transform": self.target_transform.state_dict(),
                "latent_stage": self.step_context.student.stage,
                "config": _method_dict(self.gsema_config),
                "overrides": list(self._run_overrides),
                "lengths": self._lengths(),
                "variant_lengths": self._variant_lengths or self._lengths(),
            }
            torch.save(checkpoint, tmp)

    def _continue_with(self, state: dict) -> None:
        """The run's own settings and lengths, before the networks and the schedule are built from them: the run's
        ``--set`` unless this command gives its own (which must then agree, see :meth:`_accept_run`), each length
        unless this command sets it or the variant's code has changed it since."""
        if not self._run_overrides and state.get("overrides"):
            self.gsema_config = method_config(state["overrides"], base=self.gsema_config)
            self._run_overrides = tuple(state["overrides"])
        variant_now = self._variant_lengths or self._lengths()
        variant_then = state.get("variant_lengths", {})
        for key, value in state.get("lengths", {}).items():
            if key in LENGTHS and key not in self._explicit_lengths and variant_then.get(key) == variant_now[key]:
                setattr(self, key, int(value))
        self._variant_lengths = variant_now

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        where = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "checkpoint"
        state = checkpoint.get("gsema")
        if state is None:
            raise ValueError(f"{where}: holds no GS-EMA state (it was not written by nnUNetTrainerGSEMA)")
        if not self.was_initialized:
            self._continue_with(state)
        super().load_checkpoint(filename_or_checkpoint)  # the teacher lands in self.network; put it where it belongs
        self.gsema.load_state_dict({**state["ema"], "teacher": checkpoint["network_weights"]})
        self.network.load_state_dict(state["student"])
        self.target_transform.load_state_dict(state["target_transform"])
        self._resumed = state


class nnUNetTrainerGSEMA_sign(nnUNetTrainerGSEMA):  # noqa: N801
    """GS-EMA with the sign rule: the teacher follows when the gradients' signs agree more often than not."""

    gsema_overrides = ("ema.rule=sign",)


class nnUNetTrainerGSEMA_noBACL(nnUNetTrainerGSEMA):  # noqa: N801
    """GS-EMA without the contrastive term (the ablation's "GS-EMA" row)."""

    gsema_overrides = ("loss.lambda_con=0",)


class nnUNetTrainerGSEMA_5epochs(nnUNetTrainerGSEMA):  # noqa: N801
    """Five epochs, as nnU-Net's ``nnUNetTrainer_5epochs``: a check that everything runs."""

    def __init__(
        self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = CUDA
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


# The trainers gsema-fast ships, which `-tr` finds by name and the nnUNet_extTrainer file imports.
TRAINERS = (nnUNetTrainerGSEMA, nnUNetTrainerGSEMA_sign, nnUNetTrainerGSEMA_noBACL, nnUNetTrainerGSEMA_5epochs)


def _find_trainer(name: str) -> type | None:
    # The folders of nnUNet_extTrainer first, where variants of nnUNetTrainerGSEMA live: nnU-Net's own search starts
    # with its whole package, whose Primus trainers import timm (and torchvision), which a CPU torch may not have.
    for folder in os.environ.get(EXT_TRAINER, "").split(os.pathsep):
        if folder.strip() and os.path.isdir(folder):
            found = recursive_find_python_class(
                folder, name, None, base_folder=folder, cleanup_imports_from_base_folder=True
            )
            if found is not None:
                return found
    package = join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    with optional_imports("nnunet", f"-tr {name}: nnU-Net's search of its own trainers"):
        return recursive_find_python_class(package, name, "nnunetv2.training.nnUNetTrainer")


def trainer_class_by_name(name: str) -> type[nnUNetTrainerGSEMA]:
    """The GS-EMA trainer ``-tr name`` means: gsema-fast's own (:data:`TRAINERS`), else a class of that name in the
    folders of ``nnUNet_extTrainer`` or in nnU-Net's package, which must derive from :class:`nnUNetTrainerGSEMA`."""
    shipped = {cls.__name__: cls for cls in TRAINERS}
    if name in shipped:
        return shipped[name]
    found = _find_trainer(name)
    if found is None:
        raise ValueError(
            f"-tr {name}: no such trainer among gsema-fast's ({', '.join(shipped)}), in {EXT_TRAINER} "
            f"({os.environ.get(EXT_TRAINER) or 'not set'}) or in nnU-Net's package"
        )
    if not (isinstance(found, type) and issubclass(found, nnUNetTrainerGSEMA)):
        raise ValueError(
            f"-tr {name}: not a GS-EMA trainer (a subclass of nnUNetTrainerGSEMA); nnUNetv2_train trains it"
        )
    return found


TRAINER_FILE = "gsema_fast_trainers.py"


def ext_trainer_supported() -> bool:
    """Whether this nnU-Net looks for trainers in the folders of ``nnUNet_extTrainer`` (2.8 and later)."""
    return hasattr(nnunetv2.paths, EXT_TRAINER)


def trainer_file_text() -> str:
    names = "".join(f"    {cls.__name__},\n" for cls in TRAINERS)
    return (
        f'"""gsema-fast\'s nnU-Net trainers for nnUNetv2_train and nnUNetv2_predict -tr NAME, with {EXT_TRAINER}\n'
        f"naming this folder (nnU-Net 2.8 or later). Written by `gsema-fast nnunet-trainers`; it imports them, so it\n"
        f'follows the installed gsema-fast."""\n\n'
        f"from gsema_fast.integrations.nnunet import (  # noqa: F401\n{names})\n"
    )


def write_trainer_file(folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``folder/gsema_fast_trainers.py``, the file through which nnU-Net finds gsema-fast's trainers
    (:data:`TRAINERS`) once ``nnUNet_extTrainer`` names ``folder``; returns its path. A file of that name with other
    contents is replaced only with ``overwrite``."""
    path = Path(folder).expanduser() / TRAINER_FILE
    text = trainer_file_text()
    if path.exists() or path.is_symlink():
        if path.is_file() and path.read_text() == text:
            return path
        if not overwrite:
            raise FileExistsError(
                f"{path}: holds something else than gsema-fast's trainer file (--overwrite replaces it)"
            )
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ the command


def _device(name: str) -> torch.device:
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"-device: expected cpu, cuda or mps, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("-device cuda: no CUDA device is available (use -device cpu)")
    # nnU-Net's own entry point: every core on the CPU, one thread beside a GPU (unless OMP_NUM_THREADS says)
    if "OMP_NUM_THREADS" not in os.environ:
        if name == "cpu":
            torch.set_num_threads(multiprocessing.cpu_count())
        elif name == "cuda":
            torch.set_num_threads(1)
            torch.set_num_interop_threads(1)
    return torch.device(name)


def build_trainer(
    dataset_name_or_id: str,
    configuration: str,
    fold: str | int,
    *,
    plans_identifier: str = "nnUNetPlans",
    device: torch.device | str = "cuda",
    continue_training: bool = False,
    trainer_class: type[nnUNetTrainerGSEMA] = nnUNetTrainerGSEMA,
) -> nnUNetTrainerGSEMA:
    """The trainer as ``nnUNetv2_train`` builds one (``get_trainer_from_args``), from a class rather than a name."""
    if isinstance(fold, str) and fold != "all":
        if not fold.isdigit():
            raise ValueError(f"FOLD: expected a fold number or 'all', got {fold!r}")
        fold = int(fold)
    preprocessed = os.environ.get(PREPROCESSED)
    if not preprocessed:
        raise ValueError(f"{PREPROCESSED} is not set: export nnUNet_raw, nnUNet_preprocessed and nnUNet_results")
    ident = str(dataset_name_or_id)
    if not ident.startswith("Dataset"):
        if not ident.isdigit():
            raise ValueError(f"DATASET: expected a dataset id or a DatasetXXX_Name, got {ident!r}")
        ident = int(ident)
    try:
        dataset_name = maybe_convert_to_dataset_name(ident)
    except RuntimeError:  # nnU-Net's message runs over several lines
        raise FileNotFoundError(
            f"DATASET {dataset_name_or_id}: no such dataset in {PREPROCESSED} ({preprocessed}) or {RAW} "
            f"({os.environ.get(RAW)})"
        ) from None
    folder = Path(preprocessed) / dataset_name
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file}: no plans (run nnUNetv2_plan_and_preprocess -d {dataset_name_or_id})")
    plans = load_json(str(plans_file))
    if configuration not in plans["configurations"]:
        raise ValueError(f"CONFIGURATION: {plans_file} has {sorted(plans['configurations'])}, got {configuration!r}")
    if "continue_training" in inspect.signature(get_trainer_from_args).parameters:  # nnU-Net 2.8 reads it
        plans["continue_training"] = continue_training
    dataset_json = load_json(str(folder / "dataset.json"))
    device = _device(device) if isinstance(device, str) else device
    return trainer_class(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json, device=device)


def run_training(
    dataset_name_or_id: str,
    configuration: str,
    fold: str | int,
    *,
    trainer_class: type[nnUNetTrainerGSEMA] | str = nnUNetTrainerGSEMA,
    plans_identifier: str = "nnUNetPlans",
    pretrained_weights: str | None = None,
    export_validation_probabilities: bool = False,
    continue_training: bool = False,
    only_run_validation: bool = False,
    disable_checkpointing: bool = False,
    val_with_best: bool = False,
    device: str = "cuda",
    overrides: Sequence[str] = (),
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    val_iterations_per_epoch: int | None = None,
    overwrite: bool = False,
) -> nnUNetTrainerGSEMA:
    """``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER`` in one process: nnU-Net's own sequence (checkpoint
    loading, ``run_training``, the final validation) on a GS-EMA trainer, given as a class or by name
    (:func:`trainer_class_by_name`).

    ``overrides``: ``--set`` settings of the method (:func:`method_config`) on top of the trainer's; ``epochs``,
    ``iterations_per_epoch``, ``val_iterations_per_epoch``: nnU-Net's ``num_epochs`` (1000),
    ``num_iterations_per_epoch`` (250) and ``num_val_iterations_per_epoch`` (50). They are saved with the run:
    ``continue_training`` (``--c``) goes on with them unless given again (other settings are refused, other lengths
    taken). ``overwrite``: a new run may replace the run in its folder (refused without). Returns the trainer.
    """
    if continue_training and only_run_validation:
        raise ValueError("--c and --val: continue training or only validate, not both")
    if val_with_best and disable_checkpointing:
        raise ValueError("--val_best needs the checkpoints that --disable_checkpointing turns off")
    if overwrite and (continue_training or only_run_validation):
        raise ValueError("--overwrite replaces a run with a new one: not with --c or --val")
    lengths = {}
    for key, name, value in zip(
        LENGTHS,
        ("--epochs", "--iterations", "--val-iterations"),
        (epochs, iterations_per_epoch, val_iterations_per_epoch),
        strict=True,
    ):
        if value is not None:
            if value < 1:
                raise ValueError(f"{name}: expected at least 1, got {value}")
            lengths[key] = value
    if only_run_validation and (overrides or lengths):
        raise ValueError(
            "--val validates the finished run's teacher as it was trained: --set, --epochs, --iterations and "
            "--val-iterations do not apply"
        )
    method_config(overrides)  # bad keys and values are refused before anything is built
    if isinstance(trainer_class, str):
        trainer_class = trainer_class_by_name(trainer_class)
    elif not (isinstance(trainer_class, type) and issubclass(trainer_class, nnUNetTrainerGSEMA)):
        raise TypeError(f"trainer_class: expected a subclass of nnUNetTrainerGSEMA, got {trainer_class!r}")
    trainer = build_trainer(
        dataset_name_or_id,
        configuration,
        fold,
        plans_identifier=plans_identifier,
        device=device,
        continue_training=continue_training,
        trainer_class=trainer_class,
    )
    trainer.configure_run(overrides=overrides, lengths=lengths, overwrite=overwrite)
    trainer.disable_checkpointing = disable_checkpointing
    maybe_load_checkpoint(trainer, continue_training, only_run_validation, pretrained_weights)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not only_run_validation:
        trainer.run_training()
    if val_with_best:
        trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))
    trainer.perform_actual_validation(export_validation_probabilities)
    return trainer
