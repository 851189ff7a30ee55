"""The distribution installs ``kernels/`` as ``gsema_fast.kernels`` and the YAML configs, never a top-level
``kernels`` package (the editable install the test suite runs from covers the editable case)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from backends import needs_triton

ROOT = Path(__file__).resolve().parents[1]


@needs_triton
def test_kernels_import_as_a_subpackage():
    import gsema_fast.kernels.grad_stats as grad_stats_module

    assert Path(grad_stats_module.__file__).resolve() == ROOT / "kernels" / "grad_stats.py"


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("gsema_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # Every module of the source tree ships, under its installed name: a subpackage missing from pyproject's
    # package list would install a package that cannot import.
    expected = [
        f"gsema_fast/{p.relative_to(ROOT / 'gsema_fast').as_posix()}" for p in (ROOT / "gsema_fast").rglob("*.py")
    ]
    expected += [f"gsema_fast/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")]
    expected += [f"gsema_fast/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")]
    missing = sorted(set(expected) - set(names))
    assert not missing, missing
    assert not [n for n in names if n.startswith(("kernels/", "configs/", "tests/", "bench/"))]
