"""NIfTI datasets from several centres: manifests, splits by domain, MONAI transforms, caching and loaders.

A dataset is a folder in the nnU-Net raw layout (``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz``,
``dataset.json`` with ``labels`` and ``file_ending``). Each case belongs to a domain (centre): given per case in
``dataset.json``'s ``training`` list (as :func:`gsema_fast.data.synthesize` writes it) or by a separate JSON
(``{"case": "domain"}``) or CSV (``case,domain`` header) map.

Training batches are plain tensors (no MONAI MetaTensor, so compiled models see ordinary inputs); validation and
test items keep their metadata so that predictions can be mapped back to each image's own grid.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from multiprocessing.pool import ThreadPool
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import (
    CastToTyped,
    ClassesToIndicesd,
    ClipIntensityPercentilesd,
    Compose,
    LoadImage,
    NormalizeIntensityd,
    Orientationd,
    RandCropByLabelClassesd,
    ScaleIntensityd,
    Spacingd,
    SpatialPad,
    Transform,
)
from monai.utils import convert_to_tensor
from tqdm.auto import tqdm

from gsema_fast.files import atomic_path, cache_root, first_line, require_file

log = logging.getLogger(__name__)

INTENSITY_MODES = ("zscore", "minmax", "none")
_MAX_INDICES = 50_000  # per class and case: bounds the cached crop-centre candidates (background has millions)


# ------------------------------------------------------------------------------------------------- manifests


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
    base = json_path.parent

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
    else:
        images = sorted((base / "imagesTr").glob(f"*_0000{ending}"))
        if not images:
            raise FileNotFoundError(f"dataset {base}: no images matching imagesTr/*_0000{ending}")
        raw = []
        for image in images:
            name = image.name[: -len(f"_0000{ending}")]
            raw.append((name, image, base / "labelsTr" / f"{name}{ending}", None))

    cases = []
    for name, image, label, domain in raw:
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


@dataclass(frozen=True)
class Split:
    """Training, validation (held-out source-domain cases) and test (unseen-domain cases) cases."""

    train: tuple[Case, ...]
    val: tuple[Case, ...]
    test: tuple[Case, ...]
    train_domains: tuple[str, ...]
    test_domain: str | None


def split_cases(
    manifest: Manifest,
    *,
    train_domains: Sequence | None = None,
    test_domain=None,
    val_per_domain: int = 1,
    seed: int = 0,
) -> Split:
    """Split by domain: ``test_domain``'s cases are the test set; of each training domain, ``val_per_domain``
    cases (chosen from ``seed``) are held out for validation. ``train_domains`` defaults to every other domain."""
    present = manifest.domains
    test = None if test_domain is None else str(test_domain)
    train = [str(d) for d in train_domains] if train_domains is not None else [d for d in present if d != test]
    for d in [*train, *([test] if test is not None else [])]:
        if d not in present:
            raise ValueError(f"domain {d!r} has no cases in {manifest.path}; domains present: {present}")
    if test is not None and test in train:
        raise ValueError(f"test_domain {test!r} is also a training domain ({train})")
    if len(set(train)) != len(train) or not train:
        raise ValueError(f"train_domains {train}: need at least one domain, each named once")
    if val_per_domain < 0:
        raise ValueError(f"val_per_domain={val_per_domain} must be >= 0")
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


# ------------------------------------------------------------------------------------------------ transforms


# Images whose intensities reach beyond this, in absolute value, are scaled into range before they become float32:
# the percentile clip and the normalisation sum and square them in float32, which would overflow to inf, then NaN.
INTENSITY_LIMIT = 2.0**32


class _LoadCase(Transform):
    """Load image (and label) as channel-first MetaTensors, failing on a bad case with its name, file and problem.

    The image is read in its file's own type and checked there (a float64 value beyond float32's range is finite, not
    "non-finite"), then given as float32. Intensities beyond :data:`INTENSITY_LIMIT` are scaled by a power of two
    (exact) into range first when ``intensity`` is ``zscore`` or ``minmax``, whose results do not depend on the
    image's scale; with ``none`` such an image is refused. A MONAI ``Transform`` (not a bare callable) so that
    caching datasets keep its output.
    """

    def __init__(self, label_values: Sequence[int] | None, intensity: str = "zscore"):
        self.image_loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=None)
        self.label_loader = LoadImage(
            reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32
        )
        self.label_values = None if label_values is None else np.asarray(sorted(label_values), np.float32)
        self.intensity = intensity

    def _read(self, case: str, kind: str, path) -> torch.Tensor:
        require_file(path, f"case {case}: {kind} file")
        loader = self.image_loader if kind == "image" else self.label_loader
        try:
            return loader(path)
        except Exception as err:
            raise ValueError(f"case {case}: cannot read {kind} file {path}: {_read_error(err, path)}") from err

    def _as_float32(self, case: str, path, image: torch.Tensor) -> torch.Tensor:
        if image.dtype.is_floating_point:
            finite = torch.isfinite(image)
            if not bool(finite.all()):
                raise ValueError(f"case {case}: image {path} has {int((~finite).sum())} non-finite voxels")
        low, high = float(image.min()), float(image.max())
        peak = max(abs(low), abs(high))
        if peak > INTENSITY_LIMIT:
            if self.intensity == "none":
                raise ValueError(
                    f"case {case}: image {path} has intensities in [{low:.4g}, {high:.4g}], beyond "
                    f"+-{INTENSITY_LIMIT:.4g}, which data.intensity 'none' would give the network unscaled; normalise "
                    f"them (data.intensity zscore or minmax) or rescale the file"
                )
            exponent = math.ceil(math.log2(peak / INTENSITY_LIMIT))
            log.info(
                "case %s: intensities in [%.4g, %.4g] scaled by 2^-%d before %s normalisation (float32's safe range)",
                case,
                low,
                high,
                exponent,
                self.intensity,
            )
            image = image.to(torch.float64) * 2.0**-exponent
        return image.to(torch.float32)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        case = d.get("case") or Path(d["image"]).name
        image = self._read(case, "image", d["image"])
        if image.ndim != 4:  # channel first: [1, D, H, W]
            raise ValueError(
                f"case {case}: image {d['image']} has shape {tuple(image.shape[1:])}; a 3D volume is expected"
            )
        if image.shape[0] != 1:
            raise ValueError(f"case {case}: image {d['image']} has {image.shape[0]} channels; one is expected")
        image = self._as_float32(case, d["image"], image)
        if self.label_values is not None and d.get("label") is not None:
            label = self._read(case, "label", d["label"])
            if label.shape != image.shape:
                raise ValueError(
                    f"case {case}: label {d['label']} has shape {tuple(label.shape[1:])} but image "
                    f"{d['image']} has shape {tuple(image.shape[1:])}"
                )
            if not np.allclose(label.affine.numpy(), image.affine.numpy(), rtol=1e-4, atol=1e-3):
                raise ValueError(f"case {case}: label {d['label']} and image {d['image']} have different affines")
            values = torch.unique(label).numpy()
            bad = values[~np.isin(values, self.label_values)]
            if bad.size:
                shown = [int(v) if float(v).is_integer() else float(v) for v in bad[:8]]
                raise ValueError(
                    f"case {case}: label {d['label']} holds values {shown} outside the label map "
                    f"{self.label_values.astype(int).tolist()}"
                )
            d["label"] = label.to(torch.uint8)
        d["image"] = image
        return d


def _read_error(err: Exception, path) -> str:
    """Why a file could not be loaded, in one line: MONAI's loader tries every reader it has and reports each one's
    traceback, where nibabel's own complaint about the file is the reason."""
    try:
        nib.load(path)
    except Exception as nib_err:
        return first_line(nib_err)
    return first_line(err)


