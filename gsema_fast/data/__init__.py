"""Data: synthetic multi-centre 3DRA phantoms, NIfTI manifests and loaders, and the target-domain simulation T.

Public API (names are imported on first use, so ``synthesize`` needs neither torch nor MONAI):

- :func:`synthesize` (``gsema_fast.data.phantoms``): write the built-in multi-centre dataset; :data:`CENTRES`;
  :func:`builtin_dataset`: the same, in a per-user cache folder, synthesised on first use;
  :func:`dataset_folder`: a run's dataset folder from its ``data`` settings.
- :func:`load_manifest`, :func:`split_cases`, :func:`run_domains` (``gsema_fast.data.manifest``): a dataset's cases,
  their domains, and splits by domain.
- :func:`preprocess_transforms`, :class:`Preprocessing` (``gsema_fast.data.transforms``): the MONAI preprocessing
  every path shares.
- :func:`build_loaders`, :func:`volume_loader` (``gsema_fast.data.loaders``): training patches balanced over the
  domains (``gsema_fast.data.sampling``), whole volumes for validation and prediction.
- :func:`dataset_identity`, :func:`identity_changes` (``gsema_fast.data.identity``): what a run was trained on
  (cases, domains, file contents), recorded in its checkpoints and checked before a result is reused.
- :class:`TargetTransform` (``gsema_fast.data.target``): ``x_t, y_t = T(x_s, y_s)`` on batched device tensors.

A trainer does (``DataConfig``: ``gsema_fast.config``, a config's ``data`` section)::

    data = build_loaders(root, DataConfig(train_domains=[0, 1, 2], test_domain=3, patch_size=64, batch_size=3))
    T = TargetTransform(seed=0)
    for batch in data.train:                     # call data.set_epoch(e) first for exact resumption
        x_s, y_s = batch["image"].to(dev), batch["label"].to(dev)   # [B,1,D,H,W] float32, int64
        x_t, y_t = T(x_s, y_s)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "synthesize": "phantoms",
    "builtin_dataset": "phantoms",
    "dataset_folder": "phantoms",
    "CENTRES": "phantoms",
    "CentreStyle": "phantoms",
    "LABELS": "phantoms",
    "Case": "manifest",
    "Manifest": "manifest",
    "Split": "manifest",
    "load_manifest": "manifest",
    "split_cases": "manifest",
    "run_domains": "manifest",
    "Loaders": "loaders",
    "build_loaders": "loaders",
    "volume_loader": "loaders",
    "preprocess_transforms": "transforms",
    "Preprocessing": "transforms",
    "PREPROCESSING_KEYS": "transforms",
    "unwrap_transform_error": "transforms",
    "TargetTransform": "target",
    "dataset_identity": "identity",
    "identity_changes": "identity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__():
    return sorted(list(globals()) + __all__)
