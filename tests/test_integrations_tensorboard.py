"""TensorBoard logging (``train.loggers``), read back from the event files with TensorBoard's own reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorboard")

pytestmark = pytest.mark.integration

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tiny import tiny_run  # noqa: E402

from gsema_fast.config import load_config  # noqa: E402
from gsema_fast.integrations.tensorboard import TensorBoardLogger  # noqa: E402
from gsema_fast.training import train  # noqa: E402


def read_events(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalar_series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_logger_writes_every_number_of_a_record_under_its_kind(tmp_path):
    import matplotlib.pyplot as plt

    logger = TensorBoardLogger(tmp_path / "tb")
    logger.write({"kind": "train", "step": 3, "epoch": 0, "total": 1.5, "aligned": 0.25, "skipped_steps": 0})
    logger.write({"kind": "train", "step": 6, "epoch": 1, "total": 1.25, "aligned": 0.75, "skipped_steps": 1})
    logger.write({"kind": "val", "step": 6, "epoch": 1, "dice": {"vessel": 0.5, "aneurysm": float("nan")}})
    fig = plt.figure(figsize=(2, 1))
    fig.savefig(tmp_path / "progress.png", dpi=50)
    plt.close(fig)
    logger.figure("progress", tmp_path / "progress.png", 6)
    logger.close()

    events = read_events(tmp_path / "tb")
    tags = events.Tags()
    assert set(tags["scalars"]) == {
        "train/total",
        "train/aligned",
        "train/skipped_steps",
        "val/dice/vessel",
        "val/dice/aneurysm",
    }
    assert scalar_series(events, "train/total") == [(3, 1.5), (6, 1.25)]
    assert scalar_series(events, "train/aligned") == [(3, 0.25), (6, 0.75)]
    assert scalar_series(events, "val/dice/vessel") == [(6, 0.5)]
    assert np.isnan(scalar_series(events, "val/dice/aneurysm")[0][1])  # kept: "no aneurysm" is not "Dice 0"
    (image,) = events.Images("progress")
    assert image.step == 6 and (image.width, image.height) == (100, 50)


@pytest.mark.slow
def test_training_run_logs_every_record_and_the_progress_figure(phantoms, tmp_path):
    cfg = load_config(
        "demo", [*tiny_run(phantoms), f"train.out_dir={tmp_path / 'run'}", "train.loggers=[jsonl,tensorboard]"]
    )
    run = train(cfg)["run_dir"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    events = read_events(run / "tensorboard")

    train_records = [r for r in records if r["kind"] == "train"]
    for key in ("total", "dce_student_src", "dce_student_trg", "bacl", "aligned", "grad_cos", "lr", "step_time_s"):
        want = [(r["step"], r[key]) for r in train_records]
        got = scalar_series(events, f"train/{key}")
        assert [s for s, _ in got] == [s for s, _ in want], key
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6, err_msg=key)
    val_records = [r for r in records if r["kind"] == "val"]
    assert len(val_records) == 2
    for name in ("vessel", "aneurysm"):
        got = scalar_series(events, f"val/dice/{name}")
        assert [s for s, _ in got] == [r["step"] for r in val_records]
        np.testing.assert_allclose([v for _, v in got], [r["dice"][name] for r in val_records], rtol=1e-6)
    # progress.png is drawn after every epoch, and each drawing goes to TensorBoard too
    assert [image.step for image in events.Images("progress")] == [2, 4]
    # the unseen centre, scored once at the end: the chosen teacher and the untrained one, as in summary.json
    summary = json.loads((run / "summary.json").read_text())
    for name in ("vessel", "aneurysm"):
        assert scalar_series(events, f"test/dice/{name}") == [(4, pytest.approx(summary["test"]["mean"][name]))]
        untrained = scalar_series(events, f"test/untrained_dice/{name}")
        assert untrained == [(4, pytest.approx(summary["untrained"][name]))]


def test_logger_of_a_resumed_run_keeps_the_checkpoints_step_and_hides_what_came_after(tmp_path):
    first = TensorBoardLogger(tmp_path / "tb")
    for step in (1, 2, 3):  # a run killed after step 3, its checkpoint at step 2
        first.write({"kind": "train", "step": step, "total": float(step)})
    first.close()
    resumed = TensorBoardLogger(tmp_path / "tb", resume_step=2)
    for step in (3, 4):
        resumed.write({"kind": "train", "step": step, "total": 10.0 * step})
    resumed.close()
    assert scalar_series(read_events(tmp_path / "tb"), "train/total") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


@pytest.mark.slow
def test_resumed_training_shows_every_step_once_as_log_jsonl_does(phantoms, tmp_path, monkeypatch):
    import gsema_fast.training.loop as train_module

    cfg = load_config(
        "demo", [*tiny_run(phantoms), f"train.out_dir={tmp_path / 'run'}", "train.loggers=[jsonl,tensorboard]"]
    )
    log_interval = train_module._log_interval

    def killed_after_step_3(run, *args):
        log_interval(run, *args)  # the record of step 3 is written, the checkpoint is still step 2's
        if run.step == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_log_interval", killed_after_step_3)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    run = train(cfg, resume=True)["run_dir"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    events = read_events(run / "tensorboard")
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for key in ("total", "aligned", "lr"):
        got = scalar_series(events, f"train/{key}")
        assert [s for s, _ in got] == [1, 2, 3, 4], key
        np.testing.assert_allclose([v for _, v in got], [r[key] for r in train_records], rtol=1e-6, err_msg=key)
    val_steps = [r["step"] for r in records if r["kind"] == "val"]
    assert val_steps == [2, 4]
    assert [s for s, _ in scalar_series(events, "val/dice/vessel")] == val_steps
    assert [s for s, _ in scalar_series(events, "test/dice/vessel")] == [4]


@pytest.mark.slow
def test_tensorboard_alone_writes_no_jsonl(phantoms, tmp_path):
    cfg = load_config(
        "demo",
        [
            *tiny_run(phantoms),
            f"train.out_dir={tmp_path / 'run'}",
            "train.loggers=[tensorboard]",
            "train.epochs=1",
            "train.val_every=0",
        ],
    )
    run = train(cfg)["run_dir"]
    assert not (run / "log.jsonl").exists() and not (run / "progress.png").exists()
    events = read_events(run / "tensorboard")
    assert [s for s, _ in scalar_series(events, "train/total")] == [1, 2]
