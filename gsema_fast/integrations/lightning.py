"""GS-EMA and the fused EMA in Lightning (extra ``gsema-fast[lightning]``).

- :class:`FusedEMA`, a callback: an exponential moving average of a LightningModule's weights
  (:class:`gsema_fast.ema.EMA`, one :func:`gsema_fast.ops.fused_ema_` per optimizer step, warm-up and counter on the
  device). By default the average is the model, as with Lightning's ``EMAWeightAveraging``: validation, test and
  predict run on it, the module holds it after ``fit``, and checkpoints store it as the model. It resumes with the
  checkpoint; :func:`ema_state_dict` reads it back for inference.
- :class:`GSEMAModule`, a LightningModule that trains a segmentation network with GS-EMA and BACL through
  :func:`gsema_fast.step.train_step` under manual optimisation: the simulated target batch from
  :class:`gsema_fast.data.TargetTransform`, three backward passes that add up to one, ``grad_stats``, the optimizer
  step through Lightning (which counts it) and the teacher update, decided on the device. Subclass it for your own
  batches (:meth:`GSEMAModule.source_batch`), optimizer and validation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from gsema_fast.config import Config, with_overrides
from gsema_fast.data.target import TargetTransform
from gsema_fast.ema import EMA, GSEMA
from gsema_fast.integrations import optional_imports
from gsema_fast.losses import DiceCE
from gsema_fast.step import StepContext, bacl_from_config, train_step, updater_from_config

with optional_imports("lightning", "gsema_fast.integrations.lightning"):
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["FusedEMA", "GSEMAModule", "ema_state_dict"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ FusedEMA


class _Weights(nn.Module):
    """A module's parameters and buffers, each tensor once (a tied weight is one tensor under several names): the
    same tensors, not copies. ``EMA`` averages into a copy of this shell rather than of the LightningModule, which
    refers to its Trainer. ``keys`` maps every tensor entry of the module's ``state_dict()`` to its tensor's position
    in :meth:`tensors`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        in_state_dict = set(module.state_dict(keep_vars=True))
        position: dict[int, int] = {}
        self.keys: dict[str, int] = {}
        named = [
            *((name, t, True) for name, t in module.named_parameters(remove_duplicate=False)),
            *((name, t, False) for name, t in module.named_buffers(remove_duplicate=False)),
        ]
        for name, tensor, is_parameter in named:
            if id(tensor) not in position:
                position[id(tensor)] = len(position)
                register = self.register_parameter if is_parameter else self.register_buffer
                register(f"t{position[id(tensor)]}", tensor)
            if name in in_state_dict:
                self.keys[name] = position[id(tensor)]

    def tensors(self) -> list[torch.Tensor]:
        return [t.detach() for t in (*self.parameters(), *self.buffers())]

    def named(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (in the order of :meth:`tensors`) by state-dict name, tied names sharing one tensor."""
        return {name: tensors[i] for name, i in self.keys.items()}


def _check_decay(decay: float) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"FusedEMA: decay must be a number in [0, 1], got {decay!r}")
    return float(decay)


# The format of the callback's state in a checkpoint.
STATE_VERSION = 2


class FusedEMA(pl.Callback):
    """Keep ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step (``warmup``: decay capped at
    ``1 - 1/(t+1)`` at update ``t``), through the fused op; integer buffers are copied, and with ``exclude_buffers``
    every buffer is. Nothing here reads the device: the count and the warm-up stay there.

    ``use_average`` (default True, as Lightning's ``EMAWeightAveraging``): the average is the model wherever the model
    is used outside the training steps. Validation during ``fit`` runs on it (the live weights are put back after
    each validation epoch, and on any exception or Ctrl-C before Lightning writes a checkpoint); after ``fit`` the
    module holds it, so ``trainer.test``, ``trainer.predict``, your own use of the module and, under ``ddp_spawn``, the
    module in the main process get it; a checkpoint's ``state_dict`` is the average (``load_from_checkpoint`` and
    ``test/predict(ckpt_path=...)`` get it) and ``current_model_state`` the live weights, from which ``fit(...,
    ckpt_path=...)`` resumes training. The next ``fit`` on the same module and callback continues from the live
    weights. ``use_average=False``: the live weights are the model everywhere, and the average is kept beside them
    (in :meth:`averaged`, in the checkpoint's callback state, through :func:`ema_state_dict`).

    The average follows every tensor of the module once, tied weights included, and is keyed by the module's
    ``state_dict()`` names.
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        warmup: bool = True,
        use_average: bool = True,
        exclude_buffers: bool = False,
    ) -> None:
        self.decay = _check_decay(decay)
        self.warmup = bool(warmup)
        self.use_average = bool(use_average)
        self.exclude_buffers = bool(exclude_buffers)
        self.weights: _Weights | None = None
        self.ema: EMA | None = None
        self._module_id: int | None = None
        self._pending: dict | None = None  # a checkpoint's callback state, loaded before the model is on its device
        self._pending_model: Mapping | None = None  # that checkpoint's state_dict (where the average may be)
        self._live: list[torch.Tensor] | None = None  # the live weights while the module holds the average
        self._seen_step = 0

    # ---------------------------------------------------------------------------------------- the average

    def _build(self, pl_module: pl.LightningModule) -> None:
        if self.ema is None or self._module_id != id(pl_module):
            self.weights = _Weights(pl_module)
            self.ema = EMA(self.weights, decay=self.decay, warmup=self.warmup, exclude_buffers=self.exclude_buffers)
            self._module_id, self._live = id(pl_module), None
        if self._pending is not None:
            state, model, self._pending, self._pending_model = self._pending, self._pending_model, None, None
            if state.get("version") != STATE_VERSION:
                raise ValueError("FusedEMA: the checkpoint's average was written in another format: start a new fit")
            if set(state["keys"]) != set(self.weights.keys):
                raise ValueError(
                    f"FusedEMA: the checkpoint's average holds other weights than this module "
                    f"({len(state['keys'])} tensors, this module {len(self.weights.keys)})"
                )
            average = state["average"] if state["average"] is not None else model
            with torch.no_grad():
                ema = self.ema.module.tensors()
                for name, i in self.weights.keys.items():
                    ema[i].copy_(average[name])
                self.ema.num_updates.copy_(state["num_updates"])

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averaged weights by the module's state-dict names (its parameters and persistent buffers)."""
        if self.ema is None:
            raise ValueError(
                "FusedEMA: no average in this process (it starts with trainer.fit; under ddp_spawn the module holds "
                "it after fit, or read it from a checkpoint with ema_state_dict)"
            )
        return self.weights.named(self.ema.module.tensors())

    def _hold_average(self) -> None:
        if self.ema is None or self._live is not None:
            return
        live = self.weights.tensors()
        self._live = [t.clone() for t in live]
        with torch.no_grad():
            for t, avg in zip(live, self.ema.module.tensors(), strict=True):
                t.copy_(avg)

    def _hold_live(self) -> None:
        if self._live is None:
            return
        with torch.no_grad():
            for t, saved in zip(self.weights.tensors(), self._live, strict=True):
                t.copy_(saved)
        self._live = None

    # ---------------------------------------------------------------------------------------- Lightning's hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        spawned = type(trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher"
        if stage == TrainerFn.FITTING and spawned and not self.use_average:
            log.warning(
                "FusedEMA(use_average=False) under a spawning strategy: the main process gets the live weights back; "
                "the average is in the checkpoints (ema_state_dict)"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(pl_module)
        self._hold_live()  # a previous fit left the average in the module: training goes on from the live weights

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step  # restored from a checkpoint by now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        # Only batches that stepped the optimizer (gradient accumulation, manual optimisation) move the average.
        if trainer.global_step != self._seen_step:
            self._seen_step = trainer.global_step
            self.ema.update(self.weights)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.use_average and trainer.state.fn == TrainerFn.FITTING:
            self._hold_average()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._hold_live()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.use_average:
            self._hold_average()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Before OnExceptionCheckpoint (Lightning runs checkpoint callbacks last) and before the caller sees the module.
        self._hold_live()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.ema is None:
            return
        live = dict(checkpoint["state_dict"])
        if self._live is not None:  # the module holds the average now
            live.update(self.weights.named(self._live))
        if self.use_average:
            checkpoint["state_dict"] = {**live, **self.averaged()}
            checkpoint["current_model_state"] = live
        else:
            checkpoint["state_dict"] = live

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._pending_model = checkpoint["state_dict"]
        if trainer.state.fn == TrainerFn.FITTING and "current_model_state" in checkpoint:
            pl_module.load_state_dict(checkpoint["current_model_state"])  # training resumes from the live weights
            self._live = None

    def state_dict(self) -> dict:
        if self.ema is None:
            return {} if self._pending is None else self._pending
        return {
            "version": STATE_VERSION,
            "keys": list(self.weights.keys),
            "num_updates": self.ema.num_updates.clone(),
            # with use_average the average is the checkpoint's state_dict; otherwise it is kept here
            "average": None if self.use_average else self.averaged(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores callbacks before it moves the model to its device: the average is built at fit start.
        self._pending = state_dict or None


def ema_state_dict(checkpoint: str | Path | Mapping, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """The module's ``state_dict`` with the weights averaged by :class:`FusedEMA`, from a Lightning checkpoint (a path
    or the loaded dict): ``model.load_state_dict(ema_state_dict("last.ckpt"))``.

    ``key``: the callback's state key when a checkpoint holds several (default: the only ``FusedEMA`` one).
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    states = {k: v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith(FusedEMA.__qualname__)}
    if key is not None:
        states = {k: v for k, v in states.items() if k == key}
    if len(states) != 1 or not next(iter(states.values())):
        raise ValueError(f"checkpoint: expected one FusedEMA state, found {sorted(states) or 'none'}")
    state = next(iter(states.values()))
    if state.get("version") != STATE_VERSION:
        raise ValueError("checkpoint: its FusedEMA state was written in another format")
    if state["average"] is None:  # use_average: the checkpoint's model is the average
        return dict(checkpoint["state_dict"])
    return {**checkpoint["state_dict"], **state["average"]}


# ------------------------------------------------------------------------------------------------ GSEMAModule


class _LightningOptimizerStep:
    """The optimizer as :mod:`gsema_fast.step` sees it: the step's skip flag (``found_inf``, set and deleted around
    ``step()``) lands on the torch optimizer, which reads it, while ``step()`` goes through Lightning, which counts the
    step (``global_step``, checkpoint intervals, ``max_steps``) and runs its hooks."""

    def __init__(self, lightning_optimizer) -> None:
        object.__setattr__(self, "lightning_optimizer", lightning_optimizer)

    def step(self):
        return self.lightning_optimizer.step()

    @property
    def defaults(self) -> dict:
        # StepContext reads whether the optimizer can skip a step on the device (fused)
        return self.lightning_optimizer.optimizer.defaults

    def __setattr__(self, name: str, value) -> None:
        setattr(self.lightning_optimizer.optimizer, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.lightning_optimizer.optimizer, name)


# Lightning precisions the step supports: fp16 needs the step's own GradScaler, which Lightning's plugin replaces.
PRECISIONS = ("32-true", "bf16-mixed")


class GSEMAModule(pl.LightningModule):
    """GS-EMA training of ``student`` with manual optimisation, one :func:`gsema_fast.step.train_step` per batch.

    ``student(x)`` returns ``(logits, latent)`` (every :func:`gsema_fast.models.build_model` network does); the
    teacher is a frozen copy, a submodule (so it moves and is checkpointed with the module) and the model of
    ``forward``, validation and export. ``config`` (:class:`gsema_fast.config.Config`, default: the package's
    defaults, e.g. ``load_config("paper", ["ema.rule=sign"])``) supplies the ``ema``, ``loss``, ``bacl`` and
    ``target_transform`` sections and the transform's seed (``train.seed``); ``ema.mode`` must be ``gsema``.

    Subclass it and write ``configure_optimizers`` (one optimizer over the student's parameters; a fused one, e.g.
    ``torch.optim.AdamW(..., fused=True)``, skips a step with non-finite gradients on the device); override
    :meth:`source_batch` for batches other than ``{"image", "label"}`` dicts or ``(image, label)`` pairs, and
    ``validation_step`` for other metrics. Learning-rate schedulers are yours to step (manual optimisation).
    Single device, precision ``32-true`` or ``bf16-mixed``.

    Logged per step (device tensors, read by Lightning only when it writes its logs): ``train/<term>`` for every
    output of the step (``total``, ``dce_student_src``, ``dce_student_trg``, ``bacl``, ``aligned``, ``grad_cos``,
    ``skipped``; the teacher's DCE on logging steps) and ``train/aligned_fraction`` since the start. The GS-EMA
    counters go into the checkpoint (``checkpoint["gsema"]``), the teacher and the transform's random streams into
    its ``state_dict``: ``trainer.fit(..., ckpt_path=...)`` resumes all of it. The counters belong to the module: a
    second ``fit`` on it goes on from them (the warm-up does not start again).
    """

    def __init__(self, student: nn.Module, config: Config | None = None) -> None:
        super().__init__()
        cfg = Config() if config is None else with_overrides(config)  # a validated copy, the caller's left alone
        if cfg.ema.mode != "gsema":
            raise ValueError(f"ema.mode: GSEMAModule trains with 'gsema', got {cfg.ema.mode!r}")
        self.automatic_optimization = False
        self.gsema_config = cfg
        self.student = student
        # One updater for the module's life: its counters (warm-up, aligned fraction) go on across fits.
        self.gsema: GSEMA = updater_from_config(cfg.ema, student)
        self.teacher = self.gsema.teacher
        self.dce = DiceCE.from_config(cfg.loss)
        self.bacl = bacl_from_config(cfg.loss, cfg.bacl)
        self.target_transform = TargetTransform.from_config(cfg.target_transform, seed=cfg.train.seed)
        self.step_context: StepContext | None = None  # built at fit start, around that fit's optimizer

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains, and its normalisation layers use their running statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits."""
        return self.teacher(x)[0]

    def source_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image [B, C, D, H, W], label [B, 1, D, H, W])`` of a batch."""
        if isinstance(batch, Mapping):
            return batch["image"], batch["label"]
        return batch[0], batch[1]

    def on_fit_start(self) -> None:
        if self.trainer.world_size != 1:
            raise ValueError(f"GSEMAModule trains on one device, got a world size of {self.trainer.world_size}")
        if self.trainer.precision not in PRECISIONS:
            raise ValueError(
                f"GSEMAModule: Trainer precision must be one of {PRECISIONS}, got {self.trainer.precision!r}"
            )
        optimizer = self.optimizers()
        if isinstance(optimizer, list):
            raise ValueError(f"GSEMAModule: configure_optimizers must return one optimizer, got {len(optimizer)}")
        loss = self.gsema_config.loss
        self.step_context = StepContext(
            student=self.student,
            teacher=self.teacher,
            optimizer=_LightningOptimizerStep(optimizer),
            mode="gsema",
            updater=self.gsema,
            dce=self.dce,
            bacl=self.bacl,
            lambda_sup=loss.lambda_sup,
            lambda_con=loss.lambda_con,
            teacher_terms=loss.teacher_terms,
        )

    def training_step(self, batch, batch_idx: int) -> None:
        x_s, y_s = self.source_batch(batch)
        x_t, y_t = self.target_transform(x_s, y_s)
        # Lightning sets every .grad to None before training starts (as any zero_grad(set_to_none=True) does); the
        # step's backward passes must land in its gradient buffers.
        self.step_context.point_grads_at(self.step_context.grads_a)
        # The teacher's DCE terms are only logged: computed on the steps whose values Lightning writes.
        logging_step = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        out = train_step(
            self.step_context, x_s, y_s, x_t, y_t, teacher_logits=self.gsema_config.loss.teacher_terms and logging_step
        )
        metrics = {f"train/{k}": v for k, v in out.items()}
        metrics["train/aligned_fraction"] = self.gsema.num_aligned / self.gsema.step.clamp_min(1)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=x_s.shape[0])

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = self.source_batch(batch)
        logits, _ = self.teacher(x)
        self.log("val/dce_teacher", self.dce(logits, y), batch_size=x.shape[0])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gsema"] = {"step": self.gsema.step.clone(), "num_aligned": self.gsema.num_aligned.clone()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("gsema")
        if counters is not None:
            self.gsema.step.copy_(counters["step"])
            self.gsema.num_aligned.copy_(counters["num_aligned"])
