"""Leave-one-centre-out experiments: tables, paired bootstrap intervals, presets, and the protocol that keeps the
unseen centre unseen until the end."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_run

import gsema_fast.lodo as lodo_mod
import gsema_fast.train as train_mod
from gsema_fast.checkpoints import run_config
from gsema_fast.config import config_to_dict, load_config, with_overrides
from gsema_fast.data import dataset_identity, load_manifest, synthesize
from gsema_fast.evaluate import evaluate
from gsema_fast.lodo import ABLATION_ROWS, PRESETS, lodo, paired_bootstrap, write_lodo_table
from gsema_fast.models import build_model

CLASSES = ("vessel", "aneurysm")


# ------------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_of_a_constant_difference_is_that_constant():
    mean, low, high = paired_bootstrap({"3": np.full((3, 8), 0.05)})
    assert mean == pytest.approx(0.05) and low == pytest.approx(0.05) and high == pytest.approx(0.05)


def test_bootstrap_interval_matches_the_normal_theory_for_iid_cases():
    rng = np.random.default_rng(0)
    diffs = rng.normal(0.1, 0.2, size=(1, 2000))
    mean, low, high = paired_bootstrap({"0": diffs}, resamples=4000)
    half = 1.96 * diffs.std(ddof=1) / math.sqrt(diffs.size)
    assert mean == pytest.approx(diffs.mean())
    assert low == pytest.approx(mean - half, abs=0.15 * half) and high == pytest.approx(mean + half, abs=0.15 * half)


def test_bootstrap_resamples_seeds_too():
    """A pure seed effect (every case of a seed moves together) is noise the interval must show; a case-only
    bootstrap would call +0.02 +- 0 an effect."""
    diffs = np.repeat(np.array([[-0.05], [0.02], [0.09]]), 10, axis=1)
    mean, low, high = paired_bootstrap({"0": diffs}, resamples=4000)
    assert mean == pytest.approx(0.02)
    assert low < 0 < high and low >= -0.05 - 1e-9 and high <= 0.09 + 1e-9


def test_bootstrap_skips_undefined_cases_and_pools_centres():
    a = np.array([[0.1, np.nan, 0.1]])
    b = np.array([[0.3, 0.3]])
    mean, low, high = paired_bootstrap({"0": a, "1": b}, resamples=500)
    assert mean == pytest.approx((0.1 + 0.1 + 0.3 + 0.3) / 4)
    assert 0.1 <= low <= high <= 0.3
    assert all(math.isnan(v) for v in paired_bootstrap({"0": np.full((2, 2), np.nan)}))


@pytest.mark.parametrize(
    ("diffs", "kwargs", "match"),
    [
        ({"0": np.zeros(3)}, {}, r"diffs\['0'\] has shape \(3,\)"),
        ({"0": np.zeros((2, 3)), "1": np.zeros((3, 3))}, {}, "same number of seeds"),
        ({"0": np.zeros((1, 3))}, {"confidence": 1.5}, "confidence=1.5"),
        ({"0": np.zeros((1, 3))}, {"resamples": 0}, "resamples=0"),
    ],
)
def test_bootstrap_bad_input(diffs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(diffs, **kwargs)


# ------------------------------------------------------------------------------------------------ tables
def _case_metrics(dice):
    return {
        "dice": dice,
        "sensitivity": dice + 0.05,
        "jaccard": dice / (2 - dice),
        "volume_similarity": 0.9,
        "hd95": 3.0,
    }


def _fake_run(row, centre, seed, dice, *, cases=4, aligned=None):
    per_case = {
        f"{centre}_{k:03d}": {"vessel": _case_metrics(dice + 0.01 * k), "aneurysm": _case_metrics(dice / 2)}
        for k in range(cases)
    }
    names = list(_case_metrics(0.5))
    means = {cls: {m: float(np.mean([c[cls][m] for c in per_case.values()])) for m in names} for cls in CLASSES}
    record = {
        "row": row,
        "test_domain": centre,
        "seed": seed,
        "train_seconds": 10.0,
        "unseen": means,
        "unseen_cases": per_case,
        "held_out": {"vessel": _case_metrics(0.9), "aneurysm": _case_metrics(0.6)},
    }
    if aligned is not None:
        record["telemetry"] = {"aligned": aligned, "grad_cos": 0.3}
    return record


def test_lodo_table_from_fabricated_runs(tmp_path):
    records = []
    for row, base in (("GS-EMA", 0.6), ("no EMA", 0.4), ("my variant", 0.5)):
        for c, s, d in (("0", 0, base), ("0", 1, base + 0.1), ("1", 0, base + 0.2), ("1", 1, base + 0.3)):
            records.append(_fake_run(row, c, s, d, aligned=0.75 if row == "GS-EMA" else None))
    paths = write_lodo_table(records, tmp_path, meta={"device": "test"})
    text = paths["markdown"].read_text()
    lines = text.splitlines()
    # Paper order first, then rows it does not know.
    order = [ln.split("|")[1].strip() for ln in lines if ln.startswith("| ") and "±" in ln]
    assert order[:3] == ["no EMA", "GS-EMA", "my variant"]
    no_ema = next(ln for ln in lines if ln.startswith("| no EMA |")).split("|")
    values = [0.4 + 0.015, 0.5 + 0.015, 0.6 + 0.015, 0.7 + 0.015]  # run means over 4 cases (+0.00 .. +0.03)
    # mean ± sample sd over the 2 seeds x 2 centres, in percent; no effect against itself; held-out 90 ± 0; 4 runs
    assert no_ema[2].strip() == f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"
    assert no_ema[7].strip() == "—" and no_ema[8].strip() == "90.00 ± 0.00" and no_ema[-2].strip() == "4"
    # GS-EMA is +0.2 on every paired case: the effect and a degenerate interval that excludes 0
    gsema = next(ln for ln in lines if ln.startswith("| GS-EMA |")).split("|")
    assert gsema[7].strip() == "+20.00 [+20.00, +20.00] *"
    assert gsema[9].strip() == "75.0 ± 0.0" and gsema[10].strip() == "0.30 ± 0.00"
    per_centre = [ln for ln in lines if ln.startswith("| no EMA |")][1]
    assert per_centre.split("|")[2].strip() == f"{100 * 0.465:.2f} ± {100 * np.std([0.4, 0.5], ddof=1):.2f}"
    assert "61.52" in text  # the paper's row beside ours

    rows = list(csv.DictReader(paths["csv"].open()))
    cell = next(
        r
        for r in rows
        if r["row"] == "no EMA" and r["class"] == "vessel" and r["metric"] == "dice" and r["scope"] == "unseen"
    )
    assert float(cell["mean"]) == pytest.approx(np.mean(values)) and cell["n"] == "4"
    effects = list(csv.DictReader(paths["effects"].open()))
    variant = next(r for r in effects if r["row"] == "my variant" and r["class"] == "vessel" and r["metric"] == "dice")
    assert float(variant["difference"]) == pytest.approx(0.1) and variant["pairs"] == "16"
    assert len(list(csv.DictReader(paths["runs"].open()))) == len(records) * 2 * 2
    with pytest.raises(ValueError, match="no runs"):
        write_lodo_table([], tmp_path)


def test_presets_name_real_rows_and_fit_their_purpose():
    quick, full = PRESETS["quick"], PRESETS["full"]
    assert set(quick.rows) <= set(ABLATION_ROWS) and set(full.rows) == set(ABLATION_ROWS)
    assert "no EMA, no T" in quick.rows and lodo_mod.BASELINE_ROW in quick.rows
    assert quick.seeds == 3 and quick.domains == ("3",) and full.seeds == 5 and full.domains is None
    load_config("demo", list(quick.overrides))  # the preset's overrides are valid keys


def test_no_t_row_turns_every_target_component_off():
    cfg = with_overrides(load_config("demo"), *lodo_mod._row_overrides("no EMA, no T", load_config("demo")))
    raw = config_to_dict(cfg)["target_transform"]
    assert raw and not any(section["enabled"] for section in raw.values())
    assert cfg.ema.mode == "none" and cfg.loss.lambda_con == 0


# ------------------------------------------------------------------------------------------------ orchestration
def _save_checkpoint(path, cfg):
    """What gsema_fast.train writes, as far as lodo reads it: the run's config, its dataset's identity, weights."""
    net = build_model(cfg.model)
    torch.save(
        {
            "config": config_to_dict(run_config(cfg)),
            "dataset": dataset_identity(load_manifest(cfg.data.root)),
            "student": net.state_dict(),
            "teacher": net.state_dict(),
            "step": 7,
            "epoch": 1,
        },
        path,
    )
    return path


class FakeTrain:
    """Stands in for gsema_fast.train.train: same signature and result, an untrained network as the checkpoint;
    ``fail_at``: the call (1-based) that is interrupted as Ctrl-C would."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls = []
        self.fail_at = fail_at

    def __call__(self, cfg, *, resume=False, overwrite=False, evaluate_unseen=True):
        assert not evaluate_unseen, "lodo scores the unseen centre itself"
        self.calls.append(cfg)
        if len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        out = Path(cfg.train.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return {"run_dir": out, "final": _save_checkpoint(out / "final.pt", cfg), "best": None}


TINY_LODO = [
    "model.channels=[4,8,16]",
    "model.num_res_units=0",
    "data.patch_size=[16,16,16]",
    "data.synth_domains=2",
    "data.synth_cases_per_domain=2",
    "data.val_per_domain=1",
    "data.synth_size=20",
    "loss.lambda_con=0.3",
]


def test_lodo_orchestrates_training_and_evaluation(tmp_path, monkeypatch):
    fake_train = FakeTrain()
    calls = fake_train.calls
    monkeypatch.setattr(lodo_mod, "train", fake_train)
    cfg = load_config("demo", TINY_LODO)
    before = copy.deepcopy(cfg)
    result = lodo(cfg, seeds=2, rows=["no EMA", "gs-ema-bacl"], out_dir=tmp_path / "lodo")
    assert cfg == before, "the caller's config is left alone"
    assert len(calls) == 2 * 2 * 2 and len(result["records"]) == 8
    seen = {(c.ema.mode, str(c.data.test_domain), c.train.seed) for c in calls}
    assert seen == {(m, d, s) for m in ("none", "gsema") for d in ("0", "1") for s in (0, 1)}
    bacl = [c for c in calls if c.ema.mode == "gsema"]
    # The no-EMA row turns BACL off; that must not leak into the rows after it.
    assert all(c.loss.lambda_con == 0.3 and c.bacl.volume and c.bacl.boundary for c in bacl)
    assert all(c.loss.lambda_con == 0 for c in calls if c.ema.mode == "none")
    assert lodo_mod._row_overrides("GS-EMA + BACL-B", cfg) == (
        "ema.mode=gsema",
        "bacl.volume=false",
        "bacl.boundary=true",
    )
    no_bacl = with_overrides(cfg, "loss.lambda_con=0")
    assert lodo_mod._row_overrides("GS-EMA + BACL-V", no_bacl)[-1] == "loss.lambda_con=0.5"  # the paper's weight
    assert all(c.data.root == str(tmp_path / "lodo" / "synth") and c.data.train_domains is None for c in calls)
    assert all(c.train.out_dir.endswith(f"centre-{c.data.test_domain}/seed-{c.train.seed}") for c in calls)
    record = result["records"][0]
    assert set(record["unseen"]) == {"vessel", "aneurysm"} and set(record["held_out"]) == {"vessel", "aneurysm"}
    assert len(record["unseen_cases"]) == 2  # per case, for the paired intervals
    text = result["tables"]["markdown"].read_text()
    assert "| no EMA |" in text and "| GS-EMA + BACL |" in text

    # Runs evaluated before are read back, not trained again.
    again = lodo(cfg, seeds=2, rows=["no EMA", "GS-EMA + BACL"], out_dir=tmp_path / "lodo")
    assert len(calls) == 8 and again["records"][3]["unseen"] == result["records"][3]["unseen"]
    assert again["records"][3]["unseen_cases"] == result["records"][3]["unseen_cases"]
    with pytest.raises(ValueError, match="not an ablation row"):
        lodo(cfg, rows=["EMAA"], out_dir=tmp_path / "lodo")
    with pytest.raises(ValueError, match="preset='fast'"):
        lodo(cfg, preset="fast", out_dir=tmp_path / "lodo")

    # A preset sets rows, centres and seeds; explicit arguments win.
    calls.clear()
    lodo(cfg, preset="quick", rows=["no EMA"], domains=["1"], seeds=1, out_dir=tmp_path / "preset")
    assert len(calls) == 1 and calls[0].train.epochs == 2 and str(calls[0].data.test_domain) == "1"


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def _run_list(out: Path) -> list[tuple]:
    return [(r["row"], str(r["test_domain"]), r["seed"]) for r in map(json.loads, (out / "runs.jsonl").open())]


def test_lodo_reuses_only_runs_made_with_its_settings(tmp_path, monkeypatch):
    """A finished run is read back only when its checkpoint shows the settings, dataset and seed the study would
    train it with; otherwise the study is refused in one line naming the differences, and nothing in the folder
    changes, or (overwrite) that run is trained again."""
    fake_train = FakeTrain()
    monkeypatch.setattr(lodo_mod, "train", fake_train)
    cfg = load_config("demo", TINY_LODO)
    out = tmp_path / "lodo"
    study = dict(rows=["no EMA"], domains=["1"], seeds=2, out_dir=out)
    lodo(cfg, **study)
    assert len(fake_train.calls) == 2
    before = _digests(out)

    changed = with_overrides(cfg, "optim.lr=0.5", "train.epochs=1")
    message = (
        r"lodo: .*no-ema/centre-1/seed-0 holds a finished run made with other settings than this study's "
        rf"\(optim\.lr: {re.escape(repr(cfg.optim.lr))} -> 0\.5; train\.epochs: {cfg.train.epochs} -> 1\): "
        r".*--overwrite"
    )
    with pytest.raises(ValueError, match=message):
        lodo(changed, **study)
    assert len(fake_train.calls) == 2 and _digests(out) == before  # no table written over the old results

    # the dataset: an image rewritten in place, as a new acquisition would be
    image = next((out / "synth" / "imagesTr").glob("A_000_0000.nii.gz"))
    image.write_bytes(image.read_bytes() + b"\0")
    with pytest.raises(
        ValueError, match=r"dataset: 1 image file\(s\) changed \(A_000: rewritten \(\d+ -> \d+ bytes\)\)"
    ):
        lodo(cfg, **study)
    image.write_bytes(image.read_bytes()[:-1])  # the same bytes again (a newer time): the same dataset
    lodo(cfg, **study)
    assert len(fake_train.calls) == 2

    result = lodo(changed, overwrite=True, **study)
    assert len(fake_train.calls) == 4 and all(c.optim.lr == 0.5 for c in fake_train.calls[2:])
    assert "- training: 1 epochs x" in result["tables"]["markdown"].read_text()  # the header and the runs agree
    assert _run_list(out) == [("no EMA", "1", 0), ("no EMA", "1", 1)]
    lodo(changed, **study)  # now the runs are the changed settings' own
    assert len(fake_train.calls) == 4 and _run_list(out) == [("no EMA", "1", 0), ("no EMA", "1", 1)]


def test_lodo_lists_each_run_once_and_drops_the_results_of_a_run_it_replaces(tmp_path, monkeypatch):
    cfg = load_config("demo", TINY_LODO)
    out = tmp_path / "lodo"
    study = dict(rows=["no EMA", "EMA"], domains=["1"], seeds=1, out_dir=out)
    monkeypatch.setattr(lodo_mod, "train", FakeTrain(fail_at=2))  # Ctrl-C in the second run
    with pytest.raises(KeyboardInterrupt):
        lodo(cfg, **study)
    assert _run_list(out) == [("no EMA", "1", 0)]
    fake_train = FakeTrain()
    monkeypatch.setattr(lodo_mod, "train", fake_train)
    lodo(cfg, **study)  # the interrupted study resumes: only the second run trains
    assert len(fake_train.calls) == 1 and _run_list(out) == [("no EMA", "1", 0), ("EMA", "1", 0)]
    lodo(cfg, **study)
    assert _run_list(out) == [("no EMA", "1", 0), ("EMA", "1", 0)]

    # a run trained again that fails on the way leaves no result of the run it replaced behind
    monkeypatch.setattr(lodo_mod, "train", FakeTrain(fail_at=1))
    with pytest.raises(KeyboardInterrupt):
        lodo(with_overrides(cfg, "optim.lr=0.5"), overwrite=True, **study)
    run = out / "no-ema" / "centre-1" / "seed-0"
    assert not (run / "evaluation" / "summary.json").exists() and not (run / "lodo_timing.json").exists()
    assert (out / "ema" / "centre-1" / "seed-0" / "evaluation" / "summary.json").is_file()  # not reached: kept


# ------------------------------------------------------------------------------------------------ protocol
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("phantoms"), domains=3, cases_per_domain=2, size=32, seed=0)


