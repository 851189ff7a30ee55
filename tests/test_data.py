"""gsema_fast.data: synthetic multi-centre phantoms, manifests and loaders, and the target-domain transform T."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch
from monai.transforms import Invertd
from scipy import ndimage
from scipy.stats import wasserstein_distance

from gsema_fast.cli import main as cli_main
from gsema_fast.config import DataConfig
from gsema_fast.data import (
    CENTRES,
    LABELS,
    CentreStyle,
    Preprocessing,
    TargetTransform,
    build_loaders,
    load_manifest,
    preprocess_transforms,
    run_domains,
    split_cases,
    synthesize,
    volume_loader,
)
from gsema_fast.data.loaders import shared_cache_dir
from gsema_fast.data.phantoms import acquisition, anatomy, writer
from gsema_fast.data.target import ORDER
from gsema_fast.data.transforms import SmallComponentCentres
from gsema_fast.files import cache_root

# tiny tensors: a second thread only adds synchronisation
pytestmark = pytest.mark.usefixtures("one_thread")

HAS_CUDA = torch.cuda.is_available()


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """Four centres, three cases each, small enough for a few seconds."""
    return synthesize(
        tmp_path_factory.mktemp("synth") / "ds", domains=4, cases_per_domain=3, size=48, seed=0, workers=1
    )


# ---------------------------------------------------------------------------------------------------- synth


@pytest.mark.slow
def test_synth_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = synthesize(tmp_path / "a", domains=4, cases_per_domain=1, size=32, seed=5, workers=1)
    b = synthesize(tmp_path / "b", domains=4, cases_per_domain=1, size=32, seed=5, workers=2)
    c = synthesize(tmp_path / "c", domains=4, cases_per_domain=1, size=32, seed=6, workers=1)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert len(da) == 4 * 2 + 1
    assert da == db
    images = [k for k in da if k.startswith("imagesTr")]
    assert all(da[k] != dc[k] for k in images)
    assert not [p for p in a.rglob(".*")], "temporary files left behind"


def test_synth_files_load_with_the_right_grid(synth_root):
    manifest = json.loads((synth_root / "dataset.json").read_text())
    assert manifest["labels"] == {"background": 0, "vessel": 1, "aneurysm": 2}
    assert manifest["file_ending"] == ".nii.gz" and manifest["numTraining"] == 12
    assert set(manifest["channel_names"]) == {"0"}
    for e in manifest["training"]:
        style = CENTRES[e["domain"]]
        assert e["case"].startswith(style.name)
        image, label = nib.load(synth_root / e["image"]), nib.load(synth_root / e["label"])
        assert image.shape == label.shape == tuple(e["shape"])
        np.testing.assert_allclose(image.header.get_zooms(), e["spacing"], rtol=1e-5)
        np.testing.assert_allclose(image.affine, label.affine)
        np.testing.assert_allclose(np.abs(np.diag(image.affine)[:3]), e["spacing"], rtol=1e-5)
        assert "".join(nib.aff2axcodes(image.affine)) == ("LPS" if style.axcodes == "LPS" else "RAS")
        assert image.get_data_dtype() == np.dtype(style.dtype)
        assert label.get_data_dtype() == np.uint8
        assert image.header.get_xyzt_units()[0] == "mm"
        # the field of view is shared by the centres whatever their matrix: about 48 * 0.4 mm
        fov = np.asarray(e["shape"]) * np.asarray(e["spacing"])
        assert np.all((fov > 48 * 0.4 * 0.89) & (fov < 48 * 0.4 * 1.11))
    shapes = {e["domain"]: tuple(e["shape"]) for e in manifest["training"]}
    assert len(set(shapes.values())) >= 3, "centres should differ in matrix size"


def test_synth_all_classes_present(synth_root):
    manifest = json.loads((synth_root / "dataset.json").read_text())
    seen = set()
    n_aneurysm_cases = 0
    for e in manifest["training"]:
        lab = np.asarray(nib.load(synth_root / e["label"]).dataobj)
        values = set(np.unique(lab).tolist())
        assert values <= {0, 1, 2}
        assert 1 in values, f"{e['case']} has no vessel"
        assert (lab == 2).sum() == e["aneurysm_voxels"]
        n_aneurysm_cases += 2 in values
        seen |= values
    assert seen == {0, 1, 2}
    assert n_aneurysm_cases >= 6


def test_dome_diameters_follow_the_clinical_distribution():
    rng = np.random.default_rng(0)
    d = np.array([anatomy.dome_diameter(rng) for _ in range(4000)])
    assert d.min() >= 2.0 and d.max() <= 15.0
    assert 5.0 < np.median(d) < 6.0
    # most sacs referred for 3DRA are 3-12 mm across; small and large ones exist
    assert 0.8 < np.mean((d >= 3) & (d <= 12)) < 0.97
    assert (d < 3).any() and (d > 12).any()


def test_every_case_has_an_aneurysm_and_sizes_do_not_depend_on_the_centre():
    """The anatomy is the same distribution for every centre (only acquisition differs): at least one sac per case,
    and the dome diameters drawn with each centre's case streams are indistinguishable (KS test)."""
    from scipy.stats import ks_2samp

    fov = np.full(3, 96 * acquisition.REF_SPACING_MM)
    diameters = {}
    for domain in range(4):
        ds = []
        for index in range(40):
            _, aneurysms = anatomy.draw_anatomy(np.random.default_rng([0, domain, index]), fov)
            assert 1 <= len(aneurysms) <= 2
            ds += [2 * a.axes.max() for a in aneurysms]
        diameters[domain] = np.array(ds)
        assert 4.0 < np.median(ds) < 7.5, f"centre {domain}: median dome {np.median(ds):.1f} mm"
    for a, b in itertools.combinations(diameters, 2):
        assert ks_2samp(diameters[a], diameters[b]).pvalue > 0.01