class _PadToPatch(Transform):
    """Pad a volume smaller than the patch: the image with its own minimum (outside the field of view there is no
    signal), the label with background."""

    def __init__(self, patch_size: Sequence[int]):
        self.pad = SpatialPad(spatial_size=list(patch_size), mode="constant")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if any(s < p for s, p in zip(d["image"].shape[1:], self.pad.spatial_size, strict=True)):
            d["image"] = self.pad(d["image"], value=float(d["image"].min()))
            d["label"] = self.pad(d["label"])
        return d


class _CropByClass(RandCropByLabelClassesd):
    """RandCropByLabelClassesd that never fails on a case lacking every class with a non-zero ratio (say, no
    aneurysm when only aneurysm-centred patches are asked for): such a case falls back to equal ratios over the
    classes it has."""

    def __init__(self, *args, ratios: Sequence[float], **kwargs):
        super().__init__(*args, ratios=list(ratios), **kwargs)
        self.ratios = list(ratios)

    def __call__(self, data, lazy=None):
        present = [len(ix) > 0 for ix in data[self.indices_key]]
        usable = [r if p else 0.0 for r, p in zip(self.ratios, present, strict=True)]
        self.cropper.ratios = usable if sum(usable) > 0 else [float(p) for p in present]
        return super().__call__(data, lazy)


