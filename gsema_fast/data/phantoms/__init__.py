"""Synthetic multi-centre 3D rotational angiography (3DRA) phantoms with vessel and aneurysm labels.

A case is a patient's anatomy (:mod:`~gsema_fast.data.phantoms.anatomy`: a vessel tree with one or two aneurysms,
drawn in millimetres from one distribution for every centre) acquired by one centre
(:mod:`~gsema_fast.data.phantoms.acquisition`, with the centre's settings from
:mod:`~gsema_fast.data.phantoms.centres`: voxel grid, point-spread function, contrast, texture, bias, noise,
artifacts, storage). A model that generalises across acquisition styles can therefore segment every centre.
:mod:`~gsema_fast.data.phantoms.writer` writes the cases and their ``dataset.json`` in the nnU-Net raw layout.
"""

from gsema_fast.data.phantoms.anatomy import LABELS
from gsema_fast.data.phantoms.centres import CENTRES, CentreStyle
from gsema_fast.data.phantoms.writer import builtin_dataset, dataset_folder, synthesize

__all__ = ["CENTRES", "LABELS", "CentreStyle", "builtin_dataset", "dataset_folder", "synthesize"]