def test_synth_cases_hold_sacs_and_distractors(synth_root):
    manifest = json.loads((synth_root / "dataset.json").read_text())
    for e in manifest["training"]:
        assert e["aneurysms"] >= 1 and e["aneurysm_voxels"] > 0, e["case"]
        assert len(e["dome_diameters_mm"]) == e["aneurysms"]
    # vessel loops, crossings and infundibula are drawn (all labelled vessel)
    rng = np.random.default_rng(3)
    trees = [anatomy.grow_tree(rng, np.full(3, 38.4)) for _ in range(30)]
    flared = sum(radii[0] > 1.5 * radii[-1] for t in trees for _, radii in t.branches)
    assert flared > 0, "no infundibulum in 30 trees"

    def turn(points):
        d = np.diff(points, axis=0)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        return np.degrees(np.arccos(np.clip((d[:-1] * d[1:]).sum(1), -1, 1))).sum()

    assert any(turn(p) > 240 for t in trees for p, _ in t.branches), "no vessel loop in 30 trees"
    assert writer.FORMAT_VERSION >= 2


def test_centres_differ_measurably(synth_root):
    """After the loader's normalisation (percentile clip + z-score), cases are told apart by centre: distances
    (Wasserstein, summed) between the distributions of their intensities and of their fine texture (the volume minus
    its 1-voxel Gaussian blur: noise model, point-spread function, rings, streaks) are larger between centres than
    within one, and a case's nearest centre (mean distance to its cases, itself left out) is mostly its own. Not
    every pair of centres separates on every case: the anatomy varies as in patients (the vessel fraction of a
    volume ranges 2-8 %), and two centres may share a contrast."""
    from scipy.ndimage import gaussian_filter

    manifest = json.loads((synth_root / "dataset.json").read_text())
    values = []
    for e in manifest["training"]:
        a = np.asarray(nib.load(synth_root / e["image"]).dataobj, dtype=np.float64)
        lo, hi = np.percentile(a, [0.5, 99.5])
        a = np.clip(a, lo, hi)
        a = (a - a.mean()) / a.std()
        values.append((e["domain"], a.ravel()[::7], (a - gaussian_filter(a, 1.0)).ravel()[::7]))
    n, K = len(values), 4
    W = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        W[i, j] = W[j, i] = sum(wasserstein_distance(values[i][k], values[j][k]) for k in (1, 2))
    domain = np.array([v[0] for v in values])
    others = ~np.eye(n, dtype=bool)
    same = (domain[:, None] == domain[None, :]) & others
    assert W[~same & others].mean() > 2 * W[same].mean(), np.round(W, 3)
    nearest = [np.argmin([W[i, (domain == d) & others[i]].mean() for d in range(K)]) for i in range(n)]
    assert np.mean(np.array(nearest) == domain) >= 2 / 3, (nearest, domain.tolist())


def test_centre_acquisition_styles_differ_measurably(synth_root):
    """Per case, from the stored image and its label: vessel contrast over background noise, fine-scale noise and
    coarse background structure (both relative to the vessel contrast). Every pair of centres is separated by more
    than three pooled within-centre standard deviations in at least one of them."""
    from scipy import ndimage

    manifest = json.loads((synth_root / "dataset.json").read_text())
    features: dict[int, list] = {}
    for e in manifest["training"]:
        a = np.asarray(nib.load(synth_root / e["image"]).dataobj, dtype=np.float64)
        lab = np.asarray(nib.load(synth_root / e["label"]).dataobj)
        far = ~ndimage.binary_dilation(lab > 0, iterations=3)
        background = np.median(a[far])
        contrast = np.median(a[ndimage.binary_erosion(lab == 1)]) - background
        fine = (a - ndimage.uniform_filter(a, 3))[far].std() / contrast
        coarse = ndimage.uniform_filter(a, 5)[far].std() / contrast
        features.setdefault(e["domain"], []).append((contrast / a[far].std(), fine, coarse))
    f = {d: np.asarray(v) for d, v in features.items()}
    for i, j in itertools.combinations(sorted(f), 2):
        pooled = np.sqrt((f[i].var(0, ddof=1) + f[j].var(0, ddof=1)) / 2)
        separation = np.abs(f[i].mean(0) - f[j].mean(0)) / pooled
        assert separation.max() > 3, f"centres {i} and {j}: separations {np.round(separation, 2)}"


