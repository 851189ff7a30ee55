"""The core package and its command line never import nnU-Net, Lightning or TensorBoard; asking for an integration
without its extra is a one-line error naming the extra to install."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXTRAS = [
    "nnunetv2",
    "dynamic_network_architectures",
    "batchgenerators",
    "batchgeneratorsv2",
    "acvl_utils",
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "torchmetrics",
    "tensorboard",
    "tensorboardX",
    "ignite",
]

SCRIPT = textwrap.dedent(
    """
    import importlib, logging, sys

    BLOCKED = set(sys.argv[1:])

    class Absent:
        # every module of the extras looks uninstalled
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())

    for name in ("gsema_fast", "gsema_fast.cli", "gsema_fast.config", "gsema_fast.ops", "gsema_fast.ema",
                 "gsema_fast.losses", "gsema_fast.step", "gsema_fast.models", "gsema_fast.data",
                 "gsema_fast.training.loop", "gsema_fast.evaluation.evaluate", "gsema_fast.training.benchstep",
                 "gsema_fast.integrations"):
        importlib.import_module(name)

    from gsema_fast.cli import main
    for argv in (["--help"], ["nnunet-train", "--help"]):
        try:
            main(argv)
        except SystemExit as done:
            assert done.code == 0, (argv, done.code)

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    records = []
    logging.getLogger("gsema_fast").addHandler(Keep())
    assert main(["nnunet-train", "1", "3d_fullres", "0", "-device", "cpu"]) == 2
    (error,) = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert 'pip install "gsema-fast[nnunet]"' in error and "\\n" not in error, error
    records.clear()
    assert main(["nnunet-trainers", "trainers_folder"]) == 2
    (error,) = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert 'pip install "gsema-fast[nnunet]"' in error and "\\n" not in error, error

    from gsema_fast.config import load_config
    from gsema_fast.integrations import MissingExtraError
    from gsema_fast.training.monitor import build_loggers
    cfg = load_config("demo", ["train.loggers=[jsonl,tensorboard]"])
    try:
        build_loggers(cfg, None)
        raise AssertionError("tensorboard without its extra")
    except ValueError as err:
        assert isinstance(err, MissingExtraError) and 'pip install "gsema-fast[tensorboard]"' in str(err), err
    try:
        import gsema_fast.integrations.lightning
        raise AssertionError("lightning without its extra")
    except ImportError as err:
        assert isinstance(err, MissingExtraError) and 'pip install "gsema-fast[lightning]"' in str(err), err

    try:
        import gsema_fast.integrations.monai
        raise AssertionError("the MONAI engines without ignite")
    except ImportError as err:
        assert isinstance(err, MissingExtraError) and 'pip install "gsema-fast[ignite]"' in str(err), err

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("core without extras: ok")
    """
)


@pytest.mark.slow
def test_core_and_cli_import_and_run_without_the_extras():
    done = subprocess.run([sys.executable, "-c", SCRIPT, *EXTRAS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "core without extras: ok" in done.stdout


# A torchvision built for another torch: importing it raises RuntimeError, as PyPI's does beside a CPU torch.
BROKEN_TORCHVISION = 'raise RuntimeError("operator torchvision::nms does not exist")\n'
# Each extra's first import reaches torchvision, as timm and torchmetrics (through Lightning) do.
THROUGH_TORCHVISION = "import torchvision\n"

BROKEN_SCRIPT = textwrap.dedent(
    """
    import logging, sys

    from gsema_fast.cli import main
    from gsema_fast.integrations import MissingExtraError

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logging.getLogger("gsema_fast").addHandler(Keep())
    for argv in (["nnunet-train", "1", "3d_fullres", "0", "-device", "cpu"], ["nnunet-trainers", "x"]):
        records.clear()
        assert main(argv) == 2, argv
        (error,) = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
        print(error)
    for module in ("lightning", "monai", "tensorboard"):
        try:
            __import__(f"gsema_fast.integrations.{module}")
            raise AssertionError(module)
        except MissingExtraError as err:
            assert isinstance(err, ValueError) and isinstance(err.__cause__, RuntimeError), err
            print(err)
    """
)


@pytest.mark.slow
def test_an_extra_that_fails_to_import_is_one_line_naming_the_torchvision_fix(tmp_path):
    # Every extra replaced by one that imports the broken torchvision.
    for name in ("torchvision", "nnunetv2", "lightning", "ignite"):
        (tmp_path / name).mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(BROKEN_TORCHVISION)
    for name in ("nnunetv2", "lightning", "ignite"):
        (tmp_path / name / "__init__.py").write_text(THROUGH_TORCHVISION)
    # torch.utils.tensorboard imports the tensorboard package first
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "__init__.py").write_text(THROUGH_TORCHVISION)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", BROKEN_SCRIPT], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 5, lines
    for line in lines:
        assert "RuntimeError: operator torchvision::nms does not exist" in line, line
        assert "was not built for torch" in line and "torchvision beside a CPU torch" in line, line


def test_the_integrations_are_a_package_of_the_distribution():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "gsema_fast.integrations" in pyproject["tool"]["setuptools"]["packages"]
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["nnunet"] == ["nnunetv2>=2.6"]
    assert {"lightning", "tensorboard", "ignite"} <= set(extras)
    assert any(r.startswith("pytorch-ignite") for r in extras["ignite"])