class _TrainItem(Transform):
    """The training item: plain tensors (image float32, label int64), the domain index and the case name."""

    def __call__(self, data: Mapping) -> dict:
        return {
            "image": torch.as_tensor(data["image"]).as_subclass(torch.Tensor).float().contiguous(),
            "label": torch.as_tensor(data["label"]).as_subclass(torch.Tensor).long().contiguous(),
            "domain": int(data["domain"]),
            "case": data["case"],
        }


@dataclass(frozen=True)
class Preprocessing:
    """What decides the voxels a network sees, besides the image itself: the target grid (``spacing`` in mm, None
    keeps each image's grid), the intensity clip (``clip_percentiles``, None: no clip) and the normalisation
    (``intensity``). Training, validation, evaluation, prediction and figures all preprocess through one of these;
    a checkpoint's weights are only meaningful with the settings they were trained with."""

    spacing: tuple[float, ...] | None = None
    clip_percentiles: tuple[float, ...] | None = (0.5, 99.5)
    intensity: str = "zscore"

    @classmethod
    def from_config(cls, data) -> Preprocessing:
        """The settings of a config's ``data`` section (:class:`gsema_fast.config.DataConfig`)."""
        spacing, clip = data.spacing, data.clip_percentiles
        if isinstance(spacing, (int, float)):
            spacing = [spacing] * 3
        return cls(
            None if spacing is None else tuple(float(s) for s in spacing),
            None if clip is None else tuple(float(c) for c in clip),
            data.intensity,
        )

    def transforms(self, labels: Mapping[str, int] | None = None) -> Compose:
        """:func:`preprocess_transforms` with these settings."""
        return preprocess_transforms(
            labels=labels, spacing=self.spacing, clip_percentiles=self.clip_percentiles, intensity=self.intensity
        )


# The config keys (``data.<key>``) of the preprocessing: a checkpoint fixes them.
PREPROCESSING_KEYS = tuple(f.name for f in fields(Preprocessing))


def unwrap_transform_error(err: BaseException) -> BaseException:
    """MONAI re-raises a failing transform as ``RuntimeError("applying transform ...")``, nested once per Compose:
    the error of ours (or of the library) that names the case and the problem, else ``err`` itself."""
    seen = err.__cause__
    while seen is not None and not isinstance(seen, (ValueError, FileNotFoundError)):
        seen = seen.__cause__
    return err if seen is None else seen


def preprocess_transforms(
    *,
    labels: Mapping[str, int] | None = None,
    spacing: Sequence[float] | None = None,
    clip_percentiles: Sequence[float] | None = (0.5, 99.5),
    intensity: str = "zscore",
) -> Compose:
    """Deterministic preprocessing of ``{"image": path, "label": path, "case": name}`` items (label optional):
    load and check, orient to RAS, resample to ``spacing`` (mm, None keeps each image's grid), clip intensities to
    the per-image percentiles and normalise (``zscore`` | ``minmax`` | ``none``). Invertible with MONAI ``Invertd``
    for mapping predictions back to the original grid."""
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity={intensity!r}: expected one of {INTENSITY_MODES}")
    keys = ["image", "label"] if labels is not None else ["image"]
    modes = ["bilinear", "nearest"][: len(keys)]
    xforms: list = [
        _LoadCase(None if labels is None else labels.values(), intensity),
        Orientationd(keys=keys, axcodes="RAS", labels=None, allow_missing_keys=True),
    ]
    if spacing is not None:
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing={spacing}: expected three positive voxel sizes in mm")
        xforms.append(
            Spacingd(
                keys=keys, pixdim=[float(s) for s in spacing], mode=modes, dtype=np.float32, allow_missing_keys=True
            )
        )
        if labels is not None:  # resampling computes in float; labels go back to their compact type
            xforms.append(CastToTyped(keys="label", dtype=torch.uint8))
    if clip_percentiles is not None:
        lo, hi = clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"clip_percentiles={clip_percentiles}: expected 0 <= lower < upper <= 100")
        xforms.append(ClipIntensityPercentilesd(keys="image", lower=lo, upper=hi))
    if intensity == "zscore":
        xforms.append(NormalizeIntensityd(keys="image"))
    elif intensity == "minmax":
        xforms.append(ScaleIntensityd(keys="image", minv=0.0, maxv=1.0))
    return Compose(xforms)