def test_synth_reuses_a_complete_folder_and_redoes_an_interrupted_one(tmp_path, caplog):
    root = synthesize(tmp_path / "ds", domains=2, cases_per_domain=1, size=24, seed=1, workers=1)
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    with caplog.at_level(logging.INFO, logger="gsema_fast.data.phantoms.writer"):
        synthesize(root, domains=2, cases_per_domain=1, size=24, seed=1)
    assert "nothing to do" in caplog.text
    assert stamp == {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    # an interruption before the manifest was written: the folder is not taken as complete
    before = _digests(root)
    (root / "dataset.json").unlink()
    synthesize(root, domains=2, cases_per_domain=1, size=24, seed=1)
    assert _digests(root) == before
    # another dataset, even one of this generator, is never replaced unasked; with overwrite it is
    message = r"holds another synthesised dataset \(2 centre\(s\) x 1 case\(s\), size 24, seed 1, .*--overwrite"
    with pytest.raises(FileExistsError, match=message):
        synthesize(root, domains=2, cases_per_domain=1, size=24, seed=2)
    assert _digests(root) == before
    synthesize(root, domains=2, cases_per_domain=1, size=24, seed=2, overwrite=True)
    assert json.loads((root / "dataset.json").read_text())["synth"]["seed"] == 2


# The centre table as it stood before it was written with keywords: eighteen positional values per centre, in the
# order of CentreStyle's fields. The keyword table must hold the same values, so the phantoms keep their bytes.
POSITIONAL_CENTRES = (
    (
        "A",
        (1.0, 1.0, 1.0),
        "RAS",
        0.22,
        0.10,
        1.00,
        0.15,
        0.90,
        1.00,
        0.04,
        0.10,
        "gaussian",
        0.035,
        "",
        0.0,
        "uint16",
        3000.0,
        100.0,
    ),
    (
        "B",
        (0.875, 0.875, 0.875),
        "LPS",
        0.38,
        0.30,
        0.75,
        0.30,
        0.80,
        0.75,
        0.04,
        0.25,
        "poisson",
        0.09,
        "rings",
        0.05,
        "int16",
        2000.0,
        -600.0,
    ),
    (
        "C",
        (1.0, 1.0, 0.75),
        "RAS",
        0.30,
        0.06,
        1.00,
        0.25,
        0.70,
        1.50,
        0.08,
        0.18,
        "correlated",
        0.07,
        "",
        0.0,
        "float32",
        1.0,
        0.0,
    ),
    (
        "D",
        (0.75, 0.75, 0.75),
        "LPS",
        0.50,
        0.25,
        0.70,
        0.40,
        0.65,
        0.70,
        0.10,
        0.40,
        "rician",
        0.07,
        "streaks",
        0.15,
        "int16",
        1200.0,
        0.0,
    ),
    (
        "E",
        (0.8, 0.8, 1.0),
        "RAS",
        0.45,
        0.06,
        1.10,
        0.50,
        1.00,
        1.70,
        0.05,
        0.30,
        "gaussian",
        0.08,
        "rings",
        0.08,
        "uint16",
        4000.0,
        0.0,
    ),
    (
        "F",
        (0.9, 0.9, 0.9),
        "RAS",
        0.28,
        0.25,
        0.70,
        0.20,
        0.75,
        0.90,
        0.16,
        0.15,
        "correlated",
        0.05,
        "streaks",
        0.10,
        "float32",
        1.0,
        -0.25,
    ),
)


def test_the_centre_table_written_with_keywords_draws_the_phantoms_it_drew_before():
    names = [f.name for f in dataclasses.fields(CentreStyle)]
    with pytest.raises(TypeError):  # keywords only: a positional table cannot come back
        CentreStyle(*POSITIONAL_CENTRES[0])
    assert len(CENTRES) == len(POSITIONAL_CENTRES)
    for domain, row in enumerate(POSITIONAL_CENTRES):
        before = CentreStyle(**dict(zip(names, row, strict=True)))
        assert CENTRES[domain] == before
        old, new = (acquisition.scan_case(style, domain, 0, 24, 5) for style in (before, CENTRES[domain]))
        assert new.image.dtype == old.image.dtype and new.image.tobytes() == old.image.tobytes()
        assert new.label.tobytes() == old.label.tobytes() and np.array_equal(new.affine, old.affine)


def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.nii.gz"

    def broken_save(img, path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.nib, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        writer._atomic_save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), target)
    assert list(tmp_path.iterdir()) == []


def test_synth_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="domains"):
        synthesize(tmp_path, domains=len(CENTRES) + 1)
    with pytest.raises(ValueError, match="size"):
        synthesize(tmp_path, size=8)
    with pytest.raises(ValueError, match="cases_per_domain"):
        synthesize(tmp_path, cases_per_domain=0)


def test_cached_data_lives_under_the_per_user_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "gsema-fast"
    assert shared_cache_dir() == cache_root() / "preprocessed"
    calls = []
    monkeypatch.setattr(writer, "synthesize", lambda folder, **kwargs: calls.append(Path(folder)) or Path(folder))
    writer.builtin_dataset(domains=2, cases_per_domain=1, size=24, seed=5)
    assert calls == [cache_root() / "phantoms-d2-n1-s24-seed5"]
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # unset or empty: the home folder's .cache
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "gsema-fast"


