"""Evaluation: metrics against MONAI and hand counts, sliding-window inference, checkpoints, predict, evaluate, lodo."""

import itertools
import math
import typing

import numpy as np
import pytest
import torch
from monai.metrics import ConfusionMatrixMetric, DiceMetric, MeanIoU, compute_hausdorff_distance

from gsema_fast.config import AmpMode, EvalConfig, load_config, replace
from gsema_fast.evaluation.metrics import case_metrics
from gsema_fast.inference import amp_dtype, eval_settings, predict_volume
from gsema_fast.inference.window import mirror_flips
from gsema_fast.models import build_model

LABELS = {"background": 0, "vessel": 1, "aneurysm": 2}
TINY_UNET = {"name": "unet", "channels": [4, 8, 16], "num_res_units": 0, "latent": "encoder3"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _onehot(arr: np.ndarray, classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(arr).long(), classes).permute(3, 0, 1, 2)[None].float()


# ----------------------------------------------------------------------------------------------------- metrics
@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecated internal argument
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_monai_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    ref = rng.choice(3, size=(12, 10, 9), p=[0.6, 0.3, 0.1])
    # A prediction that agrees with the reference at most voxels, so every count is non-trivial.
    pred = np.where(rng.random(ref.shape) < 0.7, ref, rng.choice(3, size=ref.shape))
    spacing = (0.5, 0.7, 1.2)
    got = case_metrics(pred, ref, LABELS, spacing=spacing)

    yp, y = _onehot(pred), _onehot(ref)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(yp, y)[0]
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(yp, y)[0]
    sens_metric = ConfusionMatrixMetric(
        include_background=False, metric_name="sensitivity", reduction="none", compute_sample=True
    )
    sens_metric(yp, y)
    sens = sens_metric.aggregate()[0][0]
    hd = compute_hausdorff_distance(yp, y, include_background=False, percentile=95, spacing=list(spacing))[0]
    for k, name in enumerate(("vessel", "aneurysm")):
        assert got[name]["dice"] == pytest.approx(float(dice[k]), abs=1e-6)
        assert got[name]["jaccard"] == pytest.approx(float(iou[k]), abs=1e-6)
        assert got[name]["sensitivity"] == pytest.approx(float(sens[k]), abs=1e-6)
        assert got[name]["hd95"] == pytest.approx(float(hd[k]), abs=1e-5)
        tp, fp, fn = got[name]["tp"], got[name]["fp"], got[name]["fn"]
        assert got[name]["volume_similarity"] == pytest.approx(1 - abs(fn - fp) / (2 * tp + fp + fn))


def test_metrics_hand_computed():
    ref = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, :4] = 1  # 4 vessel voxels
    pred[0, 0, 1:4] = 1  # 3 of them found
    pred[1, 1, 1] = 1  # 1 false positive
    m = case_metrics(pred, ref, {"background": 0, "vessel": 1}, spacing=(2.0, 1.0, 1.0))["vessel"]
    assert (m["tp"], m["fp"], m["fn"]) == (3, 1, 1)
    assert m["dice"] == pytest.approx(6 / 8)
    assert m["jaccard"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["volume_similarity"] == pytest.approx(1.0)  # FN == FP: same volume
    assert m["ref_ml"] == pytest.approx(4 * 2.0 / 1000)
    # Hand-computed surface distances: the missed voxel (0,0,0) is 1 mm from the prediction, the stray one
    # (1,1,1) is sqrt(2^2 + 1^2) mm from the reference; the 95th percentiles of the two directions are taken
    # over [1, 0, 0, 0] and [0, 0, 0, sqrt(5)] with numpy's linear interpolation.
    expected = max(np.percentile([1, 0, 0, 0], 95), np.percentile([0, 0, 0, math.sqrt(5)], 95))
    assert m["hd95"] == pytest.approx(expected, abs=1e-5)


def test_metrics_empty_masks():
    empty = np.zeros((5, 5, 5), np.int64)
    some = empty.copy()
    some[2, 2, 2:4] = 2
    labels = {"background": 0, "aneurysm": 2}

    both = case_metrics(empty, empty, labels)["aneurysm"]
    assert all(math.isnan(both[k]) for k in ("dice", "jaccard", "sensitivity", "volume_similarity", "hd95"))

    false_pos = case_metrics(some, empty, labels)["aneurysm"]  # nothing there, something predicted
    assert false_pos["dice"] == 0.0 and false_pos["jaccard"] == 0.0 and false_pos["volume_similarity"] == 0.0
    assert math.isnan(false_pos["sensitivity"]) and math.isnan(false_pos["hd95"])

    missed = case_metrics(empty, some, labels)["aneurysm"]  # an aneurysm, none predicted
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0 and missed["volume_similarity"] == 0.0
    assert math.isnan(missed["hd95"])

    # MONAI agrees wherever the reference is non-empty, and with ignore_empty=False gives the same 0.0 for a
    # false positive on an empty reference; only the both-empty case differs (MONAI 1.0, here NaN by design).
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    assert float(dice(_onehot(empty), _onehot(some))[0, 1]) == missed["dice"]
    assert float(dice(_onehot(some), _onehot(empty))[0, 1]) == false_pos["dice"]
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)
    assert float(iou(_onehot(some), _onehot(empty))[0, 1]) == false_pos["jaccard"]


