"""Post-processing of label maps: the largest component of a class, and a class's components that touch another."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from tiny import tiny_run

from gsema_fast.config import ConfigError, Postprocess, config_to_dict, load_config
from gsema_fast.data import load_manifest
from gsema_fast.evaluation.metrics import case_metrics
from gsema_fast.inference.postprocess import apply_postprocess, label_map
from gsema_fast.models import build_model

LABELS = {"background": 0, "vessel": 1, "aneurysm": 2}


def scene() -> np.ndarray:
    m = np.zeros((12, 12, 12), np.uint8)
    m[1:11, 5, 5] = 1  # a vessel
    m[3:5, 6:8, 5] = 2  # a sac on its wall: 4 voxels, touching it
    m[8:10, 1:3, 1:3] = 2  # a blob in the background: 8 voxels, touching nothing
    m[10, 10, 10] = 1  # a speck of vessel on its own
    return m


def test_nothing_asked_changes_nothing():
    m = scene()
    assert apply_postprocess(m, LABELS, Postprocess()) is m and not Postprocess()
    assert Postprocess().describe() == "none"


def test_only_the_components_touching_the_other_class_stay():
    given = scene()
    out = apply_postprocess(given, LABELS, Postprocess(attached=[["aneurysm", "vessel"]]))
    assert (given == scene()).all(), "the input is left as it was"
    assert (out == 2).sum() == 4 and out[3, 6, 5] == 2 and out[8, 1, 1] == 0
    assert ((out == 1) == (scene() == 1)).all()  # the other classes stay


def test_touching_counts_a_diagonal_neighbour():
    m = np.zeros((5, 5, 5), np.uint8)
    m[1, 1, 1], m[2, 2, 2] = 1, 2
    assert apply_postprocess(m, LABELS, Postprocess(attached=[["aneurysm", "vessel"]]))[2, 2, 2] == 2
    m[1, 1, 1] = 0
    m[0, 0, 0] = 1  # two voxels away: no longer touching
    assert apply_postprocess(m, LABELS, Postprocess(attached=[["aneurysm", "vessel"]]))[2, 2, 2] == 0


def test_the_largest_component_alone_stays():
    out = apply_postprocess(scene(), LABELS, Postprocess(keep_largest=["aneurysm", "vessel"]))
    assert (out == 2).sum() == 8 and out[8, 1, 1] == 2 and out[3, 6, 5] == 0
    assert (out == 1).sum() == 10 and out[10, 10, 10] == 0


def test_label_map_is_the_argmax_then_the_rules():
    scores = torch.zeros(3, 12, 12, 12)
    m = scene()
    for value in range(3):
        scores[value][torch.from_numpy(m == value)] = 1.0
    assert (label_map(scores, LABELS) == m).all() and label_map(scores, LABELS).dtype == np.uint8
    assert (label_map(scores, LABELS, Postprocess(keep_largest=["aneurysm"])) == 2).sum() == 8


def test_the_largest_then_the_attached_in_that_order():
    rules = Postprocess(keep_largest=["vessel"], attached=[["aneurysm", "vessel"]])
    assert rules.describe() == "largest component of vessel, aneurysm touching vessel"
    m = scene()
    m[0, 0, 0] = 1
    m[1, 1, 1] = 2  # touches only the lone vessel voxel at the corner, which keep_largest removes first
    out = apply_postprocess(m, LABELS, rules)
    assert out[0, 0, 0] == 0 and out[1, 1, 1] == 0 and out[3, 6, 5] == 2


@pytest.mark.parametrize("name", ["sac", "background"])
def test_an_unknown_class_is_named(name):
    with pytest.raises(
        ValueError, match=rf"eval.postprocess: no class '{name}' in the label map; classes: \['vessel', 'aneurysm'\]"
    ):
        apply_postprocess(scene(), LABELS, Postprocess(keep_largest=[name]))
    with pytest.raises(ValueError, match=rf"no class '{name}' in dataset.json"):
        Postprocess(attached=[["vessel", name]]).check(LABELS, "dataset.json")


def test_rules_that_are_no_rules_are_refused():
    with pytest.raises(TypeError, match="rules must be a gsema_fast.config.Postprocess, got dict"):
        apply_postprocess(scene(), LABELS, {"keep_largest": ["vessel"]})
    for bad, said in [
        ({"attached": [["aneurysm"]]}, "eval.postprocess.attached: expected a list of lists of 2 strings"),
        ({"attached": [["aneurysm", "aneurysm"]]}, "eval.postprocess.attached: expected two different classes"),
        ({"keep_largest": ["vessel", "vessel"]}, "eval.postprocess.keep_largest: expected each entry at most once"),
        ({"keep_largest": "vessel"}, "eval.postprocess.keep_largest: expected a list of strings, got 'vessel'"),
    ]:
        with pytest.raises(ConfigError, match=said):
            Postprocess(**bad)


# ------------------------------------------------------------------------ the rules where label maps are made
def _run_checkpoint(path, phantoms, *overrides, labels=True):
    """A checkpoint of an untrained tiny UNet trained (so to speak) on the session's phantoms; with ``labels``, the
    label map of that dataset recorded as the trainer records it."""
    cfg = load_config(
        "demo", [*tiny_run(phantoms), "model.num_res_units=0", "eval.postprocess.attached=[]", *overrides]
    )
    torch.manual_seed(0)
    net = build_model(cfg.model)
    state = {"config": config_to_dict(cfg), "student": net.state_dict(), "teacher": net.state_dict(), "step": 4}
    if labels:
        state["dataset"] = {"labels": dict(load_manifest(phantoms).labels)}
    torch.save(state, path)
    return path


def _components(path, value):
    return ndimage.label(np.asarray(nib.load(path).dataobj) == value, structure=np.ones((3, 3, 3)))[1]


def test_evaluate_and_predict_apply_the_rules_to_the_label_map_they_write(phantoms, tmp_path):
    from gsema_fast.evaluation.evaluate import evaluate
    from gsema_fast.inference import predict

    checkpoint = _run_checkpoint(tmp_path / "run.pt", phantoms)
    rule = ["eval.postprocess.keep_largest=[aneurysm]"]
    plain = evaluate(checkpoint, out_dir=tmp_path / "plain", device="cpu", hd95=False, save_predictions=True)
    ruled = evaluate(
        checkpoint, out_dir=tmp_path / "rule", device="cpu", hd95=False, save_predictions=True, overrides=rule
    )
    assert plain["inference"]["postprocess"] == {"keep_largest": [], "attached": []}
    assert plain["inference"]["mirror_axes"] == []
    assert ruled["inference"]["postprocess"] == {"keep_largest": ["aneurysm"], "attached": []}
    several = 0
    for before, after in zip(plain["metric_per_case"], ruled["metric_per_case"], strict=True):
        several += _components(before["prediction"], 2) > 1
        expected = apply_postprocess(
            np.asarray(nib.load(before["prediction"]).dataobj), LABELS, Postprocess(keep_largest=["aneurysm"])
        )
        np.testing.assert_array_equal(np.asarray(nib.load(after["prediction"]).dataobj), expected)
        reference = np.asarray(nib.load(after["reference"]).dataobj)
        dice = case_metrics(expected, reference, LABELS, after["spacing"], hd95=False)["aneurysm"]["dice"]
        assert after["metrics"]["aneurysm"]["dice"] == pytest.approx(dice)
    assert several, "the untrained network paints several aneurysm components: the rule had something to do"

    images = tmp_path / "images"
    images.mkdir()
    for case in plain["metric_per_case"]:
        shutil.copy(case["image"], images)
    predict(checkpoint, images, tmp_path / "predicted", device="cpu")
    predict(checkpoint, images, tmp_path / "predicted_rule", device="cpu", overrides=rule)
    for case in plain["metric_per_case"]:
        name = f"{case['case']}.nii.gz"
        np.testing.assert_array_equal(
            np.asarray(nib.load(tmp_path / "predicted" / name).dataobj),
            np.asarray(nib.load(case["prediction"]).dataobj),
        )
        assert _components(tmp_path / "predicted_rule" / name, 2) <= 1


def test_a_rule_the_dataset_cannot_follow_is_refused_before_any_work(phantoms, tmp_path):
    from gsema_fast.evaluation.evaluate import evaluate
    from gsema_fast.inference import predict
    from gsema_fast.training.build import build_data

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(phantoms / "imagesTr" / "C_000_0000.nii.gz", images)
    misspelt = ["eval.postprocess.attached=[[aneurysm,vessels]]"]
    checkpoint = _run_checkpoint(tmp_path / "run.pt", phantoms)
    with pytest.raises(ValueError, match=rf"eval.postprocess: no class 'vessels' in {phantoms / 'dataset.json'}"):
        evaluate(checkpoint, out_dir=tmp_path / "eval", device="cpu", overrides=misspelt)
    with pytest.raises(ValueError, match=r"no class 'vessels' in the label map of checkpoint .*run.pt; classes: "):
        predict(checkpoint, images, tmp_path / "predicted", device="cpu", overrides=misspelt)
    unlabelled = _run_checkpoint(tmp_path / "old.pt", phantoms, labels=False)
    with pytest.raises(ValueError, match=r"old.pt records no label map .* set eval.postprocess.keep_largest=\[\]"):
        predict(
            unlabelled,
            images,
            tmp_path / "predicted",
            device="cpu",
            overrides=["eval.postprocess.keep_largest=[aneurysm]"],
        )
    assert not (tmp_path / "eval").exists() and not (tmp_path / "predicted").exists()
    # without rules such a checkpoint predicts as before
    assert predict(unlabelled, images, tmp_path / "predicted", device="cpu")["written"]
    with pytest.raises(ValueError, match=rf"no class 'vessels' in {phantoms / 'dataset.json'}"):
        build_data(load_config("demo", [*tiny_run(phantoms), *misspelt]))


def test_train_refuses_a_misspelt_class_with_exit_code_2_and_writes_nothing(phantoms, tmp_path, caplog):
    from gsema_fast.cli import main

    sets = [arg for value in tiny_run(phantoms) for arg in ("--set", value)]
    out = tmp_path / "run"
    assert main(["train", *sets, "--set", "eval.postprocess.keep_largest=[sac]", "--out", str(out)]) == 2
    assert "eval.postprocess: no class 'sac' in" in caplog.text and not out.exists()
