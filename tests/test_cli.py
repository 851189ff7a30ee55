"""The ``gsema-fast`` command line: every verb and what its options parse to, ``train --nproc`` running the command
line it was given in every process, and bad settings refused before any process starts."""

from __future__ import annotations

import logging
from typing import get_args

import pytest

from gsema_fast import cli, config, distributed
from gsema_fast.cli import main
from gsema_fast.evaluation import evaluate
from gsema_fast.experiments.lodo import run as lodo_run
from gsema_fast.experiments.lodo import study as lodo_study
from gsema_fast.training import benchstep

OPTIONAL_RUN = {"config": None, "set": [], "out": None, "overwrite": False}
INFERENCE = {"weights": None, "config": None, "set": [], "overlap": None, "sw_batch_size": None, "device": None}
NNUNET = {
    "trainer": "nnUNetTrainerGSEMA",
    "plans": "nnUNetPlans",
    "pretrained_weights": None,
    "device": "cuda",
    "npz": False,
    "c": False,
    "val": False,
    "val_best": False,
    "disable_checkpointing": False,
    "overwrite": False,
    "set": [],
    "epochs": None,
    "iterations": None,
    "val_iterations": None,
}

# The shortest command line of each verb, in the order `gsema-fast --help` lists them, and what it parses to.
VERBS = {
    "train": (["train"], {**OPTIONAL_RUN, "resume": False, "nproc": None}),
    "synth": (
        ["synth", "--out", "x"],
        {"out": "x", "overwrite": False, "domains": 4, "cases_per_domain": 6, "size": 128, "seed": 0, "workers": None},
    ),
    "evaluate": (
        ["evaluate", "--checkpoint", "c.pt"],
        {
            **INFERENCE,
            "checkpoint": "c.pt",
            "out": None,
            "overwrite": False,
            "data": None,
            "domain": None,
            "split": "test",
            "save_predictions": False,
            "no_hd95": False,
            "figures": False,
            "compare": (),
        },
    ),
    "predict": (
        ["predict", "--checkpoint", "c.pt", "--input", "a", "b", "--output", "o"],
        {
            **INFERENCE,
            "checkpoint": "c.pt",
            "overwrite": False,
            "input": ["a", "b"],
            "output": "o",
            "probabilities": False,
        },
    ),
    "lodo": (
        ["lodo"],
        {
            **OPTIONAL_RUN,
            "preset": None,
            "seeds": None,
            "ablation": False,
            "row": None,
            "domain": None,
            "use": "best",
        },
    ),
    "lodo-table": (["lodo-table", "r.json", "--out", "t"], {"out": "t", "records": "r.json"}),
    "bench-step": (
        ["bench-step"],
        {"config": None, "set": [], "out": None, "mode": "all", "steps": 5, "warmup": 2, "no_loader": False},
    ),
    "nnunet-train": (
        ["nnunet-train", "42", "3d_fullres", "0"],
        {**NNUNET, "dataset": "42", "configuration": "3d_fullres", "fold": "0"},
    ),
    "nnunet-trainers": (["nnunet-trainers", "f"], {"overwrite": False, "folder": "f"}),
}


def parsed(argv: list[str]) -> dict:
    args = cli._build_parser().parse_args(argv)
    return {k: v for k, v in vars(args).items() if k not in ("run", "verb", "verbose")}


def test_the_verbs_in_their_order():
    (verbs,) = [a for a in cli._build_parser()._actions if a.dest == "verb"]
    assert list(verbs.choices) == list(VERBS)


@pytest.mark.parametrize("verb", list(VERBS))
def test_each_verb_parses_to_its_defaults(verb):
    argv, want = VERBS[verb]
    assert parsed(argv) == want


@pytest.mark.parametrize(
    "argv",
    [
        ["synth"],  # --out
        ["lodo-table", "r.json"],  # --out
        ["evaluate"],  # --checkpoint
        ["predict", "--checkpoint", "c.pt", "--input", "a"],  # --output
        ["evaluate", "--checkpoint", "c.pt", "--split", "train"],
        ["train", "--nproc", "two"],
        ["bench-step", "--resume"],  # train's own option
    ],
)
def test_a_bad_command_line_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code == 2
    assert "usage: gsema-fast" in capsys.readouterr().err


