"""Inference with a trained network: checkpoints rebuilt into networks (:mod:`~gsema_fast.inference.checkpoint`),
sliding-window prediction of whole volumes, preprocessing and mapping back to each image's own grid
(:mod:`~gsema_fast.inference.window`), NIfTI in and out (:mod:`~gsema_fast.inference.nifti`), and ``predict``
(:mod:`~gsema_fast.inference.prediction`).

Nothing here needs the trainer: :func:`load_checkpoint` and :func:`predict` work on any checkpoint that follows the
trainer's contract (a dict with ``config``, ``student``, ``teacher``).
"""

from gsema_fast.inference.checkpoint import LoadedCheckpoint, load_checkpoint
from gsema_fast.inference.nifti import load_nifti, save_nifti_like
from gsema_fast.inference.prediction import eval_settings, predict, segment_case
from gsema_fast.inference.window import amp_dtype, predict_volume, preprocess_case, to_original_grid

__all__ = [
    "LoadedCheckpoint",
    "amp_dtype",
    "eval_settings",
    "load_checkpoint",
    "load_nifti",
    "predict",
    "predict_volume",
    "preprocess_case",
    "save_nifti_like",
    "segment_case",
    "to_original_grid",
]
