"""From class scores to a label map: the argmax, then post-processing of nnU-Net's kind where it is asked for.

Two rules, by class name, each applied only where it helped on validation cases of the training centres
(``bench/postprocess.py`` compares them):

- ``keep_largest``: of each named class, only its largest connected component stays; the rest becomes background;
- ``attached``: ``(class, to)`` pairs: of ``class``, only the connected components that touch ``to`` stay (an
  aneurysm grows from a vessel wall: a blob of "aneurysm" in the background texture touches no vessel).

Connectivity is full (26 neighbours in 3-D) for components and for touching. One home for the label map of every
path that makes one: the training loop's scoring, ``evaluate`` and ``predict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage


@dataclass(frozen=True)
class Postprocess:
    """The post-processing of a label map; the default does nothing."""

    keep_largest: tuple[str, ...] = ()
    attached: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.keep_largest or self.attached)

    def describe(self) -> str:
        parts = [f"largest component of {c}" for c in self.keep_largest]
        parts += [f"{c} touching {to}" for c, to in self.attached]
        return ", ".join(parts) or "none"

    def check(self, labels: Mapping[str, int]) -> None:
        """ValueError naming a class that ``labels`` (name -> value) does not hold."""
        for name in (*self.keep_largest, *(n for pair in self.attached for n in pair)):
            if name not in labels or name == "background":
                known = [n for n in labels if n != "background"]
                raise ValueError(f"eval.postprocess: no class {name!r} in the label map; classes: {known}")

    def __call__(self, label_map: np.ndarray, labels: Mapping[str, int]) -> np.ndarray:
        """``label_map`` (integer, any shape) with the rules applied, a new array."""
        if not self:
            return label_map
        self.check(labels)
        out = np.array(label_map, copy=True)
        for name in self.keep_largest:
            out = _keep_largest(out, int(labels[name]))
        for name, to in self.attached:
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


def label_map(scores: torch.Tensor, labels: Mapping[str, int], postprocess: Postprocess | None = None) -> np.ndarray:
    """The label map of class scores ``[C, ...]`` (probabilities or logits): argmax over classes, then
    ``postprocess``; ``uint8`` when the classes fit it."""
    argmax = scores.argmax(0).cpu().numpy()
    argmax = argmax.astype(np.uint8 if scores.shape[0] <= 256 else np.int32)
    return postprocess(argmax, labels) if postprocess else argmax


def parse_rules(keep_largest: Sequence[str] = (), attached: Mapping[str, str] | None = None) -> Postprocess:
    """A :class:`Postprocess` from config-style values: class names, and ``{class: to}``."""
    return Postprocess(tuple(keep_largest), tuple(sorted((attached or {}).items())))
