"""The core package and its command line never import nnU-Net, Lightning or TensorBoard; asking for an integration
without its extra is a one-line error naming the extra to install."""

from __future__ import annotations

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
                 "gsema_fast.losses", "gsema_fast.step", "gsema_fast.models", "gsema_fast.data", "gsema_fast.train",
                 "gsema_fast.evaluate", "gsema_fast.benchstep", "gsema_fast.integrations"):
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

    from gsema_fast.config import load_config
    from gsema_fast.integrations import MissingExtraError
    from gsema_fast.monitor import build_loggers
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

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("core without extras: ok")
    """
)


def test_core_and_cli_import_and_run_without_the_extras():
    done = subprocess.run([sys.executable, "-c", SCRIPT, *EXTRAS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "core without extras: ok" in done.stdout


def test_the_integrations_are_a_package_of_the_distribution():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "gsema_fast.integrations" in pyproject["tool"]["setuptools"]["packages"]
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["nnunet"] == ["nnunetv2>=2.6"]
    assert {"lightning", "tensorboard"} <= set(extras)
