"""nnU-Net v2: the GS-EMA trainer's parts on tiny networks, then the whole path on a tiny synthesised dataset (slow):
``gsema-fast synth``, nnU-Net's planning and preprocessing, ``nnunet-train`` and ``nnUNetv2_train`` on the CPU,
variants by name, ``--c``, ``--val``, refused runs, ``nnUNetv2_predict``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("nnunetv2")

pytestmark = pytest.mark.integration

import nibabel as nib  # noqa: E402
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform  # noqa: E402
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet  # noqa: E402
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class  # noqa: E402

from gsema_fast.cli import main  # noqa: E402
from gsema_fast.integrations import nnunet as integration  # noqa: E402
from gsema_fast.integrations.nnunet import (  # noqa: E402
    TRAINERS,
    ClippedSGD,
    LatentUNet,
    deep_supervision_targets,
    epoch_summary,
    method_config,
    nnUNetTrainerGSEMA_sign,
    run_training,
    trainer_class_by_name,
    write_trainer_file,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"

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
    on_top = method_config(["loss.lambda_con=0.2"], base=method_config(["ema.rule=sign"]))
    assert (on_top.ema.rule, on_top.loss.lambda_con) == ("sign", 0.2)
    with pytest.raises(TypeError, match="list of"):
        method_config("ema.rule=sign")
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
        (["977", "3d_fullres", "0", "--val", "--set", "ema.rule=sign"], "--val validates the finished run"),
        (["977", "3d_fullres", "0", "--val", "--epochs", "3"], "--val validates the finished run"),
        (["977", "3d_fullres", "0", "--c", "--overwrite"], "--overwrite replaces a run"),
        (["977", "3d_fullres", "0", "-tr", "nnUNetTrainerNoSuchThing"], "-tr nnUNetTrainerNoSuchThing: "),
        (["977", "3d_fullres", "0", "-tr", "nnUNetTrainer"], "not a GS-EMA trainer"),
    ):
        caplog.clear()
        assert main(["nnunet-train", *argv, "-device", "cpu"]) == 2, argv
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], (argv, errors)


def test_epoch_summary_averages_the_cosine_over_every_step_aligned_or_not():
    conflicts = {
        "aligned": np.zeros(3),
        "grad_cos": np.array([-0.5, -0.25, np.nan]),  # the third step had non-finite gradients and was skipped
        "skipped": np.array([0.0, 0.0, 1.0]),
        "dce_student_trg": np.array([1.0, 2.0, 3.0]),
    }
    summary = epoch_summary(conflicts)
    assert summary["gsema_aligned_fraction"] == 0 and summary["gsema_skipped_steps"] == 1
    assert summary["gsema_grad_cos"] == pytest.approx(-0.375)
    assert summary["gsema_dce_target"] == pytest.approx(2.0) and np.isnan(summary["gsema_bacl"])
    mixed = {**conflicts, "aligned": np.array([1.0, 0.0, 0.0]), "bacl": np.array([0.5, 0.5, 0.5])}
    assert epoch_summary(mixed)["gsema_grad_cos"] == pytest.approx(-0.375)
    assert epoch_summary(mixed)["gsema_bacl"] == pytest.approx(0.5)
    nothing_finite = {**conflicts, "grad_cos": np.full(3, np.nan)}
    assert np.isnan(epoch_summary(nothing_finite)["gsema_grad_cos"])
    with pytest.raises(ValueError, match="no steps"):
        epoch_summary({k: v[:0] for k, v in conflicts.items()})


def test_a_variant_written_with_args_and_kwargs_gets_nnunets_signature():
    # nnU-Net looks each parameter name of type(self).__init__ up among its own __init__'s locals to record them.
    class nnUNetTrainerGSEMA_loose(integration.nnUNetTrainerGSEMA):  # noqa: N801
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_epochs = 3

    names = ["plans", "configuration", "fold", "dataset_json", "device"]
    recorded = list(inspect.signature(object.__new__(nnUNetTrainerGSEMA_loose).__init__).parameters)
    assert recorded == names
    assert set(recorded) <= set(inspect.signature(integration.nnUNetTrainer.__init__).parameters)
    shipped = object.__new__(integration.nnUNetTrainerGSEMA_5epochs).__init__
    assert list(inspect.signature(shipped).parameters) == names


def test_trainers_are_found_by_name():
    for cls in TRAINERS:
        assert trainer_class_by_name(cls.__name__) is cls
    assert nnUNetTrainerGSEMA_sign.gsema_overrides == ("ema.rule=sign",)
    assert method_config(nnUNetTrainerGSEMA_sign.gsema_overrides).ema.rule == "sign"
    with pytest.raises(ValueError, match="not a GS-EMA trainer"):
        trainer_class_by_name("nnUNetTrainer")
    # not found, or nnU-Net's own trainers cannot be searched here (Primus's need timm): one error either way
    with pytest.raises(ValueError, match="^-tr nnUNetTrainerGSEMA_typo: "):
        trainer_class_by_name("nnUNetTrainerGSEMA_typo")


def test_the_trainer_file_makes_every_trainer_known_to_nnunet(tmp_path, caplog):
    # What `nnUNetv2_train -tr NAME` does with nnUNet_extTrainer pointing at the folder.
    if not integration.ext_trainer_supported():
        pytest.skip("nnU-Net before 2.8 looks for trainers in its own package only")
    caplog.set_level(logging.INFO, logger="gsema_fast")
    folder = tmp_path / "trainers"
    assert main(["nnunet-trainers", str(folder)]) == 0
    assert f"export nnUNet_extTrainer={folder}" in caplog.text
    for cls in TRAINERS:  # nnU-Net's search of each nnUNet_extTrainer folder
        found = recursive_find_python_class(
            str(folder), cls.__name__, None, base_folder=str(folder), cleanup_imports_from_base_folder=True
        )
        assert found is cls
    # the same file again: nothing to do; another file of that name: refused in one line, unless --overwrite
    text = (folder / "gsema_fast_trainers.py").read_text()
    assert write_trainer_file(folder) == folder / "gsema_fast_trainers.py"
    (folder / "gsema_fast_trainers.py").write_text("# mine\n")
    caplog.clear()
    assert main(["nnunet-trainers", str(folder)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "--overwrite" in errors[0]
    assert (folder / "gsema_fast_trainers.py").read_text() == "# mine\n"
    assert main(["nnunet-trainers", str(folder), "--overwrite"]) == 0
    assert (folder / "gsema_fast_trainers.py").read_text() == text


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
    # nnU-Net's "EMA pseudo Dice" (its average over epochs) says what it is
    best_lines = [line for line in log_text.splitlines() if "New best EMA pseudo Dice" in line]
    assert best_lines and all(integration.BEST_EMA_NOTE in line for line in best_lines)
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

    run = {"env": {**os.environ, **env}, "capture_output": True, "text": True, "timeout": 600}
    cli = [sys.executable, "-m", "gsema_fast", "nnunet-train", "901", "3d_fullres", "0", "-device", "cpu"]
    final = (fold / "checkpoint_final.pth").read_bytes()
    logs = sorted(fold.glob("training_log_*.txt"))

    def untouched():
        assert (fold / "checkpoint_final.pth").read_bytes() == final
        assert sorted(fold.glob("training_log_*.txt")) == logs  # not even a log of the refused run

    # a new run with other settings into the same trainer's folder: refused, nothing written
    refused = subprocess.run([*cli, "--set", "ema.rule=sign", "--epochs", "1"], **run)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "holds a run of nnUNetTrainerGSEMA (checkpoint_final.pth" in refused.stderr and "-tr" in refused.stderr
    untouched()
    # --c with other GS-EMA settings: one line, nothing trained or written
    refused = subprocess.run([*cli, "--c", "--epochs", "3", "--set", "ema.decay_aligned=0.5"], **run)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "ema.decay_aligned: checkpoint 0.9, now 0.5" in refused.stderr
    untouched()
    # --c, one more epoch: the run's own iterations (2) and validation iterations (1), the GS-EMA state carried on
    resumed = subprocess.run([*cli, "--c", "--epochs", "3"], **run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert int(checkpoint["gsema"]["ema"]["step"]) == 6 and checkpoint["current_epoch"] == 3
    assert checkpoint["gsema"]["lengths"] == {
        "num_epochs": 3,
        "num_iterations_per_epoch": 2,
        "num_val_iterations_per_epoch": 1,
    }
    assert len(checkpoint["logging"]["gsema_aligned_fraction"]) == 3
    # a replacement, asked for, with other settings
    short = ["--epochs", "1", "--iterations", "1", "--val-iterations", "1"]
    replaced = subprocess.run([*cli, "--overwrite", *short, "--set", "train.seed=5"], **run)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert int(checkpoint["gsema"]["ema"]["step"]) == 1 and checkpoint["current_epoch"] == 1
    assert checkpoint["gsema"]["config"]["train.seed"] == 5
    assert len(list(fold.glob("training_log_*.txt"))) == 1
    # --val: the finished run's teacher, validated without its settings
    validated = subprocess.run([*cli, "--val"], **run)
    assert validated.returncode == 0, validated.stderr[-3000:]
    assert len(list(fold.glob("training_log_*.txt"))) == 2
    assert (fold / "validation" / "summary.json").is_file()

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


def needs_nnunets_own_trainer_search():
    # nnUNetv2_train looks a trainer up by importing every module of nnU-Net's trainer package first, Primus's
    # among them, which imports timm and with it torchvision
    try:
        importlib.import_module("timm")
    except Exception as err:  # a missing or a broken torchvision (RuntimeError) alike
        pytest.skip(f"nnUNetv2_train cannot search for trainers here: importing timm fails ({type(err).__name__})")


def docs_variant(path: Path = DOCS) -> str:
    blocks = [b.split("```", 1)[0] for b in path.read_text().split("```python\n")[1:]]
    (variant,) = [b for b in blocks if "class nnUNetTrainerGSEMA_sign_2epochs(" in b]
    return variant


def test_the_readmes_variant_is_the_one_the_documentation_trains():
    assert docs_variant(DOCS.parents[1] / "README.md") == docs_variant()


def trainer_folder(tmp_path: Path) -> Path:
    """A folder for nnUNet_extTrainer: gsema-fast's trainer file and the documentation's variant, as written."""
    folder = tmp_path / "trainers"
    assert main(["nnunet-trainers", str(folder)]) == 0
    (folder / "my_trainers.py").write_text(docs_variant())
    return folder


def variant_env(env: dict, tmp_path: Path) -> dict:
    """The test's own results folder (the preprocessed dataset shared), and its trainer folder."""
    own = {"nnUNet_results": str(tmp_path / "results"), "nnUNet_extTrainer": str(trainer_folder(tmp_path))}
    return {"env": {**os.environ, **env, **own}, "capture_output": True, "text": True, "timeout": 600}


