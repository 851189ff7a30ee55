"""GS-EMA inside nnU-Net v2 (extra ``gsema-fast[nnunet]``): the trainer :class:`nnUNetTrainerGSEMA` and
:func:`run_training`, the ``gsema-fast nnunet-train`` command.

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
student, the GS-EMA counters and settings and the target transform's random streams are saved beside it
(``checkpoint["gsema"]``) and resumed with ``--c``.

Single process only (no ``-num_gpus``), 3D configurations without a cascade, and nnU-Net's U-Nets (a network with an
``encoder`` returning its skips and a ``decoder``); torch.compile is off (nnU-Net compiles the whole network, the step
calls encoder and decoder on their own).
"""

from __future__ import annotations

import contextlib
import inspect
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gsema_fast.config import Config, config_to_dict, parse_override, with_overrides
from gsema_fast.data.target import TargetTransform
from gsema_fast.ema import GSEMA
from gsema_fast.files import atomic_path
from gsema_fast.integrations import MissingExtraError
from gsema_fast.step import StepContext, bacl_from_config, train_step, updater_from_config

try:
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
except ImportError as err:
    raise MissingExtraError("nnunet", "gsema_fast.integrations.nnunet") from err

__all__ = [
    "ClippedSGD",
    "LatentUNet",
    "build_trainer",
    "deep_supervision_targets",
    "method_config",
    "nnUNetTrainerGSEMA",
    "run_training",
]

# The config sections that describe the method; nnU-Net's plans describe everything else.
METHOD_KEYS = ("ema", "loss", "bacl", "target_transform", "train.seed")
# The per-epoch values the trainer adds to nnU-Net's log (and to its checkpoints' logging state).
LOG_KEYS = ("gsema_aligned_fraction", "gsema_grad_cos", "gsema_dce_target", "gsema_bacl", "gsema_skipped_steps")
CUDA = torch.device("cuda")
# nnU-Net's folders, as it names its environment variables
RAW, PREPROCESSED = "nnUNet_raw", "nnUNet_preprocessed"


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


