"""A dataset's cases and their domains: manifests, case-to-domain maps, and splits by domain.

A dataset is a folder in the nnU-Net raw layout (``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz``,
``dataset.json`` with ``labels`` and ``file_ending``). Each case belongs to a domain (centre): given per case in
``dataset.json``'s ``training`` list (as :func:`gsema_fast.data.synthesize` writes it) or by a separate JSON
(``{"case": "domain"}``) or CSV (``case,domain`` header) map.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from gsema_fast.config import DataConfig
from gsema_fast.files import first_line, require_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One labelled (or, for prediction, unlabelled) volume and the domain (centre) it comes from."""

    name: str
    image: Path
    label: Path | None
    domain: str


def _domain_key(d: str):
    """Sort numeric domain names numerically ("2" before "10"), others alphabetically after them."""
    return (0, int(d), "") if d.lstrip("-").isdigit() else (1, 0, d)


@dataclass(frozen=True)
class Manifest:
    """The cases of a dataset, its label map (name -> value) and where it was read from."""

    path: Path
    cases: tuple[Case, ...]
    labels: dict[str, int]
    file_ending: str = ".nii.gz"

    @property
    def domains(self) -> list[str]:
        return sorted({c.domain for c in self.cases}, key=_domain_key)

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1

    def cases_of(self, domain) -> list[Case]:
        return [c for c in self.cases if c.domain == str(domain)]


def _read_json(path: Path, what: str):
    require_file(path, what)
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{what} {path}: not valid JSON ({err})") from err


def _read_domain_map(path: Path) -> dict[str, str]:
    if path.suffix.lower() == ".csv":
        require_file(path, "domain map")
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"case", "domain"} <= set(rows[0]):
            raise ValueError(f"domain map {path}: expected a CSV with a 'case,domain' header and one row per case")
        return {r["case"].strip(): r["domain"].strip() for r in rows}
    data = _read_json(path, "domain map")
    if not isinstance(data, dict) or not all(isinstance(v, (str, int)) for v in data.values()):
        raise ValueError(f"domain map {path}: expected a JSON object {{case: domain}}")
    return {str(k): str(v) for k, v in data.items()}


def _check_headers(case: Case) -> None:
    """Shape and affine agreement read from the headers alone (cheap: no voxel data is decompressed)."""
    headers = {}
    for kind, path in (("image", case.image), ("label", case.label)):
        if path is None:
            continue
        try:
            img = nib.load(path)
        except Exception as err:  # nibabel raises several types for truncated or foreign files
            raise ValueError(f"case {case.name}: cannot read {kind} file {path}: {first_line(err)}") from err
        headers[kind] = img
    image = headers["image"]
    if len(image.shape) < 3:
        raise ValueError(f"case {case.name}: image {case.image} has shape {image.shape}; a 3D volume is expected")
    if len(image.shape) > 3 and int(np.prod(image.shape[3:])) != 1:
        raise ValueError(f"case {case.name}: image {case.image} has shape {image.shape}; one channel is expected")
    if "label" in headers:
        label = headers["label"]
        if tuple(label.shape[:3]) != tuple(image.shape[:3]):
            raise ValueError(
                f"case {case.name}: label {case.label} has shape {tuple(label.shape)} but image "
                f"{case.image} has shape {tuple(image.shape)}"
            )
        if not np.allclose(label.affine, image.affine, rtol=1e-4, atol=1e-3):
            raise ValueError(
                f"case {case.name}: label {case.label} and image {case.image} have different affines "
                f"(voxel grids):\n{label.affine}\nvs\n{image.affine}"
            )


def load_manifest(
    root: str | os.PathLike, manifest: str | os.PathLike | None = None, *, check: bool = True
) -> Manifest:
    """Read a dataset: ``root`` is its folder (or its ``dataset.json``).

    ``manifest``: another ``dataset.json`` to use instead of ``root/dataset.json``, or a case-to-domain map
    (``.json`` object or ``.csv`` with ``case,domain``) for an nnU-Net raw dataset whose ``dataset.json`` has no
    domains. Cases come from ``dataset.json``'s ``training`` list when present, otherwise from
    ``imagesTr/*_0000{file_ending}``. With ``check`` every file must exist and each label must match its image in
    shape and affine (read from the headers). Errors name the case, the file and the problem.
    """
    root = Path(root)
    json_path = root if root.suffix == ".json" else root / "dataset.json"
    domain_map_path = None
    if manifest is not None:
        mpath = Path(manifest)
        # a dataset.json names its file ending; a domain map is a bare {case: domain} object or a CSV
        if mpath.suffix.lower() == ".json" and "file_ending" in _read_json(mpath, "manifest"):
            json_path = mpath
        else:
            domain_map_path = mpath
    meta = _read_json(json_path, "dataset manifest")

    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels or not all(isinstance(v, int) for v in labels.values()):
        raise ValueError(f"dataset manifest {json_path}: 'labels' must map each label name to an integer value")
    if sorted(labels.values())[0] != 0:
        raise ValueError(f"dataset manifest {json_path}: 'labels' must include background = 0")
    channels = meta.get("channel_names", meta.get("modality", {"0": "image"}))
    if len(channels) != 1:
        raise ValueError(f"dataset manifest {json_path}: {len(channels)} input channels; one is supported")
    ending = meta.get("file_ending", ".nii.gz")
    domain_map = _read_domain_map(domain_map_path) if domain_map_path is not None else None

    cases = []
    for name, image, label, domain in _case_entries(meta, json_path, ending):
        if domain_map is not None:
            domain = domain_map.get(name)
            if domain is None:
                raise ValueError(f"case {name}: no domain in the domain map {domain_map_path}")
        elif domain is None:
            raise ValueError(f"case {name}: {json_path} gives no 'domain'; pass a case-to-domain map (JSON or CSV)")
        cases.append(Case(name, image, label, str(domain)))
    if domain_map is not None:
        unknown = sorted(set(domain_map) - {c.name for c in cases})
        if unknown:
            log.warning(
                "domain map %s names %d case(s) not in %s, e.g. %s",
                domain_map_path,
                len(unknown),
                json_path,
                unknown[:3],
            )
    if check:
        for c in cases:
            for kind, path in (("image", c.image), ("label", c.label)):
                if path is not None:
                    require_file(path, f"case {c.name}: {kind} file")
            _check_headers(c)
    return Manifest(json_path, tuple(cases), dict(labels), ending)


