"""DiceCE's recall term (``loss.recall_weight``) against an independent per-patch reference, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from gsema_fast.config import load_config
from gsema_fast.losses import DiceCE

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference_recall(logits: torch.Tensor, labels: torch.Tensor, classes) -> torch.Tensor:
    """Per patch and class, the cross-entropy over that class's voxels (each voxel's own F.cross_entropy), averaged
    over the (patch, class) pairs that hold the class."""
    terms = []
    for b in range(logits.shape[0]):
        per_voxel = F.cross_entropy(logits[b : b + 1].float(), labels[b : b + 1, 0].long(), reduction="none")[0]
        for c in classes:
            mask = labels[b, 0] == c
            if mask.any():
                terms.append(per_voxel[mask].mean())
    return torch.stack(terms).mean() if terms else logits.float().sum() * 0


def _case(shape, classes, dtype, *, missing_in=()):
    gen = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=gen)
    for b in missing_in:
        labels[b][labels[b] == max(classes)] = 0
    return logits, labels


@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 3), (3, 4, 1, 9, 6), (1, 2, 4, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_recall_term_and_its_gradient_match_the_reference(shape, dtype):
    classes = list(range(1, shape[1]))
    logits, labels = _case(shape, classes, dtype, missing_in=(0,))  # patch 0 lacks the last class
    loss = DiceCE(recall_weight=0.7, recall_classes=classes)
    got = loss(logits, labels)
    (grad,) = torch.autograd.grad(got, logits)
    ref_logits = logits.detach().clone().requires_grad_()
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    want = dice_ce(ref_logits.float(), labels) + 0.7 * reference_recall(ref_logits, labels, classes)
    (ref_grad,) = torch.autograd.grad(want, ref_logits)
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol)
    assert grad.dtype == dtype


def test_a_small_sac_counts_as_much_as_a_large_one():
    labels = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    labels[0, 0, 1:7, 1:7, 1:7] = 2  # 216 voxels
    labels[1, 0, 3, 3, 3] = 2  # 1 voxel
    logits = torch.zeros(2, 3, 8, 8, 8)
    logits[:, 0] = 4.0  # every voxel called background: both sacs missed alike
    term = DiceCE(recall_weight=1.0, recall_classes=[2]).recall(logits, labels)
    per_patch = [reference_recall(logits[b : b + 1], labels[b : b + 1], [2]) for b in range(2)]
    torch.testing.assert_close(per_patch[0], per_patch[1])
    torch.testing.assert_close(term, per_patch[0])
    voxel_mean = F.cross_entropy(logits[1:], labels[1:, 0])  # plain CE: in its patch the 1-voxel sac nearly vanishes
    assert term > 50 * voxel_mean


def test_off_or_absent_adds_nothing():
    logits, labels = _case((2, 3, 4, 5, 6), [1, 2], torch.float32, missing_in=(0, 1))
    plain = DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels)
    torch.testing.assert_close(DiceCE()(logits, labels), plain)
    with_term = DiceCE(recall_weight=2.0, recall_classes=[2])
    assert with_term.recall(logits, labels).item() == 0.0  # no patch holds class 2
    torch.testing.assert_close(with_term(logits, labels), plain)


def test_from_config():
    loss = DiceCE.from_config(load_config("demo", ["loss.recall_weight=0.5", "loss.recall_classes=[1,2]"]).loss)
    assert (loss.recall_weight, loss.recall_classes) == (0.5, (1, 2))
    assert DiceCE.from_config(load_config("demo").loss).recall_weight == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recall_weight": -1.0, "recall_classes": [2]}, r"recall_weight must be a number >= 0, got -1\.0"),
        ({"recall_weight": "1", "recall_classes": [2]}, r"recall_weight must be a number >= 0, got '1'"),
        (
            {"recall_weight": 1.0, "recall_classes": [0]},
            r"recall_classes must be distinct label values >= 1, got \[0\]",
        ),
        ({"recall_weight": 1.0, "recall_classes": [2, 2]}, r"distinct label values >= 1, got \[2, 2\]"),
        ({"recall_weight": 1.0, "recall_classes": []}, r"recall_weight=1\.0 needs at least one class"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiceCE(**kwargs)


def test_a_class_beyond_the_logits_is_refused():
    logits, labels = _case((1, 3, 4, 4, 4), [1, 2], torch.float32)
    with pytest.raises(ValueError, match=r"recall_classes \[3\]: the logits have 3 classes \(label values 0 to 2\)"):
        DiceCE(recall_weight=1.0, recall_classes=[3])(logits, labels)