def test_cli_synth(tmp_path):
    assert (
        cli_main(["synth", "--out", str(tmp_path / "ds"), "--domains", "2", "--cases-per-domain", "1", "--size", "24"])
        == 0
    )
    assert len(load_manifest(tmp_path / "ds").cases) == 2
    assert cli_main(["synth", "--out", str(tmp_path / "bad"), "--size", "4"]) == 2


# ------------------------------------------------------------------------------------------------- loaders


def test_loaders_shapes_balance_and_splits(synth_root):
    data = build_loaders(
        synth_root,
        DataConfig(train_domains=[0, 1, 2], test_domain=3, patch_size=(64, 64, 64), batch_size=3),
        steps_per_epoch=3,
        seed=0,
    )
    assert data.domains == ["0", "1", "2"] and data.num_classes == 3
    assert {c.domain for c in data.split.val} == {"0", "1", "2"} and len(data.split.val) == 3
    assert {c.domain for c in data.split.test} == {"3"} and len(data.split.test) == 3
    assert not {c.name for c in data.split.train} & {c.name for c in data.split.val}
    batches = list(data.train)
    assert len(batches) == 3
    for b in batches:
        # the 48^3 volumes are padded up to the 64^3 patch
        assert type(b["image"]) is torch.Tensor and type(b["label"]) is torch.Tensor
        assert b["image"].shape == (3, 1, 64, 64, 64) and b["image"].dtype == torch.float32
        assert b["label"].shape == (3, 1, 64, 64, 64) and b["label"].dtype == torch.int64
        assert sorted(b["domain"].tolist()) == [0, 1, 2], "each batch of K patches holds one per domain"
        assert set(b["label"].unique().tolist()) <= {0, 1, 2}
        assert torch.isfinite(b["image"]).all()
    vol = next(iter(data.val))
    assert vol["image"].shape[:2] == (1, 1) and vol["label"].dtype == torch.uint8
    assert vol["image"].affine.shape == (1, 4, 4)
    assert abs(float(vol["image"].mean())) < 0.05 and abs(float(vol["image"].std()) - 1) < 0.05  # z-scored
    assert vol["domain"][0] in {"0", "1", "2"}
    test_vol = next(iter(data.test))
    # orientation is normalised to RAS (centre D stores LPS)
    assert "".join(nib.aff2axcodes(test_vol["image"].affine[0].numpy())) == "RAS"


def test_loaders_reproducible_per_epoch(synth_root):
    data = DataConfig(train_domains=[0, 1, 2], test_domain=3, patch_size=(32, 32, 32), batch_size=3)
    a = build_loaders(synth_root, data, steps_per_epoch=2, seed=4)
    b = build_loaders(synth_root, data, steps_per_epoch=2, seed=4)
    a.set_epoch(2)
    b.set_epoch(1)
    list(b.train)  # another epoch in between must not matter
    b.set_epoch(2)
    for x, y in zip(a.train, b.train, strict=True):
        assert x["case"] == y["case"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    a.set_epoch(3)
    b.set_epoch(4)
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a.train, b.train, strict=True))


def test_resampling_to_a_spacing_and_back(synth_root):
    """Volumes resampled to a common spacing (RAS); Invertd maps a prediction back to the file's own grid."""
    man = load_manifest(synth_root)
    case = man.cases_of(3)[0]  # centre D: stored LPS on a coarser grid
    loader = volume_loader([case], Preprocessing(spacing=(0.3, 0.3, 0.3)), labels=man.labels)
    item = next(iter(loader))
    np.testing.assert_allclose(item["image"].affine[0].diag()[:3].numpy(), [0.3, 0.3, 0.3])
    assert item["label"].dtype == torch.uint8 and set(item["label"].unique().tolist()) <= {0, 1, 2}
    original = nib.load(case.label)
    assert item["image"].shape[2:] != original.shape
    invert = Invertd(keys="pred", transform=loader.dataset.transform, orig_keys="image", nearest_interp=True)
    one = decollate_batch(item)[0]
    one["pred"] = one["label"].clone()
    back = invert(one)["pred"]
    assert back.shape[1:] == original.shape
    np.testing.assert_allclose(back.affine.numpy(), original.affine, atol=1e-4)
    assert (back[0].numpy() == np.asarray(original.dataobj)).mean() > 0.98


def test_preprocessing_is_checked_by_the_data_section():
    """Preprocessing settings have the data section's types, rules and errors, however they are made."""
    assert Preprocessing(spacing=0.5).spacing == (0.5, 0.5, 0.5)
    assert Preprocessing.from_config(DataConfig(spacing=[1, 1, 2])) == Preprocessing(spacing=(1.0, 1.0, 2.0))
    assert len({Preprocessing(), Preprocessing.from_config(DataConfig())}) == 1, "equal settings: one key"
    with pytest.raises(ValueError, match=r"^data\.intensity: expected one of 'zscore', 'minmax', 'none', got 'z'"):
        Preprocessing(intensity="z")
    with pytest.raises(ValueError, match=r"^data\.spacing: expected a list of 3 finite numbers > 0"):
        Preprocessing(spacing=(1, 0, 1))
    with pytest.raises(ValueError, match=r"^data\.clip_percentiles: expected \[low, high\] with low < high"):
        Preprocessing(clip_percentiles=(99, 1))
    with pytest.raises(TypeError, match="preprocessing must be a Preprocessing, got dict"):
        preprocess_transforms({"intensity": "zscore"})