def test_unseen_centre_is_read_only_after_training_and_scored_like_evaluate(
    phantoms, tmp_path, monkeypatch, one_thread
):
    """The trainer never scores the unseen centre before its last step; it scores the checkpoint chosen on the
    training centres' validation cases (best.pt), in mm and ml, with the numbers `evaluate` gives."""
    events = []
    scored = train_mod.score_volumes

    def spy(*args, desc, **kwargs):
        events.append(("unseen" if "unseen" in desc else "validation", desc))
        return scored(*args, desc=desc, **kwargs)

    real_step = train_mod.train_step

    def step_spy(*args, **kwargs):
        events.append(("step", ""))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "score_volumes", spy)
    monkeypatch.setattr(train_mod, "train_step", step_spy)
    cfg = load_config("demo", [*tiny_run(phantoms), f"train.out_dir={tmp_path / 'run'}", "train.epochs=3"])
    result = train_mod.train(cfg)
    kinds = [k for k, _ in events]
    first_unseen = kinds.index("unseen")
    assert "step" not in kinds[first_unseen:] and "validation" not in kinds[first_unseen:]
    assert kinds.count("validation") == 3 and kinds.count("unseen") == 2  # the chosen and the untrained teacher

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["checkpoint"] == str(result["best"])
    best = torch.load(result["best"], map_location="cpu", weights_only=False)
    assert summary["validation"]["step"] == best["step"]
    assert summary["validation"]["dice"]["vessel"] == pytest.approx(best["best_val"]["dice"]["vessel"])
    again = evaluate(result["best"], split="test", out_dir=tmp_path / "eval", device="cpu")
    by_case = {r["case"]: r["metrics"] for r in again["metric_per_case"]}
    for case in summary["test"]["cases"]:
        for cls in CLASSES:
            mine, theirs = case[cls], by_case[case["case"]][cls]
            for metric in ("dice", "hd95", "ref_ml", "pred_ml"):
                if theirs[metric] is None:
                    assert mine[metric] is None
                else:
                    assert mine[metric] == pytest.approx(theirs[metric], rel=1e-5), (case["case"], cls, metric)
