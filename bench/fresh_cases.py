"""Score checkpoints on fresh cases of their training centres: ``python -m bench.fresh_cases RUN [RUN ...]``.

A run's validation split holds a few cases per training centre (the demo: six per centre), so its held-out Dice moves
with which sacs were drawn into it, and ``best.pt`` was chosen on those very cases. The built-in phantoms are
deterministic per (seed, centre, case index), so the cases after a run's own ``synth_cases_per_domain`` are new draws
of the same centres that no run trained, validated or chose a checkpoint on. This scores every given run (a run
folder: its ``checkpoints/best.pt``; or a checkpoint file) on the same ``--cases`` fresh cases per training centre,
after the largest dataset any of them used, and on the unseen centre, with the trainer's own scoring path
(:func:`gsema_fast.evaluation.scoring.score_volumes`). Choices between configurations read the fresh source-centre
figures only; the unseen-centre ones are printed for the record.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from gsema_fast.data import Preprocessing, builtin_dataset, dataset_folder, load_manifest, run_domains, volume_loader
from gsema_fast.data.phantoms.writer import FORMAT_VERSION
from gsema_fast.evaluation.scoring import score_volumes
from gsema_fast.files import write_json
from gsema_fast.inference import load_checkpoint

log = logging.getLogger("bench.fresh_cases")

# Fresh cases grouped by the dome diameter of their largest sac (mm): under 4.5 mm a sac is often no wider than its
# parent vessel, and these are the sacs a model misses; from 6 mm on it finds nearly every one.
SIZE_BANDS = (("under 4.5 mm", 0.0, 4.5), ("4.5-6 mm", 4.5, 6.0), ("6 mm and over", 6.0, float("inf")))
# A sac counts as found when its case's aneurysm Dice exceeds this (a found sac scores 0.5-0.9, a missed one ~0).
FOUND_DICE = 0.1


def synthesis_of(cfg, data: str | Path | None = None) -> dict:
    """The synthesis settings (domains, cases_per_domain, size, seed) of the dataset a run trained on (``data``, or
    the folder its config names); ValueError when it is not the built-in phantoms."""
    root = Path(data) if data is not None else dataset_folder(cfg.data)
    manifest = json.loads((root / "dataset.json").read_text())
    if "synth" not in manifest:
        raise ValueError(f"{root}: not built-in phantoms (dataset.json has no 'synth' entry): no fresh cases to draw")
    if manifest["synth"].get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{root}: phantoms of format {manifest['synth'].get('version')}, but this generator draws format "
            f"{FORMAT_VERSION}: fresh cases would come from another distribution"
        )
    return {key: manifest["synth"][key] for key in ("domains", "cases_per_domain", "size", "seed")}


def fresh_split(man, centres: list[str], first: int, count: int) -> list:
    """Cases ``first .. first + count - 1`` of each centre in ``centres`` (cases are listed in index order)."""
    cases = [c for d in centres for c in man.cases_of(d)[first : first + count]]
    if len(cases) != count * len(centres):
        raise ValueError(f"{man.path}: fewer than {first + count} cases in some of the centres {centres}")
    return cases


def load_runs(
    runs: list[str], cases: int, data: str | Path | None = None
) -> tuple[list[Path], list, list[dict], int, Any]:
    """The runs' checkpoints (a run folder: its ``checkpoints/best.pt``), loaded on the CPU, their synthesis settings,
    the index of the first fresh case, and the manifest of their phantom set grown by ``cases`` fresh cases per
    centre; ValueError when they trained on different phantom sets."""
    if cases < 1:
        raise ValueError(f"cases={cases}: expected at least 1 fresh case per centre")
    paths = [Path(r) / "checkpoints" / "best.pt" if Path(r).is_dir() else Path(r) for r in runs]
    loaded = [load_checkpoint(p, device="cpu") for p in paths]
    synths = [synthesis_of(ck.config, data) for ck in loaded]
    phantom_sets = {(s["domains"], s["size"], s["seed"]) for s in synths}
    if len(phantom_sets) > 1:
        raise ValueError(f"the runs trained on different phantom sets (domains, size, seed): {sorted(phantom_sets)}")
    first = max(s["cases_per_domain"] for s in synths)
    man = load_manifest(builtin_dataset(**{**synths[0], "cases_per_domain": first + cases}))
    return paths, loaded, synths, first, man


def largest_dome_mm(manifest_path: Path) -> dict[str, float]:
    """Each phantom case's largest dome diameter in mm, from the phantoms' dataset.json."""
    entries = json.loads(Path(manifest_path).read_text())["training"]
    return {e["case"]: max(e["dome_diameters_mm"]) for e in entries if e.get("dome_diameters_mm")}


def by_size(dice: dict[str, float], domes: dict[str, float]) -> dict[str, dict]:
    """Aneurysm Dice per case (``dice``) grouped into :data:`SIZE_BANDS` by the case's largest dome: per band the
    number of cases, their mean Dice and how many sacs were found (Dice > :data:`FOUND_DICE`)."""
    bands = {}
    for name, low, high in SIZE_BANDS:
        values = [d for case, d in dice.items() if low <= domes[case] < high]
        bands[name] = {
            "cases": len(values),
            "dice": statistics.fmean(values) if values else float("nan"),
            "found": sum(d > FOUND_DICE for d in values),
        }
    return bands


def score_runs(runs: list[str], cases: int, data: str | Path | None = None) -> dict:
    """Per run (keyed by its checkpoint path): the mean Dice per class and the aneurysm Dice per case on the fresh
    cases (``fresh``) and on the unseen centre's cases of its own dataset (``unseen``), and for each the aneurysm
    figures by sac size (``by_size``, see :func:`by_size`). ``data``: the phantoms' folder the runs trained on, where
    it is not (or no longer) the one their checkpoints name."""
    paths, loaded, synths, first, man = load_runs(runs, cases, data)
    domes = largest_dome_mm(man.path)
    results = {"first_fresh_case": first, "cases_per_centre": cases, "runs": {}}
    for path, ck, synth in zip(paths, loaded, synths, strict=True):
        centres, unseen = run_domains(man, ck.config.data)
        split = {
            "fresh": fresh_split(man, centres, first, cases),
            # the unseen centre's cases of the run's own dataset: those its trainer scored
            "unseen": fresh_split(man, [unseen], 0, synth["cases_per_domain"]),
        }
        preprocessing = Preprocessing.from_config(ck.config.data)
        scored = {}
        for name, chosen in split.items():
            loader = volume_loader(chosen, preprocessing, labels=man.labels)
            s = score_volumes(ck.net, loader, man.labels, ck.config, desc=f"{path.parent.parent.name} {name}")
            dice = {c["case"]: c["aneurysm"]["dice"] for c in s["cases"]}
            scored[name] = {"mean": s["mean"], "cases": dice, "by_size": by_size(dice, domes)}
        results["runs"][str(path)] = scored
        log.info(
            "%s: fresh %s | unseen %s",
            path,
            {c: round(v, 3) for c, v in scored["fresh"]["mean"].items()},
            {c: round(v, 3) for c, v in scored["unseen"]["mean"].items()},
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (their checkpoints/best.pt) or checkpoint files")
    parser.add_argument("--cases", type=int, default=8, help="fresh cases per training centre (default: 8)")
    parser.add_argument("--out", help="write the per-run and per-case Dice here (JSON)")
    parser.add_argument(
        "--data", help="the phantoms' folder the runs trained on (default: the one their checkpoints name)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        results = score_runs(args.runs, args.cases, args.data)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    runs = list(results["runs"].values())
    for name in ("fresh", "unseen"):
        for cls in runs[0][name]["mean"]:
            values = [r[name]["mean"][cls] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            log.info("%-6s %-9s mean %.3f  sd %.3f  (%d runs)", name, cls, statistics.fmean(values), sd, len(values))
        for band, _, _ in SIZE_BANDS:
            found = [r[name]["by_size"][band]["found"] for r in runs]
            dice = [r[name]["by_size"][band]["dice"] for r in runs]
            log.info(
                "%-6s sacs %-13s found %s of %d, aneurysm Dice %s",
                name,
                band,
                " / ".join(map(str, found)),
                runs[0][name]["by_size"][band]["cases"],
                " / ".join(f"{d:.2f}" for d in dice),
            )
    if args.out:
        write_json(results, args.out)


if __name__ == "__main__":
    main()
