"""GS-EMA and the fused EMA in Lightning (extra ``gsema-fast[lightning]``).

- :class:`FusedEMA`, a callback: an exponential moving average of a LightningModule's weights
  (:class:`gsema_fast.ema.EMA`, one :func:`gsema_fast.ops.fused_ema_` per optimizer step, warm-up and counter on the
  device), swapped in for validation, kept in the checkpoint and resumed with it. :func:`ema_state_dict` reads the
  averaged weights back from a checkpoint for inference.
- :class:`GSEMAModule`, a LightningModule that trains a segmentation network with GS-EMA and BACL through
  :func:`gsema_fast.step.train_step` under manual optimisation: the simulated target batch from
  :class:`gsema_fast.data.TargetTransform`, three backward passes that add up to one, ``grad_stats``, the optimizer
  step through Lightning (which counts it) and the teacher update, decided on the device. Subclass it for your own
  batches (:meth:`GSEMAModule.source_batch`), optimizer and validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from gsema_fast.config import Config, with_overrides
from gsema_fast.data.target import TargetTransform
from gsema_fast.ema import EMA, GSEMA
from gsema_fast.integrations import MissingExtraError
from gsema_fast.losses import DiceCE
from gsema_fast.step import StepContext, bacl_from_config, train_step, updater_from_config

try:
    import lightning.pytorch as pl
except ImportError as err:
    raise MissingExtraError("lightning", "gsema_fast.integrations.lightning") from err

__all__ = ["FusedEMA", "GSEMAModule", "ema_state_dict"]


# ------------------------------------------------------------------------------------------------ FusedEMA


class _Weights(nn.Module):
    """A module's parameters and buffers by position: the same tensors, not copies. ``EMA`` averages into a copy of
    this shell rather than of the LightningModule, which refers to its Trainer."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        persistent = set(module.state_dict())
        self.names = [name for name, _ in module.named_parameters()]
        self.names += [name for name, _ in module.named_buffers()]
        self.persistent = [name in persistent for name in self.names]
        for i, p in enumerate(module.parameters()):
            self.register_parameter(f"p{i}", p)
        for i, b in enumerate(module.buffers()):
            self.register_buffer(f"b{i}", b)

    def tensors(self) -> list[torch.Tensor]:
        return [t.detach() for t in (*self.parameters(), *self.buffers())]


def _check_decay(decay: float) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"FusedEMA: decay must be a number in [0, 1], got {decay!r}")
    return float(decay)


class FusedEMA(pl.Callback):
    """Keep ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step (``warmup``: decay capped at
    ``1 - 1/(t+1)`` at update ``t``), through the fused op; integer buffers are copied, and with ``exclude_buffers``
    every buffer is.

    ``validate_with_ema``: validation runs on the averaged weights (the live ones are put back afterwards, before any
    checkpoint is written). The callback's state in the checkpoint holds the averaged weights and the update count,
    so ``trainer.fit(..., ckpt_path=...)`` resumes the average exactly; :func:`ema_state_dict` extracts the weights.
    Nothing here reads the device: the count and the warm-up stay there.
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        warmup: bool = True,
        validate_with_ema: bool = True,
        exclude_buffers: bool = False,
    ) -> None:
        self.decay = _check_decay(decay)
        self.warmup = bool(warmup)
        self.validate_with_ema = bool(validate_with_ema)
        self.exclude_buffers = bool(exclude_buffers)
        self.weights: _Weights | None = None
        self.ema: EMA | None = None
        self._pending: dict | None = None  # a checkpoint's state, loaded before the model is on its device
        self._live: list[torch.Tensor] | None = None  # the live weights while validation runs on the average
        self._seen_step = 0

    def _build(self, pl_module: pl.LightningModule) -> None:
        if self.ema is None:
            self.weights = _Weights(pl_module)
            self.ema = EMA(self.weights, decay=self.decay, warmup=self.warmup, exclude_buffers=self.exclude_buffers)
        if self._pending is not None:
            state, self._pending = self._pending, None
            if state["names"] != self.weights.names:
                raise ValueError(
                    "FusedEMA: the checkpoint's average holds other weights than this module "
                    f"({len(state['names'])} tensors, this module {len(self.weights.names)})"
                )
            self.ema.load_state_dict(state["ema"])

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averaged weights by the module's state-dict names (persistent ones only)."""
        if self.ema is None:
            raise ValueError("FusedEMA: no average yet (it starts with trainer.fit)")
        pairs = zip(self.weights.names, self.weights.persistent, self.ema.module.tensors(), strict=True)
        return {name: tensor for name, keep, tensor in pairs if keep}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step  # restored from a checkpoint by now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        # Only batches that stepped the optimizer (gradient accumulation, manual optimisation) move the average.
        if trainer.global_step != self._seen_step:
            self._seen_step = trainer.global_step
            self.ema.update(self.weights)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.validate_with_ema:
            return
        self._build(pl_module)  # trainer.validate(..., ckpt_path=...) starts here
        live = self.weights.tensors()
        self._live = [t.clone() for t in live]
        with torch.no_grad():
            for t, avg in zip(live, self.ema.module.tensors(), strict=True):
                t.copy_(avg)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._live is None:
            return
        with torch.no_grad():
            for t, saved in zip(self.weights.tensors(), self._live, strict=True):
                t.copy_(saved)
        self._live = None

    def state_dict(self) -> dict:
        if self.ema is None:
            return {} if self._pending is None else self._pending
        return {
            "names": list(self.weights.names),
            "persistent": list(self.weights.persistent),
            "ema": self.ema.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores callbacks before it moves the model to its device: the average is built at fit start.
        self._pending = state_dict or None


def ema_state_dict(checkpoint: str | Path | Mapping, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """The weights averaged by :class:`FusedEMA`, from a Lightning checkpoint (a path or the loaded dict), keyed like
    the module's ``state_dict()``: ``model.load_state_dict(ema_state_dict("last.ckpt"))``.

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
    tensors = [v for k, v in state["ema"].items() if k.startswith("module.")]
    pairs = zip(state["names"], state["persistent"], tensors, strict=True)
    return {name: tensor for name, keep, tensor in pairs if keep}


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
    its ``state_dict``: ``trainer.fit(..., ckpt_path=...)`` resumes all of it.
    """

    def __init__(self, student: nn.Module, config: Config | None = None) -> None:
        super().__init__()
        cfg = Config() if config is None else with_overrides(config)  # a validated copy, the caller's left alone
        if cfg.ema.mode != "gsema":
            raise ValueError(f"ema.mode: GSEMAModule trains with 'gsema', got {cfg.ema.mode!r}")
        self.automatic_optimization = False
        self.gsema_config = cfg
        self.student = student
        self.teacher = GSEMA(student).teacher
        self.dce = DiceCE(batch=cfg.loss.batch_dice)
        self.bacl = bacl_from_config(cfg.loss, cfg.bacl)
        self.target_transform = TargetTransform.from_config(cfg.target_transform, seed=cfg.train.seed)
        self.gsema: GSEMA | None = None  # built at fit start, on the training device
        self.step_context: StepContext | None = None
        self._pending_counters: dict | None = None

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
        self.gsema = updater_from_config(self.gsema_config.ema, self.student, self.teacher)
        if self._pending_counters is not None:
            self.gsema.step.copy_(self._pending_counters["step"])
            self.gsema.num_aligned.copy_(self._pending_counters["num_aligned"])
            self._pending_counters = None
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
        if self.gsema is not None:
            checkpoint["gsema"] = {"step": self.gsema.step.clone(), "num_aligned": self.gsema.num_aligned.clone()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_counters = checkpoint.get("gsema")
