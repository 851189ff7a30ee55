"""From class scores to a label map: the argmax, then post-processing of nnU-Net's kind where the config's
``eval.postprocess`` (:class:`~gsema_fast.config.Postprocess`) asks for it.

Two rules, by class name, each adopted only where it helped on validation cases of the training centres
(``bench/postprocess.py`` compares them):

- ``keep_largest``: of each named class, only its largest connected component stays; the rest becomes background;
- ``attached``: ``[class, to]`` pairs: of ``class``, only the connected components that touch ``to`` stay (an
  aneurysm grows from a vessel wall: a blob of "aneurysm" in the background texture touches no vessel).

Connectivity is full (26 neighbours in 3-D) for components and for touching. One home for the label map of every
path that makes one: the training loop's scoring, ``evaluate`` and ``predict``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy import ndimage

from gsema_fast.config import Postprocess

__all__ = ["apply_postprocess", "label_map"]


def apply_postprocess(label_map: np.ndarray, labels: Mapping[str, int], rules: Postprocess) -> np.ndarray:
    """``label_map`` (integer, any shape) with ``rules`` applied: a new array, or ``label_map`` itself when there
    are none. ``labels``: the dataset's label map (name -> value); a rule naming a class it lacks is a
    ``ValueError``."""
    if not isinstance(rules, Postprocess):
        raise TypeError(f"rules must be a gsema_fast.config.Postprocess, got {type(rules).__name__}")
    if not rules:
        return label_map
    rules.check(labels)
    out = np.array(label_map, copy=True)
    for name in rules.keep_largest:
        out = _keep_largest(out, int(labels[name]))
    for name, to in rules.attached:
        out = _keep_attached(out, int(labels[name]), int(labels[to]))
    return out


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))


def _keep_largest(label_map: np.ndarray, value: int) -> np.ndarray:
    components, count = _components(label_map == value)
    if count < 2:
        return label_map
    sizes = np.bincount(components.ravel())[1:]
    out = label_map.copy()
    out[(components > 0) & (components != 1 + int(sizes.argmax()))] = 0
    return out


def _keep_attached(label_map: np.ndarray, value: int, to: int) -> np.ndarray:
    components, count = _components(label_map == value)
    if not count:
        return label_map
    near = ndimage.binary_dilation(label_map == to, structure=np.ones((3,) * label_map.ndim, dtype=bool))
    touching = np.unique(components[near & (components > 0)])
    dropped = (components > 0) & ~np.isin(components, touching)
    out = label_map.copy()
    out[dropped] = 0
    return out


def label_map(scores: torch.Tensor, labels: Mapping[str, int], rules: Postprocess | None = None) -> np.ndarray:
    """The label map of class scores ``[C, ...]`` (probabilities or logits): argmax over classes, then ``rules``
    (None: none); ``uint8`` when the classes fit it."""
    argmax = scores.argmax(0).cpu().numpy()
    argmax = argmax.astype(np.uint8 if scores.shape[0] <= 256 else np.int32)
    return argmax if rules is None else apply_postprocess(argmax, labels, rules)
