"""Training losses as ``nn.Module``s: the boundary-aware contrastive loss (BACL, over the fused ops) and Dice + CE."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gsema_fast import ops
from gsema_fast.config import BaclOptions


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

    MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``, the paper's choice. Labels may be any integer or float
    dtype holding class indices; the loss is computed in fp32 whatever the logits' autocast dtype.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__()
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, **kwargs)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), labels)
