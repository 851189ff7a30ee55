"""Shared test set-up: fixed seeds, and Triton's interpreter on machines without CUDA.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here before any kernel module is imported.

``GSEMA_FAST_TEST_WITHOUT_TRITON=1`` runs the suite as on a machine without Triton (CI does, to hold the CPU path
to needing none): ``import triton`` then fails, the kernels' tests skip, and everything else must pass.
"""

import importlib.abc
import os
import random
import sys

import numpy as np
import pytest
import torch

WITHOUT_TRITON = os.environ.get("GSEMA_FAST_TEST_WITHOUT_TRITON") == "1"


class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (GSEMA_FAST_TEST_WITHOUT_TRITON=1)", name=name)
        return None


if WITHOUT_TRITON:
    sys.meta_path.insert(0, _NoTriton())
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread: on tiny inputs extra threads only add synchronisation, which costs seconds on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
