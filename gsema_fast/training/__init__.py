"""Training: a run built from its config (:mod:`~gsema_fast.training.build`), compiled
(:mod:`~gsema_fast.training.compilation`), checkpointed and resumed (:mod:`~gsema_fast.training.checkpoints`) in its
run folder (:mod:`~gsema_fast.training.runfolder`), reported (:mod:`~gsema_fast.training.monitor`), and the loop that
ties them together (:mod:`~gsema_fast.training.loop`, :func:`train`); the whole-step benchmark
(:mod:`~gsema_fast.training.benchstep`)."""

from gsema_fast.training.loop import train

__all__ = ["train"]
