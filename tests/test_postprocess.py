"""Post-processing of label maps: the largest component of a class, and a class's components that touch another."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsema_fast.inference.postprocess import Postprocess, label_map

LABELS = {"background": 0, "vessel": 1, "aneurysm": 2}


def scene() -> np.ndarray:
    m = np.zeros((12, 12, 12), np.uint8)
    m[1:11, 5, 5] = 1  # a vessel
    m[3:5, 6:8, 5] = 2  # a sac on its wall: 4 voxels, touching it
    m[8:10, 1:3, 1:3] = 2  # a blob in the background: 8 voxels, touching nothing
    m[10, 10, 10] = 1  # a speck of vessel on its own
    return m


def test_nothing_asked_changes_nothing():
    m = scene()
    assert Postprocess()(m, LABELS) is m and not Postprocess()


def test_only_the_components_touching_the_other_class_stay():
    out = Postprocess(attached=(("aneurysm", "vessel"),))(scene(), LABELS)
    assert (out == 2).sum() == 4 and out[3, 6, 5] == 2 and out[8, 1, 1] == 0
    assert ((out == 1) == (scene() == 1)).all()  # the other classes stay


def test_touching_counts_a_diagonal_neighbour():
    m = np.zeros((5, 5, 5), np.uint8)
    m[1, 1, 1], m[2, 2, 2] = 1, 2
    assert Postprocess(attached=(("aneurysm", "vessel"),))(m, LABELS)[2, 2, 2] == 2


def test_the_largest_component_alone_stays():
    out = Postprocess(keep_largest=("aneurysm", "vessel"))(scene(), LABELS)
    assert (out == 2).sum() == 8 and out[8, 1, 1] == 2 and out[3, 6, 5] == 0
    assert (out == 1).sum() == 10 and out[10, 10, 10] == 0


def test_label_map_is_the_argmax_then_the_rules():
    scores = torch.zeros(3, 12, 12, 12)
    m = scene()
    for value in range(3):
        scores[value][torch.from_numpy(m == value)] = 1.0
    assert (label_map(scores, LABELS) == m).all() and label_map(scores, LABELS).dtype == np.uint8
    assert (label_map(scores, LABELS, Postprocess(keep_largest=("aneurysm",))) == 2).sum() == 8


def test_an_unknown_class_is_named():
    with pytest.raises(
        ValueError, match=r"eval.postprocess: no class 'sac' in the label map; classes: \['vessel', 'aneurysm'\]"
    ):
        Postprocess(keep_largest=("sac",))(scene(), LABELS)
