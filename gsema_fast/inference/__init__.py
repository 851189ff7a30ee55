"""Inference with a trained network: checkpoints rebuilt into networks, sliding-window prediction of whole volumes,
preprocessing and mapping back to each image's own grid, NIfTI in and out, and ``predict``.

Nothing here needs the trainer: :func:`load_checkpoint` and :func:`predict` work on any checkpoint that follows the
trainer's contract (a dict with ``config``, ``student``, ``teacher``).
"""

from gsema_fast.inference.prediction import (
    AMP_DTYPES,
    LoadedCheckpoint,
    amp_dtype,
    load_checkpoint,
    load_nifti,
    predict,
    predict_volume,
    preprocess_case,
    save_nifti_like,
    score_volumes,
    segment_case,
    to_original_grid,
)

__all__ = [
    "AMP_DTYPES",
    "LoadedCheckpoint",
    "amp_dtype",
    "load_checkpoint",
    "load_nifti",
    "predict",
    "predict_volume",
    "preprocess_case",
    "save_nifti_like",
    "score_volumes",
    "segment_case",
    "to_original_grid",
]
