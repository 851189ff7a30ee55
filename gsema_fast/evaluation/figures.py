"""Pictures of segmentations and latents: maximum-intensity projections with overlays, t-SNE of teacher latents.

- :func:`plot_case_mips`: the image's MIP along the three axes (in RAS orientation, at the true aspect ratio), with
  the reference and the prediction overlaid (vessel and aneurysm in two colours) and a third row that shows, per
  ray, the fraction of the class's voxels (reference or prediction) that are false positives or false negatives, so
  that a thin shell of boundary errors around a well-segmented sac stays faint and a missed sac is bright.
- :func:`plot_dataset_mips`: image and label MIPs of a few cases of every centre of a dataset (what the centres'
  acquisitions look like side by side).
- :func:`draw_progress`: a run's ``progress.png`` from its ``log.jsonl`` (losses, validation Dice, gradient
  agreement, learning rate against the step).
- :func:`draw_layer_agreement`: a GS-EMA run's ``layer_agreement.png``, the cosine of the source and target
  gradients per layer against the step (``train.layer_agreement``), with the share of layers in conflict.
- :func:`latent_tsne`: teacher latents of patches from every centre of a dataset, one t-SNE panel per checkpoint
  (e.g. an EMA and a GS-EMA run side by side), coloured by centre; a lower domain silhouette (computed on the latents
  themselves, not on the embedding) means centres overlap more, i.e. more domain-invariant features.

Figures are drawn on matplotlib's Agg canvas directly, so no display and no global backend switch are needed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from gsema_fast.data import Manifest, Preprocessing, load_manifest
from gsema_fast.evaluation.metrics import voxel_spacing
from gsema_fast.files import atomic_path
from gsema_fast.inference.checkpoint import LoadedCheckpoint, load_checkpoint
from gsema_fast.inference.window import preprocess_case

log = logging.getLogger(__name__)

__all__ = [
    "collect_latents",
    "error_fractions",
    "latent_tsne",
    "plot_case_mips",
    "plot_dataset_mips",
    "plot_latent_tsne",
]

# Class colours (RGB) by position among the foreground classes: vessel red, aneurysm yellow, then more.
_CLASS_COLOURS = [(0.9, 0.15, 0.1), (1.0, 0.85, 0.0), (0.2, 0.6, 1.0), (0.6, 0.3, 0.9)]
# Errors: false positive (predicted, not in the reference) magenta, false negative (missed) cyan; the later classes
# (aneurysm, the small one that matters) are drawn on top and brighter.
_FP_COLOUR = np.array([1.0, 0.0, 1.0])
_FN_COLOUR = np.array([0.0, 1.0, 1.0])
_AXES = (("sagittal", 0), ("coronal", 1), ("axial", 2))  # projection name and the RAS axis it collapses


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=fig.dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def _to_ras(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(arr, ornt)


def _ras_spacing(affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    spacing = voxel_spacing(affine)
    ornt = nib.orientations.io_orientation(affine)
    out = np.empty(3)
    out[ornt[:, 0].astype(int)] = spacing  # voxel axis k becomes RAS axis ornt[k, 0]
    return out


def _window(mip: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(mip, [1.0, 99.8])
    return np.clip((mip - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _foreground(labels: Mapping[str, Any]) -> list[tuple[str, int]]:
    return [
        (name, int(v))
        for name, v in labels.items()
        if isinstance(v, (int, np.integer)) and int(v) != 0 and name.lower() != "background"
    ]


def error_fractions(pred: np.ndarray, ref: np.ndarray, value: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per ray along ``axis``: the fraction of the voxels of class ``value`` (in the prediction or the reference)
    that are false positives, and the fraction that are false negatives; 0 where the ray meets neither."""
    in_pred, in_ref = pred == value, ref == value
    along_ray = np.maximum((in_pred | in_ref).sum(axis=axis), 1)
    return (in_pred & ~in_ref).sum(axis=axis) / along_ray, (in_ref & ~in_pred).sum(axis=axis) / along_ray


