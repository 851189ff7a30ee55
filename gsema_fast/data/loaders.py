"""Loaders: training patches balanced over the source domains (:func:`build_loaders`, :class:`Loaders`), and whole
preprocessed volumes for validation, evaluation and prediction (:func:`volume_loader`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from monai.transforms import ClassesToIndicesd, Compose

from gsema_fast.config import DataConfig
from gsema_fast.data.manifest import Case, Manifest, Split, load_manifest, split_cases
from gsema_fast.data.sampling import DomainBalancedSampler
from gsema_fast.data.transforms import (
    Preprocessing,
    SmallComponentCentres,
    _CheckedCacheDataset,
    _CheckedDataset,
    _CropByClass,
    _dataset,
    _items,
    _PadToPatch,
    _TrainItem,
    preprocessed_grid,
)
from gsema_fast.files import cache_root

log = logging.getLogger(__name__)

_MAX_INDICES = 50_000  # per class and case: bounds the cached crop-centre candidates (background has millions)


def volume_loader(
    cases: Sequence[Case],
    preprocessing: Preprocessing,
    *,
    labels: Mapping[str, int] | None = None,
    cache: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """Whole volumes preprocessed with ``preprocessing``, one per batch, for validation, evaluation and prediction.

    Items: ``image`` MetaTensor [1, 1, D, H, W] (float32, affine and applied transforms attached), ``label``
    [1, 1, D, H, W] uint8 when ``labels`` is given, ``case`` and ``domain`` (lists of one name). ``cache`` keeps
    the preprocessed volumes in memory after their first load (loading then happens in this process).
    """
    transform = preprocessing.transforms(labels=labels)
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


def shared_cache_dir() -> Path:
    """The per-user folder where processes share preprocessed training volumes (``$XDG_CACHE_HOME/gsema-fast/
    preprocessed`` or ``~/.cache/...``); files are keyed by case path, file stamp and preprocessing settings."""
    return cache_root() / "preprocessed"


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
    data: DataConfig,
    *,
    steps_per_epoch: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """Training patches balanced over the source domains, plus validation and unseen-domain test volumes, of the
    dataset in ``root`` as a config's ``data`` section describes them.

    ``data.manifest``: see :func:`load_manifest`; the domains and held-out cases: see :func:`split_cases`
    (``data.test_domain`` None: no unseen domain). Each training item is a ``data.patch_size`` crop (volumes smaller
    than the patch are padded) centred on a voxel whose class is drawn with ``data.class_ratios`` (background,
    vessel, aneurysm, ...; default equal, which oversamples small aneurysms). A class a case lacks is skipped; a case
    with none of the weighted classes uses equal weights over those it has. ``data.batch_size`` patches per batch,
    ``data.samples_per_volume`` of them from each loaded volume. An epoch is ``steps_per_epoch`` batches (default:
    one pass over the training cases). Preprocessing: :class:`Preprocessing` of ``data``. ``data.cache``: keep
    preprocessed volumes in memory, or in ``data.cache_dir`` on disk when given (written atomically; reused across
    runs). ``seed``: the split, the order of the cases and the crops.

    ``rank``/``world_size``: this process's part of a multi-process run. ``data.batch_size`` is then per rank: the
    ranks' batches of a step together form the global batch that one process would draw (see
    :class:`DomainBalancedSampler`), ``val`` and ``test`` hold every ``world_size``-th case from ``rank`` (None when
    that share is empty), and an in-memory cache without ``cache_dir`` becomes one shared disk cache
    (:func:`shared_cache_dir`) rather than a copy of the training set in every rank's memory.
    """
    if not isinstance(data, DataConfig):
        raise TypeError(f"data must be a DataConfig (a config's data section), got {type(data).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    man = load_manifest(root, data.manifest)
    split = split_cases(man, data, seed=seed)
    if rank == 0:
        _warn_small_volumes(split.train, data.patch_size, data.spacing)
    preprocessing = Preprocessing.from_config(data)
    pre = preprocessing.transforms(labels=man.labels)
    items = _items(split.train, {d: i for i, d in enumerate(split.train_domains)})
    train_ds = _training_dataset(items, _training_transform(pre, data, man), data, man, world_size)
    train, sampler, generator = _training_loader(train_ds, items, data, steps_per_epoch, seed, rank, world_size)
    volumes = dict(labels=man.labels, cache=data.cache, num_workers=min(data.num_workers, 2))
    val_cases, test_cases = split.val[rank::world_size], split.test[rank::world_size]
    val = volume_loader(val_cases, preprocessing, **volumes) if val_cases else None
    test = volume_loader(test_cases, preprocessing, **volumes) if test_cases else None
    loaders = Loaders(
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
    loaders.set_epoch(0)
    return loaders


def _training_transform(pre: Compose, data: DataConfig, man: Manifest) -> Compose:
    """Preprocessing, padding up to the patch, and the crops centred by class (``data.class_ratios``, one weight per
    label value of the dataset) and, with ``data.small_components``, on small components of one class."""
    ratios = [1.0] * man.num_classes if data.class_ratios is None else data.class_ratios
    if len(ratios) != man.num_classes:
        raise ValueError(
            f"data.class_ratios={ratios}: expected {man.num_classes} weights, one per label value of {man.path}"
        )
    small = data.small_components
    centres = []
    if small.ratio > 0:
        if small.label >= man.num_classes:
            raise ValueError(
                f"data.small_components.label={small.label}: expected a label value of {man.path} "
                f"(0 to {man.num_classes - 1})"
            )
        ratios = [*ratios, small.ratio]
        centres.append(
            SmallComponentCentres(
                small.label, small.below_mm3, indices_key="label_cls_indices", max_indices=_MAX_INDICES
            )
        )
    patch = data.patch_size
    return Compose(
        [
            *pre.transforms,
            _PadToPatch(patch),
            ClassesToIndicesd(keys="label", num_classes=man.num_classes, max_samples_per_class=_MAX_INDICES),
            *centres,
            _CropByClass(
                keys=["image", "label"],
                label_key="label",
                spatial_size=patch,
                ratios=ratios,
                num_classes=man.num_classes,
                num_samples=data.samples_per_volume,
                indices_key="label_cls_indices",
                warn=False,
            ),
            _TrainItem(),
        ]
    )


def _training_dataset(items: list[dict], transform: Compose, data: DataConfig, man: Manifest, world_size: int):
    """The training volumes, cached in memory or on disk (keyed by what decides their voxels)."""
    decided_by = [
        data.spacing and list(data.spacing),
        data.clip_percentiles and list(data.clip_percentiles),
        data.intensity,
        data.patch_size,
        man.labels,
    ]
    small = data.small_components
    if small.ratio > 0:  # the cached items then hold the small components' centres too
        decided_by.append([small.label, small.below_mm3])
    fingerprint = hashlib.sha1(json.dumps(decided_by).encode()).hexdigest()[:16]
    cache_dir = data.cache_dir
    if world_size > 1 and data.cache and cache_dir is None:
        cache_dir = shared_cache_dir()
        log.info("%d ranks: preprocessed training volumes are cached on disk in %s", world_size, cache_dir)
    return _dataset(items, transform, cache=data.cache, cache_dir=cache_dir, fingerprint=fingerprint)


def _training_loader(dataset, items: list[dict], data: DataConfig, steps_per_epoch, seed: int, rank: int, world: int):
    """The loader of domain-balanced training batches, its sampler and its generator."""
    per_batch = data.batch_size // data.samples_per_volume
    n_items = (
        steps_per_epoch * per_batch if steps_per_epoch else max(-(-len(items) // (per_batch * world)), 1) * per_batch
    )
    sampler = DomainBalancedSampler(
        [it["domain"] for it in items], n_items, seed, batch_size=per_batch, num_replicas=world, rank=rank
    )
    generator = torch.Generator().manual_seed(_seed_for(seed, 0, rank))
    loader = DataLoader(
        dataset,
        batch_size=per_batch,
        sampler=sampler,
        num_workers=data.num_workers,
        drop_last=True,
        generator=generator,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, sampler, generator
