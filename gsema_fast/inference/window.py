"""Sliding-window prediction of whole volumes, the autocast type of each ``train.amp`` setting, and the
preprocessing of one case and the mapping of its prediction back to the image's own grid."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import nn

from gsema_fast.config import EvalConfig, resolve_amp
from gsema_fast.data import unwrap_transform_error

# The torch type of each resolved ``train.amp`` setting (the choices are the config's AmpMode).
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str, device: torch.device, *, inference: bool = False) -> torch.dtype | None:
    """Autocast type of the ``train.amp`` setting ``amp`` on ``device`` (``auto`` resolved by
    :func:`gsema_fast.config.resolve_amp`). ``inference``: none on the CPU whatever the setting, where 3D
    convolutions under autocast are far slower than fp32."""
    resolved = resolve_amp(amp, device.type)
    if inference and device.type != "cuda":
        return None
    return _AUTOCAST[resolved]


def _first_conv_in_channels(net: nn.Module) -> int | None:
    for module in net.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return None


def _logits_of(net: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        # (logits, latent) from gsema_fast.models; a plain segmentation network returns logits alone.
        return out[0] if isinstance(out, (tuple, list)) else out

    return forward


def predict_volume(
    net: nn.Module,
    image: torch.Tensor,
    *,
    roi_size: Sequence[int] | int,
    settings: EvalConfig | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Logits ``[B, out_channels, D, H, W]`` (float32) of a whole volume ``image [B, C, D, H, W]``.

    MONAI ``sliding_window_inference`` over windows of ``roi_size`` (the training patch size) with the ``settings``
    of a config's ``eval`` section (None: its defaults): ``overlap`` and ``mode`` blending (gaussian weights the
    window centres, where the network saw the most context). Any volume size
    works: a volume smaller than the window is padded, and the last windows of a size that is not a multiple of the
    window step are shifted back inside the volume. Windows run on the network's device, ``sw_batch_size`` at a time;
    the output is assembled on ``image``'s device, so a large volume can stay in host memory while the network runs
    on a GPU. ``amp_dtype`` (``torch.bfloat16`` or ``torch.float16``) autocasts the network on CUDA and is ignored
    on the CPU. ``settings.mirror_axes`` averages the logits over the volume and its mirror images (each mapped
    back). The network runs in eval mode under ``torch.no_grad`` and its mode is restored afterwards.
    """
    if image.ndim != 5:
        raise ValueError(f"image: expected a batch [B, C, D, H, W], got shape {tuple(image.shape)}")
    expected = _first_conv_in_channels(net)
    if expected is not None and image.shape[1] != expected:
        raise ValueError(f"image has {image.shape[1]} channel(s) but the network takes {expected}")
    settings = EvalConfig() if settings is None else settings
    if not isinstance(settings, EvalConfig):
        raise TypeError(f"settings must be an EvalConfig (a config's eval section), got {type(settings).__name__}")
    roi = [int(roi_size)] * 3 if isinstance(roi_size, int) else [int(r) for r in roi_size]
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size={roi_size}: expected three positive sizes")
    try:
        net_device = next(net.parameters()).device
    except StopIteration:
        net_device = image.device
    use_amp = amp_dtype is not None and net_device.type == "cuda"
    was_training = net.training
    net.eval()
    try:
        autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
        # no_grad rather than inference_mode: callers may later modify the result in place (inference tensors
        # refuse that outside inference mode).
        # Padding with the image minimum, as training pads small volumes: no signal outside the field of view.
        cval = float(image.min()) if image.numel() else 0.0

        def windows(volume: torch.Tensor) -> torch.Tensor:
            logits = sliding_window_inference(
                volume,
                roi,
                settings.sw_batch_size,
                _logits_of(net),
                overlap=settings.overlap,
                mode=settings.mode,
                padding_mode="constant",
                cval=cval,
                sw_device=net_device,
                device=image.device,
                progress=progress,
            )
            # A MetaTensor would carry the image's meta into the caller's arithmetic; callers have the image.
            return torch.as_tensor(logits).as_subclass(torch.Tensor).float()

        with torch.no_grad(), autocast:
            logits = windows(image)
            flips = mirror_flips(settings.mirror_axes)
            for dims in flips:
                logits += windows(image.flip(dims)).flip(dims)
    finally:
        net.train(was_training)
    return logits / (1 + len(flips)) if flips else logits


def mirror_flips(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """The tensor dims of ``[B, C, D, H, W]`` to flip for each mirrored pass of test-time mirroring along the
    spatial ``axes`` (0, 1, 2): every non-empty subset of them, ``2^len(axes) - 1`` passes."""
    dims = [2 + int(a) for a in axes]
    return [tuple(d for bit, d in enumerate(dims) if mask >> bit & 1) for mask in range(1, 1 << len(dims))]


def preprocess_case(transform, item: dict) -> dict:
    """``transform(item)`` (a :meth:`Preprocessing.transforms`); a failing transform raises the error that names
    the file and the problem rather than MONAI's wrapper around it."""
    try:
        return transform(item)
    except RuntimeError as err:
        found = unwrap_transform_error(err)
        if found is err:
            raise
        raise found from None


def to_original_grid(transform, probs: torch.Tensor, image) -> torch.Tensor:
    """Class probabilities ``[C, ...]`` on the preprocessed grid, resampled onto the image's original voxel grid by
    inverting the preprocessing's spatial transforms (orientation, spacing) recorded on ``image``."""
    pred = MetaTensor(probs.cpu(), meta=dict(image.meta), applied_operations=list(image.applied_operations))
    return torch.as_tensor(transform.inverse({"image": pred})["image"]).as_subclass(torch.Tensor)
