"""The CPU path needs no Triton: in a process where ``import triton`` fails, the package imports, every op runs on
CPU tensors (the torch references), ``gsema-fast train`` trains, and asking for the kernels says in one line what to
install. (CI also runs the whole fast tier that way: ``GSEMA_FAST_TEST_WITHOUT_TRITON=1``, see conftest.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny import tiny_run

ROOT = Path(__file__).resolve().parents[1]

# Makes `import triton` fail as on a machine without it, then runs the test's code.
BLOCK_TRITON = textwrap.dedent(
    """
    import importlib.abc, os, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoTriton())
    os.environ.pop("TRITON_INTERPRET", None)
    """
)

OPS = textwrap.dedent(
    """
    import importlib, pkgutil
    import torch
    import gsema_fast
    from gsema_fast import ops
    from gsema_fast.ema import EMA, GSEMA
    from gsema_fast.losses import BACL

    skipped = ("gsema_fast.kernels", "gsema_fast.integrations.", "gsema_fast.__main__")
    for info in pkgutil.walk_packages(gsema_fast.__path__, "gsema_fast."):
        if not info.name.startswith(skipped):
            importlib.import_module(info.name)

    a = [torch.randn(300), torch.randn(7).bfloat16()]
    b = [torch.randn(300), torch.randn(7).bfloat16()]
    stats = ops.grad_stats(a, b, accumulate_into_a=True)
    assert stats.dtype == torch.float64 and torch.isfinite(stats).all()
    teacher = [t.float().clone() for t in a]
    assert ops.gsema_update_(teacher, a, stats, decay_aligned=0.9, decay_conflict=1.0, step=3).item() in (0.0, 1.0)
    ops.fused_ema_(teacher, a, 0.25)
    ops.fused_ema_(teacher, a, torch.tensor(0.25))
    zs = [torch.randn(2, 3, 6, 6, 6, requires_grad=i < 2) for i in range(4)]
    ops.bacl_loss(*zs, mask="reference").backward()
    BACL()(*zs)[0].backward()
    assert ops.high_pass(zs[0]).shape == zs[0].shape
    model = torch.nn.Linear(4, 3)
    EMA(model, 0.99).update(model)
    GSEMA(model).update(torch.tensor([1.0, 1, 1, 1, 1, 1], dtype=torch.float64))
    assert not [m for m in sys.modules if m == "triton" or m.startswith(("triton.", "gsema_fast.kernels"))]

    os.environ[ops.BACKEND_ENV] = "triton"
    try:
        ops.grad_stats(a, b)
    except ops.TritonUnavailableError as err:
        print("ERROR:", err)
    else:
        raise AssertionError("the Triton backend ran without Triton")
    """
)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TRITON + code, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_the_ops_and_every_module_run_without_triton():
    done = _run(OPS)
    assert done.returncode == 0, done.stderr[-3000:]
    (error,) = [line for line in done.stdout.splitlines() if line.startswith("ERROR:")]
    assert "pip install triton" in error and "GSEMA_FAST_BACKEND=torch" in error


@pytest.mark.slow
def test_train_runs_without_triton(phantoms, tmp_path):
    overrides = [a for kv in [*tiny_run(phantoms), "train.device=cpu"] for a in ("--set", kv)]
    code = "from gsema_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    done = _run(code, "train", *overrides, "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "final.pt").is_file()
    assert "triton" not in done.stderr.lower()
