"""Writing the phantoms: each case's NIfTI files, the dataset's ``dataset.json``, the worker processes that generate
the cases, and the checks that keep a dataset folder whole (:func:`synthesize`); the built-in dataset in a per-user
cache folder (:func:`builtin_dataset`) and a run's dataset folder (:func:`dataset_folder`).

Only numpy, scipy and nibabel are used by the generator (no torch): the cases are generated in worker processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from gsema_fast.data.phantoms.acquisition import scan_case
from gsema_fast.data.phantoms.anatomy import LABELS
from gsema_fast.data.phantoms.centres import CENTRES
from gsema_fast.files import atomic_path, cache_root
from gsema_fast.memory import available_memory

log = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
FORMAT_VERSION = 2  # bump when the generator changes, so that cached synthetic datasets are rebuilt


def _atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    """Write next to the target and rename over it, so an interruption never leaves a half-written file."""
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _case_name(domain: int, index: int) -> str:
    return f"{CENTRES[domain].name}_{index:03d}"


def _make_case(out_dir: str, domain: int, index: int, size: int, seed: int) -> dict:
    """Generate and write one case; returns its dataset.json entry. Deterministic in (seed, domain, index)."""
    style = CENTRES[domain]
    scan = scan_case(style, domain, index, size, seed)
    name = _case_name(domain, index)
    root = Path(out_dir)
    image_rel, label_rel = f"imagesTr/{name}_0000{FILE_ENDING}", f"labelsTr/{name}{FILE_ENDING}"
    _atomic_save(_nifti(scan.label, scan.affine), root / label_rel)
    _atomic_save(_nifti(scan.image, scan.affine), root / image_rel)
    return {
        "case": name,
        "image": f"./{image_rel}",
        "label": f"./{label_rel}",
        "domain": domain,
        "centre": style.name,
        "shape": list(scan.label.shape),
        "spacing": [round(float(s), 6) for s in scan.spacing],
        "aneurysms": len(scan.aneurysms),
        "dome_diameters_mm": [round(2 * float(a.axes.max()), 3) for a in scan.aneurysms],
        "aneurysm_voxels": int((scan.label == LABELS["aneurysm"]).sum()),
    }


def _complete(out: Path, params: dict) -> bool:
    """Whether ``out`` already holds the dataset these parameters produce (its manifest is written last)."""
    try:
        manifest = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("synth") != params:
        return False
    return all((out / e["image"]).is_file() and (out / e["label"]).is_file() for e in manifest.get("training", []))


# What this generator writes into imagesTr/ and labelsTr/: case files, and the temporary files of an interrupted write.
_OWN_FILE = re.compile(
    rf"(?:{'|'.join(c.name for c in CENTRES)})_\d{{3,}}(?:_0000)?{re.escape(FILE_ENDING)}"
    r"|\..+\.tmp\..+"
)


def _synthesised_params(out: Path) -> dict | None:
    """The settings of the synthesised dataset whose manifest ``out`` holds; None when it holds none."""
    try:
        manifest = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("name") != "gsema-synth":
        return None
    return manifest.get("synth") if isinstance(manifest.get("synth"), dict) else None


def _params(domains: int, cases_per_domain: int, size: int, seed: int) -> dict:
    """What decides a synthesised dataset's bytes, as its manifest records them."""
    return dict(domains=domains, cases_per_domain=cases_per_domain, size=size, seed=seed, version=FORMAT_VERSION)


def _describe(params: dict) -> str:
    return (
        f"{params.get('domains')} centre(s) x {params.get('cases_per_domain')} case(s), size {params.get('size')}, "
        f"seed {params.get('seed')}, format {params.get('version')}"
    )


# Generating one case of the finest centre peaks at about 47 bytes per voxel of its size^3 matrix (tracemalloc over
# the six centres at sizes 64 and 96: float32 fields, label and temporaries), whatever the size.
PEAK_BYTES_PER_VOXEL = 48


