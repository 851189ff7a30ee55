"""Training losses as ``nn.Module``s: the boundary-aware contrastive loss (BACL, over the fused ops) and Dice + CE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gsema_fast import ops
from gsema_fast.config import BaclOptions, LossConfig


class BACL(nn.Module):
    """Boundary-aware contrastive loss (paper Sec. 2.3, Eq. 3-5) over the latents of student and teacher.

    ``forward(z_stu_src, z_stu_trg, z_tea_src, z_tea_trg)`` takes four ``[B, C, D, H, W]`` latents and returns
    ``(loss, parts)``: the 0-dim loss (volume term plus boundary term, whichever are on) and a dict of detached 0-dim
    device tensors for logging, with no host sync:

    - ``"volume"``, ``"boundary"``: each term's loss;
    - ``"volume_pos"``, ``"volume_neg"``, ``"boundary_pos"``, ``"boundary_neg"``: the mean cosine similarity of the
      positive pairs (S_s,T_s), (S_t,T_t) and of the negative pairs (S_s,S_t), (T_s,T_t), (S_s,T_t), (S_t,T_s).

    Options are those of :func:`gsema_fast.ops.bacl_loss` (``BACL(cfg.bacl)``, ``BACL(tau=0.5)``), checked here, at
    construction, and kept as ``options``; ``reduction`` ``"batch_mean"`` averages the similarities over the batch
    before the InfoNCE, as the public code does. The backend is chosen by :func:`gsema_fast.ops.bacl_terms`: the
    fused Triton passes on CUDA, the torch reference on the CPU.
    """

    def __init__(self, options: BaclOptions | None = None, **overrides: Any) -> None:
        super().__init__()
        self.options = BaclOptions.of(options, **overrides).require_term()

    def forward(
        self,
        z_stu_src: torch.Tensor,
        z_stu_trg: torch.Tensor,
        z_tea_src: torch.Tensor,
        z_tea_trg: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        result = ops.bacl_terms(z_stu_src, z_stu_trg, z_tea_src, z_tea_trg, self.options)
        parts: dict[str, torch.Tensor] = {}
        for name, loss, sims in (
            ("volume", result.volume, result.volume_sims),
            ("boundary", result.boundary, result.boundary_sims),
        ):
            if loss is None:
                continue
            parts[name] = loss.detach()
            parts[f"{name}_pos"] = sims[:, :2].mean()
            parts[f"{name}_neg"] = sims[:, 2:].mean()
        return result.loss, parts

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options)


class DiceCE(nn.Module):
    """Supervised loss L_DCE: Dice + cross-entropy on softmax logits against integer labels ``[B, 1, D, H, W]``.

    MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``, the paper's choice; other keyword arguments go to it.
    Labels may be any integer or float dtype holding class indices; the loss is computed in fp32 whatever the logits'
    autocast dtype.

    With ``recall_weight`` w > 0, a recall term for the label values in ``recall_classes`` is added:

        w * mean over (patch b, class c present in b) of  -(1 / |Y_bc|) * sum_{v in Y_bc} log softmax(logits_b)[c, v]

    where Y_bc are the voxels of class c in patch b: each patch's sac counts once, whatever its size (Dice + CE's
    cross-entropy is a mean over every voxel, where a small sac weighs almost nothing). Patches without the class add
    nothing; a batch without it adds 0. Computed on the device without a host sync.
    """

    def __init__(self, *, recall_weight: float = 0.0, recall_classes: Sequence[int] = (), **kwargs) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        if not isinstance(recall_weight, (int, float)) or isinstance(recall_weight, bool) or not recall_weight >= 0:
            raise ValueError(f"recall_weight must be a number >= 0, got {recall_weight!r}")
        classes = tuple(recall_classes)
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in classes) or len(set(classes)) != len(
            classes
        ):
            raise ValueError(f"recall_classes must be distinct label values >= 1, got {recall_classes!r}")
        if recall_weight > 0 and not classes:
            raise ValueError(f"recall_weight={recall_weight!r} needs at least one class in recall_classes")
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, **kwargs)
        self.recall_weight = float(recall_weight)
        self.recall_classes = classes

    @classmethod
    def from_config(cls, loss: LossConfig) -> DiceCE:
        """The supervised loss of a config's ``loss`` section."""
        return cls(batch=loss.batch_dice, recall_weight=loss.recall_weight, recall_classes=loss.recall_classes)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        loss = self.loss(logits, labels)
        if self.recall_weight == 0:
            return loss
        return loss + self.recall_weight * self.recall(logits, labels)

    def recall(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The recall term alone (unweighted), 0-dim fp32."""
        if max(self.recall_classes) >= logits.shape[1]:
            raise ValueError(
                f"recall_classes {list(self.recall_classes)}: the logits have {logits.shape[1]} classes "
                f"(label values 0 to {logits.shape[1] - 1})"
            )
        log_probs = torch.log_softmax(logits.float(), dim=1)
        labels = labels.long()
        # classes picked by Python index: an index tensor would be a host-to-device copy in every step
        voxels = torch.stack([(labels[:, 0] == c).flatten(1) for c in self.recall_classes], dim=1).float()  # [B, K, V]
        picked = torch.stack([log_probs[:, c].flatten(1) for c in self.recall_classes], dim=1)
        count = voxels.sum(dim=2)
        nll = -(picked * voxels).sum(dim=2) / count.clamp_min(1)
        present = (count > 0).float()
        return (nll * present).sum() / present.sum().clamp_min(1)

    def extra_repr(self) -> str:
        if self.recall_weight == 0:
            return ""
        return f"recall_weight={self.recall_weight}, recall_classes={list(self.recall_classes)}"