def test_class_ratios_oversample_aneurysms(synth_root):
    kw = dict(train_domains=[0, 1, 2], test_domain=3, patch_size=(16, 16, 16), batch_size=3)
    has_aneurysm = {
        c.name: e["aneurysms"] > 0
        for c, e in zip(
            load_manifest(synth_root).cases,
            json.loads((synth_root / "dataset.json").read_text())["training"],
            strict=True,
        )
    }
    for b in build_loaders(synth_root, DataConfig(class_ratios=(0, 0, 1), **kw), steps_per_epoch=4).train:
        for case, label in zip(b["case"], b["label"], strict=True):
            # cases without an aneurysm fall back to the classes they have instead of failing
            assert (label == 2).any() == has_aneurysm[case]
    for b in build_loaders(synth_root, DataConfig(class_ratios=(0, 1, 0), **kw), steps_per_epoch=4).train:
        assert all((label == 1).any() for label in b["label"])


def test_small_component_centres_are_the_voxels_of_small_components_only():
    label = np.zeros((1, 12, 12, 12), dtype=np.uint8)
    label[0, 1:6, 1:6, 1:6] = 2  # 125 voxels
    label[0, 9, 9, 9] = 2  # 1 voxel
    label[0, 10, 10, 10] = 2  # touches it diagonally: the same 26-connected component of 2 voxels
    label[0, 8, 1:4, 1] = 1  # another class
    item = {"label": MetaTensor(torch.as_tensor(label), affine=torch.diag(torch.tensor([0.5, 0.5, 0.5, 1.0])))}
    item["cls"] = [np.zeros(0, dtype=np.int64)]
    small = SmallComponentCentres(2, below_mm3=10.0, indices_key="cls", max_indices=100)  # voxels of 0.125 mm^3
    (kept,) = small(item)["cls"][1:]
    assert sorted(np.unravel_index(kept, (12, 12, 12))[0].tolist()) == [9, 10]
    both = SmallComponentCentres(2, below_mm3=16.0, indices_key="cls", max_indices=100)(item)["cls"][1]
    assert 50 <= len(both) <= 100  # 127 voxels under 16 mm^3, every second one kept: under the cap
    none = SmallComponentCentres(2, below_mm3=0.2, indices_key="cls", max_indices=100)(item)["cls"][1]
    assert len(none) == 0  # no component under 0.2 mm^3
    assert len(item["cls"]) == 1  # the input is not changed


def _smallest_sac_mm3(root: Path) -> dict[str, float]:
    """Each case's smallest aneurysm component (26-connected) in mm^3, from its label file (inf: no sac)."""
    smallest = {}
    for case in load_manifest(root).cases:
        label = nib.load(case.label)
        components, count = ndimage.label(np.asarray(label.dataobj) == 2, structure=np.ones((3, 3, 3)))
        voxels = np.bincount(components.ravel())[1:]
        smallest[case.name] = float(voxels.min() * np.prod(label.header.get_zooms()[:3])) if count else np.inf
    return smallest