def _check_memory(size: int, workers: int) -> int:
    """Refuse a size one case of which cannot be generated in the available memory (``ValueError``), before anything
    is allocated or written; returns the number of worker processes whose cases fit at once."""
    need = PEAK_BYTES_PER_VOXEL * size**3
    available = available_memory()
    if available is None:
        return workers
    if need > available:
        largest = int((available / PEAK_BYTES_PER_VOXEL) ** (1 / 3))
        raise ValueError(
            f"synth: size={size} needs about {need / 2**30:.1f} GiB of memory to generate one case, and "
            f"{available / 2**30:.1f} GiB is available; choose a size of at most {largest}"
        )
    fit = max(1, available // need)
    if workers > fit:
        log.warning(
            "synth: %d worker process(es) would need %.1f GiB, %.1f GiB is available: using %d",
            workers,
            workers * need / 2**30,
            available / 2**30,
            fit,
        )
    return int(min(workers, fit))


def _own_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "synth" in manifest and manifest.get("name") == "gsema-synth"


def _foreign_files(out: Path) -> list[str]:
    """What ``out`` holds that this generator did not write (names relative to it); [] for a new or empty folder."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise NotADirectoryError(f"synth: {out} is a file, not a folder")
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name in ("imagesTr", "labelsTr") and entry.is_dir():
            foreign += [f"{entry.name}/{p.name}" for p in sorted(entry.iterdir()) if not _OWN_FILE.fullmatch(p.name)]
        elif entry.name == "dataset.json" and _own_manifest(entry):
            continue
        elif not (entry.name.startswith(".") and _OWN_FILE.fullmatch(entry.name)):  # dataset.json's temporary file
            foreign.append(entry.name)
    return foreign


def _remove_stale(out: Path, entries: dict[str, dict]) -> None:
    """After a (re)generation imagesTr/ and labelsTr/ hold exactly this dataset: cases of an earlier, larger one (or,
    with ``overwrite``, another dataset's files) would otherwise sit beside it."""
    keep = {Path(e[key]).name for e in entries.values() for key in ("image", "label")}
    stale = [p for sub in ("imagesTr", "labelsTr") for p in (out / sub).iterdir() if p.is_file() and p.name not in keep]
    for path in stale:
        path.unlink()
    if stale:
        log.info("removed %d file(s) of the dataset %s held before", len(stale), out)


def synthesize(
    out_dir: str | os.PathLike,
    *,
    domains: int = 4,
    cases_per_domain: int = 6,
    size: int = 128,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic multi-centre 3DRA dataset in the nnU-Net raw layout and return its folder.

    ``out_dir/imagesTr/{case}_0000.nii.gz``, ``out_dir/labelsTr/{case}.nii.gz`` (0 background, 1 vessel,
    2 aneurysm) and ``out_dir/dataset.json`` (``labels``, ``file_ending``, ``channel_names``, a ``training`` list
    whose entries carry each case's ``domain`` (0 .. domains-1), and the centre styles under ``domains``).
    ``size`` is the matrix of the finest centre; the field of view is ``size * 0.4 mm`` (+-10 % per case) and each
    centre samples it on its own grid (:data:`CENTRES`).

    The bytes depend only on the arguments other than ``workers`` (each case has its own random stream). Files are
    written atomically and the manifest last, so an interrupted run leaves no half-written file and is simply
    redone; a folder that already holds the same dataset is returned at once unless ``overwrite``. A folder that holds
    anything else (another dataset, synthesised with other settings or not, other files) is refused
    (``FileExistsError``) unless ``overwrite``, which replaces the dataset in it: imagesTr/ and labelsTr/ then hold
    exactly the new cases. A ``size`` one case of which would not fit in the available memory
    (:data:`PEAK_BYTES_PER_VOXEL`) is refused before anything is written, and ``workers`` is lowered to what fits.
    ``workers``: processes (default: the CPUs this process may use, at most one per case, for datasets of at least
    four 128^3 cases' worth of voxels; one otherwise, since starting processes costs more than small cases take).
    Where torch is already imported the workers are spawned, which re-imports the calling script: as with any
    Python multiprocessing, a script that calls this needs an ``if __name__ == "__main__":`` guard (without one the
    cases are generated in this process, with a warning).
    """
    if not 1 <= domains <= len(CENTRES):
        raise ValueError(f"domains={domains}: the synthetic benchmark defines 1 to {len(CENTRES)} centres")
    if cases_per_domain < 1:
        raise ValueError(f"cases_per_domain={cases_per_domain}: need at least one case per centre")
    if size < 16:
        raise ValueError(f"size={size}: volumes smaller than 16 voxels cannot hold a vessel tree")
    out = Path(out_dir)
    params = _params(domains, cases_per_domain, size, seed)
    if not overwrite and _complete(out, params):
        log.info("%s already holds this synthetic dataset; nothing to do", out)
        return out
    _refuse_other_contents(out, params, overwrite=overwrite)
    jobs = [(str(out), d, i, size, seed) for d in range(domains) for i in range(cases_per_domain)]
    workers = _check_memory(size, _worker_count(workers, jobs, size))
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    manifest_path = out / "dataset.json"
    manifest_path.unlink(missing_ok=True)  # the folder is incomplete until the new manifest is written
    log.info(
        "synthesising %d cases (%d centres, size %d, seed %d) into %s with %d process(es)",
        len(jobs),
        domains,
        size,
        seed,
        out,
        workers,
    )
    entries = _make_cases(jobs, workers)
    training = [entries[_case_name(d, i)] for d in range(domains) for i in range(cases_per_domain)]
    _write_manifest(manifest_path, training, domains, params)
    _remove_stale(out, entries)
    return out


def _refuse_other_contents(out: Path, params: dict, *, overwrite: bool) -> None:
    """Without ``overwrite``, a folder holding another synthesised dataset or files this generator did not write is
    refused (``FileExistsError``)."""
    held = _synthesised_params(out)
    if held is not None and held != params and not overwrite:
        raise FileExistsError(
            f"synth: {out} holds another synthesised dataset ({_describe(held)}); pass --overwrite to replace it "
            f"with this one ({_describe(params)}), or choose another folder"
        )
    foreign = _foreign_files(out)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(
            f"synth: {out} holds files this generator did not write ({shown}); choose a new or empty folder, or "
            f"pass --overwrite to replace the dataset in it"
        )


def _worker_count(workers: int | None, jobs: list, size: int) -> int:
    """The processes asked for (default: every CPU this process may use, for real work only: starting processes costs
    seconds), at most one per case."""
    if workers is None:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = usable if len(jobs) * size**3 >= 4 * 128**3 else 1
    return max(1, min(workers, len(jobs)))


def _make_cases(jobs: list[tuple], workers: int) -> dict[str, dict]:
    """Every job's case, generated in this process or in ``workers`` processes; their dataset.json entries by name."""
    entries: dict[str, dict] = {}
    with tqdm(total=len(jobs), desc="synth", unit="case", disable=None) as bar:

        def made(entry: dict) -> None:
            entries[entry["case"]] = entry
            bar.update()

        if workers > 1:
            _make_cases_in_processes(jobs, workers, made)
        for job in jobs:  # all of them with one worker; those a failed process pool left over otherwise
            if _case_name(job[1], job[2]) not in entries:
                made(_make_case(*job))
    return entries


def _make_cases_in_processes(jobs: list[tuple], workers: int, made) -> None:
    # fork starts workers at once; but a parent that imported torch may hold OpenMP thread pools that a forked child
    # must not inherit, so it pays for spawn (a fresh interpreter per worker)
    method = "fork" if "torch" not in sys.modules and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for fut in cf.as_completed([pool.submit(_make_case, *job) for job in jobs]):
                made(fut.result())
    except cf.process.BrokenProcessPool as err:
        # typically a script without an ``if __name__ == "__main__":`` guard, which spawned workers re-run
        log.warning("worker processes failed (%s); generating the remaining cases in this process", err)


def _write_manifest(path: Path, training: list[dict], domains: int, params: dict) -> None:
    """``dataset.json``, written last: its presence says the dataset is whole."""
    manifest = {
        "name": "gsema-synth",
        "description": "Synthetic multi-centre 3D rotational angiography phantoms (vessel tree + saccular aneurysms)",
        "channel_names": {"0": "3DRA"},
        "labels": dict(LABELS),
        "numTraining": len(training),
        "file_ending": FILE_ENDING,
        "domains": {str(d): asdict(CENTRES[d]) for d in range(domains)},
        "training": training,
        "synth": params,
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")


def builtin_dataset(
    *,
    domains: int = 4,
    cases_per_domain: int = 6,
    size: int = 128,
    seed: int = 0,
    folder: str | os.PathLike | None = None,
) -> Path:
    """The built-in multi-centre dataset with these settings, synthesised on first use and reused afterwards.

    ``folder`` None: a per-user cache folder named after the settings (``$XDG_CACHE_HOME/gsema-fast`` or
    ``~/.cache/gsema-fast``), so training, evaluation and later runs all find the same cases; phantoms of an earlier
    generator format there are rebuilt. A ``folder`` holding phantoms of other settings is refused
    (``FileExistsError``): they may be another run's data.
    """
    params = _params(domains, cases_per_domain, size, seed)
    kwargs = dict(domains=domains, cases_per_domain=cases_per_domain, size=size, seed=seed)
    if folder is None:
        folder = cache_root() / f"phantoms-d{domains}-n{cases_per_domain}-s{size}-seed{seed}"
        held = _synthesised_params(folder)
        if held is not None and held != params:  # only the format can differ in a folder named after the settings
            log.info("rebuilding the phantoms in %s (format %s -> %s)", folder, held.get("version"), FORMAT_VERSION)
            return synthesize(folder, overwrite=True, **kwargs)
        return synthesize(folder, **kwargs)
    held = _synthesised_params(Path(folder))
    if held is not None and held != params:
        raise FileExistsError(
            f"data.synth_dir: {folder} holds phantoms of other settings ({_describe(held)}) than data.synth_* ask "
            f"for ({_describe(params)}); give another folder, or replace them with gsema-fast synth --out {folder} "
            f"--overwrite"
        )
    return synthesize(folder, **kwargs)


def dataset_folder(data) -> Path:
    """The dataset a run's ``data`` settings name: ``data.root``, or the built-in phantoms of its ``synth_*``
    settings (synthesised on first use). ``data``: any object with those attributes (the config's data section)."""
    if data.root is not None:
        root = Path(data.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: {root} is not a folder")
        return root
    return builtin_dataset(
        domains=data.synth_domains,
        cases_per_domain=data.synth_cases_per_domain,
        size=data.synth_size,
        seed=data.synth_seed,
        folder=data.synth_dir,
    )
