"""MONAI transforms of the volumes: loading and checking a case, intensity handling, the deterministic
preprocessing every path shares (:class:`Preprocessing`), the training crops, and the caching datasets' workarounds.

Training items are plain tensors (no MONAI MetaTensor, so compiled models see ordinary inputs); validation and test
items keep their metadata so that predictions can be mapped back to each image's own grid.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from multiprocessing.pool import ThreadPool
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import (
    CastToTyped,
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
from scipy import ndimage
from tqdm.auto import tqdm

from gsema_fast.config import DataConfig
from gsema_fast.data.manifest import Case
from gsema_fast.files import atomic_path, first_line, require_file

log = logging.getLogger(__name__)

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


class SmallComponentCentres(Transform):
    """One more list of crop-centre candidates after ``ClassesToIndicesd``'s: the voxels of the connected components
    (26-connected) of class ``label`` smaller than ``below_mm3``, as flat indices into the label's grid (at most
    ``max_indices``, evenly spaced), appended to ``data[indices_key]``. Deterministic, so caching datasets keep it;
    the voxel volume comes from the label's own spacing (a MetaTensor's ``pixdim``)."""

    def __init__(self, label: int, below_mm3: float, *, indices_key: str, max_indices: int):
        self.label, self.below_mm3, self.indices_key, self.max_indices = label, below_mm3, indices_key, max_indices

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        label = d["label"]
        voxel_mm3 = float(np.prod(np.asarray(label.pixdim, dtype=np.float64)[:3]))
        components, count = ndimage.label(np.asarray(label[0]) == self.label, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        small = np.flatnonzero(sizes * voxel_mm3 < self.below_mm3)
        small = small[small > 0]  # 0 is everything outside the class
        found = np.flatnonzero(np.isin(components.ravel(), small)) if small.size else np.zeros(0, dtype=np.int64)
        if found.size > self.max_indices:
            found = found[:: -(-found.size // self.max_indices)]
        d[self.indices_key] = [*d[self.indices_key], found]
        return d


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
    (``intensity``), the settings of a config's ``data`` section of these names, checked by it. Training, validation,
    evaluation, prediction and figures all preprocess through one of these; a checkpoint's weights are only
    meaningful with the settings they were trained with."""

    # The data section's defaults.
    spacing: tuple[float, ...] | None = DataConfig.model_fields["spacing"].default
    clip_percentiles: tuple[float, ...] | None = tuple(DataConfig.model_fields["clip_percentiles"].default)
    intensity: str = DataConfig.model_fields["intensity"].default

    def __post_init__(self) -> None:
        data = DataConfig(spacing=self.spacing, clip_percentiles=self.clip_percentiles, intensity=self.intensity)
        for key in ("spacing", "clip_percentiles"):  # one number means isotropic; tuples: a hashable key
            value = getattr(data, key)
            object.__setattr__(self, key, None if value is None else tuple(value))

    @classmethod
    def from_config(cls, data: DataConfig) -> Preprocessing:
        """The settings of a config's ``data`` section (:class:`gsema_fast.config.DataConfig`)."""
        return cls(data.spacing, data.clip_percentiles, data.intensity)

    def transforms(self, labels: Mapping[str, int] | None = None) -> Compose:
        """:func:`preprocess_transforms` with these settings."""
        return preprocess_transforms(self, labels=labels)


# The config keys (``data.<key>``) of the preprocessing: a checkpoint fixes them.
PREPROCESSING_KEYS = tuple(f.name for f in fields(Preprocessing))


def unwrap_transform_error(err: BaseException) -> BaseException:
    """MONAI re-raises a failing transform as ``RuntimeError("applying transform ...")``, nested once per Compose:
    the error of ours (or of the library) that names the case and the problem, else ``err`` itself."""
    seen = err.__cause__
    while seen is not None and not isinstance(seen, (ValueError, FileNotFoundError)):
        seen = seen.__cause__
    return err if seen is None else seen


def preprocess_transforms(preprocessing: Preprocessing, *, labels: Mapping[str, int] | None = None) -> Compose:
    """Deterministic preprocessing of ``{"image": path, "label": path, "case": name}`` items (label optional):
    load and check, orient to RAS, resample to ``preprocessing.spacing`` (mm, None keeps each image's grid), clip
    intensities to the per-image percentiles and normalise (``zscore`` | ``minmax`` | ``none``). Invertible with
    MONAI ``Invertd`` for mapping predictions back to the original grid."""
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a Preprocessing, got {type(preprocessing).__name__}")
    spacing, clip_percentiles, intensity = (
        preprocessing.spacing,
        preprocessing.clip_percentiles,
        preprocessing.intensity,
    )
    keys = ["image", "label"] if labels is not None else ["image"]
    modes = ["bilinear", "nearest"][: len(keys)]
    xforms: list = [
        _LoadCase(None if labels is None else labels.values(), intensity),
        Orientationd(keys=keys, axcodes="RAS", labels=None, allow_missing_keys=True),
    ]
    if spacing is not None:
        xforms.append(
            Spacingd(
                keys=keys, pixdim=[float(s) for s in spacing], mode=modes, dtype=np.float32, allow_missing_keys=True
            )
        )
        if labels is not None:  # resampling computes in float; labels go back to their compact type
            xforms.append(CastToTyped(keys="label", dtype=torch.uint8))
    if clip_percentiles is not None:
        lo, hi = clip_percentiles
        xforms.append(ClipIntensityPercentilesd(keys="image", lower=lo, upper=hi))
    if intensity == "zscore":
        xforms.append(NormalizeIntensityd(keys="image"))
    elif intensity == "minmax":
        xforms.append(ScaleIntensityd(keys="image", minv=0.0, maxv=1.0))
    return Compose(xforms)


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
