"""bench.postprocess: every candidate rule scored on the same predictions of a run's validation and fresh cases."""

from __future__ import annotations

import sys

import pytest
from tiny import phantom_settings, tiny_checkpoint

from bench import fresh_cases
from bench import postprocess as bench_postprocess

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_candidate_scores_as_the_trainer_scores_a_run_configured_with_it(phantoms, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    plain = tiny_checkpoint(tmp_path / "plain.pt", phantom_settings(phantoms))
    largest = tiny_checkpoint(
        tmp_path / "largest.pt", [*phantom_settings(phantoms), "eval.postprocess.keep_largest=[aneurysm]"]
    )
    mirrored = tiny_checkpoint(
        tmp_path / "mirrored.pt",
        [*phantom_settings(phantoms), "eval.mirror_axes=[0, 2]", "eval.postprocess.attached=[[aneurysm,vessel]]"],
    )
    results = bench_postprocess.score_rules([str(plain)], cases=1, mirror_axes=[0, 2])
    scored = results[str(plain)]
    assert set(scored) == {"validation", "fresh"} and len(bench_postprocess.candidates([0])) == 10
    assert all(set(scored[scope]) == set(bench_postprocess.candidates([0, 2])) for scope in scored)
    # the trainer's scoring path (score_volumes, through bench.fresh_cases), with and without the rule in the config
    trainer = fresh_cases.score_runs([str(plain), str(largest), str(mirrored)], cases=1)["runs"]
    for cls in ("vessel", "aneurysm"):
        assert scored["fresh"]["none"][cls] == pytest.approx(trainer[str(plain)]["fresh"]["mean"][cls], abs=1e-6)
        assert scored["fresh"]["largest aneurysm"][cls] == pytest.approx(
            trainer[str(largest)]["fresh"]["mean"][cls], abs=1e-6
        )
        assert scored["fresh"]["mirrored, aneurysm touching vessel"][cls] == pytest.approx(
            trainer[str(mirrored)]["fresh"]["mean"][cls], abs=1e-6
        )
    # the untrained network paints aneurysm in many places: keeping the largest component changes its score
    assert scored["fresh"]["largest aneurysm"]["aneurysm"] != scored["fresh"]["none"]["aneurysm"]
    assert scored["fresh"]["mirrored"]["vessel"] != scored["fresh"]["none"]["vessel"]
    table = bench_postprocess.table(results)
    assert "| fresh | none | aneurysm |" in table and "| validation | largest vessel | vessel |" in table
    assert all(line.endswith("| +0.000 |") for line in table.splitlines() if "| none |" in line)


def test_the_command_refuses_bad_inputs_with_exit_code_2(phantoms, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tiny_checkpoint(tmp_path / "run.pt", phantom_settings(phantoms))
    for argv, said in [
        ([str(run), "--cases", "0"], "cases=0: expected at least 1 fresh case per centre"),
        ([str(tmp_path / "missing.pt")], "missing.pt"),
        ([str(run), "--mirror-axes", "3"], "invalid choice: 3"),
    ]:
        monkeypatch.setattr(sys, "argv", ["bench.postprocess", *argv])
        with pytest.raises(SystemExit) as exit_:
            bench_postprocess.main()
        assert exit_.value.code == 2 and said in capsys.readouterr().err