def test_metrics_regions_and_inputs():
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 3, (6, 6, 6))
    pred = rng.integers(0, 3, (6, 6, 6))
    m = case_metrics(torch.from_numpy(pred)[None, None], ref, {"vessel": 1, "any": [1, 2]}, hd95=False)
    union_p, union_r = pred > 0, ref > 0
    assert m["any"]["tp"] == int((union_p & union_r).sum())
    assert math.isnan(m["vessel"]["hd95"])
    with pytest.raises(ValueError, match="shape"):
        case_metrics(pred, ref[:5], LABELS)
    with pytest.raises(ValueError, match="integer labels"):
        case_metrics(pred + 0.5, ref, LABELS)
    with pytest.raises(ValueError, match="no foreground"):
        case_metrics(pred, ref, {"background": 0})


# ----------------------------------------------------------------------------------------------- sliding window
class _Probe(torch.nn.Module):
    """A network whose logits are a known function of the input, returning (logits, latent) like the real ones."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.5, 0.0]))

    def forward(self, x):
        return self.conv(x), x[:, :, ::4, ::4, ::4]


def test_sliding_window_any_size_matches_pointwise_net():
    net = _Probe()
    # Neither a multiple of the window, nor of its step, and one axis smaller than the window.
    image = torch.randn(2, 1, 23, 17, 9)
    logits = predict_volume(net, image, roi_size=(8, 8, 16), settings=EvalConfig(overlap=0.5, sw_batch_size=3))
    assert logits.shape == (2, 2, 23, 17, 9) and logits.dtype == torch.float32
    assert type(logits) is torch.Tensor
    torch.testing.assert_close(logits, net.conv(image).detach(), atol=1e-5, rtol=1e-5)


def test_sliding_window_unet_restores_mode_and_checks_channels():
    net = build_model(TINY_UNET).train()
    image = torch.randn(1, 1, 19, 13, 21)
    logits = predict_volume(net, image, roi_size=16, settings=EvalConfig(overlap=0.25, mode="constant"))
    assert logits.shape == (1, 3, 19, 13, 21) and torch.isfinite(logits).all()
    assert net.training  # put back as it was
    with pytest.raises(ValueError, match="2 channel"):
        predict_volume(net, torch.randn(1, 2, 16, 16, 16), roi_size=16)
    with pytest.raises(ValueError, match="batch"):
        predict_volume(net, torch.randn(1, 16, 16, 16), roi_size=16)
    with pytest.raises(TypeError, match="settings must be an EvalConfig"):
        predict_volume(net, image, roi_size=16, settings={"overlap": 0.5})


@pytest.mark.parametrize("axes", [[0], [2, 0], [0, 1, 2]])
def test_mirroring_averages_the_logits_of_the_flipped_volumes_mapped_back(axes):
    torch.manual_seed(0)
    net = build_model(TINY_UNET)
    image = torch.randn(1, 1, 19, 13, 21)
    settings = EvalConfig(overlap=0.25)
    plain = predict_volume(net, image, roi_size=16, settings=settings)
    # the reference: every subset of the axes (the empty one included), flipped, predicted, flipped back, averaged
    subsets = [[2 + a for a in combo] for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]
    expected = torch.stack(
        [predict_volume(net, image.flip(d), roi_size=16, settings=settings).flip(d) for d in subsets]
    ).mean(0)
    mirrored = predict_volume(net, image, roi_size=16, settings=replace(settings, mirror_axes=axes))
    assert len(mirror_flips(axes)) == 2 ** len(axes) - 1 and not torch.allclose(mirrored, plain, atol=1e-3)
    torch.testing.assert_close(mirrored, expected, atol=1e-5, rtol=1e-5)
    # a network that is its own mirror image (pointwise) gives the same logits mirrored or not
    probe = _Probe()
    once = predict_volume(probe, image, roi_size=16, settings=settings)
    torch.testing.assert_close(
        predict_volume(probe, image, roi_size=16, settings=replace(settings, mirror_axes=axes)), once
    )


def test_mirror_axes_are_spatial_axes_each_once():
    for bad, said in [([3], "eval.mirror_axes: expected a list of ints"), ([1, 1], "each entry at most once")]:
        with pytest.raises(ValueError, match=said):
            EvalConfig(mirror_axes=bad)


def test_inference_settings_are_the_eval_sections():
    cfg = load_config("demo")
    assert eval_settings(cfg) == cfg.eval
    assert eval_settings(cfg, overlap=0.5, sw_batch_size=None) == replace(cfg.eval, overlap=0.5)
    with pytest.raises(ValueError, match=r"^eval\.overlap: expected a number in \[0, 1\), got 1\.5$"):
        eval_settings(cfg, overlap=1.5)
    with pytest.raises(ValueError, match=r"^eval\.sw_batch_size: expected an int >= 1, got 0$"):
        eval_settings(cfg, sw_batch_size=0)


def test_amp_dtype_knows_every_amp_setting():
    """The autocast type of every train.amp choice, auto resolved by the config's one resolver."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    expected = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    assert {amp: amp_dtype(amp, cuda) for amp in typing.get_args(AmpMode)} == expected
    assert amp_dtype("auto", cpu) is None and amp_dtype("bf16", cpu) is torch.bfloat16
    assert all(amp_dtype(amp, cpu, inference=True) is None for amp in typing.get_args(AmpMode))
    with pytest.raises(ValueError, match="train.amp must be one of 'auto', 'bf16', 'fp16', 'fp32', got 'bf32'"):
        amp_dtype("bf32", cuda)


