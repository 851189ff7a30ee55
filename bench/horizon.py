"""The teacher's horizon: ``python -m bench.horizon STUDY [STUDY ...] --fresh FRESH.json [...] --out DIR``.

Each STUDY is a ``gsema-fast lodo`` folder (its ``runs.jsonl``), trained at one ``ema.decay_aligned``; each FRESH file
is what ``python -m bench.fresh_cases --out`` wrote for some of those runs. Per decay and row this writes
``horizon.md`` (and ``horizon.json``):

- the fresh training-centre cases (the figure a choice reads): each run's case mean, then mean ± sd over seeds, and
  the paired GS-EMA − EMA difference per seed (the rows share their student, seed for seed, so the difference is
  the gate's alone);
- the teacher against its own student on the validation cases through training (``train.val_student``): a teacher
  is worth having only where it beats the network it averages;
- the share of steps whose update went through (``aligned``) per quarter of training;
- the unseen centre, recorded beside, never read for a choice.

``horizon.png`` draws the teacher-minus-student validation Dice and the aligned share over training, per decay.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gsema_fast.files import atomic_path, write_json

log = logging.getLogger("bench.horizon")
CLASSES = ("vessel", "aneurysm")


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def read_run(record: dict, fresh: dict) -> dict:
    """One run: its decay, row, seed, fresh and unseen Dice, validation curve and aligned share over training."""
    folder = Path(record["run_dir"])
    config = yaml.safe_load((folder / "config.yaml").read_text())
    lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    val = [x for x in lines if x.get("kind") == "val" and "student_dice" in x]
    train = [x for x in lines if x.get("kind") == "train" and x.get("aligned") is not None]  # EMA logs none
    steps = max(x["step"] for x in lines if x.get("kind") == "train")
    quarters = [[x["aligned"] for x in train if q * steps / 4 < x["step"] <= (q + 1) * steps / 4] for q in range(4)]
    scored = fresh.get(str(folder / "checkpoints" / "best.pt"))
    return {
        "decay": config["ema"]["decay_aligned"],
        "row": record["row"],
        "seed": record["seed"],
        "fresh": scored["fresh"]["mean"] if scored else None,
        "unseen": {c: record["unseen"][c]["dice"] for c in CLASSES},
        "val": [(x["step"], x["dice"], x["student_dice"]) for x in val],
        "aligned": [statistics.fmean(q) if q else float("nan") for q in quarters],
    }


def collect(studies: list[str], fresh_files: list[str]) -> list[dict]:
    fresh = {}
    for path in fresh_files:
        fresh.update(json.loads(Path(path).read_text())["runs"])
    runs = []
    for study in studies:
        records = [json.loads(line) for line in (Path(study) / "runs.jsonl").read_text().splitlines() if line.strip()]
        latest = {(r["row"], r["test_domain"], r["seed"]): r for r in records}  # a rerun's record replaces the first
        runs += [read_run(r, fresh) for r in latest.values()]
    return runs


def table(runs: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for run in runs:
        groups[(run["decay"], run["row"])].append(run)
    lines = [
        "| decay | row | seeds | fresh vessel | fresh aneurysm | GS-EMA − EMA fresh aneurysm, per seed "
        "| teacher − student val aneurysm, last / largest over training | aligned per quarter "
        "| unseen vessel | unseen aneurysm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (decay, row), group in sorted(groups.items()):
        scored = [r for r in group if r["fresh"]]
        fresh = [mean_sd([r["fresh"][c] for r in scored]) if scored else "not scored" for c in CLASSES]
        if scored and len(scored) < len(group):
            fresh = [f"{f} ({len(scored)} of {len(group)} scored)" for f in fresh]
        paired = ""
        if row == "GS-EMA":
            ema = {r["seed"]: r for r in groups.get((decay, "EMA"), []) if r["fresh"]}
            diffs = [
                f"{r['fresh']['aneurysm'] - ema[r['seed']]['fresh']['aneurysm']:+.4f}"
                for r in scored
                if r["seed"] in ema
            ]
            paired = ", ".join(diffs)
        last = [r["val"][-1][1]["aneurysm"] - r["val"][-1][2]["aneurysm"] for r in group if r["val"]]
        peak = [max(v[1]["aneurysm"] - v[2]["aneurysm"] for v in r["val"]) for r in group if r["val"]]
        gap = f"{statistics.fmean(last):+.3f} / {statistics.fmean(peak):+.3f}" if last else "n/a"
        aligned = " ".join(f"{statistics.fmean(r['aligned'][q] for r in group):.2f}" for q in range(4))
        unseen = [mean_sd([r["unseen"][c] for r in group]) for c in CLASSES]
        lines.append(
            f"| {decay} | {row} | {len(group)} | {fresh[0]} | {fresh[1]} | {paired or '—'} | {gap} "
            f"| {aligned if row != 'EMA' else '—'} | {unseen[0]} | {unseen[1]} |"
        )
    return lines


def figure(runs: list[dict], path: Path) -> None:
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    gap_ax, aligned_ax = fig.subplots(1, 2)
    for decay in sorted({r["decay"] for r in runs}):
        gsema = [r for r in runs if r["decay"] == decay and r["row"] == "GS-EMA" and r["val"]]
        if not gsema:
            continue
        steps = [v[0] for v in gsema[0]["val"]]
        gap = [
            statistics.fmean(r["val"][i][1]["aneurysm"] - r["val"][i][2]["aneurysm"] for r in gsema)
            for i in range(len(steps))
        ]
        gap_ax.plot(steps, gap, marker="o", label=f"decay {decay}")
        aligned_ax.plot(
            [1, 2, 3, 4],
            [statistics.fmean(r["aligned"][q] for r in gsema) for q in range(4)],
            marker="o",
            label=f"decay {decay}",
        )
    gap_ax.axhline(0, color="grey", lw=0.8)
    gap_ax.set(
        xlabel="step", ylabel="teacher − student aneurysm Dice (validation)", title="Is the teacher worth having?"
    )
    aligned_ax.set(xlabel="quarter of training", ylabel="share of steps updating the teacher", title="GS-EMA's gate")
    for ax in (gap_ax, aligned_ax):
        ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", help="lodo output folders, one per decay")
    parser.add_argument("--fresh", nargs="*", default=[], help="bench.fresh_cases --out files for those runs")
    parser.add_argument("--out", required=True, help="folder for horizon.md, horizon.json and horizon.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = collect(args.studies, args.fresh)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = table(runs)
    with atomic_path(out / "horizon.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")
    write_json(runs, out / "horizon.json")
    figure(runs, out / "horizon.png")
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
