"""Leave-one-centre-out experiments: tables, paired bootstrap intervals, the records a table is rebuilt from,
presets, and the protocol that keeps the unseen centre unseen until the end."""

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

import gsema_fast.experiments.lodo.run as lodo_mod
import gsema_fast.experiments.lodo.study as study_mod
import gsema_fast.training.loop as train_mod
from gsema_fast.cli import main as cli_main
from gsema_fast.config import config_to_dict, load_config, with_overrides
from gsema_fast.data import dataset_identity, load_manifest
from gsema_fast.evaluation.evaluate import evaluate
from gsema_fast.experiments.lodo import (
    ABLATION_ROWS,
    PRESETS,
    RECORDS_FILE,
    TABLE_METRICS,
    lodo,
    paired_bootstrap,
    read_lodo_records,
    rebuild_lodo_table,
    write_lodo_table,
)
from gsema_fast.models import build_model
from gsema_fast.training.checkpoints import run_config

# tiny tensors: a second thread only adds synchronisation
pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("vessel", "aneurysm")
TABLES = ("markdown", "csv", "effects", "runs", "records")


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


def test_bootstrap_weighs_each_run_alike_not_each_case():
    """Centre 0 has 2 cases at +0.2, centre 1 has 10 at 0: the table's cells weigh each run alike (+0.1), and so
    must the effect (pooling the 12 cells would say +0.033). Every resample gives +0.1: a degenerate interval."""
    mean, low, high = paired_bootstrap({"0": np.full((1, 2), 0.2), "1": np.zeros((1, 10))})
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1), abs=1e-12)


def test_bootstrap_of_complete_equal_runs_is_the_mean_of_all_cells():
    """With every case defined and one centre, each run has the same cases, so the mean of run means is the mean
    of all cells, in the estimate and in every resample: the same draws give the interval of a pooled bootstrap."""
    rng = np.random.default_rng(3)
    diffs = rng.normal(0.02, 0.1, size=(3, 12))
    mean, low, high = paired_bootstrap({"3": diffs}, resamples=2000, seed=5)
    draws = np.random.default_rng(5)
    seed_draw, case_draw = draws.integers(0, 3, size=(2000, 3)), draws.integers(0, 12, size=(2000, 12))
    pooled = diffs[seed_draw[:, :, None], case_draw[:, None, :]].mean(axis=(1, 2))
    assert (mean, low, high) == pytest.approx((diffs.mean(), *np.percentile(pooled, [2.5, 97.5])), abs=1e-12)


def test_bootstrap_skips_undefined_cells_and_absent_runs():
    """Centre 0 has no run for the second seed (a NaN row) and one undefined case. Runs: 0.1 (centre 0, seed 0),
    0.3 and 0.5 (centre 1), so the estimate is 0.3. A seed draw of (0, 0) gives 0.2, (1, 1) 0.5 (centre 0 has no
    run), (0, 1) 0.3, each with probability >= 1/4, so the 95 % interval is [0.2, 0.5] exactly."""
    a = np.array([[0.1, np.nan, 0.1], [np.nan, np.nan, np.nan]])
    b = np.array([[0.3, 0.3, 0.3], [0.5, 0.5, 0.5]])
    mean, low, high = paired_bootstrap({"0": a, "1": b})
    assert (mean, low, high) == pytest.approx((0.3, 0.2, 0.5), abs=1e-12)
    assert all(math.isnan(v) for v in paired_bootstrap({"0": np.full((2, 2), np.nan)}))


