"""Lightning: the FusedEMA callback and the GS-EMA LightningModule, on tiny models on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

pytestmark = pytest.mark.integration

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

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self.net(x), y))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

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


def val_data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(4, 4, generator=g), torch.randn(4, 1, generator=g)), batch_size=4)


def close(got: dict, want: dict, **tolerance) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value.to(got[name].dtype), msg=name, **tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("use_average", [True, False])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_fused_ema_follows_every_optimizer_step_and_the_model_is_one_set_of_weights(accumulate, use_average):
    model, ema, snaps = Regressor(), FusedEMA(0.6, use_average=use_average), Snapshots()
    trainer(max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[ema, snaps]).fit(
        model, regression_data(), val_data()
    )
    steps = 8 // accumulate
    assert len(snaps.after_step) == steps and int(ema.ema.num_updates) == steps
    averaged = ema.averaged()
    close(averaged, expected_average(snaps.start, snaps.after_step, 0.6), rtol=1e-5, atol=1e-6)
    live = snaps.after_step[-1]
    assert not torch.equal(live["net.0.weight"], averaged["net.0.weight"])
    # The model, wherever it is used outside the training steps: the average (default) or the live weights.
    model_weights = averaged if use_average else live
    close(model.seen_in_validation, model_weights, rtol=0, atol=0)  # the last validation, after the last step
    close(model.state_dict(), model_weights, rtol=0, atol=0)  # the module after fit
    evaluate = trainer(callbacks=[ema])
    validated = evaluate.validate(model, val_data())[0]["val_loss"]
    tested = evaluate.test(model, val_data())[0]["test_loss"]
    (predicted,) = evaluate.predict(model, val_data())
    assert tested == pytest.approx(validated, rel=1e-6)
    reference = Regressor()
    reference.load_state_dict(model_weights)
    reference.eval()
    x, y = next(iter(val_data()))
    torch.testing.assert_close(predicted, reference.net(x), rtol=1e-6, atol=1e-6)
    assert validated == pytest.approx(float(F.mse_loss(reference.net(x), y)), rel=1e-5)


@pytest.mark.slow
def test_checkpoints_hold_the_average_as_the_model_and_resume_exactly(tmp_path):
    full_model, full = Regressor(), FusedEMA(0.6)
    trainer(max_epochs=4, callbacks=[full]).fit(full_model, regression_data(), val_data())

    first_model, first = Regressor(), FusedEMA(0.6)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[first, saver], enable_checkpointing=True).fit(
        first_model, regression_data(), val_data()
    )
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    # The model in the checkpoint is the average; the live weights are beside it, for resuming.
    close(checkpoint["state_dict"], first.averaged(), rtol=0, atol=0)
    assert not torch.equal(checkpoint["current_model_state"]["net.0.weight"], checkpoint["state_dict"]["net.0.weight"])
    close(ema_state_dict(tmp_path / "last.ckpt"), first.averaged(), rtol=0, atol=0)
    loaded = Regressor.load_from_checkpoint(tmp_path / "last.ckpt")
    close(loaded.state_dict(), first.averaged(), rtol=0, atol=0)
    fresh = Regressor()
    trainer(callbacks=[FusedEMA(0.6)]).test(fresh, val_data(), ckpt_path=tmp_path / "last.ckpt")
    close(fresh.state_dict(), first.averaged(), rtol=0, atol=0)

    resumed_model, resumed = Regressor(), FusedEMA(0.6)
    fit = trainer(max_epochs=4, callbacks=[resumed])
    fit.fit(resumed_model, regression_data(), val_data(), ckpt_path=tmp_path / "last.ckpt")
    assert int(resumed.ema.num_updates) == int(full.ema.num_updates) == 16
    close(resumed.averaged(), full.averaged(), rtol=1e-6, atol=1e-7)
    close(resumed_model.state_dict(), full_model.state_dict(), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_without_use_average_the_average_is_kept_beside_the_live_model(tmp_path):
    model, ema = Regressor(), FusedEMA(0.6, use_average=False)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=2, callbacks=[ema, saver], enable_checkpointing=True).fit(model, regression_data(), val_data())
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    close(checkpoint["state_dict"], model.state_dict(), rtol=0, atol=0)
    assert "current_model_state" not in checkpoint
    close(ema_state_dict(checkpoint), ema.averaged(), rtol=0, atol=0)
    resumed = FusedEMA(0.6, use_average=False)
    trainer(max_epochs=3, callbacks=[resumed]).fit(Regressor(), regression_data(), ckpt_path=tmp_path / "last.ckpt")
    assert int(resumed.ema.num_updates) == 12


class FailsInValidation(Regressor):
    """Raises ``error`` in the validation of the second epoch."""

    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.error = error

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        if self.current_epoch == 1:
            raise self.error("in validation")


@pytest.mark.slow
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_or_ctrl_c_in_validation_leaves_the_live_weights_and_checkpoints_them(tmp_path, error):
    import signal

    model, ema, snaps = FailsInValidation(error), FusedEMA(0.6), Snapshots()
    on_exception = pl.callbacks.OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")
    fit = trainer(max_epochs=3, callbacks=[on_exception, ema, snaps], enable_checkpointing=True)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        # Lightning ends the process on Ctrl-C (sys.exit(1)) after its exception hooks, and raises anything else
        with pytest.raises(SystemExit if error is KeyboardInterrupt else error):
            fit.fit(model, regression_data(), val_data())
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores Ctrl-C from then on
    live = snaps.after_step[-1]
    assert len(snaps.after_step) == 8
    close(model.seen_in_validation, ema.averaged(), rtol=0, atol=0)  # it failed while holding the average ...
    close(model.state_dict(), live, rtol=0, atol=0)  # ... and holds the live weights again
    checkpoint = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)
    close(checkpoint["current_model_state"], live, rtol=0, atol=0)
    close(checkpoint["state_dict"], ema.averaged(), rtol=0, atol=0)


class Tied(pl.LightningModule):
    """An embedding and an output layer sharing one weight, and a buffer that is not saved."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Embedding(6, 3)
        self.out = nn.Linear(3, 6, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return F.cross_entropy(self.out(self.embed(tokens)), tokens)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.slow
def test_tied_weights_are_averaged_once_and_keyed_like_the_state_dict(tmp_path):
    model, ema = Tied(), FusedEMA(0.5, use_average=False)
    tokens = DataLoader(TensorDataset(torch.arange(6).repeat(4)), batch_size=6)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, callbacks=[ema, saver], enable_checkpointing=True).fit(model, tokens)
    averaged = ema.averaged()
    assert set(averaged) == set(model.state_dict()) == {"embed.weight", "out.weight"}
    assert averaged["embed.weight"] is averaged["out.weight"]
    assert not torch.equal(averaged["embed.weight"], model.embed.weight)
    Tied().load_state_dict(averaged)
    Tied().load_state_dict(ema_state_dict(tmp_path / "last.ckpt"))
    torch.testing.assert_close(ema_state_dict(tmp_path / "last.ckpt")["out.weight"], averaged["embed.weight"])


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_gsema_module_keeps_its_counters_across_fits():
    # Two fits of one epoch train as one fit of two (SGD without momentum keeps no state between them).
    once, _ = make_segmenter()
    trainer(max_epochs=2).fit(once, segmentation_data())
    twice, _ = make_segmenter()
    for _ in range(2):
        trainer(max_epochs=1).fit(twice, segmentation_data())
    assert int(twice.gsema.step) == int(once.gsema.step) == 4
    assert int(twice.gsema.num_aligned) == int(once.gsema.num_aligned)
    for name, value in once.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        torch.testing.assert_close(twice.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_gsema_module_refuses_what_its_step_cannot_do():
    with pytest.raises(ValueError, match="ema.mode"):
        Segmenter(build_model(**TINY_MODEL), load_config("demo", ["ema.mode=ema"]))
    module, _ = make_segmenter()
    with pytest.raises(ValueError, match="precision must be one of"):
        trainer(max_epochs=1, precision="64-true").fit(module, segmentation_data())


@pytest.mark.slow
def test_gsema_module_trains_under_bf16_autocast():
    module, _ = make_segmenter()
    fit = trainer(max_epochs=1, log_every_n_steps=1, precision="bf16-mixed")
    fit.fit(module, segmentation_data())
    assert fit.global_step == int(module.gsema.step) == 2
    assert all(torch.isfinite(v) for k, v in fit.callback_metrics.items() if k != "train/grad_cos")


@pytest.mark.slow
def test_the_documented_gsema_script_runs_as_written(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    (script,) = [b.split("```", 1)[0] for b in docs.split("```python\n")[1:] if "(GSEMAModule):" in b]
    (tmp_path / "script.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as on a user's machine
    done = subprocess.run(
        [sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'train/aligned_fraction'" in done.stdout and (tmp_path / "teacher.pt").is_file()


DDP_SPAWN_SCRIPT = """
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gsema_fast.integrations.lightning import FusedEMA, ema_state_dict


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    model = Regressor()
    saver = pl.callbacks.ModelCheckpoint(dirpath=sys.argv[1], save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, callbacks=[FusedEMA(0.6), saver],
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, data)
    checkpoint = torch.load(sys.argv[1] + "/last.ckpt", weights_only=False)
    average, live = ema_state_dict(checkpoint), checkpoint["current_model_state"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, average[name]), name
    assert not torch.equal(live["net.0.weight"], average["net.0.weight"])
    print("the main process holds the average")
"""


@pytest.mark.slow
def test_under_ddp_spawn_the_main_process_gets_the_average(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "spawned.py").write_text(DDP_SPAWN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "spawned.py", str(tmp_path / "checkpoints")],
        cwd=tmp_path,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the main process holds the average" in done.stdout
