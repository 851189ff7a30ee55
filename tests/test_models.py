"""Networks with a latent tap: shapes, the tap equals a forward hook on the block, logits equal MONAI's forward."""

import pytest
import torch
from monai.networks.nets import DynUNet, SwinUNETR, UNet
from monai.networks.nets.swin_unetr import PatchMergingV2, SwinTransformerBlock

from gsema_fast.config import load_config
from gsema_fast.models import (
    LogitsOnly,
    build_model,
    latent_channels,
    latent_names,
    latent_stride,
    repeated_blocks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_UNET = {"name": "unet", "channels": [8, 16, 32, 64], "num_res_units": 1}
TINY_DYNUNET = {"name": "dynunet", "feature_size": 8, "levels": 4}


def _unet_block(model, latent):
    """The MONAI submodule whose output is the named latent (UNet nests Sequential(down, Skip(next), up))."""
    block = model.model
    if latent == "bottleneck":
        while isinstance(block, torch.nn.Sequential) and len(block) == 3:
            block = block[1].submodule
        return block
    for _ in range(int(latent.removeprefix("encoder")) - 2):
        block = block[1].submodule
    return block[0]


def _dynunet_block(model, latent):
    if latent == "bottleneck":
        return model.bottleneck
    index = int(latent.removeprefix("encoder"))
    return model.input_block if index == 1 else model.downsamples[index - 2]


def _run_with_hook(model, block, x):
    captured = {}
    handle = block.register_forward_hook(lambda _module, _inputs, output: captured.setdefault("out", output))
    try:
        with torch.no_grad():
            logits, latent = model(x)
    finally:
        handle.remove()
    return logits, latent, captured["out"]


@pytest.mark.parametrize(
    ("spec", "monai_class", "find_block"),
    [(TINY_UNET, UNet, _unet_block), (TINY_DYNUNET, DynUNet, _dynunet_block)],
    ids=["unet", "dynunet"],
)
def test_conv_nets_every_latent(spec, monai_class, find_block):
    size = 16  # the smallest grid whose 8x-downsampled bottleneck still has more than one voxel
    x = torch.randn(1, 1, size, size, size)
    names = latent_names(spec)
    assert "encoder3" in names and names[-1] == "bottleneck"
    for name in names:
        model = build_model(spec, latent=name).eval()
        logits, latent, hooked = _run_with_hook(model, find_block(model, name), x)
        assert logits.shape == (1, 3, size, size, size)
        assert torch.equal(latent, hooked), name
        stride = latent_stride(model)
        assert latent.shape == (1, latent_channels(model), size // stride, size // stride, size // stride), name
    # The logits do not depend on the tap, so comparing the last model with MONAI's forward is enough.
    with torch.no_grad():
        assert torch.equal(logits, monai_class.forward(model, x))
        assert torch.equal(LogitsOnly(model)(x), logits)
    assert latent_stride(build_model(spec)) == 4, "encoder3 is the stride-4 map"


def test_unet_weights_load_into_plain_monai():
    model = build_model(TINY_UNET).eval()
    plain = UNet(3, 1, 3, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)[0], plain(x))


def test_swinunetr_latent_and_logits():
    model = build_model(name="swinunetr", feature_size=12).eval()
    # 64 x 32 x 32 is the cheapest input whose deepest Swin stage keeps more than one voxel for instance norm.
    x = torch.randn(1, 1, 64, 32, 32)
    logits, latent, hooked = _run_with_hook(model, model.encoder3, x)
    assert logits.shape == (1, 3, 64, 32, 32)
    assert latent.shape == (1, 24, 16, 8, 8)  # [B, 2F, D/4, H/4, W/4]
    assert (latent_channels(model), latent_stride(model)) == (24, 4)
    assert torch.equal(latent, hooked)
    with torch.no_grad():
        assert torch.equal(logits, SwinUNETR.forward(model, x))
        # The teacher's latent-only forward computes exactly the tapped block, for encoder and Swin taps alike.
        assert torch.equal(model.forward_latent(x), latent)
        for name in ("hidden0", "encoder4", "decoder3"):
            model.latent_name = name
            assert torch.equal(model.forward_latent(x), model(x)[1]), name


def test_swinunetr_blocks_and_checkpointing():
    model = build_model(name="swinunetr", feature_size=12, checkpointing=True)
    blocks = repeated_blocks(model)
    names = [name for name, _ in blocks]
    assert len(names) == len(set(names))
    assert sum(isinstance(m, SwinTransformerBlock) for _, m in blocks) == 8
    assert sum(isinstance(m, PatchMergingV2) for _, m in blocks) == 4
    assert {"encoder3", "decoder1"} <= set(names)
    assert not any(a != b and b.startswith(f"{a}.") for a in names for b in names), "outermost blocks only"
    assert all(m.use_checkpoint for _, m in blocks if isinstance(m, SwinTransformerBlock))
    assert "swinViT.layers1.0.blocks.0" in names


def test_swinunetr_rejects_bad_input_size():
    model = build_model(name="swinunetr", feature_size=12).eval()
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.zeros(1, 1, 48, 64, 64))


def test_build_from_config_and_errors():
    cfg = load_config("demo")
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        logits, latent = model(torch.randn(1, 1, 16, 16, 16))
    assert logits.shape[1] == cfg.model.out_channels
    assert latent.shape[1] == latent_channels(model)
    with pytest.raises(ValueError, match=r"model\.latent.*encoder3"):
        build_model(cfg.model, latent="encoder9")
    with pytest.raises(ValueError, match=r"model\.latent.*decoder5"):
        build_model(name="swinunetr", feature_size=12, latent="bottleneck")
    with pytest.raises(ValueError, match=r"model\.widht"):
        build_model(name="unet", widht=3)
    with pytest.raises(ValueError, match=r"model\.name"):
        build_model(name="resnet")
