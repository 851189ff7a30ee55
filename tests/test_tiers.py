"""The test tiers: the guard in conftest fails a test that starts a process or trains without the ``slow`` mark, a test
module that needs an optional extra carries ``integration``, and the marks are registered."""

from __future__ import annotations

import ast
import importlib.metadata
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from backends import BACKENDS, INTERPRETED
from conftest import GUARD, UnmarkedSlowTestError
from tiny import make_ctx, tiny_batch, tiny_run

from gsema_fast.config import load_config
from gsema_fast.step import train_step
from gsema_fast.training import train

TESTS = Path(__file__).resolve().parent
# The module each optional extra installs, as a test skips on it (pytest.importorskip)
EXTRA_MODULES = {"nnunet": "nnunetv2", "lightning": "lightning", "tensorboard": "tensorboard", "ignite": "ignite"}


def taken_back(request) -> str:
    """The guard's complaint about this test, which broke the rule on purpose (left, it would fail the test)."""
    return GUARD.violations.pop(request.node.nodeid)


@pytest.mark.parametrize(
    ("start", "what"),
    [
        (lambda: subprocess.run(["true", "x"]), r"starts a process \(subprocess\.Popen: true x\)"),
        (lambda: os.system("true"), r"starts a process \(os\.system: true\)"),
        (
            lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
            r"starts a process \(multiprocessing: SpawnProcess-\d+\)",
        ),
    ],
    ids=["subprocess", "os.system", "multiprocessing"],
)
def test_an_unmarked_test_that_starts_a_process_fails(request, start, what):
    with pytest.raises(UnmarkedSlowTestError, match=rf"test_tiers\.py::.* is not marked slow, but it {what}"):
        start()
    assert "mark it @pytest.mark.slow" in taken_back(request)


def test_an_unmarked_test_that_trains_fails_at_the_first_step(request, phantoms, tmp_path):
    cfg = load_config("demo", [*tiny_run(phantoms), f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(UnmarkedSlowTestError, match=r"but it trains \(a gsema_step from gsema_fast\.training\.loop\)"):
        train(cfg)
    taken_back(request)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_test_of_the_step_itself_is_no_training(request):
    out = train_step(make_ctx("gsema"), *tiny_batch())
    assert out["skipped"].item() == 0.0
    assert request.node.nodeid not in GUARD.violations


GUARDED_SUITE = """
import subprocess

import pytest


@pytest.fixture(scope="module")
def started():
    subprocess.run(["true"], check=True)


def test_quick():
    pass


def test_unmarked_process():
    subprocess.run(["true"])


def test_unmarked_process_whose_error_is_caught():
    try:
        subprocess.run(["true"])
    except Exception:
        pass


@pytest.mark.slow
def test_marked_process():
    subprocess.run(["true"], check=True)


@pytest.mark.slow
def test_marked_with_the_fixture(started):
    pass


def test_unmarked_with_the_fixture_it_already_set_up(started):
    pass
"""


@pytest.mark.slow
def test_the_guard_in_a_session_of_its_own(tmp_path):
    """A fixture that started a process makes every test that uses it slow, also after it was set up for another;
    an exception of the guard that the code under test caught still fails the test."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(GUARDED_SUITE))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "test_suite.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    outcomes = {}
    for line in done.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR") and "::" in rest:
            outcomes[rest.split("::")[1].split(" ")[0]] = word
    assert outcomes == {
        "test_quick": "PASSED",
        "test_unmarked_process": "FAILED",
        "test_unmarked_process_whose_error_is_caught": "FAILED",
        "test_marked_process": "PASSED",
        "test_marked_with_the_fixture": "PASSED",
        "test_unmarked_with_the_fixture_it_already_set_up": "ERROR",  # refused at its set-up
    }, done.stdout[-3000:]
    assert "its fixture 'started' starts a process" in done.stdout


def test_the_marks_are_registered_and_checked(request):
    names = {line.split(":")[0] for line in request.config.getini("markers")}
    assert {"slow", "integration", "gpu"} <= names
    assert "--strict-markers" in request.config.getini("addopts")  # a misspelt mark is an error, not a quick test


def test_the_kernels_cases_are_slow_where_triton_interprets_them():
    (triton,) = [case for case in BACKENDS if getattr(case, "values", None) == ("triton",)]
    assert ("slow" in {mark.name for mark in triton.marks}) == INTERPRETED


def test_the_extras_are_those_of_the_distribution():
    extras = set(importlib.metadata.metadata("gsema-fast").get_all("Provides-Extra"))
    assert set(EXTRA_MODULES) == extras - {"dev"}


def _skips_without(node: ast.AST) -> set[str]:
    """The extras whose modules ``node`` skips without (``pytest.importorskip("...")``)."""
    found = set()
    for call in ast.walk(node):
        if (
            isinstance(call, ast.Call)
            and ast.unparse(call.func) == "pytest.importorskip"
            and call.args
            and isinstance(call.args[0], ast.Constant)
        ):
            top = str(call.args[0].value).split(".")[0]
            found |= {extra for extra, module in EXTRA_MODULES.items() if module == top}
    return found


def _marks(decorators) -> set[str]:
    return {ast.unparse(d).removeprefix("pytest.mark.").split("(")[0] for d in decorators}


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_a_test_that_needs_an_extra_is_marked_integration(path):
    tree = ast.parse(path.read_text())
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    module_marks: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
            module_marks = _marks(node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value])
    for node in tree.body:
        if not isinstance(node, definitions) and _skips_without(node):
            assert "integration" in module_marks, f"{path.name} skips without {_skips_without(node)}: pytestmark"
        elif isinstance(node, ast.FunctionDef) and node.name.startswith("test_") and _skips_without(node):
            marks = module_marks | _marks(node.decorator_list)
            assert "integration" in marks, f"{path.name}::{node.name} needs {_skips_without(node)}: mark integration"
