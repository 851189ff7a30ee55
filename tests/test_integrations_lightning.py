"""Lightning: the FusedEMA callback and the GS-EMA LightningModule, on tiny models on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from tiny import TINY_MODEL, tiny_batch  # noqa: E402

from gsema_fast.config import config_to_dict, load_config  # noqa: E402
from gsema_fast.data import TargetTransform  # noqa: E402
from gsema_fast.ema import GSEMA  # noqa: E402
from gsema_fast.integrations.lightning import FusedEMA, GSEMAModule, ema_state_dict  # noqa: E402
from gsema_fast.losses import BACL, DiceCE  # noqa: E402
from gsema_fast.models import build_model  # noqa: E402
from gsema_fast.step import StepContext, train_step  # noqa: E402


def trainer(**kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return pl.Trainer(**options)


# ------------------------------------------------------------------------------------------------ FusedEMA


class Regressor(pl.LightningModule):
    """A batch-norm MLP: float buffers (running statistics) and an integer one (num_batches_tracked)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.seen_in_validation: dict[str, torch.Tensor] | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation = {k: v.clone() for k, v in self.state_dict().items()}
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def regression_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(16, 1, generator=g)), batch_size=4)


class Snapshots(pl.Callback):
    """The live weights after every optimizer step."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.seen = 0

    def on_fit_start(self, trainer, pl_module):
        self.start = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.seen:
            self.seen = trainer.global_step
            self.after_step.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def expected_average(start, snapshots, decay):
    """The EMA with warm-up by hand: update t uses min(decay, 1 - 1/(t+1)); integer tensors are copied."""
    avg = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in start.items()}
    for t, weights in enumerate(snapshots):
        d = min(decay, 1 - 1 / (t + 1))
        for k, v in weights.items():
            avg[k] = d * avg[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone()
    return avg


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fused_ema_follows_every_optimizer_step_and_validates_on_the_average(accumulate):
    model, ema, snaps = Regressor(), FusedEMA(0.6), Snapshots()
    trainer(max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[ema, snaps]).fit(
        model, regression_data(), DataLoader(TensorDataset(torch.randn(4, 4), torch.randn(4, 1)), batch_size=4)
    )
    steps = 8 // accumulate
    assert len(snaps.after_step) == steps and int(ema.ema.num_updates) == steps
    want = expected_average(snaps.start, snaps.after_step, 0.6)
    got = ema.averaged()
    assert set(got) == set(model.state_dict())
    for name, value in want.items():
        torch.testing.assert_close(got[name], value.to(got[name].dtype), rtol=1e-5, atol=1e-6, msg=name)
    # The last validation ran after the last step, on the averaged weights; the live ones came back afterwards.
    for name, value in got.items():
        torch.testing.assert_close(model.seen_in_validation[name], value, rtol=0, atol=0, msg=name)
    live = model.state_dict()
    for name, value in snaps.after_step[-1].items():
        torch.testing.assert_close(live[name], value, rtol=0, atol=0, msg=name)
    assert not torch.equal(live["net.0.weight"], got["net.0.weight"])


def test_fused_ema_resumes_from_a_checkpoint_exactly(tmp_path):
    val = DataLoader(TensorDataset(torch.randn(4, 4), torch.randn(4, 1)), batch_size=4)
    full_model, full = Regressor(), FusedEMA(0.6)
    trainer(max_epochs=4, callbacks=[full]).fit(full_model, regression_data(), val)

    first_model, first = Regressor(), FusedEMA(0.6)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[first, saver], enable_checkpointing=True).fit(first_model, regression_data(), val)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    # The model's state in the checkpoint is the live one (validation's swap was undone before saving) ...
    for name, value in first_model.state_dict().items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=0, atol=0, msg=name)
    # ... and the average is the callback's, readable for inference.
    averaged = ema_state_dict(tmp_path / "last.ckpt")
    assert set(averaged) == set(first_model.state_dict())
    for name, value in first.averaged().items():
        torch.testing.assert_close(averaged[name], value, rtol=0, atol=0, msg=name)
    Regressor().load_state_dict(averaged)

    resumed_model, resumed = Regressor(), FusedEMA(0.6)
    fit = trainer(max_epochs=4, callbacks=[resumed])
    fit.fit(resumed_model, regression_data(), val, ckpt_path=tmp_path / "last.ckpt")
    assert int(resumed.ema.num_updates) == int(full.ema.num_updates) == 16
    for name, value in full.averaged().items():
        torch.testing.assert_close(resumed.averaged()[name], value, rtol=1e-6, atol=1e-7, msg=name)
    for name, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_fused_ema_rejects_a_bad_decay_and_a_checkpoint_without_it(tmp_path):
    with pytest.raises(ValueError, match="decay must be a number in"):
        FusedEMA(1.5)
    with pytest.raises(ValueError, match="expected one FusedEMA state"):
        ema_state_dict({"callbacks": {}})


# ------------------------------------------------------------------------------------------------ GSEMAModule


class Segmenter(GSEMAModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.05, fused=True)


class Batches(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        torch.manual_seed(5)
        self.items = []
        for _ in range(n):
            x, y, _, _ = tiny_batch(batch=1)
            self.items.append({"image": x[0], "label": y[0]})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def segmentation_data(batches: int = 2) -> DataLoader:
    return DataLoader(Batches(2 * batches), batch_size=2)


def make_segmenter(*overrides: str) -> tuple[Segmenter, nn.Module]:
    torch.manual_seed(1)
    student = build_model(**TINY_MODEL)
    start = copy.deepcopy(student)
    return Segmenter(student, load_config("demo", ["ema.decay_aligned=0.5", *overrides])), start


def test_gsema_module_runs_the_package_step_through_lightnings_optimizer():
    module, start = make_segmenter()
    fit = trainer(max_epochs=2, log_every_n_steps=1)
    fit.fit(module, segmentation_data())
    assert fit.global_step == 4  # Lightning counted every step taken through it
    assert int(module.gsema.step) == 4
    logged = fit.callback_metrics
    for key in ("total", "dce_student_src", "dce_student_trg", "bacl", "aligned", "grad_cos", "aligned_fraction"):
        assert f"train/{key}" in logged, key
    assert "train/dce_teacher_src" in logged  # every step is a logging step here
    assert logged["train/aligned_fraction"] == module.gsema.num_aligned / 4

    # The same four steps without Lightning: the package's step on a twin of everything.
    cfg = module.gsema_config
    updater = GSEMA(start, decay_aligned=0.5, decay_conflict=1.0, rule="dot", warmup=True)
    ctx = StepContext(
        student=start,
        teacher=updater.teacher,
        optimizer=torch.optim.SGD(start.parameters(), lr=0.05, fused=True),
        mode="gsema",
        updater=updater,
        dce=DiceCE(),
        bacl=BACL(),
        lambda_sup=cfg.loss.lambda_sup,
        lambda_con=cfg.loss.lambda_con,
    )
    transform = TargetTransform(seed=cfg.train.seed, **config_to_dict(cfg)["target_transform"])
    for _ in range(2):
        for batch in segmentation_data():
            train_step(ctx, batch["image"], batch["label"], *transform(batch["image"], batch["label"]))
    assert int(updater.num_aligned) == int(module.gsema.num_aligned)
    for mine, theirs in ((module.student, start), (module.teacher, updater.teacher)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    pairs = zip(module.teacher.parameters(), module.student.parameters(), strict=True)
    moved = [not torch.equal(a, b) for a, b in pairs]
    assert any(moved)  # the teacher is an average, not the student


def test_gsema_module_resumes_teacher_counters_and_target_streams(tmp_path):
    full, _ = make_segmenter()
    trainer(max_epochs=2).fit(full, segmentation_data())

    first, _ = make_segmenter()
    half = trainer(max_epochs=1)
    half.fit(first, segmentation_data())
    half.save_checkpoint(tmp_path / "half.ckpt")
    assert torch.load(tmp_path / "half.ckpt", weights_only=False)["gsema"]["step"] == 2

    resumed, _ = make_segmenter()
    trainer(max_epochs=2).fit(resumed, segmentation_data(), ckpt_path=tmp_path / "half.ckpt")
    assert int(resumed.gsema.step) == 4 and int(resumed.gsema.num_aligned) == int(full.gsema.num_aligned)
    for name, value in full.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_gsema_module_refuses_what_its_step_cannot_do():
    with pytest.raises(ValueError, match="ema.mode"):
        Segmenter(build_model(**TINY_MODEL), load_config("demo", ["ema.mode=ema"]))
    module, _ = make_segmenter()
    with pytest.raises(ValueError, match="precision must be one of"):
        trainer(max_epochs=1, precision="64-true").fit(module, segmentation_data())


def test_gsema_module_trains_under_bf16_autocast():
    module, _ = make_segmenter()
    fit = trainer(max_epochs=1, log_every_n_steps=1, precision="bf16-mixed")
    fit.fit(module, segmentation_data())
    assert fit.global_step == int(module.gsema.step) == 2
    assert all(torch.isfinite(v) for k, v in fit.callback_metrics.items() if k != "train/grad_cos")


@pytest.mark.slow
def test_the_readmes_gsema_script_runs_as_written(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (script,) = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:] if "(GSEMAModule):" in b]
    (tmp_path / "script.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as on a user's machine
    done = subprocess.run(
        [sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'train/aligned_fraction'" in done.stdout and (tmp_path / "teacher.pt").is_file()
