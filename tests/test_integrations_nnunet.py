"""nnU-Net v2: the GS-EMA trainer's parts on tiny networks, then the whole path on a tiny synthesised dataset (slow):
``gsema-fast synth``, nnU-Net's planning and preprocessing, ``nnunet-train`` on the CPU, ``--c``, ``nnUNetv2_predict``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("nnunetv2")

import nibabel as nib  # noqa: E402
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform  # noqa: E402
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet  # noqa: E402
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class  # noqa: E402

from gsema_fast.cli import main  # noqa: E402
from gsema_fast.integrations import nnunet as integration  # noqa: E402
from gsema_fast.integrations.nnunet import (  # noqa: E402
    ClippedSGD,
    LatentUNet,
    deep_supervision_targets,
    method_config,
    run_training,
)

# ------------------------------------------------------------------------------------------------ the parts


def tiny_unet(kind: str) -> nn.Module:
    common = {
        "input_channels": 1,
        "n_stages": 4,
        "features_per_stage": [4, 8, 16, 16],
        "conv_op": nn.Conv3d,
        "kernel_sizes": 3,
        "strides": [1, 2, 2, 2],
        "num_classes": 3,
        "n_conv_per_stage_decoder": 1,
        "conv_bias": True,
        "norm_op": nn.InstanceNorm3d,
        "norm_op_kwargs": {"affine": True},
        "nonlin": nn.LeakyReLU,
        "deep_supervision": True,
    }
    if kind == "plain":
        return PlainConvUNet(n_conv_per_stage=1, **common)
    return ResidualEncoderUNet(n_blocks_per_stage=1, **common)


@pytest.mark.parametrize("kind", ["plain", "residual"])
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_latent_unet_taps_an_encoder_stage_and_keeps_the_outputs(kind, stage):
    torch.manual_seed(0)
    net = tiny_unet(kind)
    x = torch.randn(2, 1, 16, 16, 24)
    wrapped = LatentUNet(net, stage)
    outputs, latent = wrapped(x)
    for got, want in zip(outputs, net(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    skip = net.encoder(x)[stage]
    torch.testing.assert_close(latent, skip, rtol=0, atol=0)
    torch.testing.assert_close(wrapped.forward_latent(x), skip, rtol=0, atol=0)
    assert [p.data_ptr() for p in wrapped.parameters()] == [p.data_ptr() for p in net.parameters()]


def test_latent_unet_refuses_a_network_without_encoder_and_decoder():
    with pytest.raises(ValueError, match="nnU-Net's U-Nets"):
        LatentUNet(nn.Conv3d(1, 3, 3), 0)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.float32])
@pytest.mark.parametrize("shape", [(16, 16, 16), (15, 20, 9)])
def test_deep_supervision_targets_follow_nnunets_own_downsampling(dtype, shape):
    torch.manual_seed(0)
    scales = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    labels = torch.randint(0, 3, (2, 1, *shape)).to(dtype)
    per_sample = [DownsampleSegForDSTransform(ds_scales=scales)(segmentation=y)["segmentation"] for y in labels]
    want = [torch.stack(level) for level in zip(*per_sample, strict=True)]
    got = deep_supervision_targets(labels, want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_clipped_sgd_clips_the_gradient_norm_before_its_step():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins, strict=True):
        p.grad = 10 * torch.randn_like(p)
        q.grad = p.grad.clone()
    ClippedSGD(params, max_norm=12, lr=0.1, momentum=0.99, nesterov=True, weight_decay=3e-5, fused=True).step()
    torch.nn.utils.clip_grad_norm_(twins, 12)
    torch.optim.SGD(twins, lr=0.1, momentum=0.99, nesterov=True, weight_decay=3e-5).step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q)


def test_method_config_takes_only_the_methods_settings():
    assert method_config(["ema.rule=sign", "train.seed=3"]).ema.rule == "sign"
    with pytest.raises(ValueError, match="nnunet-train takes only"):
        method_config(["data.patch_size=[64,64,64]"])
    with pytest.raises(ValueError, match="ema.mode"):
        method_config(["ema.mode=ema"])
    with pytest.raises(ValueError, match="ema.decay_aligned"):
        method_config(["ema.decay_aligned=2"])


def test_nnunet_train_reports_bad_input_in_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert main(["nnunet-train", "1", "3d_fullres", "0", "-device", "cpu"]) == 2
    assert "nnUNet_preprocessed is not set" in caplog.text
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    for argv, message in (
        (["977", "3d_fullres", "0"], "DATASET 977"),
        (["977", "3d_fullres", "x"], "FOLD"),
        (["977", "3d_fullres", "0", "--set", "model.name=unet"], "nnunet-train takes only"),
        (["977", "3d_fullres", "0", "--epochs", "0"], "--epochs"),
        (["977", "3d_fullres", "0", "--c", "--val"], "--c and --val"),
    ):
        caplog.clear()
        assert main(["nnunet-train", *argv, "-device", "cpu"]) == 2, argv
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], (argv, errors)


def test_the_readmes_trainer_file_registers_the_class_with_nnunet(tmp_path):
    # What `nnUNetv2_train -tr nnUNetTrainerGSEMA` does with nnUNet_extTrainer pointing at the folder.
    if not hasattr(importlib.import_module("nnunetv2.paths"), "nnUNet_extTrainer"):
        pytest.skip("nnU-Net before 2.8 looks for trainers in its own package only")
    (tmp_path / "gsema_trainers.py").write_text("from gsema_fast.integrations.nnunet import nnUNetTrainerGSEMA\n")
    found = recursive_find_python_class(
        str(tmp_path), "nnUNetTrainerGSEMA", None, base_folder=str(tmp_path), cleanup_imports_from_base_folder=True
    )
    assert found is integration.nnUNetTrainerGSEMA


# ------------------------------------------------------------------------------------------------ the whole path

DATASET = "Dataset901_GSEMA"


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory):
    """A planned and preprocessed tiny dataset (2 centres x 3 cases of 32^3), and the variables nnU-Net reads."""
    if isinstance(importlib.import_module("nnunetv2.paths").nnUNet_raw, (str, type(None))):
        pytest.skip("nnU-Net before 2.8 reads its folders when imported, before this fixture sets them")
    root = tmp_path_factory.mktemp("nnunet")
    env = {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_n_proc_DA": "1",  # also the preprocessing's thread count; 0 is set for training below
        "nnUNet_def_n_proc": "1",
        "OMP_NUM_THREADS": "1",
        # the torch reference of the fused ops: the kernels have their own tests, and under the interpreter that
        # conftest turns on (TRITON_INTERPRET) an nnU-Net network's 2M parameters take minutes per step
        "GSEMA_FAST_BACKEND": "torch",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        run = {"env": os.environ.copy(), "capture_output": True, "text": True}
        synth = [sys.executable, "-m", "gsema_fast", "synth", "--out", f"{env['nnUNet_raw']}/{DATASET}"]
        plan = shutil.which("nnUNetv2_plan_and_preprocess", path=os.path.dirname(sys.executable))
        for argv in (
            [*synth, "--domains", "2", "--cases-per-domain", "3", "--size", "32"],
            [plan, "-d", "901", "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
        ):
            done = subprocess.run(argv, **run)
            assert done.returncode == 0, (argv, done.stderr[-3000:])
        env["nnUNet_n_proc_DA"] = "0"  # training: augmentation in the training process, no worker processes
        patch.setenv("nnUNet_n_proc_DA", "0")
        yield root, env


class nnUNetTrainerGSEMA(integration.nnUNetTrainerGSEMA):  # noqa: N801 (the same name: the same results folder)
    """Counts the encoder calls of student and teacher in each phase."""

    def initialize(self):
        super().initialize()
        self.phase, self.calls = "train", {}
        for name, net in (("student", self.network), ("teacher", self.teacher)):
            net.encoder.register_forward_hook(lambda *_, name=name: self._count(name))

    def _count(self, name):
        key = (self.phase, name)
        self.calls[key] = self.calls.get(key, 0) + 1

    def validation_step(self, batch):
        self.phase = "val"
        try:
            return super().validation_step(batch)
        finally:
            self.phase = "train"

    def perform_actual_validation(self, save_probabilities=False):
        self.phase = "final validation"
        super().perform_actual_validation(save_probabilities)


@pytest.mark.slow
def test_nnunet_train_predict_and_resume_on_the_cpu(nnunet_env, tmp_path, monkeypatch):
    root, env = nnunet_env
    # read by nnU-Net when it is imported, not when it runs
    monkeypatch.setattr("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.default_num_processes", 1)
    trainer = run_training(
        "901",
        "3d_fullres",
        "0",
        device="cpu",
        epochs=2,
        iterations_per_epoch=2,
        val_iterations_per_epoch=1,
        trainer_class=nnUNetTrainerGSEMA,
    )
    # the student trains (its encoder runs in the step; the teacher's runs only up to the latent there), the
    # teacher is what nnU-Net validates, per epoch and at the end
    assert trainer.calls.get(("train", "student"), 0) == 2 * 2 * 2  # source and target batch, 2 steps, 2 epochs
    assert trainer.calls.get(("val", "teacher"), 0) == 2 and ("val", "student") not in trainer.calls
    assert trainer.calls.get(("final validation", "teacher"), 0) > 0
    assert ("final validation", "student") not in trainer.calls

    fold = Path(trainer.output_folder)
    assert fold.parent.name == "nnUNetTrainerGSEMA__nnUNetPlans__3d_fullres"
    log_text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert log_text.count("GS-EMA: ") >= 3 and " of 2 steps aligned (teacher updated)" in log_text
    aligned = trainer.logger.get_value("gsema_aligned_fraction", step=None)
    assert len(aligned) == 2 and all(0 <= a <= 1 for a in aligned)
    assert json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"] >= 0

    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"  # what nnUNetv2_predict finds without this package
    teacher, student = trainer.teacher.state_dict(), trainer.network.state_dict()
    for name, value in checkpoint["network_weights"].items():
        torch.testing.assert_close(value, teacher[name], rtol=0, atol=0)
        torch.testing.assert_close(checkpoint["gsema"]["student"][name], student[name], rtol=0, atol=0)
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    assert int(checkpoint["gsema"]["ema"]["step"]) == 4

    run = {"env": {**os.environ, **env}, "capture_output": True, "text": True}
    cli = [sys.executable, "-m", "gsema_fast", "nnunet-train", "901", "3d_fullres", "0", "-device", "cpu"]
    short = ["--iterations", "2", "--val-iterations", "1"]
    # --c with other GS-EMA settings: one line, nothing trained
    refused = subprocess.run([*cli, *short, "--epochs", "3", "--c", "--set", "ema.decay_aligned=0.5"], **run)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "ema.decay_aligned: checkpoint 0.9, now 0.5" in refused.stderr
    # --c: one more epoch from the final checkpoint, the GS-EMA state carried on
    resumed = subprocess.run([*cli, *short, "--epochs", "3", "--c"], **run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert int(checkpoint["gsema"]["ema"]["step"]) == 6 and checkpoint["current_epoch"] == 3
    assert len(checkpoint["logging"]["gsema_aligned_fraction"]) == 3

    # nnU-Net's own prediction loads the exported teacher
    image = Path(env["nnUNet_raw"]) / DATASET / "imagesTr" / "A_000_0000.nii.gz"
    (tmp_path / "in").mkdir()
    shutil.copy(image, tmp_path / "in")
    predict = shutil.which("nnUNetv2_predict", path=os.path.dirname(sys.executable))
    args = ["-i", tmp_path / "in", "-o", tmp_path / "out", "-d", "901", "-c", "3d_fullres", "-f", "0"]
    args += ["-tr", "nnUNetTrainerGSEMA", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"]
    predicted = subprocess.run([predict, *map(str, args)], **run)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    label = nib.load(tmp_path / "out" / "A_000.nii.gz")
    assert label.shape == nib.load(image).shape
    assert set(torch.from_numpy(label.get_fdata()).unique().tolist()) <= {0.0, 1.0, 2.0}