def method_config(overrides: Sequence[str] = ()) -> Config:
    """The package's config with ``--set`` overrides of the method's sections only (:data:`METHOD_KEYS`)."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if not any(key == k or key.startswith(k + ".") for k in METHOD_KEYS):
            raise ValueError(
                f"--set {text}: nnunet-train takes only {', '.join(k + '.*' for k in METHOD_KEYS[:-1])} and "
                f"train.seed; nnU-Net's plans decide the rest"
            )
    cfg = with_overrides(Config(), *overrides)
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


class nnUNetTrainerGSEMA(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming of trainers)
    """nnU-Net's trainer with GS-EMA, a teacher that is validated and exported, and BACL (see the module docstring).

    Settings, like nnU-Net's own, are attributes to set before ``initialize()`` (or in a subclass's ``__init__``):
    ``gsema_config`` (:class:`gsema_fast.config.Config`; its ``ema``, ``loss``, ``bacl``, ``target_transform``
    sections and ``train.seed`` are used, :func:`method_config` builds one from ``--set`` overrides) and
    ``gsema_latent_stage`` (the encoder stage BACL reads; None: the first stage at stride 4 or more).
    """

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = CUDA,  # nnU-Net records these arguments by name: its signature, unchanged
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.gsema_config = method_config()
        self.gsema_latent_stage: int | None = None
        self.teacher: nn.Module | None = None
        self.gsema: GSEMA | None = None
        self.target_transform: TargetTransform | None = None
        self.step_context: StepContext | None = None
        # nnU-Net 2.8 logs through a MetaLogger around the per-epoch history, earlier versions keep it themselves
        history = getattr(self.logger, "local_logger", self.logger).my_fantastic_logging
        for key in LOG_KEYS:
            history.setdefault(key, [])

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

    def on_train_start(self) -> None:
        super().on_train_start()
        if int(self.gsema.step) == 0:  # a fresh run: the student may hold -pretrained_weights by now
            self.teacher.load_state_dict(self.network.state_dict())
        e, loss = self.gsema_config.ema, self.gsema_config.loss
        self.print_to_log_file(
            f"GS-EMA: rule {e.rule}, decay aligned {e.decay_aligned}, conflict {e.decay_conflict}, warm-up {e.warmup}; "
            f"lambda_sup {loss.lambda_sup}, lambda_con {loss.lambda_con}, BACL on encoder stage "
            f"{self.step_context.student.stage}; the teacher is validated and exported"
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
        steps, aligned, skipped = len(train_outputs), int(values["aligned"].sum()), int(values["skipped"].sum())
        logged = {
            "gsema_aligned_fraction": aligned / steps,
            "gsema_grad_cos": float(values["grad_cos"][np.isfinite(values["grad_cos"])].mean()) if aligned else np.nan,
            "gsema_dce_target": float(values["dce_student_trg"].mean()),
            "gsema_bacl": float(values["bacl"].mean()) if "bacl" in values else np.nan,
            "gsema_skipped_steps": skipped,
        }
        for key, value in logged.items():
            self.logger.log(key, value, self.current_epoch)
        self.print_to_log_file(
            f"GS-EMA: {aligned} of {steps} steps aligned (teacher updated), mean cos(g_src, g_trg) "
            f"{logged['gsema_grad_cos']:.4f}, target loss {logged['gsema_dce_target']:.4f}, BACL "
            f"{logged['gsema_bacl']:.4f}" + (f", {skipped} non-finite steps skipped" if skipped else "")
        )

    # ------------------------------------------------------------------------------------------- the teacher

    def validation_step(self, batch: dict) -> dict:
        with self.teacher_as_network():
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
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
            }
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        super().load_checkpoint(filename_or_checkpoint)  # the teacher lands in self.network; put it where it belongs
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        where = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "checkpoint"
        state = checkpoint.get("gsema")
        if state is None:
            raise ValueError(f"{where}: holds no GS-EMA state (it was not written by nnUNetTrainerGSEMA)")
        differs = _first_difference(state["config"], _method_dict(self.gsema_config))
        if differs:
            raise ValueError(f"{where}: trained with other GS-EMA settings ({differs}); resume with the same --set")
        self.gsema.load_state_dict({**state["ema"], "teacher": checkpoint["network_weights"]})
        self.network.load_state_dict(state["student"])
        self.target_transform.load_state_dict(state["target_transform"])


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
    trainer_class: type[nnUNetTrainerGSEMA] = nnUNetTrainerGSEMA,
) -> nnUNetTrainerGSEMA:
    """``nnUNetv2_train DATASET CONFIGURATION FOLD -tr nnUNetTrainerGSEMA`` in one process: nnU-Net's own sequence
    (checkpoint loading, ``run_training``, the final validation) on a trainer built from ``trainer_class``.

    ``overrides``: ``--set`` settings of the method (:func:`method_config`); ``epochs``, ``iterations_per_epoch``,
    ``val_iterations_per_epoch``: nnU-Net's ``num_epochs`` (1000), ``num_iterations_per_epoch`` (250) and
    ``num_val_iterations_per_epoch`` (50). Returns the trainer.
    """
    if continue_training and only_run_validation:
        raise ValueError("--c and --val: continue training or only validate, not both")
    if val_with_best and disable_checkpointing:
        raise ValueError("--val_best needs the checkpoints that --disable_checkpointing turns off")
    for name, value in (
        ("--epochs", epochs),
        ("--iterations", iterations_per_epoch),
        ("--val-iterations", val_iterations_per_epoch),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{name}: expected at least 1, got {value}")
    cfg = method_config(overrides)
    trainer = build_trainer(
        dataset_name_or_id,
        configuration,
        fold,
        plans_identifier=plans_identifier,
        device=device,
        continue_training=continue_training,
        trainer_class=trainer_class,
    )
    trainer.gsema_config = cfg
    if epochs is not None:
        trainer.num_epochs = epochs
    if iterations_per_epoch is not None:
        trainer.num_iterations_per_epoch = iterations_per_epoch
    if val_iterations_per_epoch is not None:
        trainer.num_val_iterations_per_epoch = val_iterations_per_epoch
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
