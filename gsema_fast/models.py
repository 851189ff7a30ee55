"""The segmentation networks, each returning ``(logits, latent)``.

The contrastive loss needs an intermediate feature map (the latent) from every forward. Forward hooks would
do, but they break torch.compile graphs and hide the data flow, so each network here is a subclass of its MONAI
class whose ``forward`` calls the same submodules in the same order as MONAI's own and also returns the chosen
intermediate. Parameters and state-dict keys are MONAI's, so weights move freely between the two, and
``MonaiClass.forward(model, x)`` gives exactly the logits of ``model(x)[0]``.

Latent names: ``encoderK`` is the encoder feature map ``K - 1`` halvings below the input grid, so ``encoder3``
(the default) is the stride-4 map of every network: for SwinUNETR the output of its ``encoder3`` block,
``[B, 2F, D/4, H/4, W/4]``. SwinUNETR also offers its other blocks by name (``encoder1/2/4/10``,
``decoder5..1``) and the Swin stage outputs ``hidden0..4``; DynUNet and UNet offer ``bottleneck``. MONAI's
UNet downsamples in its first layer, so its names start at ``encoder2``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock, UnetUpBlock
from monai.networks.layers import SkipConnection
from monai.networks.nets import DynUNet, SwinUNETR, UNet
from monai.networks.nets.swin_unetr import PatchMergingV2, SwinTransformerBlock
from torch import nn

from gsema_fast.config import MAX_DERIVED_CHANNELS, SWIN_DIVISOR, Config, ModelConfig, replace

__all__ = [
    "LatentDynUNet",
    "LatentSwinUNETR",
    "LatentUNet",
    "LogitsOnly",
    "build_model",
    "latent_channels",
    "latent_names",
    "latent_stride",
    "repeated_blocks",
    "unwrap_model",
]

# name -> (channels as a multiple of feature_size, stride w.r.t. the input grid)
_SWIN_TAPS: dict[str, tuple[int, int]] = {
    "hidden0": (1, 2),
    "hidden1": (2, 4),
    "hidden2": (4, 8),
    "hidden3": (8, 16),
    "hidden4": (16, 32),
    "encoder1": (1, 1),
    "encoder2": (1, 2),
    "encoder3": (2, 4),
    "encoder4": (4, 8),
    "encoder10": (16, 32),
    "decoder5": (8, 16),
    "decoder4": (4, 8),
    "decoder3": (2, 4),
    "decoder2": (1, 2),
    "decoder1": (1, 1),
}

# Outermost modules worth compiling one by one; everything else is glue that runs once per forward.
_COMPILE_UNITS = (
    SwinTransformerBlock,
    PatchMergingV2,  # PatchMerging subclasses it
    UnetrBasicBlock,
    UnetrUpBlock,
    UnetResBlock,
    UnetBasicBlock,
    UnetUpBlock,
    ResidualUnit,
    Convolution,
)
# A single 1x1x1 conv gains nothing from compiling; its inner Convolution must not be listed either.
_NOT_COMPILED = (UnetOutBlock,)


def _pick_latent(name: str, available: list[str], network: str) -> int:
    if name not in available:
        raise ValueError(f"model.latent: {name!r} is not a block of {network}; choose one of {', '.join(available)}")
    return available.index(name)


class LatentSwinUNETR(SwinUNETR):
    """MONAI SwinUNETR whose forward returns ``(logits, latent)``; see the module docstring for latent names."""

    def __init__(self, *, latent: str = "encoder3", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tap_names = list(_SWIN_TAPS)
        _pick_latent(latent, self._tap_names, "swinunetr")
        self.latent_name = latent
        multiple, self.latent_stride = _SWIN_TAPS[latent]
        self.latent_channels = multiple * kwargs.get("feature_size", 24)

    def forward(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Plain ints: with static shapes this check costs nothing under torch.compile, unlike MONAI's numpy one.
        divisor = self.patch_size**5
        if any(size % divisor for size in x_in.shape[2:]):
            raise ValueError(
                f"SwinUNETR input spatial shape {tuple(x_in.shape[2:])} must be divisible by {divisor} "
                f"(data.patch_size: multiples of {SWIN_DIVISOR}, at least 64)"
            )
        hidden = self.swinViT(x_in, self.normalize)
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        out = self.decoder1(dec0, enc0)
        logits = self.out(out)
        taps = {
            "hidden0": hidden[0],
            "hidden1": hidden[1],
            "hidden2": hidden[2],
            "hidden3": hidden[3],
            "hidden4": hidden[4],
            "encoder1": enc0,
            "encoder2": enc1,
            "encoder3": enc2,
            "encoder4": enc3,
            "encoder10": dec4,
            "decoder5": dec3,
            "decoder4": dec2,
            "decoder3": dec1,
            "decoder2": dec0,
            "decoder1": out,
        }
        return logits, taps[self.latent_name]

    def forward_latent(self, x_in: torch.Tensor) -> torch.Tensor:
        """The latent alone, computing only the blocks it depends on (a teacher whose logits are not needed).

        For ``encoder3`` that is the patch embedding, the first Swin stage and ``encoder3``: a fraction of a forward.
        Decoder taps need the whole network and fall back to :meth:`forward`.
        """
        name = self.latent_name
        if name == "encoder1":
            return self.encoder1(x_in)
        depth = {"hidden0": 0, "hidden1": 1, "hidden2": 2, "hidden3": 3, "hidden4": 4}.get(name)
        depth = {"encoder2": 0, "encoder3": 1, "encoder4": 2}.get(name, depth)
        if depth is None:
            return self.forward(x_in)[1]
        vit = self.swinViT
        x = vit.pos_drop(vit.patch_embed(x_in))
        # The same stages, in the same order, as MONAI's SwinTransformer.forward up to the needed hidden state.
        for stage in range(1, depth + 1):
            if vit.use_v2:
                x = getattr(vit, f"layers{stage}c")[0](x.contiguous())
            x = getattr(vit, f"layers{stage}")[0](x.contiguous())
        hidden = vit.proj_out(x, self.normalize)
        if name.startswith("hidden"):
            return hidden
        return getattr(self, name)(hidden)


class _FullForwardLatent:
    """``forward_latent`` for networks whose latent needs (nearly) the whole forward."""

    def forward_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[1]


class LatentDynUNet(_FullForwardLatent, DynUNet):
    """MONAI DynUNet (nnU-Net-style, no deep supervision) whose forward returns ``(logits, latent)``.

    ``encoder1`` is the input block, ``encoderK`` the output of downsampling stage ``K - 1``, then ``bottleneck``.
    """

    def __init__(self, *, latent: str = "encoder3", **kwargs: Any) -> None:
        super().__init__(**kwargs, deep_supervision=False)
        encoder_count = 1 + len(self.downsamples)
        self._tap_names = [f"encoder{k + 1}" for k in range(encoder_count)] + ["bottleneck"]
        self._latent_index = _pick_latent(latent, self._tap_names, "dynunet")
        self.latent_name = latent
        self.latent_channels = int(self.filters[self._latent_index])
        self.latent_stride = _total_stride(self.strides[: self._latent_index + 1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Same order as MONAI's recursive DynUNetSkipLayer: down the encoders, bottleneck, up with the skips.
        taps = [self.input_block(x)]
        for down in self.downsamples:
            taps.append(down(taps[-1]))
        h = self.bottleneck(taps[-1])
        taps.append(h)
        for up, skip in zip(self.upsamples, reversed(taps[:-1]), strict=True):
            h = up(h, skip)
        return self.output_block(h), taps[self._latent_index]


class LatentUNet(_FullForwardLatent, UNet):
    """MONAI UNet whose forward returns ``(logits, latent)``: ``encoder2`` .. ``encoderN`` then ``bottleneck``."""

    def __init__(self, *, latent: str = "encoder3", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._down_layers = 0
        block = self.model
        # MONAI builds Sequential(down, SkipConnection(next level), up) recursively down to the bottom layer.
        while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
            if block[1].mode != "cat":
                raise ValueError(f"UNet skip connections must concatenate, found mode {block[1].mode!r}")
            self._down_layers += 1
            block = block[1].submodule
        self._tap_names = [f"encoder{k + 2}" for k in range(self._down_layers)] + ["bottleneck"]
        self._latent_index = _pick_latent(latent, self._tap_names, "unet")
        self.latent_name = latent
        self.latent_channels = int(self.channels[self._latent_index])
        self.latent_stride = _total_stride(self.strides[: self._latent_index + 1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taps = []
        levels = []
        block = self.model
        for _ in range(self._down_layers):
            x = block[0](x)
            taps.append(x)
            levels.append(block)
            block = block[1].submodule
        x = block(x)
        taps.append(x)
        for level, skip in zip(reversed(levels), reversed(taps[:-1]), strict=True):
            x = level[2](torch.cat([skip, x], dim=level[1].dim))
        return x, taps[self._latent_index]


def _total_stride(strides: Any) -> int:
    total = 1
    for stride in strides:
        # Isotropic here; an anisotropic stride reports its first axis.
        total *= int(stride[0] if isinstance(stride, (list, tuple)) else stride)
    return total


def _level_widths(cfg: ModelConfig) -> list[int]:
    if cfg.channels is not None:
        return list(cfg.channels)
    return [min(cfg.feature_size * 2**level, MAX_DERIVED_CHANNELS) for level in range(cfg.levels)]


def _model_config(spec: Config | ModelConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> ModelConfig:
    """The model section ``spec`` describes with ``overrides``: checked by the config (unknown keys, names, ranges)."""
    if isinstance(spec, Config):
        spec = spec.model
    if spec is None:
        spec = ModelConfig()
    if isinstance(spec, ModelConfig):
        return replace(spec, **overrides) if overrides else spec
    if isinstance(spec, Mapping):
        return ModelConfig(**{**spec, **overrides})
    raise TypeError(f"build_model: expected a ModelConfig or a mapping, got {type(spec).__name__}")


def build_model(spec: Config | ModelConfig | Mapping[str, Any] | None = None, /, **overrides: Any) -> nn.Module:
    """The network described by ``spec`` (``cfg.model``, a mapping, or None for the defaults) and ``overrides``.

    ``build_model(cfg.model)``, ``build_model(name="unet", channels=[8, 16, 32])``. The module's forward returns
    ``(logits [B, out_channels, D, H, W], latent)`` and it carries ``latent_name``, ``latent_channels`` and
    ``latent_stride``. A bad name or latent raises ``ValueError`` naming the ``model.*`` key.
    """
    cfg = _model_config(spec, overrides)
    if cfg.name == "swinunetr":
        # MONAI imports einops lazily and would only fail at the first forward, deep inside a training step.
        if importlib.util.find_spec("einops") is None:
            raise ImportError("model.name: swinunetr needs the einops package (pip install einops)")
        return LatentSwinUNETR(
            latent=cfg.latent,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            feature_size=cfg.feature_size,
            drop_rate=cfg.dropout,
            use_checkpoint=cfg.checkpointing,
            spatial_dims=3,
        )
    widths = _level_widths(cfg)
    if cfg.name == "dynunet":
        strides = [1] + [2] * (len(widths) - 1)
        return LatentDynUNet(
            latent=cfg.latent,
            spatial_dims=3,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            kernel_size=[3] * len(widths),
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=widths,
            dropout=cfg.dropout or None,
            res_block=cfg.res_block,
        )
    return LatentUNet(
        latent=cfg.latent,
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        channels=widths,
        strides=[2] * (len(widths) - 1),
        num_res_units=cfg.num_res_units,
        dropout=cfg.dropout,
    )


def latent_names(spec: Config | ModelConfig | Mapping[str, Any] | None = None, /, **overrides: Any) -> list[str]:
    """The latent names the described network offers (without building it, for config checks and help text)."""
    cfg = _model_config(spec, overrides)
    if cfg.name == "swinunetr":
        return list(_SWIN_TAPS)
    levels = len(_level_widths(cfg))
    first = 1 if cfg.name == "dynunet" else 2
    return [f"encoder{first + k}" for k in range(levels - 1)] + ["bottleneck"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside torch.compile (``_orig_mod``) and DistributedDataParallel (``module``) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def latent_channels(model: nn.Module) -> int:
    """Channels of the latent the model returns."""
    return unwrap_model(model).latent_channels


def latent_stride(model: nn.Module) -> int:
    """Downsampling factor of the latent w.r.t. the input grid (4 for ``encoder3``)."""
    return unwrap_model(model).latent_stride


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost blocks (Swin blocks, patch mergings, UNETR/UNet conv blocks) by name, in registration order.

    Compiling these one by one keeps each compiled graph small, and blocks of equal shape and configuration
    can share compiled code; the glue between them (reshapes, concatenations, the attention-mask build) stays
    eager and costs little.
    """
    root = unwrap_model(model)
    found: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(f"{outer}.") for outer in skipped):
            continue
        if isinstance(module, _NOT_COMPILED):
            skipped.append(name)
        elif isinstance(module, _COMPILE_UNITS):
            found.append((name, module))
            skipped.append(name)
    return found


class LogitsOnly(nn.Module):
    """Wraps a ``(logits, latent)`` network for code that expects logits alone (sliding-window inference)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[0]