# --------------------------------------------------------------------------------------- checkpoints and files
def _config(root, **extra):
    from gsema_fast.config import load_config

    sets = [
        f"data.root={root}",
        "model.channels=[4,8,16]",
        "model.num_res_units=0",
        "data.patch_size=[16,16,16]",
        "data.spacing=0.6",
        "eval.overlap=0.25",
        "data.val_per_domain=1",
    ]
    return load_config("demo", sets + [f"{k}={v}" for k, v in extra.items()])


def _save_checkpoint(path, cfg, net=None):
    from gsema_fast.config import config_to_dict

    net = net or build_model(cfg.model)
    teacher = {k: v + 0.01 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    # the label map of the phantoms, recorded as the trainer records its dataset's
    state = {"config": config_to_dict(cfg), "student": net.state_dict(), "teacher": teacher, "step": 7, "epoch": 1}
    torch.save({**state, "dataset": {"labels": LABELS}}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(phantoms, tmp_path_factory):
    return _save_checkpoint(tmp_path_factory.mktemp("ck") / "final.pt", _config(phantoms))


def test_load_checkpoint_weights_and_errors(checkpoint, phantoms, tmp_path):
    from gsema_fast.inference import load_checkpoint

    teacher = load_checkpoint(checkpoint, device="cpu")
    student = load_checkpoint(checkpoint, weights="student", device="cpu")
    assert teacher.weights == "teacher" and teacher.step == 7 and not teacher.net.training
    first = next(iter(teacher.net.state_dict()))
    torch.testing.assert_close(teacher.net.state_dict()[first], student.net.state_dict()[first] + 0.01)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"student": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="no 'config'"):
        load_checkpoint(tmp_path / "partial.pt")

    # Weights of one network stored with the config of another.
    other = build_model(_config(phantoms).model, channels=[8, 16, 32])
    _save_checkpoint(tmp_path / "mixed.pt", _config(phantoms), net=other)
    with pytest.raises(ValueError, match="do not fit the model its config describes"):
        load_checkpoint(tmp_path / "mixed.pt")
    # A --config whose model differs from the checkpoint's.
    with pytest.raises(ValueError, match=r"model\.channels"):
        load_checkpoint(checkpoint, config=_config(phantoms, **{"model.channels": "[8,16,32]"}))
    with pytest.raises(ValueError, match=r"data\.spacing"):
        load_checkpoint(checkpoint, config=_config(phantoms, **{"data.spacing": "1.0"}))
    # Data and eval settings of a --config are taken.
    assert load_checkpoint(checkpoint, config=_config(phantoms, **{"eval.overlap": 0.5})).config.eval.overlap == 0.5


# Finer than the images (about 0.4-0.5 mm): up and back down loses nothing; coarser: detail is lost, the place is not.
@pytest.mark.parametrize(("spacing", "min_dice"), [(None, 1.0), ((0.3, 0.3, 0.3), 0.99), ((0.6, 0.6, 0.6), 0.7)])
def test_preprocessing_inverts_onto_the_original_grid(phantoms, spacing, min_dice):
    import nibabel as nib

    from gsema_fast.data import Preprocessing, load_manifest
    from gsema_fast.inference import to_original_grid

    man = load_manifest(phantoms)
    case = man.cases_of("1")[0]  # centre B: stored LPS, so orientation is undone too
    assert nib.aff2axcodes(nib.load(case.label).affine) == ("L", "P", "S")
    transform = Preprocessing(spacing=spacing).transforms(labels=man.labels)
    item = transform({"image": str(case.image), "label": str(case.label), "case": case.name})
    onehot = _onehot(item["label"][0].numpy().astype(np.int64))[0]
    back = to_original_grid(transform, onehot, item["image"]).argmax(0).numpy()
    orig = np.asarray(nib.load(case.label).dataobj)
    assert back.shape == orig.shape
    if spacing is None:
        np.testing.assert_array_equal(back, orig)
    dice = case_metrics(back, orig, {"fg": [1, 2]}, hd95=False)["fg"]["dice"]
    mirrored = case_metrics(back[::-1], orig, {"fg": [1, 2]}, hd95=False)["fg"]["dice"]
    assert dice >= min_dice and mirrored < 0.5


def _nifti(path, data, affine, dtype=np.int16):
    import nibabel as nib

    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.header.set_slope_inter(0.5, 10.0)  # stored intensities scaled, as scanners write them
    img.header.set_qform(affine, code=1)
    nib.save(img, path)
    return path


def test_predict_round_trips_affine_shape_and_reports_bad_files(checkpoint, tmp_path):
    import nibabel as nib

    from gsema_fast.inference import predict

    rng = np.random.default_rng(0)
    # Oblique, anisotropic, flipped, and a size that is no multiple of the 16^3 window.
    rot = np.array([[0.0, -1.0, 0.0], [0.96, 0.0, 0.28], [-0.28, 0.0, 0.96]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.5, 0.7, 0.9])
    affine[:3, 3] = [12.0, -30.5, 7.25]
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = _nifti(inputs / "case1_0000.nii.gz", rng.integers(0, 800, (19, 23, 11)), affine)
    _nifti(inputs / "case2.nii", rng.integers(0, 800, (9, 7, 30)), np.diag([1.1, 0.4, 0.6, 1.0]))
    _nifti(inputs / "twochan.nii.gz", rng.integers(0, 800, (10, 10, 10, 2)), np.eye(4))
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")

    result = predict(checkpoint, inputs, tmp_path / "out", probabilities=True, device="cpu")
    assert set(result["failed"]) == {str(inputs / "twochan.nii.gz"), str(inputs / "broken.nii.gz")}
    assert "channels" in result["failed"][str(inputs / "twochan.nii.gz")]
    assert "cannot read" in result["failed"][str(inputs / "broken.nii.gz")]

    for name, src in (("case1", good), ("case2", inputs / "case2.nii")):
        original = nib.load(src)
        labels = nib.load(tmp_path / "out" / f"{name}.nii.gz")
        assert labels.shape == original.shape
        np.testing.assert_allclose(labels.affine, original.affine, atol=1e-6)
        assert labels.header.get_qform(coded=True)[1] == 1
        values = np.asarray(labels.dataobj)
        assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1, 2}
        probs = nib.load(tmp_path / "out" / f"{name}_probabilities.nii.gz")
        assert probs.shape == (*original.shape, 3)
        p = np.asarray(probs.dataobj)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
        np.testing.assert_array_equal(p.argmax(-1), values)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict(checkpoint, tmp_path / "missing.nii.gz", tmp_path / "out2")


