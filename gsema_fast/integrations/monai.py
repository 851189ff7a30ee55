"""GS-EMA in MONAI's ignite engines (extra ``gsema-fast[ignite]``): :class:`GSEMAIteration`, the
``iteration_update`` of a :class:`monai.engines.SupervisedTrainer`.

GS-EMA cannot be a handler that runs after an iteration: the teacher's update needs the source- and target-domain
gradients apart, inside the step. So the whole step is the trainer's iteration: per batch the simulated target domain
(:class:`gsema_fast.data.TargetTransform`) and one :func:`gsema_fast.step.train_step` on a
:class:`gsema_fast.step.StepContext` (the losses, three backward passes that add up to one, ``grad_stats``, the
optimizer step and the teacher update, decided on the device). The engine keeps everything else: the loader and
``prepare_batch``, epochs, events and handlers (``StatsHandler``, ``CheckpointSaver``, ``ValidationHandler``, ...).

The teacher is evaluated by a :class:`monai.engines.SupervisedEvaluator` through
:class:`gsema_fast.models.LogitsOnly`, which gives the ``(logits, latent)`` networks of this package the
logits-only interface MONAI's inferers and metrics expect.
"""

from __future__ import annotations

from typing import Any

import torch

from gsema_fast.data.target import TargetTransform
from gsema_fast.integrations import optional_imports
from gsema_fast.step import StepContext, train_step

with optional_imports("ignite", "gsema_fast.integrations.monai"):
    import ignite.engine  # noqa: F401 (MONAI's engines run on ignite: without it they cannot be built)
    from monai.utils.enums import CommonKeys

__all__ = ["GSEMAIteration"]


def _plain(tensor: Any) -> torch.Tensor:
    # MONAI's MetaTensor carries metadata through every op; the step needs none of it
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"GSEMAIteration: prepare_batch must give tensors, got {type(tensor).__name__}")
    return tensor.as_subclass(torch.Tensor)


class GSEMAIteration:
    """``SupervisedTrainer(..., iteration_update=GSEMAIteration(context, target_transform))``.

    ``context``: the step's :class:`gsema_fast.step.StepContext` (student, teacher, fused optimizer, updater, losses;
    :func:`gsema_fast.training.build.build_context` makes one from a config); give the trainer
    ``network=context.student`` and ``optimizer=context.optimizer``. ``target_transform``: the simulated target domain
    (:func:`gsema_fast.training.build.build_target_transform`). ``teacher_logits``: compute the teacher's DCE terms
    (logged only) every iteration (default: ``context.teacher_terms``).

    Each iteration takes ``(image, label)`` from the engine's ``prepare_batch`` on the engine's device and returns
    the engine's output: ``image``, ``label``, ``loss`` (the total) and every term of the step (``dce_student_src``,
    ``bacl``, ``aligned``, ``grad_cos``, ...), device tensors that handlers read when they report. The engine's
    ``amp`` is not used: mixed precision is the context's ``amp_dtype``.
    """

    def __init__(
        self, context: StepContext, target_transform: TargetTransform, *, teacher_logits: bool | None = None
    ) -> None:
        if not isinstance(context, StepContext):
            raise TypeError(f"context: expected a gsema_fast.step.StepContext, got {type(context).__name__}")
        if not isinstance(target_transform, TargetTransform):
            raise TypeError(
                f"target_transform: expected a gsema_fast.data.TargetTransform, got {type(target_transform).__name__}"
            )
        self.context = context
        self.target_transform = target_transform
        self.teacher_logits = teacher_logits

    def __call__(self, engine, batchdata) -> dict[str, torch.Tensor]:
        if batchdata is None:
            raise ValueError("GSEMAIteration: the loader gave no batch")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x_s, y_s = _plain(batch[0]), _plain(batch[1])
        x_t, y_t = self.target_transform(x_s, y_s)
        # anything that reset .grad (a handler's zero_grad(set_to_none=True)) must not send the backward passes
        # elsewhere than the step's gradient buffers
        self.context.point_grads_at(self.context.grads_a)
        out = train_step(self.context, x_s, y_s, x_t, y_t, teacher_logits=self.teacher_logits)
        engine.state.output = {CommonKeys.IMAGE: x_s, CommonKeys.LABEL: y_s, CommonKeys.LOSS: out["total"], **out}
        return engine.state.output