def plot_case_mips(
    image: np.ndarray,
    pred: np.ndarray,
    ref: np.ndarray,
    affine: np.ndarray,
    labels: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    title: str = "",
) -> Path:
    """Write a 3 x 3 figure: rows reference / prediction / errors, columns sagittal / coronal / axial MIPs.

    ``image``, ``pred``, ``ref``: arrays on the same voxel grid whose affine is ``affine`` (the image's own grid,
    any storage orientation); they are reoriented to RAS and shown at the voxel spacing's aspect ratio. Overlays
    are projections too: a pixel shows a class if any voxel along the ray has it (the later class on top). In the
    errors row a pixel's colour strength is the fraction of the class's voxels on its ray (reference or
    prediction) that are wrong: a maximum projection of the error masks would paint a whole sac as missed when
    only its outer shell is.
    """
    classes = _foreground(labels)
    image = _to_ras(np.asarray(image, np.float32), affine)
    pred = _to_ras(np.asarray(pred), affine)
    ref = _to_ras(np.asarray(ref), affine)
    if not image.shape == pred.shape == ref.shape:
        raise ValueError(f"image {image.shape}, prediction {pred.shape} and reference {ref.shape} differ in shape")
    spacing = _ras_spacing(affine)
    fig = Figure(figsize=(12, 12), dpi=100)
    grid = fig.subplots(3, 3)
    for col, (view, axis) in enumerate(_AXES):
        mip = _window(image.max(axis=axis))
        rest = [a for a in range(3) if a != axis]
        # Rows of the shown picture run along the second remaining axis, so that up is superior/anterior.
        aspect = spacing[rest[1]] / spacing[rest[0]]
        for row, source in enumerate(("reference", "prediction", "errors")):
            rgb = np.repeat(mip[..., None], 3, axis=-1)
            for k, (_, value) in enumerate(classes):
                colour = np.array(_CLASS_COLOURS[k % len(_CLASS_COLOURS)])
                p_proj = (pred == value).any(axis=axis)
                r_proj = (ref == value).any(axis=axis)
                if source == "errors":
                    weight = 0.55 if k == 0 and len(classes) > 1 else 1.0
                    fractions = error_fractions(pred, ref, value, axis)
                    for fraction, err_colour in zip(fractions, (_FP_COLOUR, _FN_COLOUR), strict=True):
                        strength = (weight * fraction)[..., None]
                        rgb[:] = (1 - strength) * rgb + strength * err_colour
                else:
                    shown = r_proj if source == "reference" else p_proj
                    rgb[shown] = 0.35 * rgb[shown] + 0.65 * colour
            ax = grid[row, col]
            ax.imshow(np.transpose(rgb, (1, 0, 2)), origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{view} MIP")
            if col == 0:
                ax.set_ylabel(source)
    handles = [Patch(color=_CLASS_COLOURS[k % len(_CLASS_COLOURS)], label=name) for k, (name, _) in enumerate(classes)]
    handles += [Patch(color=_FP_COLOUR, label="false positive"), Patch(color=_FN_COLOUR, label="false negative")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_dataset_mips(
    cases: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    labels: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    title: str = "",
) -> Path:
    """Write one row per case: the image's axial and coronal MIPs, then the same with the label overlaid.

    ``cases``: ``(caption, image, label, affine)`` per row, each pair on its own grid (any storage orientation,
    shown in RAS at the true aspect ratio).
    """
    if not cases:
        raise ValueError("plot_dataset_mips: no cases to draw")
    classes = _foreground(labels)
    views = (_AXES[2], _AXES[1])
    fig = Figure(figsize=(10, 2.6 * len(cases)), dpi=90)
    grid = fig.subplots(len(cases), 4, squeeze=False)
    for row, (caption, image, label, affine) in enumerate(cases):
        image = _to_ras(np.asarray(image, np.float32), affine)
        label = _to_ras(np.asarray(label), affine)
        spacing = _ras_spacing(affine)
        for k, (view, axis) in enumerate(views):
            mip = _window(image.max(axis=axis))
            rest = [a for a in range(3) if a != axis]
            aspect = spacing[rest[1]] / spacing[rest[0]]
            overlay = np.repeat(mip[..., None], 3, axis=-1)
            for c, (_, value) in enumerate(classes):
                shown = (label == value).any(axis=axis)
                overlay[shown] = 0.35 * overlay[shown] + 0.65 * np.array(_CLASS_COLOURS[c % len(_CLASS_COLOURS)])
            for col, picture in ((k, np.repeat(mip[..., None], 3, axis=-1)), (k + 2, overlay)):
                ax = grid[row, col]
                ax.imshow(np.transpose(picture, (1, 0, 2)), origin="lower", aspect=aspect, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{view} MIP" + (", labels" if col >= 2 else ""), fontsize=9)
        grid[row, 0].set_ylabel(caption, fontsize=9)
    handles = [Patch(color=_CLASS_COLOURS[k % len(_CLASS_COLOURS)], label=name) for k, (name, _) in enumerate(classes)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------- progress


def draw_progress(log_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """progress.png: losses, validation Dice, aligned fraction and learning rate against the step."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig = Figure(figsize=(11, 7), dpi=90)
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    for key in ("total", "dce_student_src", "dce_student_trg", "dce_teacher_trg", "bacl"):
        if train and key in train[0]:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax.set(title="losses", xlabel="step")
    ax = axes[0, 1]
    for key in sorted({k for r in val for k in r.get("dice", {})}):
        line = ax.plot([r["step"] for r in val], [r["dice"].get(key, float("nan")) for r in val], marker="o", label=key)
        student = [r for r in val if "student_dice" in r]
        if student:  # train.val_student: the student dashed, in its class's colour
            steps, dice = [r["step"] for r in student], [r["student_dice"].get(key, float("nan")) for r in student]
            ax.plot(steps, dice, linestyle="--", color=line[0].get_color(), label=f"{key} (student)")
    title = "validation Dice (teacher; student dashed)" if any("student_dice" in r for r in val) else None
    ax.set(title=title or "validation Dice (teacher)", xlabel="step", ylim=(0, 1))
    ax = axes[1, 0]
    if train and "aligned" in train[0]:
        ax.plot([r["step"] for r in train], [r["aligned"] for r in train], label="aligned fraction")
        ax.plot([r["step"] for r in train], [r["grad_cos"] for r in train], label="cos(g_src, g_trg)")
    ax.set(title="gradient agreement", xlabel="step")
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax = axes[1, 1]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(title="learning rate", xlabel="step", yscale="log")
    fig.tight_layout()
    _save(fig, out_path)


def draw_layer_agreement(log_path: str | os.PathLike, out_path: str | os.PathLike) -> bool:
    """layer_agreement.png: per layer (rows, input to output) and log interval (columns) the cosine of the source
    and target gradients, red where they conflict, blue where they agree; below it, the share of layers in conflict
    beside the whole network's cosine. Returns False (and draws nothing) when the log holds no per-layer record."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train" and r.get("layer_cos")]
    if not train:
        return False
    layers = list(train[-1]["layer_cos"])
    steps = [r["step"] for r in train]
    cos = np.array([[r["layer_cos"].get(name, np.nan) for r in train] for name in layers], dtype=float)
    fig = Figure(figsize=(11, 3 + 0.12 * len(layers)), dpi=90)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [max(3, len(layers) // 6), 1]})
    image = top.imshow(
        cos, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest",
        extent=(steps[0], steps[-1], len(layers) - 0.5, -0.5),
    )  # fmt: skip
    top.set_yticks(range(len(layers)), [_short_layer(n) for n in layers], fontsize=5)
    top.set(title="cos(g_src, g_trg) per layer", ylabel="layer")
    fig.colorbar(image, ax=top, fraction=0.02, pad=0.01)
    conflict = np.nanmean(np.where(np.isnan(cos), np.nan, cos < 0), axis=0)
    bottom.plot(steps, conflict, label="share of layers with cos < 0")
    if "grad_cos" in train[0]:
        bottom.plot(steps, [r["grad_cos"] for r in train], label="whole network's cos")
    bottom.axhline(0, color="grey", linewidth=0.5)
    bottom.set(xlabel="step")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out_path)
    return True


def _short_layer(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


# ----------------------------------------------------------------------------------------------------- latents
def _patch_starts(
    label: torch.Tensor | None, shape: Sequence[int], roi: Sequence[int], count: int, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """Corners of ``count`` windows, centred on random foreground voxels where there are any (the vessels are
    what the network has to represent; a background-only patch says little about a centre's appearance of them)."""
    if label is not None and bool((label > 0).any()):
        points = torch.nonzero(label.reshape(shape) > 0).numpy()
    else:
        points = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    chosen = points[rng.choice(len(points), size=count, replace=len(points) < count)]
    return [
        tuple(int(min(max(c - r // 2, 0), s - r)) for c, r, s in zip(centre, roi, shape, strict=True))
        for centre in chosen
    ]


def collect_latents(
    net: torch.nn.Module,
    volumes: Iterable[tuple[torch.Tensor, torch.Tensor | None, str]],
    *,
    roi_size: Sequence[int],
    patches_per_case: int = 8,
    seed: int = 0,
    batch_size: int = 4,
) -> tuple[np.ndarray, list[str]]:
    """Spatially averaged latents ``[N, C]`` of ``patches_per_case`` windows per volume, and each one's domain.

    ``volumes``: ``(image [1, D, H, W], label [1, D, H, W] or None, domain)`` preprocessed as for the network;
    volumes smaller than ``roi_size`` are padded with their minimum.
    """
    rng = np.random.default_rng(seed)
    device = next(net.parameters()).device
    roi = [int(r) for r in roi_size]
    features: list[np.ndarray] = []
    domains: list[str] = []
    was_training = net.training
    net.eval()
    try:
        for image, label, domain in volumes:
            image = torch.as_tensor(image).as_subclass(torch.Tensor)
            shape = list(image.shape[1:])
            pad = [max(r - s, 0) for r, s in zip(roi, shape, strict=True)]
            if any(pad):
                spec = [p for axis in reversed(range(3)) for p in (0, pad[axis])]
                image = torch.nn.functional.pad(image, spec, value=float(image.min()))
                if label is not None:
                    label = torch.nn.functional.pad(torch.as_tensor(label).as_subclass(torch.Tensor), spec)
                shape = list(image.shape[1:])
            if label is not None:
                label = torch.as_tensor(label).as_subclass(torch.Tensor)
            starts = _patch_starts(label, shape, roi, patches_per_case, rng)
            crops = torch.stack(
                [image[:, s[0] : s[0] + roi[0], s[1] : s[1] + roi[1], s[2] : s[2] + roi[2]] for s in starts]
            )
            with torch.no_grad():
                for i in range(0, len(crops), batch_size):
                    _, latent = net(crops[i : i + batch_size].to(device))
                    features.append(latent.float().mean(dim=(2, 3, 4)).cpu().numpy())
            domains += [str(domain)] * len(starts)
    finally:
        net.train(was_training)
    return np.concatenate(features) if features else np.zeros((0, 0), np.float32), domains


def plot_latent_tsne(
    panels: Mapping[str, tuple[np.ndarray, Sequence[str]]],
    path: str | os.PathLike,
    *,
    unseen: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """One t-SNE panel per entry of ``panels`` (title -> (features [N, C], domain of each row)), coloured by domain;
    ``unseen`` domains are drawn as triangles. Each title gets the domain silhouette of its standardised features."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    unseen = {str(d) for d in unseen}
    all_domains = sorted({d for _, doms in panels.values() for d in doms}, key=lambda d: (d in unseen, d))
    colours = ListedColormap(_tab10()).colors
    fig = Figure(figsize=(5.5 * len(panels), 5.5), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, (feats, doms)) in zip(axes, panels.items(), strict=True):
        doms = np.asarray([str(d) for d in doms])
        if len(feats) < 5:
            raise ValueError(f"t-SNE of {title!r}: {len(feats)} latent vectors; at least 5 are needed")
        x = StandardScaler().fit_transform(np.asarray(feats, np.float64))
        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        score = silhouette_score(x, doms) if 1 < len(set(doms)) < len(x) else float("nan")
        for k, d in enumerate(all_domains):
            sel = doms == d
            if sel.any():
                ax.scatter(
                    emb[sel, 0],
                    emb[sel, 1],
                    s=22,
                    color=colours[k % len(colours)],
                    alpha=0.8,
                    marker="^" if d in unseen else "o",
                    edgecolors="none",
                )
        ax.set_title(f"{title}\ndomain silhouette {score:.3f} (lower: centres overlap more)", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        Line2D(
            [],
            [],
            linestyle="",
            marker="^" if d in unseen else "o",
            color=colours[k % len(colours)],
            label=f"centre {d}{' (unseen)' if d in unseen else ''}",
        )
        for k, d in enumerate(all_domains)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle("t-SNE of teacher latents (patch means), coloured by centre")
    return _save(fig, path)


def _tab10() -> list:
    from matplotlib import colormaps

    return list(colormaps["tab10"].colors)


def latent_tsne(
    checkpoints: Sequence[Any],
    data: Any,
    path: str | os.PathLike,
    *,
    cases_per_domain: int = 3,
    patches_per_case: int = 8,
    device: str | torch.device | None = None,
    config=None,
    unseen: Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """t-SNE figure of the teacher latents of ``checkpoints`` (paths or loaded checkpoints, one panel each) on up to
    ``cases_per_domain`` cases of every centre of ``data`` (a dataset folder or a loaded manifest).

    ``unseen``: centres drawn as triangles (default: each first checkpoint's test domain).
    """
    man = data if isinstance(data, Manifest) else load_manifest(data)
    chosen = [c for d in man.domains for c in man.cases_of(d)[:cases_per_domain]]
    prepared: dict[Preprocessing, list] = {}
    panels: dict[str, tuple[np.ndarray, list[str]]] = {}
    for entry in checkpoints:
        loaded = (
            entry
            if isinstance(entry, LoadedCheckpoint)
            else load_checkpoint(entry, weights="teacher", device=device, config=config)
        )
        cfg = loaded.config
        if unseen is None:
            unseen = [str(cfg.data.test_domain) if cfg.data.test_domain is not None else man.domains[-1]]
        key = Preprocessing.from_config(cfg.data)
        if key not in prepared:  # checkpoints of one study share their preprocessing: load the volumes once
            transform = key.transforms(labels=man.labels)
            prepared[key] = []
            for c in chosen:
                item = preprocess_case(transform, {"image": str(c.image), "label": str(c.label), "case": c.name})
                prepared[key].append((item["image"], item["label"], c.domain))
        feats, doms = collect_latents(
            loaded.net, prepared[key], roi_size=cfg.data.patch_size, patches_per_case=patches_per_case, seed=seed
        )
        title = f"{loaded.path.parent.name}/{loaded.path.name}: ema.mode={cfg.ema.mode}"
        while title in panels:
            title += "'"
        panels[title] = (feats, doms)
    out = plot_latent_tsne(panels, path, unseen=unseen or (), seed=seed)
    log.info("wrote %s", out)
    return out