def _case_entries(meta: dict, json_path: Path, ending: str) -> list[tuple[str, Path, Path | None, object]]:
    """``(name, image, label, domain or None)`` of every case: from ``dataset.json``'s ``training`` list when it has
    one, otherwise from ``imagesTr/*_0000{ending}`` beside it."""
    base = json_path.parent
    entries = meta.get("training")
    if isinstance(entries, list) and entries and isinstance(entries[0], dict):
        raw = []
        for e in entries:
            if "image" not in e:
                raise ValueError(f"dataset manifest {json_path}: training entry {e} has no 'image'")
            image = base / e["image"]
            label = base / e["label"] if e.get("label") else None
            name = e.get("case") or (label or image).name[: -len(ending)].removesuffix("_0000")
            raw.append((name, image, label, e.get("domain")))
        return raw
    images = sorted((base / "imagesTr").glob(f"*_0000{ending}"))
    if not images:
        raise FileNotFoundError(f"dataset {base}: no images matching imagesTr/*_0000{ending}")
    raw = []
    for image in images:
        name = image.name[: -len(f"_0000{ending}")]
        raw.append((name, image, base / "labelsTr" / f"{name}{ending}", None))
    return raw


@dataclass(frozen=True)
class Split:
    """Training, validation (held-out source-domain cases) and test (unseen-domain cases) cases."""

    train: tuple[Case, ...]
    val: tuple[Case, ...]
    test: tuple[Case, ...]
    train_domains: tuple[str, ...]
    test_domain: str | None


def split_cases(manifest: Manifest, data: DataConfig, *, seed: int = 0) -> Split:
    """Split by domain as a config's ``data`` section says: ``data.test_domain``'s cases are the test set (None: no
    test set); of each training domain, ``data.val_per_domain`` cases (chosen from ``seed``) are held out for
    validation. ``data.train_domains`` None is every other domain. The domains must have cases in ``manifest``."""
    present = manifest.domains
    test = None if data.test_domain is None else str(data.test_domain)
    train = (
        [str(d) for d in data.train_domains] if data.train_domains is not None else [d for d in present if d != test]
    )
    for d in [*train, *([test] if test is not None else [])]:
        if d not in present:
            raise ValueError(f"domain {d!r} has no cases in {manifest.path}; domains present: {present}")
    if not train:
        raise ValueError(f"data.test_domain {test!r} is the only domain of {manifest.path}: none is left to train on")
    val_per_domain = data.val_per_domain
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for d in train:
        cases = manifest.cases_of(d)
        if len(cases) <= val_per_domain:
            raise ValueError(
                f"domain {d!r} has {len(cases)} case(s) in {manifest.path}: too few to hold out "
                f"{val_per_domain} for validation and still train on it"
            )
        order = rng.permutation(len(cases))
        va += [cases[i] for i in sorted(order[:val_per_domain])]
        tr += [cases[i] for i in sorted(order[val_per_domain:])]
    te = manifest.cases_of(test) if test is not None else []
    return Split(tuple(tr), tuple(va), tuple(te), tuple(train), test)


def run_domains(manifest: Manifest, data) -> tuple[list[str], str]:
    """The training domains and the unseen domain of a run on ``manifest``, from its data settings (``data``: any
    object with ``train_domains`` and ``test_domain``, such as the config's data section): ``test_domain`` None is
    the last domain, ``train_domains`` None every domain but the unseen one."""
    test = str(data.test_domain) if data.test_domain is not None else manifest.domains[-1]
    if data.train_domains is not None:
        return [str(d) for d in data.train_domains], test
    return [d for d in manifest.domains if d != test], test