def test_small_components_centre_the_patches_on_small_sacs(synth_root):
    kw = dict(train_domains=[0, 1, 2], test_domain=3, patch_size=(16, 16, 16), batch_size=3)
    smallest = _smallest_sac_mm3(synth_root)
    training = sorted(v for c, v in smallest.items() if not c.startswith("D"))
    limit = (training[len(training) // 2 - 1] + training[len(training) // 2]) / 2  # about half the cases below
    # Patches centred on vessel only, or (a million times likelier) on a small sac where the case has one.
    config = DataConfig(class_ratios=(0, 1, 0), small_components={"ratio": 1e6, "label": 2, "below_mm3": limit}, **kw)
    seen = {True: [], False: []}
    for b in build_loaders(synth_root, config, steps_per_epoch=12).train:
        for case, label in zip(b["case"], b["label"], strict=True):
            seen[smallest[case] < limit].append(((label == 2).any().item(), (label == 1).any().item()))
    assert seen[True] and all(sac for sac, _ in seen[True])
    assert seen[False] and all(vessel for _, vessel in seen[False])
    assert not all(sac for sac, _ in seen[False])  # the large sacs are not what centred those
    with pytest.raises(ValueError, match=r"data\.small_components\.label=3: expected a label value of .*dataset\.json"):
        build_loaders(synth_root, DataConfig(small_components={"ratio": 1, "label": 3}, **kw))


def test_disk_cache_is_written_atomically_and_survives_corruption(synth_root, tmp_path, caplog):
    data = DataConfig(
        train_domains=[0, 1], test_domain=None, patch_size=(32, 32, 32), batch_size=2, cache_dir=tmp_path / "cache"
    )
    kw = dict(steps_per_epoch=2, seed=0)
    first = [b["image"] for b in build_loaders(synth_root, data, **kw).train]
    files = sorted((tmp_path / "cache").iterdir())
    assert files and all(f.suffix == ".pt" and not f.name.startswith(".") for f in files)
    files[0].write_bytes(files[0].read_bytes()[:100])  # a half-written file, as a copy interrupted would leave
    with caplog.at_level(logging.WARNING):
        again = [b["image"] for b in build_loaders(synth_root, data, **kw).train]
    assert "unreadable" in caplog.text
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert torch.load(files[0], weights_only=True)  # rewritten whole


# ----------------------------------------------------------------------------------------------- bad input


def _raw_dataset(root: Path, cases: dict[str, str], *, label_value: int = 1, size: int = 20) -> Path:
    """An nnU-Net v2 raw dataset (no domains in dataset.json) with a bright cube labelled ``label_value``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name in cases:
        img = np.zeros((size,) * 3, np.float32)
        lab = np.zeros((size,) * 3, np.uint8)
        img[5:12, 5:12, 5:12] = 1.0
        lab[5:12, 5:12, 5:12] = label_value
        affine = np.diag([0.5, 0.5, 0.5, 1.0])
        nib.save(nib.Nifti1Image(img, affine), root / "imagesTr" / f"{name}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), root / "labelsTr" / f"{name}.nii.gz")
    meta = {"channel_names": {"0": "3DRA"}, "labels": dict(LABELS), "numTraining": len(cases), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


CASES = {"p1": "north", "p2": "north", "p3": "south", "p4": "south"}


def test_nnunet_raw_with_csv_or_json_domain_map(tmp_path):
    root = _raw_dataset(tmp_path / "raw", CASES)
    (tmp_path / "map.csv").write_text("case,domain\n" + "".join(f"{c},{d}\n" for c, d in CASES.items()))
    (tmp_path / "map.json").write_text(json.dumps(CASES))
    for m in ("map.csv", "map.json"):
        man = load_manifest(root, tmp_path / m)
        assert man.domains == ["north", "south"] and len(man.cases) == 4
    data = build_loaders(
        root,
        DataConfig(
            manifest=tmp_path / "map.csv",
            train_domains=["north"],
            test_domain="south",
            patch_size=(32, 32, 32),
            batch_size=1,
            val_per_domain=1,
        ),
    )
    b = next(iter(data.train))
    assert b["image"].shape == (1, 1, 32, 32, 32)  # 20^3 volume padded
    with pytest.raises(ValueError, match="gives no 'domain'"):
        load_manifest(root)
    (tmp_path / "short.json").write_text(json.dumps({"p1": "north"}))
    with pytest.raises(ValueError, match="case p2: no domain in the domain map"):
        load_manifest(root, tmp_path / "short.json")


def test_missing_and_unreadable_files(tmp_path):
    root = _raw_dataset(tmp_path / "raw", CASES)
    (tmp_path / "map.json").write_text(json.dumps(CASES))
    (root / "labelsTr" / "p2.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"case p2: label file .*p2\.nii\.gz does not exist"):
        load_manifest(root, tmp_path / "map.json")
    root = _raw_dataset(tmp_path / "raw2", CASES)
    (root / "imagesTr" / "p3_0000.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match=r"case p3: cannot read image file .*p3_0000\.nii\.gz"):
        load_manifest(root, tmp_path / "map.json")
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_manifest(tmp_path / "nowhere")


def test_shape_and_affine_mismatch(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps(CASES))
    root = _raw_dataset(tmp_path / "a", CASES)
    nib.save(
        nib.Nifti1Image(np.zeros((20, 20, 19), np.uint8), np.diag([0.5, 0.5, 0.5, 1])), root / "labelsTr" / "p1.nii.gz"
    )
    with pytest.raises(ValueError, match=r"case p1: label .*p1\.nii\.gz has shape \(20, 20, 19\)"):
        load_manifest(root, tmp_path / "map.json")
    root = _raw_dataset(tmp_path / "b", CASES)
    nib.save(
        nib.Nifti1Image(np.zeros((20, 20, 20), np.uint8), np.diag([0.6, 0.5, 0.5, 1])), root / "labelsTr" / "p4.nii.gz"
    )
    with pytest.raises(ValueError, match="case p4: label .* different affines"):
        load_manifest(root, tmp_path / "map.json")


@pytest.mark.parametrize("cache", [True, False])
def test_bad_voxels_name_the_case(tmp_path, cache):
    (tmp_path / "map.json").write_text(json.dumps(CASES))
    root = _raw_dataset(tmp_path / "a", CASES)
    nib.save(
        nib.Nifti1Image(np.full((20, 20, 20), 5, np.uint8), np.diag([0.5, 0.5, 0.5, 1])),
        root / "labelsTr" / "p3.nii.gz",
    )
    data = DataConfig(manifest=tmp_path / "map.json", patch_size=16, batch_size=1, val_per_domain=0, cache=cache)
    with pytest.raises(ValueError, match=r"case p3: label .*p3\.nii\.gz holds values \[5\] outside the label map"):
        list(build_loaders(root, data).train)
    root = _raw_dataset(tmp_path / "b", CASES)
    img = np.zeros((20, 20, 20), np.float32)
    img[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(img, np.diag([0.5, 0.5, 0.5, 1])), root / "imagesTr" / "p2_0000.nii.gz")
    with pytest.raises(ValueError, match=r"case p2: image .*p2_0000\.nii\.gz has 1 non-finite voxels"):
        list(build_loaders(root, data).train)


def test_domain_errors(synth_root):
    man = load_manifest(synth_root)
    assert man.domains == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="domain '7' has no cases"):
        split_cases(man, DataConfig(train_domains=[0, 7]))
    with pytest.raises(ValueError, match="data.train_domains: holds the test domain 1"):
        split_cases(man, DataConfig(train_domains=[0, 1], test_domain=1))
    with pytest.raises(ValueError, match="too few to hold out"):
        split_cases(man, DataConfig(train_domains=[0], val_per_domain=3))
    with pytest.raises(ValueError, match=r"data.class_ratios=\[1.0, 1.0\]: expected 3 weights, one per label value"):
        build_loaders(synth_root, DataConfig(class_ratios=(1, 1)))
    with pytest.raises(ValueError, match="data.samples_per_volume: must divide data.batch_size = 3"):
        build_loaders(synth_root, DataConfig(batch_size=3, samples_per_volume=2))
    with pytest.raises(TypeError, match="data must be a DataConfig"):
        build_loaders(synth_root, {"batch_size": 2})
    split = split_cases(man, DataConfig(test_domain=3, val_per_domain=1), seed=0)
    assert split.train_domains == ("0", "1", "2") and len(split.train) == 6


@pytest.mark.parametrize(
    ("train_domains", "test_domain", "expected"),
    [
        (None, None, (["0", "1", "2"], "3")),  # the last domain is the unseen one
        (None, 1, (["0", "2", "3"], "1")),
        ([2, 0], None, (["2", "0"], "3")),
        (["0"], "2", (["0"], "2")),
    ],
)
def test_run_domains(synth_root, train_domains, test_domain, expected):
    data = SimpleNamespace(train_domains=train_domains, test_domain=test_domain)
    assert run_domains(load_manifest(synth_root), data) == expected


# ------------------------------------------------------------------------------------------ target transform


def _only(name: str, **settings) -> dict:
    return {n: ({"p": 1.0, **settings} if n == name else False) for n in ORDER}


def _phantom_label(shape=(2, 1, 40, 48, 32)) -> torch.Tensor:
    y = torch.zeros(shape, dtype=torch.int64)
    y[:, :, 8:30, 10:40, 6:24] = 1
    y[:, :, 15:22, 18:26, 10:16] = 2
    y[1, :, 2:6, 2:6, 2:6] = 1
    return y


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_geometric_keeps_image_and_label_aligned(device):
    y = _phantom_label().to(device)
    T = TargetTransform(seed=3, **_only("geometric", rotate_deg=30.0, scale=(0.8, 1.2), image_mode="nearest"))
    x_t, y_t = T(y.float(), y)
    assert torch.equal(x_t.round().long(), y_t)  # the same sampling grid for both
    assert (y_t != y).float().mean() > 0.01  # and it did move
    T = TargetTransform(seed=3, **_only("geometric", rotate_deg=30.0, scale=(0.8, 1.2)))
    x_t, y_t = T(y.float(), y)
    assert (x_t.round().long() == y_t).float().mean() > 0.98  # bilinear image: only the edges may differ
    assert set(y_t.unique().tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("name", [n for n in ORDER if n != "geometric"])
def test_intensity_components_change_the_image_only(name):
    y = _phantom_label()
    x = y.float() + 0.1 * torch.randn(y.shape)
    x_t, y_t = TargetTransform(seed=1, **_only(name))(x, y)
    assert torch.equal(y_t, y)
    assert torch.isfinite(x_t).all() and x_t.shape == x.shape and x_t.dtype == torch.float32
    assert not torch.allclose(x_t, x)


@pytest.mark.parametrize("name", ["geometric", "gin", "noise"])
def test_probability_selects_samples(name):
    y = _phantom_label((8, 1, 24, 24, 24))
    x = y.float() + 0.1 * torch.randn(y.shape)
    x_t, y_t = TargetTransform(seed=0, **{n: ({"p": 0.5} if n == name else False) for n in ORDER})(x, y)
    changed = [not torch.equal(x_t[i], x[i]) for i in range(8)]
    assert 0 < sum(changed) < 8
    for i in range(8):
        if not changed[i]:
            assert torch.equal(y_t[i], y[i])


def test_gin_preserves_the_norm():
    x = torch.randn(3, 1, 24, 24, 24) * torch.tensor([0.5, 1.0, 3.0]).view(3, 1, 1, 1, 1) + 0.3
    for seed in range(4):
        x_t, _ = TargetTransform(seed=seed, **_only("gin"))(x, torch.zeros_like(x, dtype=torch.long))
        torch.testing.assert_close(x_t.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-4, atol=0)
        assert not torch.allclose(x_t, x)


def test_disabled_transform_is_the_identity_and_labels_may_be_4d():
    y = _phantom_label()[:, 0]
    x = torch.randn(2, 1, *y.shape[1:])
    x_t, y_t = TargetTransform(**dict.fromkeys(ORDER, False))(x, y)
    assert torch.equal(x_t, x) and torch.equal(y_t, y)
    x_t, y_t = TargetTransform(**{n: {"p": 0.0} for n in ORDER})(x, y)
    assert torch.equal(x_t, x)
    x_t, y_t = TargetTransform(seed=0)(x, y)
    assert y_t.shape == y.shape


def test_target_transform_reproducible_and_resumable():
    y = _phantom_label()
    x = y.float() + 0.1 * torch.randn(y.shape)
    every = {n: {"p": 1.0} for n in ORDER}
    a = TargetTransform(seed=7, **every)
    b = TargetTransform(seed=7, **every)
    xa, ya = a(x, y)
    xb, yb = b(x, y)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xc, _ = TargetTransform(seed=8, **every)(x, y)
    assert not torch.allclose(xa, xc)
    state = a.state_dict()
    x1, y1 = a(x, y)
    c = TargetTransform(seed=0, **every)
    c.load_state_dict(state)
    x2, y2 = c(x, y)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, xa)  # the stream moved on


@pytest.mark.gpu
def test_target_transform_on_cuda_reproducible():
    y = _phantom_label().cuda()
    x = y.float() + 0.1 * torch.randn(y.shape, device="cuda")
    every = {n: {"p": 1.0} for n in ORDER}
    xa, ya = TargetTransform(seed=2, **every)(x, y)
    xb, yb = TargetTransform(seed=2, **every)(x, y)
    assert xa.device.type == "cuda" and torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize(
    ("components", "message"),
    [
        ({"blur": {"p": 1}}, "unknown key 'target_transform.blur'; target_transform has: geometric, gin, "),
        (
            {"noise": {"sdt": (0, 1)}},
            "unknown key 'target_transform.noise.sdt' (did you mean 'target_transform.noise.std'",
        ),
        (
            {"intensity": {"gamma": (2, 1)}},
            "target_transform.intensity.gamma: expected [low, high] with low <= high, got",
        ),
        ({"gin": {"p": 1.5}}, "target_transform.gin.p: expected a number in [0, 1], got 1.5"),
        ({"gin": {"kernels": (2,)}}, "target_transform.gin.kernels: expected odd kernel sizes"),
        ({"geometric": {"image_mode": "bicubic"}}, "target_transform.geometric.image_mode: expected one of 'bilinear'"),
        ({"smooth": "off"}, "target_transform.smooth: expected a section (mapping of keys), got 'off' (str)"),
    ],
)
def test_target_transform_settings_are_the_configs(components, message):
    """The keyword form is checked by the config's target_transform section: the same keys, rules and errors."""
    with pytest.raises(ValueError) as err:
        TargetTransform(**components)
    assert message in str(err.value)


def test_target_transform_config_errors():
    with pytest.raises(ValueError, match="label shape"):
        TargetTransform()(torch.zeros(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ dataset identity


def test_dataset_identity_names_what_changed_and_only_that(tmp_path, monkeypatch):
    from gsema_fast.data import dataset_identity, identity_changes, load_manifest
    from gsema_fast.data import identity as identity_mod

    root = synthesize(tmp_path / "ds", domains=2, cases_per_domain=2, size=20, seed=0, workers=1)
    recorded = dataset_identity(load_manifest(root))
    assert identity_changes(recorded, load_manifest(root)) == []
    # bad records: not one this version wrote
    for bad in ({}, {"version": -1}, "a string", None):
        assert identity_changes(bad, load_manifest(root)) == ["the recorded dataset identity is of an unknown format"]
    # another label map
    manifest = json.loads((root / "dataset.json").read_text())
    manifest["labels"]["stent"] = 3
    (root / "dataset.json").write_text(json.dumps(manifest))
    assert identity_changes(recorded, load_manifest(root)) == [
        "label map {'background': 0, 'vessel': 1, 'aneurysm': 2} -> {'background': 0, 'vessel': 1, 'aneurysm': 2, "
        "'stent': 3}"
    ]
    # a file too large to hash: its modification time decides
    monkeypatch.setattr(identity_mod, "HASH_LIMIT", 0)
    del manifest["labels"]["stent"]
    (root / "dataset.json").write_text(json.dumps(manifest))
    unhashed = dataset_identity(load_manifest(root))
    assert all(c["image"]["sha256"] is None for c in unhashed["cases"].values())
    label = root / "labelsTr" / "B_001.nii.gz"
    stat = label.stat()
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert identity_changes(unhashed, load_manifest(root)) == [
        "1 label file(s) changed (B_001: modified since (same size; too large to have been hashed))"
    ]
    # digests recorded before are kept for files that did not change, not read again
    assert dataset_identity(load_manifest(root), previous=recorded)["cases"]["A_000"] == recorded["cases"]["A_000"]
