"""Choose the inference's options on the training centres: ``python -m bench.postprocess RUN [RUN ...] --cases 16``.

Each run's ``best.pt`` teacher segments its own validation cases (held-out cases of its training centres) and
``--cases`` fresh cases of each training centre (as ``bench.fresh_cases`` draws them); every candidate rule of
:mod:`gsema_fast.inference.postprocess` is applied to the same predictions (with ``--mirror-axes``, also to those of
test-time mirroring, ``eval.mirror_axes``), and the Dice per class is compared with the plain argmax, paired by run.
The unseen centre is not looked at: an option is adopted only where it helps on the training centres' cases.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import numpy as np

from bench.fresh_cases import fresh_split, load_runs
from gsema_fast.config import Postprocess, replace
from gsema_fast.data import Preprocessing, builtin_dataset, load_manifest, run_domains, split_cases, volume_loader
from gsema_fast.evaluation.metrics import case_metrics, voxel_spacing
from gsema_fast.evaluation.scoring import volume_logits
from gsema_fast.files import write_json
from gsema_fast.inference.postprocess import label_map

log = logging.getLogger("bench.postprocess")

RULES = {
    "none": Postprocess(),
    "largest aneurysm": Postprocess(keep_largest=["aneurysm"]),
    "largest vessel": Postprocess(keep_largest=["vessel"]),
    "aneurysm touching vessel": Postprocess(attached=[["aneurysm", "vessel"]]),
    "largest vessel, aneurysm touching it": Postprocess(keep_largest=["vessel"], attached=[["aneurysm", "vessel"]]),
}


def candidates(mirror_axes: list[int] | None = None) -> dict[str, tuple[bool, Postprocess]]:
    """Each candidate's name, whether it mirrors, and its rules: every rule, and with ``mirror_axes`` every rule on
    the mirrored predictions too."""
    out = {name: (False, rule) for name, rule in RULES.items()}
    if mirror_axes:
        out |= {("mirrored" if name == "none" else f"mirrored, {name}"): (True, rule) for name, rule in RULES.items()}
    return out


def score_rules(
    runs: list[str], cases: int, data: str | Path | None = None, mirror_axes: list[int] | None = None
) -> dict:
    """Per run, scope (``validation``, ``fresh``) and candidate: the mean Dice per class over the scope's cases."""
    paths, loaded, synths, first, man = load_runs(runs, cases, data)
    chosen_candidates = candidates(mirror_axes)
    results: dict = {}
    for path, ck, synth in zip(paths, loaded, synths, strict=True):
        centres, _ = run_domains(man, ck.config.data)
        own = load_manifest(builtin_dataset(**synth))  # the dataset this run was split from
        scopes = {
            # the cases the trainer validated on and chose best.pt by: its own split of its own dataset
            "validation": split_cases(own, ck.config.data, seed=ck.config.train.seed).val,
            "fresh": fresh_split(man, centres, first, cases),
        }
        preprocessing = Preprocessing.from_config(ck.config.data)
        plain_cfg = replace(ck.config, eval=replace(ck.config.eval, mirror_axes=[]))
        mirrored_cfg = replace(ck.config, eval=replace(ck.config.eval, mirror_axes=list(mirror_axes or [])))
        per_run: dict = {}
        for scope, chosen in scopes.items():
            dice: dict[str, dict[str, list[float]]] = {name: {} for name in chosen_candidates}
            for item in volume_loader(chosen, preprocessing, labels=man.labels):
                logits = {False: volume_logits(ck.net, item, plain_cfg, amp=None, device=ck.device)}
                if mirror_axes:
                    logits[True] = volume_logits(ck.net, item, mirrored_cfg, amp=None, device=ck.device)
                reference = item["label"][0, 0].cpu()
                spacing = voxel_spacing(np.asarray(item["image"].affine))
                for name, (mirrored, rule) in chosen_candidates.items():
                    prediction = label_map(logits[mirrored][0], man.labels, rule)
                    metrics = case_metrics(prediction, reference, man.labels, spacing, hd95=False)
                    for cls, m in metrics.items():
                        dice[name].setdefault(cls, []).append(m["dice"])
            per_run[scope] = {name: {c: float(np.nanmean(v)) for c, v in d.items()} for name, d in dice.items()}
            log.info(
                "%s %s: %s", path, scope, {r: {c: round(v, 3) for c, v in d.items()} for r, d in per_run[scope].items()}
            )
        results[str(path)] = per_run
    return results


def table(results: dict) -> str:
    """Markdown: per scope, rule and class, the mean ± sd over runs and the paired difference from ``none``."""
    runs = list(results.values())
    lines = ["| scope | rule | class | Dice (mean ± sd over runs) | Δ vs none, per run |", "|---|---|---|---|---|"]
    for scope in runs[0]:
        for rule in runs[0][scope]:
            for cls in runs[0][scope][rule]:
                values = [r[scope][rule][cls] for r in runs]
                sd = statistics.stdev(values) if len(values) > 1 else float("nan")
                deltas = ", ".join(f"{r[scope][rule][cls] - r[scope]['none'][cls]:+.3f}" for r in runs)
                lines.append(f"| {scope} | {rule} | {cls} | {statistics.fmean(values):.3f} ± {sd:.3f} | {deltas} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (their checkpoints/best.pt) or checkpoint files")
    parser.add_argument("--cases", type=int, default=8, help="fresh cases per training centre (default: 8)")
    parser.add_argument("--data", help="the phantoms' folder the runs trained on (default: the one they name)")
    parser.add_argument("--out", help="write the per-run Dice here (JSON)")
    parser.add_argument(
        "--mirror-axes",
        type=int,
        nargs="+",
        choices=(0, 1, 2),
        help="also score test-time mirroring along these spatial axes (eval.mirror_axes; 2^n passes per case)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        results = score_rules(args.runs, args.cases, args.data, args.mirror_axes)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    sys.stdout.write(table(results))
    if args.out:
        write_json(results, args.out)


if __name__ == "__main__":
    main()
