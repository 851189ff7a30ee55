"""NIfTI in and out: an image read lazily, and a volume written on another image's voxel grid, atomically."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from gsema_fast.files import atomic_path


def load_nifti(path: str | os.PathLike):
    """The nibabel image at ``path`` (data read lazily)."""
    return nib.load(str(path))


def save_nifti_like(data: np.ndarray, like, path: Path) -> None:
    """``data`` on ``like``'s voxel grid, with its affine and header (data type and scaling set for ``data``)."""
    header = like.header.copy()
    header.set_data_dtype(data.dtype)
    img = type(like)(data, like.affine, header=header)
    # The input's scaling (scl_slope / scl_inter) describes its intensities, not labels or probabilities.
    img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:  # its name keeps the real ending, from which nibabel picks compression
        img.to_filename(str(tmp))
