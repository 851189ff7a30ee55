"""Whole-step throughput: plain supervised step, the public code's GS-EMA step structure, and ours.

On a GPU: SwinUNETR feature_size 48, 96^3, batch 1 (bf16, compiled, as ``configs/gpu.yaml`` resolves); on the CPU:
a tiny SwinUNETR (feature_size 12, 64^3, batch 1, fp32), the smallest it trains at. ``extra_info`` holds each
mode's ratio to ``plain`` measured in the same run. ``gsema-fast bench-step`` prints the same as JSON.
"""

from __future__ import annotations

import functools

import pytest

from bench._util import ON_GPU, sync, timed
from gsema_fast.config import load_config
from gsema_fast.training.benchstep import prepare, step_function

SETTINGS = (
    ["model.name=swinunetr", "model.feature_size=48", "data.patch_size=[96,96,96]", "data.batch_size=1"]
    if ON_GPU
    else ["model.name=swinunetr", "model.feature_size=12", "data.patch_size=[64,64,64]", "data.batch_size=1"]
)
ROUNDS = 10 if ON_GPU else 2


@functools.lru_cache(maxsize=1)
def prepared():
    return prepare(load_config("gpu" if ON_GPU else "demo", SETTINGS))


@functools.cache
def step_of(mode: str):
    cfg, ctx, batch, _ = prepared()
    return step_function(mode, cfg, ctx, *batch)


def run(fn):
    fn()
    sync()


@pytest.mark.parametrize("mode", ["plain", "reference", "gsema"])
def test_step(benchmark, mode):
    fn = step_of(mode)
    benchmark.pedantic(run, args=(fn,), rounds=ROUNDS, warmup_rounds=1)
    if benchmark.disabled:
        return
    cfg = prepared()[0]
    ms = timed(fn, warmup=1, iters=ROUNDS)
    plain = ms if mode == "plain" else timed(step_of("plain"), warmup=1, iters=ROUNDS)
    benchmark.extra_info.update(
        device="cuda" if ON_GPU else "cpu",
        ms=round(ms, 2),
        x_plain=round(ms / plain, 2),
        model=f"{cfg.model.name} F={cfg.model.feature_size}",
        patch=str(cfg.data.patch_size),
        amp=cfg.train.amp,
    )
