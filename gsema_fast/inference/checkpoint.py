"""A trainer checkpoint rebuilt into a network for inference (:func:`load_checkpoint`): the weights, the config it
was trained with (or a compatible one given), on the device asked for, in eval mode."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from gsema_fast.config import (
    Config,
    EvalWeights,
    check_choice,
    config_from_dict,
    config_to_dict,
    parse_override,
    resolve_device,
    with_overrides,
)
from gsema_fast.data import PREPROCESSING_KEYS
from gsema_fast.files import read_checkpoint
from gsema_fast.inference.window import amp_dtype
from gsema_fast.models import build_model

# Checkpoint entries that hold training state; everything else is small metadata.
_STATE_KEYS = ("config", "student", "teacher", "optimizer", "scheduler", "scaler", "updater", "rng", "target_transform")


@dataclasses.dataclass
class LoadedCheckpoint:
    """A network rebuilt from a checkpoint, in eval mode on ``device``, with the config it was trained with."""

    net: nn.Module
    config: Config
    path: Path
    weights: str
    step: int | None
    epoch: int | None
    device: torch.device
    amp_dtype: torch.dtype | None = None
    # The checkpoint's other entries (best score, untrained baseline, ...), without weights and optimizer state.
    extra: dict = dataclasses.field(repr=False, default_factory=dict)

    @property
    def trained_labels(self) -> dict[str, int] | None:
        """The label map (class name -> value) of the dataset the network was trained on, as the trainer records it;
        None for a checkpoint written before the trainer recorded its dataset."""
        labels = (self.extra.get("dataset") or {}).get("labels")
        return None if labels is None else {str(name): int(value) for name, value in dict(labels).items()}


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A state dict taken from a compiled or DDP-wrapped module carries these prefixes on every key.
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _merge_config(ck_cfg: Config, override: Config | None, path: Path) -> Config:
    """The checkpoint's config, with data and eval settings taken from ``override`` where they do not conflict
    (a --config that changed the preprocessing would feed the weights other inputs)."""
    if override is None:
        return ck_cfg
    mine, theirs = config_to_dict(ck_cfg), config_to_dict(override)
    conflicts = [
        f"model.{k}: checkpoint {mine['model'][k]!r}, config {theirs['model'][k]!r}"
        for k in mine["model"]
        if mine["model"][k] != theirs["model"].get(k)
    ]
    conflicts += [
        f"data.{k}: checkpoint {mine['data'][k]!r}, config {theirs['data'][k]!r}"
        for k in PREPROCESSING_KEYS
        if mine["data"][k] != theirs["data"][k]
    ]
    if conflicts:
        raise ValueError(
            f"checkpoint {path} was trained with other model or preprocessing settings than the given "
            f"config; drop --config or make these agree:\n  " + "\n  ".join(conflicts)
        )
    merged = dict(mine)
    merged["data"] = theirs["data"]
    merged["eval"] = theirs["eval"]
    return config_from_dict(merged)


def _apply_inference_overrides(cfg: Config, overrides, path: Path) -> Config:
    """``overrides`` (``"a.b=c"``) of the settings that apply at inference; the model, the preprocessing and the
    training settings are what the weights were trained with."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'a.b=c' strings, got the string {overrides!r}")
    updated = with_overrides(cfg, *overrides)  # the syntax, the key and the value checked as --set checks them
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if not (key.startswith("eval.") or key == "train.amp"):
            raise ValueError(
                f"override {text!r} for checkpoint {path}: expected eval.* or train.amp, the settings that apply at "
                f"inference (the others are the checkpoint's)"
            )
    return updated


def load_checkpoint(
    path: str | os.PathLike,
    *,
    weights: str | None = None,
    device: str | torch.device | None = None,
    config=None,
    overrides=(),
) -> LoadedCheckpoint:
    """Rebuild the ``weights`` network (``teacher`` or ``student``; None: the config's ``eval.weights``, by default
    the teacher, the domain-generalised model) of a trainer checkpoint, on ``device`` (None: CUDA if available).

    The model is built from the config stored in the checkpoint (``build_model(cfg.model)``). ``config``: a
    :class:`~gsema_fast.config.Config` whose data and eval sections replace the stored ones (another dataset,
    other inference settings); its model section and preprocessing (``data.spacing``, ``data.clip_percentiles``,
    ``data.intensity``) must equal the checkpoint's. ``overrides``: ``"a.b=c"`` strings (the ``--set`` syntax) of
    ``eval.*`` and ``train.amp``, applied last. Every failure (missing or unreadable file, missing keys, weights
    that do not fit the stored model config, a conflicting ``config``, an override of another setting) raises
    ``FileNotFoundError`` or ``ValueError`` with the file and the reason.
    """
    path = Path(path)
    if weights is not None:
        check_choice("weights", weights, EvalWeights)
    ck = read_checkpoint(path)  # tensors, numbers, strings and containers only: loading runs no code
    if not isinstance(ck, Mapping) or "config" not in ck:
        found = f"keys: {', '.join(map(str, ck))}" if isinstance(ck, Mapping) else f"a {type(ck).__name__}"
        raise ValueError(f"checkpoint {path}: no 'config' entry ({found}); it was not written by gsema-fast train")
    try:
        cfg = config_from_dict(ck["config"])
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: its stored config is not valid here: {err}") from err
    cfg = _apply_inference_overrides(_merge_config(cfg, config, path), overrides, path)
    weights = weights or cfg.eval.weights
    if weights not in ck:
        raise ValueError(
            f"checkpoint {path}: no {weights!r} weights (keys: {', '.join(map(str, ck))}); it was not "
            f"written by gsema-fast train"
        )
    net = build_model(cfg.model)
    state = _strip_wrappers(ck[weights])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        model = cfg.model
        detail = str(err).split("\n", 1)[-1].strip()
        raise ValueError(
            f"checkpoint {path}: its {weights} weights do not fit the model its config describes (model.name="
            f"{model.name}, feature_size={model.feature_size}, channels={model.channels}, out_channels="
            f"{model.out_channels}); the file mixes weights and config of different models:\n{detail[:1500]}"
        ) from None
    dev = torch.device(resolve_device("auto" if device is None else str(device), key="device"))
    net.to(dev).eval()
    return LoadedCheckpoint(
        net,
        cfg,
        path,
        weights,
        ck.get("step"),
        ck.get("epoch"),
        dev,
        amp_dtype(cfg.train.amp, dev, inference=True),
        extra={k: v for k, v in ck.items() if k not in _STATE_KEYS},
    )