# ----------------------------------------------------------------------------------------- datasets, loaders


@contextlib.contextmanager
def _own_errors():
    """Surface the error of a failing transform (:func:`unwrap_transform_error`), keeping its own cause."""
    try:
        yield
    except RuntimeError as err:
        seen = unwrap_transform_error(err)
        if seen is err:
            raise
        raise seen from seen.__cause__


class _CheckedCacheDataset(CacheDataset):
    def _fill_cache(self, indices=None) -> list:
        """CacheDataset's filling, with its threads joined however it ends: MONAI's pool is left running when a case
        fails, and a thread still inside torch when the interpreter exits aborts the process (SIGABRT), so a bad
        case ended with exit code 134 instead of its error."""
        if self.cache_num <= 0:
            return []
        indices = list(range(self.cache_num)) if indices is None else indices
        pool = ThreadPool(self.num_workers)
        bar = tqdm(total=len(indices), desc="Loading dataset", disable=not self.progress)
        items = []
        try:
            for item in pool.imap(self._load_cache_item, indices):
                items.append(item)
                bar.update()
            return items
        finally:
            bar.close()
            pool.terminate()  # drops the cases not started
            pool.join()  # waits for the ones in flight

    def _load_cache_item(self, idx: int):
        with _own_errors():
            return super()._load_cache_item(idx)

    def _transform(self, index: int):
        with _own_errors():
            return super()._transform(index)


class _CheckedDataset(Dataset):
    def _transform(self, index: int):
        with _own_errors():
            return super()._transform(index)


class _AtomicPersistentDataset(PersistentDataset):
    """PersistentDataset whose cache files are written next to their final name and renamed into place.

    MONAI writes into the system temporary folder and moves the file, which is a copy (not atomic) when the cache
    is on another file system; a half-written file there is not always recognised as corrupt.
    """

    def __init__(self, data, transform, cache_dir, fingerprint: str):
        super().__init__(data=data, transform=transform, cache_dir=cache_dir)
        self.transform_hash = fingerprint  # the preprocessing parameters, so that changing them misses the cache

    def _cachecheck(self, item_transformed):
        hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        if hashfile.is_file():
            try:
                return torch.load(hashfile, weights_only=True)
            except Exception as err:  # unreadable: recompute and replace it
                log.warning("cache file %s is unreadable (%s); recomputing it", hashfile, err)
        with _own_errors():
            item = self._pre_transform(dict(item_transformed))
        item = convert_to_tensor(item, convert_numeric=False, track_meta=False)  # loadable with weights_only
        with atomic_path(hashfile) as tmp:  # ranks of a multi-process run may write the same entry at once
            torch.save(item, tmp)
        return item

    def _transform(self, index: int):
        with _own_errors():
            return super()._transform(index)


def _items(cases: Sequence[Case], domain_index: Mapping[str, int] | None = None) -> list[dict]:
    items = []
    for c in cases:
        # size and modification time: a changed file misses the disk cache instead of reading stale data
        stats = [p.stat() for p in (c.image, c.label) if p is not None and p.exists()]
        stamp = "-".join(f"{st.st_size}:{st.st_mtime_ns}" for st in stats)
        item = {
            "image": str(c.image),
            "case": c.name,
            "stamp": stamp,
            "domain": domain_index[c.domain] if domain_index is not None else c.domain,
        }
        if c.label is not None:
            item["label"] = str(c.label)
        items.append(item)
    return items