def test_shared_options_repeat_and_take_their_values():
    got = parsed(["lodo", "--set", "a.b=1", "--set=c.d=[2, 3]", "--out", "o", "--overwrite", "--config", "paper"])
    assert got["set"] == ["a.b=1", "c.d=[2, 3]"] and got["out"] == "o" and got["overwrite"] and got["config"] == "paper"
    got = parsed(["predict", "--checkpoint", "c", "--input", "a", "--output", "o", "--set", "eval.mode=constant"])
    assert got["set"] == ["eval.mode=constant"]


# ------------------------------------------------------------------------------------------------ train --nproc


@pytest.fixture
def launches(monkeypatch):
    """What `train --nproc` would start: (processes, command line, verbose) of each launch, which reports success."""
    calls = []

    def launch(nproc, argv, *, verbose=False):
        calls.append((nproc, list(argv), verbose))
        return 0, None

    monkeypatch.setattr(distributed, "launch", launch)
    monkeypatch.setattr(distributed, "launched", lambda: False)
    return calls


@pytest.mark.parametrize(
    ("argv", "nproc", "each_process"),
    [
        (
            ["train", "--out", "R", "--set", "train.epochs=1", "--nproc", "2", "--resume"],
            2,
            ["train", "--out", "R", "--set", "train.epochs=1", "--resume"],
        ),
        (
            ["-v", "train", "--nproc=3", "--set=optim.lr=0.01", "--config", "demo", "--overwrite"],
            3,
            ["-v", "train", "--set=optim.lr=0.01", "--config", "demo", "--overwrite"],
        ),
        (
            ["train", "--np", "4", "--set", "data.batch_size=1", "--nproc", "2"],
            2,
            ["train", "--set", "data.batch_size=1"],
        ),
    ],
    ids=["separate value", "--nproc=N and -v", "abbreviated and repeated"],
)
def test_nproc_runs_the_command_line_it_was_given(launches, argv, nproc, each_process, tmp_path, monkeypatch):
    """Every process runs the command line as typed, less --nproc: an option added to train needs no second place."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0
    assert launches == [(nproc, each_process, "-v" in argv)]


def test_nproc_ends_as_the_job_did(launches, monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(distributed, "launch", lambda *args, **kwargs: (2, "case c0_00: label holds values [7]"))
    assert main(["train", "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "case c0_00: label holds values [7]"
    ]


def test_nproc_refuses_a_bad_setting_before_any_process_starts(launches, caplog, tmp_path):
    assert main(["train", "--nproc", "2", "--set", "optim.lr=fast", "--out", str(tmp_path / "run")]) == 2
    assert launches == []
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "optim.lr" in error and "\n" not in error
    assert not (tmp_path / "run").exists()


def choices_of(verb: str, dest: str) -> tuple:
    (verbs,) = [a for a in cli._build_parser()._actions if a.dest == "verb"]
    (option,) = [a for a in verbs.choices[verb]._actions if a.dest == dest]
    return tuple(option.choices)


# The parser names these choices itself, so that `--help` needs neither pydantic nor torch; their homes are below.
@pytest.mark.parametrize(
    ("verb", "dest", "home"),
    [
        ("evaluate", "weights", lambda: get_args(config.EvalWeights)),
        ("predict", "weights", lambda: get_args(config.EvalWeights)),
        ("bench-step", "mode", lambda: (*benchstep.MODES, "all")),
        ("lodo", "preset", lambda: tuple(lodo_study.PRESETS)),
        ("lodo", "use", lambda: lodo_run.CHECKPOINTS),
        ("evaluate", "split", lambda: evaluate.SPLITS),
    ],
)
def test_the_parsers_choices_are_those_of_their_home(verb, dest, home):
    assert choices_of(verb, dest) == home()
