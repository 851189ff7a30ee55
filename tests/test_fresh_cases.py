"""bench.fresh_cases: scoring runs on phantom cases of their training centres that no run trained on."""

from __future__ import annotations

import hashlib
import json

import pytest
from tiny import SESSION_PHANTOMS, phantom_settings, tiny_checkpoint

from bench import fresh_cases
from gsema_fast.data import synthesize

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_larger_synthesis_begins_with_the_same_cases(phantoms, tmp_path):
    # What fresh cases rest on: the cases after a run's own are new draws, its own ones are unchanged.
    larger = synthesize(tmp_path / "larger", **{**SESSION_PHANTOMS, "cases_per_domain": 3}, workers=1)
    for case in ("A_000", "A_001", "B_001"):
        for sub, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            digest = [hashlib.sha256((root / sub / name).read_bytes()).hexdigest() for root in (phantoms, larger)]
            assert digest[0] == digest[1], f"{sub}/{name}"
    assert not (phantoms / "labelsTr" / "A_002.nii.gz").exists()
    assert (larger / "labelsTr" / "A_002.nii.gz").exists()


def test_score_runs_uses_only_cases_no_run_saw(phantoms, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tiny_checkpoint(tmp_path / "run.pt", phantom_settings(phantoms))
    results = fresh_cases.score_runs([str(run)], cases=1)
    assert results["first_fresh_case"] == 2 and results["cases_per_centre"] == 1
    scored = results["runs"][str(run)]
    # centres A (0) and B (1) trained, C (2) unseen: fresh = A's and B's third cases; unseen = C's own two cases
    assert list(scored["fresh"]["cases"]) == ["A_002", "B_002"]
    assert list(scored["unseen"]["cases"]) == ["C_000", "C_001"]
    for split in ("fresh", "unseen"):
        assert set(scored[split]["mean"]) == {"vessel", "aneurysm"}
        assert all(0.0 <= v <= 1.0 for v in scored[split]["mean"].values())
        bands = scored[split]["by_size"]
        assert sum(b["cases"] for b in bands.values()) == len(scored[split]["cases"])


def test_by_size_groups_cases_by_their_largest_sac():
    domes = {"a": 3.0, "b": 4.4, "c": 4.5, "d": 7.0, "e": 6.0}
    dice = {"a": 0.0, "b": 0.8, "c": 0.05, "d": 0.9, "e": 0.7}
    bands = fresh_cases.by_size(dice, domes)
    assert bands["under 4.5 mm"] == {"cases": 2, "dice": 0.4, "found": 1}
    assert bands["4.5-6 mm"] == {"cases": 1, "dice": 0.05, "found": 0}
    assert bands["6 mm and over"]["cases"] == 2 and bands["6 mm and over"]["found"] == 2
    assert bands["6 mm and over"]["dice"] == pytest.approx(0.8)


def test_score_runs_rejects_bad_inputs(phantoms, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tiny_checkpoint(tmp_path / "run.pt", phantom_settings(phantoms))
    with pytest.raises(ValueError, match="cases=0"):
        fresh_cases.score_runs([str(run)], cases=0)
    # a dataset folder that is not the built-in phantoms has no further cases to draw
    foreign = tmp_path / "foreign"
    (foreign / "imagesTr").mkdir(parents=True)
    (foreign / "dataset.json").write_text((phantoms / "dataset.json").read_text().replace('"synth"', '"other"'))
    other = tiny_checkpoint(tmp_path / "other.pt", [f"data.root={foreign}"])
    with pytest.raises(ValueError, match="not built-in phantoms"):
        fresh_cases.score_runs([str(other)], cases=1)
    # phantoms of an older format: a new draw would come from another generator
    old = tmp_path / "old"
    (old / "imagesTr").mkdir(parents=True)
    manifest = json.loads((phantoms / "dataset.json").read_text())
    manifest["synth"]["version"] = -1
    (old / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="phantoms of format -1"):
        fresh_cases.score_runs([str(tiny_checkpoint(tmp_path / "old.pt", [f"data.root={old}"]))], cases=1)
    seed1 = tiny_checkpoint(tmp_path / "seed1.pt", [*phantom_settings(tmp_path / "s1"), "data.synth_seed=1"])
    with pytest.raises(ValueError, match="different phantom sets"):
        fresh_cases.score_runs([str(run), str(seed1)], cases=1)
    with pytest.raises(FileNotFoundError):
        fresh_cases.score_runs([str(tmp_path / "missing.pt")], cases=1)


def test_the_dataset_can_be_named_where_the_checkpoint_names_another(phantoms, tmp_path, monkeypatch):
    """A run whose stored dataset path no longer leads to its phantoms (moved, or stored relative by an earlier
    version) is scored with --data naming them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tiny_checkpoint(tmp_path / "run.pt", [f"data.root={tmp_path / 'moved-away'}"])
    with pytest.raises(FileNotFoundError, match="moved-away is not a folder"):
        fresh_cases.score_runs([str(run)], cases=1)
    results = fresh_cases.score_runs([str(run)], cases=1, data=phantoms)
    assert list(results["runs"][str(run)]["fresh"]["cases"]) == ["A_002", "B_002"]