def _dataset(items: list[dict], transform: Compose, *, cache: bool, cache_dir, fingerprint: str):
    if not cache:
        return _CheckedDataset(items, transform)
    if cache_dir is not None:
        path = Path(cache_dir)
        path.mkdir(parents=True, exist_ok=True)
        return _AtomicPersistentDataset(items, transform, path, fingerprint)
    workers = max(1, min(4, os.cpu_count() or 1))
    return _CheckedCacheDataset(
        items, transform, num_workers=workers, copy_cache=False, progress=log.isEnabledFor(logging.INFO)
    )


def volume_loader(
    cases: Sequence[Case],
    *,
    labels: Mapping[str, int] | None = None,
    spacing: Sequence[float] | None = None,
    clip_percentiles: Sequence[float] | None = (0.5, 99.5),
    intensity: str = "zscore",
    cache: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """Whole preprocessed volumes, one per batch, for validation, evaluation and prediction.

    Items: ``image`` MetaTensor [1, 1, D, H, W] (float32, affine and applied transforms attached), ``label``
    [1, 1, D, H, W] uint8 when ``labels`` is given, ``case`` and ``domain`` (lists of one name). ``cache`` keeps
    the preprocessed volumes in memory after their first load (loading then happens in this process).
    """
    transform = preprocess_transforms(
        labels=labels, spacing=spacing, clip_percentiles=clip_percentiles, intensity=intensity
    )
    items = _items(cases)
    if labels is None:
        for it in items:
            it.pop("label", None)
    if cache:  # filled on first use, in this process (worker processes would each fill, then drop, a copy)
        ds = _CheckedCacheDataset(items, transform, num_workers=1, copy_cache=False, progress=False, runtime_cache=True)
        num_workers = 0
    else:
        ds = _CheckedDataset(items, transform)
    return DataLoader(ds, batch_size=1, shuffle=False, num_workers=num_workers)


class DomainBalancedSampler(torch.utils.data.Sampler):
    """Indices that visit the domains in rounds: each round takes one case from every domain (in a random order),
    each domain cycling through its own shuffled cases. Any K consecutive items hold one case per domain, so a batch
    of a multiple of K items is exactly balanced. The order depends only on (seed, epoch).

    Across ``num_replicas`` processes the rounds fill global batches of ``batch_size * num_replicas`` items and this
    ``rank`` takes its own ``batch_size`` of each: together the ranks see what one process with the global batch
    would. Within a global batch no case repeats while its domain has unused cases (a domain's next pick skips the
    cases the batch already holds), so ranks never train on the same case in one step."""

    def __init__(
        self,
        domains: Sequence[int],
        num_samples: int,
        seed: int = 0,
        *,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank}: expected 0 <= rank < num_replicas={num_replicas}")
        self.by_domain = [np.flatnonzero(np.asarray(domains) == d) for d in sorted(set(domains))]
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1  # without set_epoch, the next pass still differs
        queues = [list(rng.permutation(idx)) for idx in self.by_domain]
        global_batch = self.batch_size * self.num_replicas
        total = self.num_samples * self.num_replicas
        order: list[int] = []
        in_batch: set[int] = set()

        def take(k: int) -> int:
            queue = queues[k]
            for _ in range(2):  # the queue as it is, then with the domain's next shuffle in front of it
                for j in range(len(queue) - 1, -1, -1):  # pop order: from the end
                    if queue[j] not in in_batch:
                        return int(queue.pop(j))
                queue[:0] = list(rng.permutation(self.by_domain[k]))
            return int(queue.pop())  # the domain has fewer cases than its share of the batch

        while len(order) < total:
            for k in rng.permutation(len(queues)):
                if len(order) % global_batch == 0:
                    in_batch = set()
                index = take(k)
                in_batch.add(index)
                order.append(index)
        order = order[:total]
        mine = [
            i
            for g in range(0, total, global_batch)
            for i in order[g + self.rank * self.batch_size : g + (self.rank + 1) * self.batch_size]
        ]
        return iter(mine)


def shared_cache_dir() -> Path:
    """The per-user folder where processes share preprocessed training volumes (``$XDG_CACHE_HOME/gsema-fast/
    preprocessed`` or ``~/.cache/...``); files are keyed by case path, file stamp and preprocessing settings."""
    return cache_root() / "preprocessed"


def preprocessed_grid(path: Path, spacing: Sequence[float] | None) -> tuple[int, int, int]:
    """The voxel grid (RAS axis order) of the image at ``path`` after preprocessing, from its header alone: reoriented
    to RAS, and resampled to ``spacing`` (mm) when given."""
    img = nib.load(path)
    shape, zooms = img.shape[:3], img.header.get_zooms()[:3]
    ras_shape, ras_zooms = [0, 0, 0], [1.0, 1.0, 1.0]
    for axis, (target, _) in enumerate(nib.orientations.io_orientation(img.affine)):
        ras_shape[int(target)], ras_zooms[int(target)] = shape[axis], float(zooms[axis])
    if spacing is not None:
        ras_shape = [max(1, round(n * z / float(s))) for n, z, s in zip(ras_shape, ras_zooms, spacing, strict=True)]
    return tuple(int(n) for n in ras_shape)


def _warn_small_volumes(cases: Sequence[Case], patch: Sequence[int], spacing: Sequence[float] | None) -> None:
    """Say when the patch is larger than training volumes: they are padded up to it, and every step then computes
    on padding (a patch twice a volume's size costs eight times the voxels)."""
    grids = {c.name: preprocessed_grid(c.image, spacing) for c in cases}
    small = {name: g for name, g in grids.items() if any(n < p for n, p in zip(g, patch, strict=True))}
    if small:
        smallest = [min(g[axis] for g in grids.values()) for axis in range(3)]
        log.warning(
            "data.patch_size %s is larger than %d of the %d training volumes along some axis (smallest grid %s after "
            "preprocessing, e.g. case %s): they are padded up to the patch, and each step computes on the padding "
            "too; a patch within %s avoids it",
            list(patch),
            len(small),
            len(grids),
            smallest,
            next(iter(small)),
            smallest,
        )


def _seed_for(seed: int, epoch: int, rank: int = 0) -> int:
    # rank 0 keeps the single-process seeds; other ranks draw their own crops and worker seeds
    return int(np.random.SeedSequence([seed, epoch, *([rank] if rank else [])]).generate_state(1)[0])


@dataclass
class Loaders:
    """What :func:`build_loaders` returns. ``train`` yields ``{"image": float32 [B,1,*patch], "label": int64
    [B,1,*patch], "domain": int64 [B] (index into ``domains``), "case": [names]}``; ``val`` (held-out cases of the
    training domains) and ``test`` (the unseen domain) yield whole volumes as :func:`volume_loader` describes."""

    manifest: Manifest
    split: Split
    domains: list[str]
    train: DataLoader
    val: DataLoader | None
    test: DataLoader | None
    preprocess: Compose
    seed: int
    num_classes: int
    rank: int = 0
    world_size: int = 1
    _sampler: DomainBalancedSampler = field(repr=False, default=None)
    _generator: torch.Generator = field(repr=False, default=None)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass over ``train`` depend only on (seed, epoch): case order, crop positions and worker
        seeds. Call it at the start of every epoch for runs that resume exactly."""
        self._sampler.set_epoch(epoch)
        s = _seed_for(self.seed, epoch, self.rank)
        self.train.dataset.transform.set_random_state(seed=s)
        self._generator.manual_seed(s)


def build_loaders(
    root: str | os.PathLike,
    *,
    manifest: str | os.PathLike | None = None,
    train_domains: Sequence | None = None,
    test_domain=None,
    patch_size: Sequence[int] = (96, 96, 96),
    spacing: Sequence[float] | None = None,
    batch_size: int = 2,
    samples_per_volume: int = 1,
    class_ratios: Sequence[float] | None = None,
    clip_percentiles: Sequence[float] | None = (0.5, 99.5),
    intensity: str = "zscore",
    val_per_domain: int = 1,
    steps_per_epoch: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """Training patches balanced over the source domains, plus validation and unseen-domain test volumes.

    ``root``/``manifest``: see :func:`load_manifest`. Domains: see :func:`split_cases`. Each training item is a
    ``patch_size`` crop (volumes smaller than the patch are padded) centred on a voxel whose class is drawn with
    ``class_ratios`` (background, vessel, aneurysm, ...; default equal, which oversamples small aneurysms). A class
    a case lacks is skipped; a case with none of the weighted classes uses equal weights over those it has.
    ``batch_size`` patches per batch, ``samples_per_volume`` of them from each loaded volume (must divide
    ``batch_size``). An epoch is ``steps_per_epoch`` batches (default: one pass over the training cases).
    Preprocessing: see :func:`preprocess_transforms`. ``cache``: keep preprocessed volumes in memory, or in
    ``cache_dir`` on disk when given (written atomically; reused across runs).

    ``rank``/``world_size``: this process's part of a multi-process run. ``batch_size`` is then per rank: the
    ranks' batches of a step together form the global batch that one process would draw (see
    :class:`DomainBalancedSampler`), ``val`` and ``test`` hold every ``world_size``-th case from ``rank`` (None when
    that share is empty), and an in-memory ``cache`` without ``cache_dir`` becomes one shared disk cache
    (:func:`shared_cache_dir`) rather than a copy of the training set in every rank's memory.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    man = load_manifest(root, manifest)
    split = split_cases(
        man, train_domains=train_domains, test_domain=test_domain, val_per_domain=val_per_domain, seed=seed
    )
    patch = [int(p) for p in patch_size]
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size={list(patch_size)}: expected three positive sizes")
    if batch_size < 1 or samples_per_volume < 1 or batch_size % samples_per_volume:
        raise ValueError(
            f"batch_size={batch_size}, samples_per_volume={samples_per_volume}: the batch must hold a "
            f"whole number of volumes' samples"
        )
    ratios = [1.0] * man.num_classes if class_ratios is None else [float(r) for r in class_ratios]
    if len(ratios) != man.num_classes or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(
            f"class_ratios={class_ratios}: expected {man.num_classes} non-negative weights, one per "
            f"label value, not all zero"
        )

    if rank == 0:
        _warn_small_volumes(split.train, patch, spacing)
    pre = preprocess_transforms(
        labels=man.labels, spacing=spacing, clip_percentiles=clip_percentiles, intensity=intensity
    )
    train_xform = Compose(
        [
            *pre.transforms,
            _PadToPatch(patch),
            ClassesToIndicesd(keys="label", num_classes=man.num_classes, max_samples_per_class=_MAX_INDICES),
            _CropByClass(
                keys=["image", "label"],
                label_key="label",
                spatial_size=patch,
                ratios=ratios,
                num_classes=man.num_classes,
                num_samples=samples_per_volume,
                indices_key="label_cls_indices",
                warn=False,
            ),
            _TrainItem(),
        ]
    )
    fingerprint = hashlib.sha1(
        json.dumps(
            [spacing and list(spacing), clip_percentiles and list(clip_percentiles), intensity, patch, man.labels]
        ).encode()
    ).hexdigest()[:16]
    domain_index = {d: i for i, d in enumerate(split.train_domains)}
    items = _items(split.train, domain_index)
    if world_size > 1 and cache and cache_dir is None:
        cache_dir = shared_cache_dir()
        log.info("%d ranks: preprocessed training volumes are cached on disk in %s", world_size, cache_dir)
    train_ds = _dataset(items, train_xform, cache=cache, cache_dir=cache_dir, fingerprint=fingerprint)

    per_batch = batch_size // samples_per_volume
    n_items = (
        steps_per_epoch * per_batch
        if steps_per_epoch
        else max(-(-len(items) // (per_batch * world_size)), 1) * per_batch
    )
    sampler = DomainBalancedSampler(
        [it["domain"] for it in items], n_items, seed, batch_size=per_batch, num_replicas=world_size, rank=rank
    )
    generator = torch.Generator().manual_seed(_seed_for(seed, 0, rank))
    train = DataLoader(
        train_ds,
        batch_size=per_batch,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        generator=generator,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    common = dict(
        spacing=spacing,
        clip_percentiles=clip_percentiles,
        intensity=intensity,
        cache=cache,
        num_workers=min(num_workers, 2),
    )
    val_cases, test_cases = split.val[rank::world_size], split.test[rank::world_size]
    val = volume_loader(val_cases, labels=man.labels, **common) if val_cases else None
    test = volume_loader(test_cases, labels=man.labels, **common) if test_cases else None
    data = Loaders(
        man,
        split,
        list(split.train_domains),
        train,
        val,
        test,
        pre,
        seed,
        man.num_classes,
        rank=rank,
        world_size=world_size,
        _sampler=sampler,
        _generator=generator,
    )
    data.set_epoch(0)
    return data
