"""The package's data flows down its layers and never back up: a module imports only from layers below its own; no
import circle; no private name imported from another module; no function-local import of the package's own
modules (except the command line's, which keeps ``--help`` fast, and the optional integrations, imported only when
used). Every module imports on its own, whichever is imported first. No function outside the kernels is longer than
a screen: a longer one is split into named steps."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A name in PACKAGES stands for the package and its submodules (which may import each other); a
# subpackage that spans layers has each module listed in its own layer, and its __init__ with the highest of them.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        ("gsema_fast", "gsema_fast.files", "gsema_fast.memory", "gsema_fast.distributed", "gsema_fast.integrations"),
    ),
    ("configuration, sinks", ("gsema_fast.config", "gsema_fast.integrations.tensorboard")),
    ("torch references", ("gsema_fast.reference",)),
    ("kernels", ("gsema_fast.kernels",)),
    ("ops", ("gsema_fast.ops",)),
    ("losses, EMA", ("gsema_fast.losses", "gsema_fast.ema")),
    ("models, data", ("gsema_fast.models", "gsema_fast.data")),
    ("step", ("gsema_fast.step",)),
    ("metrics", ("gsema_fast.evaluation.metrics",)),
    ("inference", ("gsema_fast.inference",)),
    ("scoring, figures", ("gsema_fast.evaluation.scoring", "gsema_fast.evaluation.figures")),
    (
        "training set-up",
        (
            "gsema_fast.training.build",
            "gsema_fast.training.compilation",
            "gsema_fast.training.checkpoints",
            "gsema_fast.training.runfolder",
            "gsema_fast.training.monitor",
        ),
    ),
    (
        "training",
        (
            "gsema_fast.training",
            "gsema_fast.training.loop",
            "gsema_fast.training.benchstep",
            "gsema_fast.integrations.nnunet",
            "gsema_fast.integrations.lightning",
            "gsema_fast.integrations.monai",
        ),
    ),
    ("evaluation", ("gsema_fast.evaluation", "gsema_fast.evaluation.evaluate")),
    ("experiments", ("gsema_fast.experiments", "gsema_fast.experiments.lodo")),
    ("CLI", ("gsema_fast.cli",)),
    ("entry point", ("gsema_fast.__main__",)),
]
# Units whose modules may import each other.
PACKAGES = (
    "gsema_fast.reference",
    "gsema_fast.kernels",
    "gsema_fast.data",
    "gsema_fast.inference",
    "gsema_fast.experiments.lodo",
)
LAZY_IMPORTERS = ("gsema_fast.cli",)  # imports inside functions: the command's --help must not load torch


def module_files() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (kernels/ is installed as gsema_fast.kernels)."""
    files = {}
    for path in sorted((ROOT / "gsema_fast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "gsema_fast.kernels" if path.stem == "__init__" else f"gsema_fast.kernels.{path.stem}"
        files[name] = path
    return files


def unit(module: str) -> str:
    return next((p for p in PACKAGES if module == p or module.startswith(p + ".")), module)


def layer(module: str) -> int:
    """The layer of a module: that of the most specific name in LAYERS covering it."""
    best = None
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or (name in PACKAGES and module.startswith(name + ".")):
                if best is None or len(name) > len(best[1]):
                    best = (index, name)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: give it one")
    return best[0]


def imports(path: Path, module: str) -> list[tuple[str, list[str], bool, int]]:
    """``(imported module, names, inside a function, line)`` for every import of the package in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "gsema_fast":
                        found.append((alias.name, [], in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(".")
                if base.split(".")[0] == "gsema_fast":
                    names = [a.name for a in child.names]
                    # "from gsema_fast import ops" imports the module gsema_fast.ops
                    submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
                    for target in submodules or [base]:
                        found.append((target, [] if submodules else names, in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return found


MODULES = module_files()


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_flow_down(module):
    own = layer(module)
    package = MODULES[module].name == "__init__.py"
    for target, names, in_function, line in imports(MODULES[module], module):
        where = f"{MODULES[module].relative_to(ROOT)}:{line}"
        if unit(target) != unit(module):
            # a package's __init__ gathers the public names of its own modules, which may sit in its layer
            own_module = package and target.startswith(module + ".")
            assert layer(target) < own or (own_module and layer(target) == own), (
                f"{where}: {module} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer(target)][0]}): "
                f"a module imports only from layers below its own"
            )
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private or unit(target) == unit(module), f"{where}: private name(s) {private} of {target}"
        lazy_ok = module in LAZY_IMPORTERS or target.startswith("gsema_fast.integrations.")
        assert not in_function or lazy_ok, f"{where}: {module} imports {target} inside a function"


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The check above is not vacuous: an evaluation import in the step module is reported."""
    fake = tmp_path / "step.py"
    fake.write_text("from gsema_fast.evaluation.evaluate import evaluate\n")
    (target, _, _, _), *_ = imports(fake, "gsema_fast.step")
    assert target == "gsema_fast.evaluation.evaluate" and layer(target) > layer("gsema_fast.step")


SCRIPT = textwrap.dedent(
    """
    import importlib, sys

    names = sys.argv[1:]
    try:
        import triton
    except ImportError:  # the kernels need Triton; the Triton-free CPU path is tested in test_without_triton.py
        names = [n for n in names if not n.startswith("gsema_fast.kernels")]
    for first in names:
        for loaded in [m for m in sys.modules if m == "gsema_fast" or m.startswith("gsema_fast.")]:
            del sys.modules[loaded]
        # this module first, then all the others, the last-listed first
        for name in [first, *reversed(names)]:
            try:
                importlib.import_module(name)
            except ImportError as err:
                # an integration whose extra is not installed: its own test covers it (by name: each round of
                # this loop imports the package, and its MissingExtraError class, anew)
                if type(err).__name__ != "MissingExtraError":
                    raise
    """
)


def test_only_the_kernels_import_triton():
    """Triton is imported by the kernel modules alone, which ``ops`` loads on the first launch: the CPU path, the
    trainer and the CLI run where Triton is not installed."""
    for module, path in MODULES.items():
        if unit(module) == "gsema_fast.kernels":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names += [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            kernels = [n for n in names if n.split(".")[0] == "triton" or n.startswith("gsema_fast.kernels")]
            assert not kernels, f"{path.relative_to(ROOT)}:{node.lineno} imports {kernels}"


@pytest.mark.slow
def test_every_module_imports_whichever_comes_first():
    names = [m for m in MODULES if m != "gsema_fast.__main__"]
    done = subprocess.run([sys.executable, "-c", SCRIPT, *names], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_a_missing_extra_is_tolerated_in_every_round_and_nothing_else_is(tmp_path):
    """The import check passes without the optional extras (the README's test command installs only [dev]) however
    many times the package is imported afresh, and still fails on any other import error."""
    missing = tmp_path / "gsema_fast_missing_extra.py"
    missing.write_text("from gsema_fast.integrations import MissingExtraError\nraise MissingExtraError('x', 'y')\n")
    broken = tmp_path / "gsema_fast_broken.py"
    broken.write_text("import a_module_that_does_not_exist\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    names = ["gsema_fast.files", "gsema_fast_missing_extra", "gsema_fast.config"]
    done = subprocess.run([sys.executable, "-c", SCRIPT, *names], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *names, "gsema_fast_broken"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 1 and "a_module_that_does_not_exist" in done.stderr


def test_the_layout_page_names_every_module():
    """docs/layout.md names every top-level module, every subpackage folder and each module in it (by its folder and
    its file name), and the folders beside the package."""
    text = (ROOT / "docs" / "layout.md").read_text()
    package = ROOT / "gsema_fast"
    for path in sorted(package.rglob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        folder = path.parent.relative_to(package).as_posix()
        if folder != ".":
            assert f"{folder}/`" in text, f"docs/layout.md does not name the folder gsema_fast/{folder}/"
        assert f"{path.name}`" in text, f"docs/layout.md does not name gsema_fast/{path.relative_to(package)}"
    for folder in ("kernels/", "configs/", "bench/", "tests/"):
        assert f"{folder}`" in text, f"docs/layout.md does not name {folder}"


# Longer functions are split into named steps that read top to bottom. The kernels are exempt: a Triton program is one
# function by nature.
MAX_FUNCTION_LINES = 80


def function_lengths() -> dict[str, tuple[int, str]]:
    """``{module.function: (lines, where)}`` for every function and method of the package outside the kernels."""
    found = {}
    for module, path in MODULES.items():
        if unit(module) == "gsema_fast.kernels":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found[f"{module}.{node.name}"] = (node.end_lineno - node.lineno + 1, where)
    return found


def test_no_function_outside_the_kernels_is_longer_than_a_screen():
    lengths = function_lengths()
    long = [
        f"{where} {name.rpartition('.')[2]}: {lines} lines"
        for name, (lines, where) in sorted(lengths.items())
        if lines > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines; split them into named steps: {long}"