def test_evaluate_writes_summary_csv_and_figures(checkpoint, phantoms, tmp_path):
    import csv
    import json

    import nibabel as nib

    from gsema_fast.evaluation.evaluate import evaluate

    out = tmp_path / "eval"
    summary = evaluate(
        checkpoint,
        out_dir=out,
        save_predictions=True,
        figures=True,
        compare=[checkpoint],
        device="cpu",
        tsne_cases_per_domain=2,
        tsne_patches_per_case=3,
    )
    assert summary["domains"] == ["2"] and summary["split"] == "test" and summary["weights"] == "teacher"
    on_disk = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in on_disk["metric_per_case"]] == ["C_000", "C_001"]
    assert set(on_disk["mean"]) == {"vessel", "aneurysm"} and "2" in on_disk["per_domain"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 4 and rows[0]["class"] == "vessel"
    for case in on_disk["metric_per_case"]:
        pred = nib.load(case["prediction"])
        ref = nib.load(case["reference"])
        assert pred.shape == ref.shape
        np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-6)
        m = case_metrics(np.asarray(pred.dataobj), np.asarray(ref.dataobj), LABELS, case["spacing"])
        assert m["vessel"]["dice"] == pytest.approx(case["metrics"]["vessel"]["dice"])
    assert (out / "figures" / "C_000.png").stat().st_size > 10_000
    assert (out / "figures" / "tsne.png").stat().st_size > 10_000

    held_out = evaluate(checkpoint, split="val", out_dir=tmp_path / "val", device="cpu", hd95=False)
    assert held_out["domains"] == ["0", "1"] and len(held_out["metric_per_case"]) == 2
    with pytest.raises(ValueError, match="no cases"):
        evaluate(checkpoint, domain="7", out_dir=tmp_path / "x", device="cpu")
    # A checkpoint of a run on the built-in phantoms names no folder: evaluation finds the same built-in dataset
    # (here the fixture's, whose settings match), or takes the one given.
    builtin = {
        "data.root": "null",
        "data.synth_dir": str(phantoms),
        "data.synth_domains": 3,
        "data.synth_cases_per_domain": 2,
        "data.synth_size": 32,
        "data.synth_seed": 0,
    }
    no_root = _save_checkpoint(tmp_path / "noroot.pt", _config(phantoms, **builtin))
    found = evaluate(no_root, out_dir=tmp_path / "z", device="cpu", hd95=False)
    assert found["domains"] == ["2"] and [c["case"] for c in found["metric_per_case"]] == ["C_000", "C_001"]
    assert evaluate(no_root, phantoms, out_dir=tmp_path / "y", device="cpu", hd95=False)["domains"] == ["2"]


