"""Case and dataset figures: what the error row shows, and the dataset MIPs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gsema_fast.evaluation.figures import draw_layer_agreement, error_fractions, plot_case_mips, plot_dataset_mips
from gsema_fast.training.monitor import IntervalLog

LABELS = {"background": 0, "vessel": 1, "aneurysm": 2}


def _ball(radius: float, size: int = 24) -> np.ndarray:
    grid = np.indices((size, size, size)) - (size - 1) / 2
    return np.sqrt((grid**2).sum(0)) <= radius


def test_a_thin_shell_of_errors_stays_faint_and_a_missed_sac_is_bright():
    ref = np.where(_ball(8), 2, 0)
    shrunk = np.where(_ball(7), 2, 0)  # a good segmentation, one voxel short all round
    fp, fn = error_fractions(shrunk, ref, 2, axis=2)
    assert fp.max() == 0
    assert fn[12, 12] < 0.15 and fn.max() == 1.0  # the rim rays are all error, the rays through the sac barely
    disc = (ref == 2).any(axis=2)
    # a maximum projection of the error mask marks every ray through the sac; the fractions stay faint inside
    assert ((ref == 2) & (shrunk != 2)).any(axis=2)[disc].all()
    inner = (np.sqrt(((np.indices((24, 24)) - 11.5) ** 2).sum(0)) <= 5) & disc
    assert fn[inner].max() < 0.3  # through the body of the sac: a few boundary voxels of 10-16
    _, missed = error_fractions(np.zeros_like(ref), ref, 2, axis=2)
    assert np.all(missed[(ref == 2).any(axis=2)] == 1.0)


@pytest.mark.parametrize("shape", [(20, 24, 16), (17, 17, 17)])
def test_figures_are_written(tmp_path, shape):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[4:10, 4:10, 4:10] = 1
    label[6:8, 6:8, 6:8] = 2
    affine = np.diag([0.4, 0.5, 0.6, 1.0])
    case = plot_case_mips(image, label, label, affine, LABELS, tmp_path / "case.png", title="t")
    data = plot_dataset_mips([("A", image, label, affine), ("B", image, label, affine)], LABELS, tmp_path / "d.png")
    assert case.stat().st_size > 5_000 and data.stat().st_size > 5_000


def test_dataset_mips_need_a_case(tmp_path):
    with pytest.raises(ValueError, match="no cases"):
        plot_dataset_mips([], LABELS, tmp_path / "d.png")


def test_layer_agreement_figure_needs_per_layer_records(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"kind": "train", "step": 25, "grad_cos": 0.4}) + "\n")
    assert draw_layer_agreement(log, tmp_path / "none.png") is False and not (tmp_path / "none.png").exists()
    records = [
        {"kind": "train", "step": s, "grad_cos": 0.3, "layer_cos": {"a": 0.5, "b": -0.2 + s / 100}} for s in (25, 50)
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert draw_layer_agreement(log, tmp_path / "layers.png") is True and (tmp_path / "layers.png").stat().st_size > 0


def test_an_interval_logs_vector_metrics_by_name(tmp_path):
    """A vector metric (per-layer cosines) is averaged over the interval like the scalars and written by name."""
    interval = IntervalLog(tmp_path / "log.jsonl", names={"layer_cos": ["first", "second"]})
    interval.add({"total": torch.tensor(1.0), "layer_cos": torch.tensor([0.5, -0.5])})
    interval.add({"total": torch.tensor(3.0)})
    record = interval.flush(kind="train", step=2)
    assert record["total"] == 2.0 and record["layer_cos"] == {"first": 0.5, "second": -0.5}
    assert json.loads((tmp_path / "log.jsonl").read_text())["layer_cos"] == {"first": 0.5, "second": -0.5}