@pytest.mark.slow
def test_the_documented_variant_trains_into_its_own_folder(nnunet_env, tmp_path):
    root, env = nnunet_env
    run = variant_env(env, tmp_path)
    cli = [sys.executable, "-m", "gsema_fast", "nnunet-train", "901", "3d_fullres", "0", "-device", "cpu"]
    done = subprocess.run([*cli, "-tr", "nnUNetTrainerGSEMA_sign_2epochs"], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    fold = tmp_path / "results" / DATASET / "nnUNetTrainerGSEMA_sign_2epochs__nnUNetPlans__3d_fullres" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    config = checkpoint["gsema"]["config"]
    assert (config["ema"]["rule"], config["loss"]["lambda_con"]) == ("sign", 0.2)
    assert checkpoint["current_epoch"] == 2 and int(checkpoint["gsema"]["ema"]["step"]) == 4
    assert list(checkpoint["init_args"]) == ["plans", "configuration", "fold", "dataset_json", "device"]


@pytest.mark.slow
def test_nnunets_own_commands_train_variants_by_name_and_continue_them_with_their_settings(nnunet_env, tmp_path):
    root, env = nnunet_env
    needs_nnunets_own_trainer_search()
    run = variant_env(env, tmp_path)
    nnunet_train = [shutil.which("nnUNetv2_train", path=os.path.dirname(sys.executable)), "901", "3d_fullres", "0"]
    results = tmp_path / "results" / DATASET

    # nnU-Net's own command trains the documented variant
    done = subprocess.run([*nnunet_train, "-tr", "nnUNetTrainerGSEMA_sign_2epochs", "-device", "cpu"], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    fold = results / "nnUNetTrainerGSEMA_sign_2epochs__nnUNetPlans__3d_fullres" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["gsema"]["config"]["ema"]["rule"] == "sign" and checkpoint["current_epoch"] == 2

    # a shipped variant, its run's lengths and settings set by nnunet-train, continued by nnU-Net's --c: it goes on
    # with them (one epoch of two steps, seed 5), not with nnU-Net's 1000 epochs of 250
    short = ["--epochs", "1", "--iterations", "2", "--val-iterations", "1", "--set", "train.seed=5"]
    done = subprocess.run([sys.executable, "-m", "gsema_fast", "nnunet-train", "901", "3d_fullres", "0", "-device",
                           "cpu", "-tr", "nnUNetTrainerGSEMA_noBACL", *short], **run)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([*nnunet_train, "-tr", "nnUNetTrainerGSEMA_noBACL", "--c", "-device", "cpu"], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    fold = results / "nnUNetTrainerGSEMA_noBACL__nnUNetPlans__3d_fullres" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["current_epoch"] == 1 and int(checkpoint["gsema"]["ema"]["step"]) == 2
    assert checkpoint["gsema"]["overrides"] == ["train.seed=5"] and checkpoint["gsema"]["config"]["train.seed"] == 5
    assert checkpoint["gsema"]["config"]["loss"]["lambda_con"] == 0
    # nnU-Net's --val validates it without the settings nnUNetv2_train has no option for
    done = subprocess.run([*nnunet_train, "-tr", "nnUNetTrainerGSEMA_noBACL", "--val", "-device", "cpu"], **run)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_a_variant_written_with_args_and_kwargs_is_built_by_nnunet(nnunet_env):
    class nnUNetTrainerGSEMA_loose(integration.nnUNetTrainerGSEMA):  # noqa: N801
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_epochs = 3

    trainer = integration.build_trainer("901", "3d_fullres", "0", device="cpu", trainer_class=nnUNetTrainerGSEMA_loose)
    assert trainer.num_epochs == 3
    assert list(trainer.my_init_kwargs) == ["plans", "configuration", "fold", "dataset_json", "device"]
    assert trainer.my_init_kwargs["fold"] == 0 and trainer.my_init_kwargs["device"] == torch.device("cpu")
    assert not list(Path(trainer.output_folder).glob("training_log_*.txt"))  # nothing written before a run starts