def test_cli_evaluate_and_predict(checkpoint, phantoms, tmp_path):
    from gsema_fast.cli import main

    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(tmp_path / "e"),
                "--device",
                "cpu",
                "--domain",
                "0",
                "--no-hd95",
            ]
        )
        == 0
    )
    assert (tmp_path / "e" / "summary.json").is_file()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    image = next((phantoms / "imagesTr").glob("A_*"))
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--input",
                str(image),
                "--output",
                str(tmp_path / "p"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (tmp_path / "p" / image.name.replace("_0000", "")).is_file()


# ------------------------------------------------------------------------------------------------ inference settings
def test_load_checkpoint_takes_the_inference_settings_and_only_those(checkpoint):
    from gsema_fast.inference import load_checkpoint

    stored = load_checkpoint(checkpoint, device="cpu").config
    overrides = ["eval.mode=constant", "eval.sw_batch_size=3", "train.amp=bf16"]
    loaded = load_checkpoint(checkpoint, device="cpu", overrides=overrides)
    assert (loaded.config.eval.mode, loaded.config.eval.sw_batch_size, loaded.config.train.amp) == (
        "constant",
        3,
        "bf16",
    )
    assert loaded.amp_dtype is None  # no autocast at inference on the CPU, whatever train.amp says
    assert loaded.config.data == stored.data and loaded.config.model == stored.model
    refused = [
        ("optim.lr=0.1", r"override 'optim\.lr=0\.1' for checkpoint .*final\.pt: expected eval\.\* or train\.amp"),
        ("data.spacing=1.0", r"override 'data\.spacing=1\.0' .*expected eval\.\* or train\.amp"),
        ("model.channels=[8,16,32]", r"override 'model\.channels=\[8,16,32\]' .*expected eval\.\* or train\.amp"),
        ("eval.overlap=2", r"eval\.overlap"),
        ("eval.nope=1", r"eval\.nope"),
        ("eval.mode", r"expected KEY=VALUE"),
    ]
    for override, match in refused:
        with pytest.raises(ValueError, match=match):
            load_checkpoint(checkpoint, device="cpu", overrides=[override])
    with pytest.raises(TypeError, match="overrides"):
        load_checkpoint(checkpoint, device="cpu", overrides="eval.mode=constant")


@pytest.mark.gpu
def test_train_amp_given_at_inference_sets_the_autocast_on_cuda(checkpoint):
    from gsema_fast.inference import load_checkpoint

    assert load_checkpoint(checkpoint, device="cuda").amp_dtype == torch.bfloat16  # the stored "auto"
    assert load_checkpoint(checkpoint, device="cuda", overrides=["train.amp=fp16"]).amp_dtype == torch.float16
    assert load_checkpoint(checkpoint, device="cuda", overrides=["train.amp=fp32"]).amp_dtype == torch.float32


def test_cli_predict_and_evaluate_take_inference_settings(checkpoint, phantoms, tmp_path, monkeypatch, caplog):
    import json
    import logging

    import gsema_fast.inference.prediction as prediction
    from gsema_fast.cli import main
    from gsema_fast.config import save_config

    seen = []
    segment = prediction.segment_case

    def spy(loaded, transform, item, settings=None):
        used = settings or loaded.config.eval
        seen.append({"overlap": used.overlap, "sw_batch_size": used.sw_batch_size, "mode": used.mode})
        return segment(loaded, transform, item, settings)

    monkeypatch.setattr(prediction, "segment_case", spy)
    image = next((phantoms / "imagesTr").glob("A_*"))
    predict = ["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--device", "cpu", "--output"]
    assert main([*predict, str(tmp_path / "p1"), "--set", "eval.mode=constant", "--set", "eval.sw_batch_size=3"]) == 0
    assert seen[-1] == {"overlap": 0.25, "sw_batch_size": 3, "mode": "constant"}  # the rest: the checkpoint's
    # --config gives its eval section, --set goes on top of it, and --overlap given wins over both
    config = save_config(_config(phantoms, **{"eval.overlap": 0.5, "eval.mode": "constant"}), tmp_path / "infer.yaml")
    assert main([*predict, str(tmp_path / "p2"), "--config", str(config), "--set", "eval.mode=gaussian"]) == 0
    assert seen[-1] == {"overlap": 0.5, "sw_batch_size": 2, "mode": "gaussian"}
    assert main([*predict, str(tmp_path / "p3"), "--set", "eval.overlap=0.5", "--overlap", "0"]) == 0
    assert seen[-1]["overlap"] == 0
    caplog.clear()
    assert main([*predict, str(tmp_path / "p4"), "--set", "optim.lr=0.1"]) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "'optim.lr=0.1'" in error and "expected eval.* or train.amp" in error
    assert not (tmp_path / "p4").exists() and len(seen) == 3

    evaluate = ["evaluate", "--checkpoint", str(checkpoint), "--device", "cpu", "--domain", "0", "--no-hd95"]
    assert (
        main([*evaluate, "--out", str(tmp_path / "e"), "--set", "eval.mode=constant", "--set", "eval.overlap=0"]) == 0
    )
    inference = json.loads((tmp_path / "e" / "summary.json").read_text())["inference"]
    assert (inference["mode"], inference["overlap"], inference["sw_batch_size"]) == ("constant", 0, 2)
    assert main([*evaluate, "--out", str(tmp_path / "e2"), "--set", "data.root=elsewhere"]) == 2
    assert not (tmp_path / "e2").exists()
