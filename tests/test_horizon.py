"""bench.horizon: the horizon table reads fresh-case figures paired by seed, the teacher-minus-student gap from the
validation log, and the aligned share per quarter of training."""

from __future__ import annotations

import json

import pytest

from bench import horizon


def fake_study(root, decay, rows, fresh_aneurysm):
    """A lodo folder at ``decay``: per row and seed a run with config, log and record; returns the fresh JSON."""
    records, fresh = [], {}
    for row in rows:
        for seed in (0, 1):
            run = root / f"h{decay}" / row / f"seed-{seed}"
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(f"ema: {{decay_aligned: {decay}}}\n")
            log = [
                {"kind": "train", "step": s, **({"aligned": 1.0 if s <= 4 else 0.5} if row == "GS-EMA" else {})}
                for s in range(1, 9)
            ]
            log += [
                {"kind": "val", "step": 4, "dice": {"aneurysm": 0.5}, "student_dice": {"aneurysm": 0.3}},
                {"kind": "val", "step": 8, "dice": {"aneurysm": 0.6}, "student_dice": {"aneurysm": 0.6}},
            ]
            (run / "log.jsonl").write_text("\n".join(json.dumps(x) for x in log) + "\n")
            dice = {"vessel": 0.8, "aneurysm": fresh_aneurysm[row][seed]}
            fresh[str(run / "checkpoints" / "best.pt")] = {"fresh": {"mean": dice}}
            records.append(
                {
                    "row": row,
                    "test_domain": "3",
                    "seed": seed,
                    "run_dir": str(run),
                    "unseen": {"vessel": {"dice": 0.5}, "aneurysm": {"dice": 0.2 + seed / 10}},
                }
            )
    (root / f"h{decay}" / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    path = root / f"fresh-{decay}.json"
    path.write_text(json.dumps({"runs": fresh}))
    return path


def test_the_table_pairs_seeds_and_reads_the_logs(tmp_path):
    fresh = fake_study(tmp_path, 0.99, ["EMA", "GS-EMA"], {"EMA": [0.5, 0.6], "GS-EMA": [0.55, 0.58]})
    lines = horizon.table(horizon.collect([str(tmp_path / "h0.99")], [str(fresh)]))
    ema, gsema = lines[2].split(" | "), lines[3].split(" | ")
    assert ema[1] == "EMA" and gsema[1] == "GS-EMA"
    assert gsema[4] == "0.565 ± 0.021"  # fresh aneurysm over the two seeds
    assert gsema[5] == "+0.0500, -0.0200"  # paired by seed against EMA
    assert gsema[6] == "+0.000 / +0.200"  # teacher - student: at the last validation, and the largest
    assert gsema[7] == "1.00 1.00 0.50 0.50"  # aligned share per quarter of 8 steps
    assert ema[7] == "—" and gsema[9] == "0.250 ± 0.071 |"


def test_an_unscored_run_says_so_and_the_figure_is_written(tmp_path):
    fake_study(tmp_path, 0.9, ["EMA", "GS-EMA"], {"EMA": [0.5, 0.6], "GS-EMA": [0.5, 0.6]})
    runs = horizon.collect([str(tmp_path / "h0.9")], [])
    assert "not scored" in horizon.table(runs)[3]
    fresh = json.loads((tmp_path / "fresh-0.9.json").read_text())
    one = {k: v for k, v in fresh["runs"].items() if "seed-0" in k}
    (tmp_path / "one.json").write_text(json.dumps({"runs": one}))
    assert (
        "(1 of 2 scored)" in horizon.table(horizon.collect([str(tmp_path / "h0.9")], [str(tmp_path / "one.json")]))[3]
    )
    horizon.figure(runs, tmp_path / "horizon.png")
    assert (tmp_path / "horizon.png").read_bytes()[:4] == b"\x89PNG"


def test_a_folder_without_runs_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs.jsonl"):
        horizon.collect([str(tmp_path)], [])
