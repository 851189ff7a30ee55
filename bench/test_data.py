"""Data benchmarks: synthetic cases per second, training patches per second through the loader and T, and T alone
on the training device.

Targets (issue 4): 24 synthetic cases of 128^3 in under a minute on two CPU cores (measured with ``gsema-fast
synth``, see the package's docstring in ``gsema_fast/data/phantoms/``); T on a batch of two 128^3 patches well under
a GPU training step (~0.1 s on H200). With ``--benchmark-disable`` (CI) every case runs once at toy sizes;
otherwise at the sizes of the targets. ``extra_info`` holds the rates.
"""

from __future__ import annotations

import pytest
import torch

from bench._util import DEVICE, ON_GPU, sync, timed
from gsema_fast.config import DataConfig
from gsema_fast.data import TargetTransform, build_loaders, synthesize
from gsema_fast.data.target import ORDER


@pytest.fixture(scope="module")
def full(request) -> bool:
    return not request.config.getoption("benchmark_disable")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, full):
    size = 128 if full else 32
    return synthesize(tmp_path_factory.mktemp("bench_data") / "ds", domains=4, cases_per_domain=3, size=size, seed=0)


def test_synth_cases_per_second(benchmark, tmp_path, full):
    cases_per_domain, size = (6, 128) if full else (1, 32)
    n = 4 * cases_per_domain

    def run():
        synthesize(tmp_path / "ds", domains=4, cases_per_domain=cases_per_domain, size=size, seed=0, overwrite=True)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(cases=n, size=size)
    if benchmark.stats:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(seconds=round(seconds, 2), cases_per_s=round(n / seconds, 3))
    assert len(list((tmp_path / "ds" / "imagesTr").glob("*.nii.gz"))) == n


def test_loader_and_target_transform_patches_per_second(benchmark, dataset, full):
    patch, batch, steps = ((96, 96, 96), 2, 20) if full else ((32, 32, 32), 3, 2)
    settings = DataConfig(
        train_domains=[0, 1, 2],
        test_domain=3,
        patch_size=patch,
        batch_size=batch,
        num_workers=4 if (full and ON_GPU) else 0,
    )
    data = build_loaders(dataset, settings, steps_per_epoch=steps)
    T = TargetTransform(seed=0).to(DEVICE)

    def epoch():
        for b in data.train:
            x = b["image"].to(DEVICE, non_blocking=True)
            y = b["label"].to(DEVICE, non_blocking=True)
            T(x, y)
        sync()

    benchmark.pedantic(epoch, rounds=3 if full else 1, iterations=1, warmup_rounds=1)  # warm-up: cache, workers
    benchmark.extra_info.update(device=str(DEVICE), patch=list(patch), batch=batch, steps=steps)
    if benchmark.stats:
        benchmark.extra_info["patches_per_s"] = round(steps * batch / benchmark.stats.stats.median, 2)


@pytest.mark.parametrize("components", ["all", "gin"])
def test_target_transform_on_device(benchmark, full, components):
    side = 128 if full else 32
    x = torch.randn(2, 1, side, side, side, device=DEVICE)
    y = (torch.rand(2, 1, side, side, side, device=DEVICE) > 0.95).long()
    if components == "all":  # every component on every sample: the most T can cost
        T = TargetTransform(seed=0, **{n: {"p": 1.0} for n in ORDER})
    else:
        T = TargetTransform(seed=0, **{n: ({"p": 1.0, "kernels": [3]} if n == "gin" else False) for n in ORDER})
    ms = timed(lambda: T(x, y), warmup=2 if full else 1, iters=10 if full else 1)
    benchmark.pedantic(lambda: T(x, y), rounds=1, iterations=1)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu", shape=list(x.shape), ms=round(ms, 3)
    )