@pytest.mark.parametrize(
    ("diffs", "kwargs", "match"),
    [
        ({"0": np.zeros(3)}, {}, r"diffs\['0'\] has shape \(3,\)"),
        ({"0": np.zeros((0, 3))}, {}, r"diffs\['0'\] has shape \(0, 3\)"),
        ({"0": np.zeros((2, 3)), "1": np.zeros((3, 3))}, {}, "same number of seed rows"),
        ({"0": np.zeros((1, 3))}, {"confidence": 1.5}, "confidence=1.5"),
        ({"0": np.zeros((1, 3))}, {"resamples": 0}, "resamples=0"),
    ],
)
def test_bootstrap_bad_input(diffs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(diffs, **kwargs)


# ------------------------------------------------------------------------------------------------ hand-made runs
def _found(dice, hd95=3.0):
    """One class of one case as metrics.case_metrics scores it: found (reference and prediction hold it)."""
    return {
        "dice": dice,
        "sensitivity": dice + 0.05,
        "jaccard": dice / (2 - dice),
        "volume_similarity": 0.9,
        "hd95": hd95,
        "tp": 10,
        "fp": 2,
        "fn": 3,
    }


def _missed():
    """The reference holds the class, the prediction none of it."""
    nan = math.nan
    return {
        "dice": 0.0,
        "sensitivity": 0.0,
        "jaccard": 0.0,
        "volume_similarity": 0.0,
        "hd95": nan,
        "tp": 0,
        "fp": 0,
        "fn": 20,
    }


def _false_alarm():
    """The reference lacks the class, the prediction holds some."""
    nan = math.nan
    return {
        "dice": 0.0,
        "sensitivity": nan,
        "jaccard": 0.0,
        "volume_similarity": 0.0,
        "hd95": nan,
        "tp": 0,
        "fp": 5,
        "fn": 0,
    }


def _nothing():
    """Neither holds the class: every metric 0/0."""
    nan = math.nan
    return {
        "dice": nan,
        "sensitivity": nan,
        "jaccard": nan,
        "volume_similarity": nan,
        "hd95": nan,
        "tp": 0,
        "fp": 0,
        "fn": 0,
    }


def _run(row, centre, seed, cases, *, cls="aneurysm", **extra):
    """A run record of lodo with per-case metrics of one class on its unseen centre."""
    return {
        "row": row,
        "test_domain": centre,
        "seed": seed,
        "unseen_cases": {f"{centre}_{k:03d}": {cls: c} for k, c in enumerate(cases)},
        **extra,
    }


def _effect(paths, row, metric="dice", cls="aneurysm", centre="all", *, optional=False):
    rows = [
        r
        for r in csv.DictReader(paths["effects"].open())
        if (r["row"], r["metric"], r["class"], r["centre"]) == (row, metric, cls, centre)
    ]
    if optional and not rows:
        return None
    assert len(rows) == 1, (row, metric, cls, centre)
    out = {k: float(rows[0][k]) for k in ("difference", "ci_low", "ci_high", "row_mean", "baseline_mean")}
    return out | {"runs": int(rows[0]["runs"]), "pairs": int(rows[0]["pairs"])}


def _cell(paths, row, metric="dice", cls="aneurysm", scope="unseen", centre="all"):
    rows = list(csv.DictReader(paths["csv"].open()))
    (hit,) = [
        r
        for r in rows
        if (r["row"], r["metric"], r["class"], r["scope"], r["centre"]) == (row, metric, cls, scope, centre)
    ]
    return float(hit["mean"])


def _table_row(paths, row, cls="aneurysm"):
    """The main markdown table's cells of a row in a class's section, by column header."""
    lines = paths["markdown"].read_text().split(f"## {cls}\n", 1)[1].splitlines()
    header = next(ln for ln in lines if ln.startswith("| method |"))
    line = next(ln for ln in lines if ln.startswith(f"| {row} |"))
    names = [h.strip() for h in header.strip("|").split("|")]
    return dict(zip(names, (c.strip() for c in line.strip("|").split("|")), strict=True))


def _assert_effect(effect, difference, low, high, *, pairs, runs):
    got = (effect["difference"], effect["ci_low"], effect["ci_high"])
    assert got == pytest.approx((difference, low, high), abs=1e-12)
    assert (effect["pairs"], effect["runs"]) == (pairs, runs)
    # The point estimate is the difference of the two rows' statistics on the same pairs.
    assert effect["difference"] == pytest.approx(effect["row_mean"] - effect["baseline_mean"], abs=1e-12)


# ------------------------------------------------------------------------------------------------ the cases
def test_a_case_without_the_class_leaves_both_rows(tmp_path):
    """Two aneurysm-free cases: no EMA predicts a false positive (Dice 0), GS-EMA nothing (Dice undefined). They
    enter neither row: the DSC cells agree (60 and 60, not 30 against 60) and so does the effect, +0.00 over the
    6 pairs that have an aneurysm; the false positives show as false alarms (100 % against 0 %)."""
    records = []
    for seed in range(3):
        records.append(_run("no EMA", "3", seed, [_found(0.6), _found(0.6), _false_alarm(), _false_alarm()]))
        records.append(_run("GS-EMA", "3", seed, [_found(0.6), _found(0.6), _nothing(), _nothing()]))
    paths = write_lodo_table(records, tmp_path)
    base, row = _table_row(paths, "no EMA"), _table_row(paths, "GS-EMA")
    assert base["DSC (%)"] == row["DSC (%)"] == "60.00 ± 0.00"
    assert row["Δ DSC vs no EMA [95% CI]"] == "+0.00 [+0.00, +0.00]"
    assert (base["false alarm (%)"], row["false alarm (%)"]) == ("100.00 ± 0.00", "0.00 ± 0.00")
    assert "Cases with aneurysm in the reference: unseen centre 3, 2 of 4. The others" in paths["markdown"].read_text()
    dice = _effect(paths, "GS-EMA")
    _assert_effect(dice, 0.0, 0.0, 0.0, pairs=6, runs=3)
    assert dice["difference"] == pytest.approx(_cell(paths, "GS-EMA") - _cell(paths, "no EMA"), abs=1e-12)
    _assert_effect(_effect(paths, "GS-EMA", "false_alarm"), -1.0, -1.0, -1.0, pairs=6, runs=3)


def test_a_miss_is_not_dropped_from_one_side(tmp_path):
    """No EMA finds all 4 sacs (HD95 10 mm); GS-EMA misses 3 of 4 (the one it finds at 2 mm). HD95 is over the
    cases both found (3 pairs: one per seed, -8 mm), beside the share missed (+75 points over all 12 pairs); Dice
    counts each miss as 0: per case 0 or -0.8, mean -0.6. Its interval: a resample's mean is -0.8 k / 4 with k
    ~ Binomial(4, 3/4) misses drawn (the same cases under every seed), P(k = 4) = 0.32 and P(k <= 1) = 0.051,
    so [-0.8, -0.2]; the share missed likewise [+0.25, +1.00]."""
    records = []
    for seed in range(3):
        records.append(_run("no EMA", "3", seed, [_found(0.8, hd95=10.0)] * 4))
        records.append(_run("GS-EMA", "3", seed, [_found(0.8, hd95=2.0), _missed(), _missed(), _missed()]))
    paths = write_lodo_table(records, tmp_path)
    base, row = _table_row(paths, "no EMA"), _table_row(paths, "GS-EMA")
    assert (base["HD95 (mm)"], row["HD95 (mm)"]) == ("10.00 ± 0.00", "2.00 ± 0.00")
    assert (base["missed (%)"], row["missed (%)"]) == ("0.00 ± 0.00", "75.00 ± 0.00")
    assert row["Δ DSC vs no EMA [95% CI]"] == "-60.00 [-80.00, -20.00] *"
    hd95 = _effect(paths, "GS-EMA", "hd95")
    _assert_effect(hd95, -8.0, -8.0, -8.0, pairs=3, runs=3)
    assert (hd95["row_mean"], hd95["baseline_mean"]) == (2.0, 10.0)
    _assert_effect(_effect(paths, "GS-EMA", "missed"), 0.75, 0.25, 1.0, pairs=12, runs=3)
    dice = _effect(paths, "GS-EMA")
    _assert_effect(dice, -0.6, -0.8, -0.2, pairs=12, runs=3)
    for metric in ("dice", "missed"):
        difference = _cell(paths, "GS-EMA", metric) - _cell(paths, "no EMA", metric)
        assert _effect(paths, "GS-EMA", metric)["difference"] == pytest.approx(difference, abs=1e-12)


def test_each_run_weighs_the_same_in_cells_and_effects(tmp_path):
    """Centre 0 with 2 cases at +0.20 and centre 1 with 10 cases at 0: DSC 50 against 60, so the effect is +10
    points (pooling the cells would say +3.33), in every resample: [+10, +10]; per centre +20 and 0."""
    records = [
        _run("no EMA", "0", 0, [_found(0.5)] * 2),
        _run("no EMA", "1", 0, [_found(0.5)] * 10),
        _run("GS-EMA", "0", 0, [_found(0.7)] * 2),
        _run("GS-EMA", "1", 0, [_found(0.5)] * 10),
    ]
    paths = write_lodo_table(records, tmp_path)
    assert _table_row(paths, "no EMA")["DSC (%)"] == "50.00 ± 0.00"
    assert _table_row(paths, "GS-EMA")["DSC (%)"] == f"60.00 ± {100 * np.std([0.7, 0.5], ddof=1):.2f}"
    assert _table_row(paths, "GS-EMA")["Δ DSC vs no EMA [95% CI]"] == "+10.00 [+10.00, +10.00] *"
    dice = _effect(paths, "GS-EMA")
    _assert_effect(dice, 0.1, 0.1, 0.1, pairs=12, runs=2)
    assert dice["difference"] == pytest.approx(_cell(paths, "GS-EMA") - _cell(paths, "no EMA"), abs=1e-12)
    _assert_effect(_effect(paths, "GS-EMA", centre="0"), 0.2, 0.2, 0.2, pairs=2, runs=1)
    _assert_effect(_effect(paths, "GS-EMA", centre="1"), 0.0, 0.0, 0.0, pairs=10, runs=1)
    for centre in ("0", "1"):
        difference = _cell(paths, "GS-EMA", centre=centre) - _cell(paths, "no EMA", centre=centre)
        assert _effect(paths, "GS-EMA", centre=centre)["difference"] == pytest.approx(difference, abs=1e-12)


def test_unequal_seeds_per_row_pair_on_the_seeds_both_have(tmp_path):
    """No EMA has seeds 0-2, GS-EMA 0-1: the effect is over seeds 0 and 1 (+0.1 and +0.3: +0.2; a seed draw gives
    0.1, 0.2 or 0.3 with probabilities 1/4, 1/2, 1/4, so [+0.1, +0.3]), says so, and is the difference of the two
    rows' means over those seeds, not of the cells (70 against 40, which seed 2 of no EMA pulls down)."""
    records = [
        _run("no EMA", "3", 0, [_found(0.5)] * 4),
        _run("no EMA", "3", 1, [_found(0.5)] * 4),
        _run("no EMA", "3", 2, [_found(0.2)] * 4),
        _run("GS-EMA", "3", 0, [_found(0.6)] * 4),
        _run("GS-EMA", "3", 1, [_found(0.8)] * 4),
    ]
    paths = write_lodo_table(records, tmp_path)
    assert _table_row(paths, "no EMA")["DSC (%)"] == f"40.00 ± {100 * np.std([0.5, 0.5, 0.2], ddof=1):.2f}"
    assert _table_row(paths, "GS-EMA")["DSC (%)"] == f"70.00 ± {100 * np.std([0.6, 0.8], ddof=1):.2f}"
    assert _table_row(paths, "GS-EMA")["Δ DSC vs no EMA [95% CI]"] == "+20.00 [+10.00, +30.00] * (2 paired runs)"
    dice = _effect(paths, "GS-EMA")
    _assert_effect(dice, 0.2, 0.1, 0.3, pairs=8, runs=2)
    runs = list(csv.DictReader(paths["runs"].open()))
    paired = {r["row"]: [] for r in runs}
    for r in runs:
        if r["seed"] in ("0", "1"):
            paired[r["row"]].append(float(r["dice"]))
    assert (dice["row_mean"], dice["baseline_mean"]) == pytest.approx((np.mean(paired["GS-EMA"]), 0.5), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_effects_are_the_difference_of_the_cells_with_the_same_runs(tmp_path, seed):
    """Random studies (centres of different sizes, cases without the class, misses, three seeds, both rows with the
    same runs): every effect, pooled and per centre, is the difference of the two rows' cells, except HD95, which
    is over the cases both rows found and is the difference of the rows' means on those."""
    rng = np.random.default_rng(seed)
    sizes = {"0": 3, "1": 7}
    holds = {c: rng.random(n) < 0.75 for c, n in sizes.items()}
    for flags in holds.values():
        flags[:2] = (True, False)  # both kinds of case at every centre
    records = []
    for row in ("no EMA", "EMA"):
        for centre, n in sizes.items():
            for s in range(3):
                cases = []
                for k in range(n):
                    found = rng.random() < 0.7
                    if holds[centre][k]:
                        cases.append(
                            _found(float(rng.uniform(0.1, 0.9)), float(rng.uniform(1, 20))) if found else _missed()
                        )
                    else:
                        cases.append(_false_alarm() if found else _nothing())
                records.append(_run(row, centre, s, cases))
    paths = write_lodo_table(records, tmp_path)
    for centre in ("all", "0", "1"):
        for metric in TABLE_METRICS:
            effect = _effect(paths, "EMA", metric, centre=centre, optional=metric == "hd95")
            if metric == "hd95":
                assert effect is None or effect["difference"] == pytest.approx(
                    effect["row_mean"] - effect["baseline_mean"], abs=1e-12
                )
                continue
            difference = _cell(paths, "EMA", metric, centre=centre) - _cell(paths, "no EMA", metric, centre=centre)
            assert effect["difference"] == pytest.approx(difference, abs=1e-12), (centre, metric)
            assert effect["row_mean"] == pytest.approx(_cell(paths, "EMA", metric, centre=centre), abs=1e-12)
    with_class = sum(int(holds[c].sum()) for c in sizes)
    assert _effect(paths, "EMA")["pairs"] == 3 * with_class
    assert _effect(paths, "EMA", "false_alarm")["pairs"] == 3 * (sum(sizes.values()) - with_class)


# ------------------------------------------------------------------------------------------------ tables
def _study(rows=(("GS-EMA", 0.6), ("no EMA", 0.4), ("my variant", 0.5)), *, cases=4):
    """Runs of three rows on two centres and two seeds, both classes, held-out cases and telemetry."""
    records = []
    for row, base in rows:
        for centre, seed, dice in (("0", 0, base), ("0", 1, base + 0.1), ("1", 0, base + 0.2), ("1", 1, base + 0.3)):
            unseen = {
                f"{centre}_{k:03d}": {"vessel": _found(dice + 0.01 * k), "aneurysm": _found(dice / 2)}
                for k in range(cases)
            }
            held_out = {f"h_{k}": {"vessel": _found(0.9), "aneurysm": _found(0.6)} for k in range(2)}
            record = {
                "row": row,
                "test_domain": centre,
                "seed": seed,
                "train_seconds": 10.0 + seed,
                "unseen_cases": unseen,
                "held_out_cases": held_out,
                "unseen": {"ignored": {}},  # the runs' own means are not what the table averages
            }
            if row == "GS-EMA":
                record["telemetry"] = {"aligned": 0.75, "grad_cos": 0.3}
            records.append(record)
    return records


def test_lodo_table_from_fabricated_runs(tmp_path):
    records = _study()
    paths = write_lodo_table(records, tmp_path, meta={"device": "test"})
    text = paths["markdown"].read_text()
    lines = text.splitlines()
    # Paper order first, then rows it does not know.
    order = [ln.split("|")[1].strip() for ln in lines if ln.startswith("| ") and "±" in ln]
    assert order[:3] == ["no EMA", "GS-EMA", "my variant"]
    no_ema = _table_row(paths, "no EMA", "vessel")
    values = [0.4 + 0.015, 0.5 + 0.015, 0.6 + 0.015, 0.7 + 0.015]  # run means over 4 cases (+0.00 .. +0.03)
    # mean ± sample sd over the 2 seeds x 2 centres, in percent; no effect against itself; held-out 90 ± 0; 4 runs
    assert no_ema["DSC (%)"] == f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"
    assert no_ema["Δ DSC vs no EMA [95% CI]"] == "—" and no_ema["held-out source DSC (%)"] == "90.00 ± 0.00"
    assert no_ema["missed (%)"] == "0.00 ± 0.00" and no_ema["runs"] == "4"
    assert "false alarm (%)" not in no_ema  # every case holds both classes
    # GS-EMA is +0.2 on every paired case: the effect and a degenerate interval that excludes 0
    gsema = _table_row(paths, "GS-EMA", "vessel")
    assert gsema["Δ DSC vs no EMA [95% CI]"] == "+20.00 [+20.00, +20.00] *"
    assert gsema["aligned (%)"] == "75.0 ± 0.0" and gsema["cos"] == "0.30 ± 0.00"
    per_centre = [ln for ln in lines if ln.startswith("| no EMA |")][1]
    assert per_centre.split("|")[2].strip() == f"{100 * 0.465:.2f} ± {100 * np.std([0.4, 0.5], ddof=1):.2f}"
    assert "Cases with vessel in the reference: unseen centres 0, 4 of 4; 1, 4 of 4; held-out cases" in text
    assert "61.52" in text  # the paper's row beside ours
    assert "- device: test" in text

    assert _cell(paths, "no EMA", "dice", "vessel") == pytest.approx(np.mean(values))
    assert _cell(paths, "no EMA", "dice", "vessel", "held_out") == pytest.approx(0.9)
    variant = _effect(paths, "my variant", "dice", "vessel")
    assert variant["difference"] == pytest.approx(0.1) and variant["pairs"] == 16 and variant["runs"] == 4
    assert _effect(paths, "my variant", "dice", "vessel", centre="1")["pairs"] == 8
    runs = list(csv.DictReader(paths["runs"].open()))
    assert len(runs) == len(records) * 2 * 2  # run x scope x class
    assert {r["train_seconds"] for r in runs} == {"10.0", "11.0"}
    with pytest.raises(ValueError, match="no runs"):
        write_lodo_table([], tmp_path)


def _bad_records():
    good = _run("no EMA", "3", 0, [_found(0.5)])
    no_count = copy.deepcopy(good)
    del no_count["unseen_cases"]["3_000"]["aneurysm"]["fn"]
    other_dataset = _run("GS-EMA", "3", 0, [_false_alarm()])
    return [
        ([{k: v for k, v in good.items() if k != "unseen_cases"}], r"records\[0\]: no 'unseen_cases'"),
        ([good | {"seed": "0"}], r"records\[0\]: seed='0'; expected an integer"),
        ([good, copy.deepcopy(good)], r"records\[1\] \('no EMA', centre 3, seed 0\): the same run as records\[0\]"),
        ([no_count], r"unseen_cases\['3_000'\]\['aneurysm'\] has no 'fn'"),
        ([good | {"unseen_cases": {}}], "unseen_cases is {}"),
        ([good | {"held_out_cases": {"h": [1]}}], r"held_out_cases\['h'\] is \[1\]"),
        ([good, other_dataset], "the reference of case '3_000' lacks 'aneurysm', but not in records\\[0\\]"),
    ]


@pytest.mark.parametrize(("records", "match"), _bad_records())
def test_lodo_table_bad_input(tmp_path, records, match):
    with pytest.raises(ValueError, match=match):
        write_lodo_table(records, tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything is written


# ------------------------------------------------------------------------------------------------ records
def _odd_study():
    """Runs with every kind of case and value a table meets: misses, false alarms, 0/0 cases, a run without
    held-out cases, a missing seed, non-ASCII meta."""
    records = _study(cases=3)
    records[0]["unseen_cases"]["0_000"]["aneurysm"] = _missed()
    records[1]["unseen_cases"]["0_001"]["aneurysm"] = _missed()
    for rec in records:
        if rec["test_domain"] == "1":
            rec["unseen_cases"]["1_002"]["aneurysm"] = _false_alarm() if rec["seed"] else _nothing()
    del records[3]["held_out_cases"]
    del records[-1]  # "my variant" has no centre 1, seed 1
    records[2]["unseen_cases"]["1_000"]["vessel"]["dice"] = 1 / 3
    return records, {"config": "demo with train.epochs=2", "device": "CPU (2 threads) — ×", "seeds": "0, 1"}


def test_records_rebuild_every_table_byte_for_byte(tmp_path):
    records, meta = _odd_study()
    first = write_lodo_table(records, tmp_path / "study", meta=meta)
    again = rebuild_lodo_table(first["records"], tmp_path / "rebuilt")
    for name in TABLES:
        assert again[name].read_bytes() == first[name].read_bytes(), name
    # Rebuilding in place rewrites the same bytes.
    before = {name: first[name].read_bytes() for name in TABLES}
    rebuild_lodo_table(first["records"], tmp_path / "study")
    assert {name: first[name].read_bytes() for name in TABLES} == before
    back, back_meta = read_lodo_records(first["records"])
    assert back_meta == meta and len(back) == len(records)
    assert back[0]["unseen_cases"]["0_000"]["aneurysm"]["tp"] == 0
    assert math.isnan(back[0]["unseen_cases"]["0_000"]["aneurysm"]["hd95"])
    # One line per run and per run, scope, case and class: small, and readable in a diff.
    lines = first["records"].read_text().splitlines()
    cases = sum(len(r.get(f, {})) * 2 for r in records for f in ("unseen_cases", "held_out_cases"))
    assert len(lines) == 10 + len(records) + cases


def test_rebuild_refuses_a_folder_with_other_records(tmp_path):
    records, meta = _odd_study()
    first = write_lodo_table(records, tmp_path / "a", meta=meta)
    other = write_lodo_table(records[:4], tmp_path / "b", meta=meta)
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    with pytest.raises(ValueError, match=r"b/lodo_records.json holds other runs than .*a/lodo_records.json"):
        rebuild_lodo_table(first["records"], tmp_path / "b")
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before
    assert other["records"].is_file()


def _records_file(tmp_path, edit):
    records, meta = _odd_study()
    path = write_lodo_table(records, tmp_path / "study", meta=meta)["records"]
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(format="something else"), "not a lodo records file"),
        (lambda d: d.update(version=2), "version 2; this gsema-fast reads version 1"),
        (lambda d: d.update(case_columns=d["case_columns"][:-1]), "case_columns"),
        (lambda d: d.update(meta=[1]), "meta: expected an object"),
        (lambda d: d.update(runs=[]), "runs: expected a non-empty list"),
        (lambda d: d["runs"][1].pop("seed"), r"runs\[1\] is .*expected"),
        (lambda d: d["cases"][0].pop(), r"cases\[0\]: expected a list of run, scope"),
        (lambda d: d["cases"][3].__setitem__(0, 99), r"cases\[3\]: run is 99"),
        (lambda d: d["cases"][3].__setitem__(1, "train"), r"cases\[3\]: scope is 'train'"),
        (lambda d: d["cases"][3].__setitem__(4, "0.5"), r"cases\[3\]: dice is '0.5'"),
        (lambda d: d["cases"][3].__setitem__(9, -1), r"cases\[3\]: tp is -1"),
        (lambda d: d["runs"].append(dict(d["runs"][0])), r"runs\[\d+\]: no 'unseen_cases'"),
        (lambda d: d["runs"][1].update(d["runs"][0]), r"runs\[1\] .*the same run as runs\[0\]"),
    ],
)
def test_read_lodo_records_bad_input(tmp_path, edit, match):
    path = _records_file(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as err:
        read_lodo_records(path)
    assert str(err.value).startswith(str(path))


def test_read_lodo_records_not_json(tmp_path):
    path = tmp_path / RECORDS_FILE
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        read_lodo_records(path)


def test_lodo_table_command(tmp_path, caplog):
    records, meta = _odd_study()
    first = write_lodo_table(records, tmp_path / "study", meta=meta)
    assert cli_main(["lodo-table", str(first["records"]), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "lodo_table.md").read_bytes() == first["markdown"].read_bytes()
    caplog.clear()
    assert cli_main(["lodo-table", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.json" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "x").exists()


def test_presets_name_real_rows_and_fit_their_purpose():
    quick, full = PRESETS["quick"], PRESETS["full"]
    assert set(quick.rows) <= set(ABLATION_ROWS) and set(full.rows) == set(ABLATION_ROWS)
    assert "no EMA, no T" in quick.rows and study_mod.BASELINE_ROW in quick.rows
    assert quick.seeds == 3 and quick.domains == ("3",) and full.seeds == 5 and full.domains is None
    quick_cfg = load_config("demo", list(quick.overrides))  # the preset's overrides are valid keys
    assert quick_cfg.train.epochs * quick_cfg.train.steps_per_epoch == 1000 and quick_cfg.eval.mirror_axes == []


def test_no_t_row_turns_every_target_component_off():
    cfg = with_overrides(load_config("demo"), *study_mod.row_overrides("no EMA, no T", load_config("demo")))
    raw = config_to_dict(cfg)["target_transform"]
    assert raw and not any(section["enabled"] for section in raw.values())
    assert cfg.ema.mode == "none" and cfg.loss.lambda_con == 0


# ------------------------------------------------------------------------------------------------ orchestration
def _save_checkpoint(path, cfg):
    """What the training loop writes, as far as lodo reads it: the run's config, its dataset's identity, weights."""
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
    """Stands in for gsema_fast.training.loop.train: same signature and result, an untrained network as the checkpoint;
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
    assert study_mod.row_overrides("GS-EMA + BACL-B", cfg) == (
        "ema.mode=gsema",
        "bacl.volume=false",
        "bacl.boundary=true",
    )
    no_bacl = with_overrides(cfg, "loss.lambda_con=0")
    assert study_mod.row_overrides("GS-EMA + BACL-V", no_bacl)[-1] == "loss.lambda_con=0.5"  # the paper's weight
    # the EMA row averages at GS-EMA's decay, whatever ema.decay says: the two rows differ by the gate alone
    for decay in (0.9, 0.99):
        ema_row = with_overrides(
            cfg,
            f"ema.decay_aligned={decay}",
            *study_mod.row_overrides("EMA", with_overrides(cfg, f"ema.decay_aligned={decay}")),
        )
        assert (ema_row.ema.mode, ema_row.ema.decay, ema_row.loss.lambda_con) == ("ema", decay, 0)
    assert all(c.data.root == str(tmp_path / "lodo" / "synth") and c.data.train_domains is None for c in calls)
    assert all(c.train.out_dir.endswith(f"centre-{c.data.test_domain}/seed-{c.train.seed}") for c in calls)
    record = result["records"][0]
    assert set(record["unseen"]) == {"vessel", "aneurysm"} and set(record["held_out"]) == {"vessel", "aneurysm"}
    assert len(record["unseen_cases"]) == 2  # per case, for the paired intervals
    assert len(record["held_out_cases"]) == 1  # one held-out case of the one training centre
    text = result["tables"]["markdown"].read_text()
    assert "| no EMA |" in text and "| GS-EMA + BACL |" in text
    # The per-case metrics are in lodo_records.json, which rebuilds every table as written, and not in the journal.
    journal = [json.loads(ln) for ln in (tmp_path / "lodo" / "runs.jsonl").read_text().splitlines()]
    assert len(journal) == 8 and not any(k.endswith("_cases") for entry in journal for k in entry)
    rebuilt = rebuild_lodo_table(result["tables"]["records"], tmp_path / "rebuilt")
    assert all(rebuilt[n].read_bytes() == result["tables"][n].read_bytes() for n in TABLES)

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


@pytest.mark.slow
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
