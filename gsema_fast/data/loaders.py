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

from gsema_fast.data.manifest import Case, Manifest, Split, load_manifest, split_cases
from gsema_fast.data.sampling import DomainBalancedSampler
from gsema_fast.data.transforms import (
    _CheckedCacheDataset,
    _CheckedDataset,
    _CropByClass,
    _dataset,
    _items,
    _PadToPatch,
    _TrainItem,
    preprocess_transforms,
    preprocessed_grid,
)
from gsema_fast.files import cache_root

log = logging.getLogger(__name__)

_MAX_INDICES = 50_000  # per class and case: bounds the cached crop-centre candidates (background has millions)


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
