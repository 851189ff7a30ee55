"""Benchmark set-up: fixed seeds. Benchmarks run the production path of each device (Triton on CUDA, the torch
reference on the CPU), never Triton's interpreter."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_seeds():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
