"""A network scored on whole preprocessed volumes, the one scoring path of the training loop (validation on the
training centres' held-out cases, and the unseen centre at the end): sliding windows with the config's patch size and
``eval`` settings, the metrics of :mod:`~gsema_fast.evaluation.metrics` in mm and ml from each volume's affine (the
numbers ``evaluate`` computes on the image's own grid when ``data.spacing`` is None), gathered across ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gsema_fast import distributed
from gsema_fast.config import Config
from gsema_fast.evaluation.metrics import case_metrics, mean_dice, voxel_spacing
from gsema_fast.inference.postprocess import label_map
from gsema_fast.inference.window import predict_volume


def volume_logits(
    net: nn.Module, item: Mapping[str, Any], cfg: Config, *, amp: torch.dtype | None, device: torch.device
) -> torch.Tensor:
    """Logits ``[1, C, ...]`` of one preprocessed volume of a :func:`gsema_fast.data.volume_loader`, by sliding
    window with the config's patch size and ``eval`` settings."""
    return predict_volume(
        net,
        item["image"].to(device),
        roi_size=cfg.data.patch_size,
        settings=cfg.eval,
        amp_dtype=amp,
    )


def score_volumes(
    net: nn.Module,
    loader,
    labels: Mapping[str, Any],
    cfg: Config,
    *,
    amp: torch.dtype | None = None,
    hd95: bool = False,
    desc: str = "score",
) -> dict:
    """Metrics of ``net`` on whole preprocessed volumes (a :func:`gsema_fast.data.volume_loader`), by sliding window
    with the config's patch size and ``eval`` settings (``eval.postprocess`` applied to each label map):
    ``{"cases": [{"case", "domain", class: metrics}], "mean": {class: mean Dice}}``, in mm and ml from each
    volume's affine (the numbers ``evaluate`` computes on the image's own grid when ``data.spacing`` is None). In a
    multi-process run ``loader`` holds this rank's share of the cases (or is None) and every rank returns the metrics
    of all cases, gathered, in the single-process order."""
    try:
        device = next(net.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    per_case = []
    for item in tqdm(loader or [], desc=desc, leave=False, disable=not distributed.is_main_process()):
        logits = volume_logits(net, item, cfg, amp=amp, device=device)
        spacing = voxel_spacing(np.asarray(item["image"].affine))
        metrics = case_metrics(
            label_map(logits[0], labels, cfg.eval.postprocess), item["label"][0, 0].cpu(), labels, spacing, hd95=hd95
        )
        per_case.append({"case": item["case"][0], "domain": str(item["domain"][0]), **metrics})
    if distributed.world_size() > 1:
        shares = distributed.all_gather_object(per_case)
        # rank r scored cases r, r + world, r + 2 world, ...
        longest = max(map(len, shares))
        per_case = [share[i] for i in range(longest) for share in shares if i < len(share)]
    return {"cases": per_case, "mean": mean_dice(per_case)}
