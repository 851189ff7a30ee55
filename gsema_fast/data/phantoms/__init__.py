"""Synthetic multi-centre 3D rotational angiography (3DRA) phantoms with vessel and aneurysm labels."""

from gsema_fast.data.phantoms.writer import (
    CENTRES,
    LABELS,
    CentreStyle,
    builtin_dataset,
    dataset_folder,
    synthesize,
)

__all__ = ["CENTRES", "LABELS", "CentreStyle", "builtin_dataset", "dataset_folder", "synthesize"]
