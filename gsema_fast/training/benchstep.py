"""Whole-step throughput: a plain supervised step, the public code's GS-EMA step structure, and ours.

``bench_step(cfg, modes)`` builds the configured student/teacher pair on the configured device, draws one batch of
``data.batch_size`` random patches of ``data.patch_size`` (labels from thresholds of the image, so every class is
present) and its simulated target, then times each mode's step in the same process:

- ``plain``: the student alone on the source batch: forward, Dice + CE, backward, optimizer step (same AMP and
  compile settings as ``gsema``);
- ``reference``: the public code's structure: fp32 eager, four separate forwards, a full backward of the total loss
  plus two more full backward passes for g_src and g_trg, the decision by ``torch.cat`` + sign + cosine read on the
  host, a Python-loop EMA;
- ``gsema``: this project's step (:func:`gsema_fast.step.gsema_step`), as on the steps that do not log (the teacher
  runs only up to its latent; the loop computes the teacher's logged DCE terms once per ``train.log_every`` steps).

Step times are medians over ``steps`` timed steps after ``warmup`` untimed ones (the first of which, compilation
included, is reported on its own), synchronised on CUDA. The target transform's time per batch is reported next to
them: data must never be what limits a step. With ``train.compile`` the compiled code is loaded from and saved to
the compile cache (:func:`gsema_fast.training.compilation.compile_cache_file`), so a second run of the same config
reports a warm first step (``"compile_cache": "warm"``).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F

from gsema_fast.config import Config, resolve_auto, with_overrides
from gsema_fast.memory import retain_freed_memory
from gsema_fast.models import build_model, unwrap_model
from gsema_fast.reference.bacl import bacl_reference
from gsema_fast.step import gsema_step
from gsema_fast.training.build import build_context, build_data, build_target_transform, seed_everything
from gsema_fast.training.compilation import compile_blocks, compile_cache_file, load_compile_cache, save_compile_cache

log = logging.getLogger(__name__)

MODES = ("plain", "reference", "gsema")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(cfg: Config, device: torch.device):
    d = cfg.data
    patch = list(d.patch_size)  # the config stores three sizes
    generator = torch.Generator().manual_seed(cfg.train.seed)
    x_s = torch.randn(d.batch_size, cfg.model.in_channels, *patch, generator=generator).to(device)
    # Thresholds give every class a share of voxels, so the losses and gradients are those of a real batch.
    y_s = ((x_s[:, :1] > 0.5).long() + (x_s[:, :1] > 1.5).long()).clamp_max(cfg.model.out_channels - 1)
    transform = build_target_transform(cfg, device)
    x_t, y_t = transform(x_s, y_s)
    return x_s, y_s, x_t, y_t, transform


def _plain_step(ctx, x_s, y_s):
    with ctx.autocast():
        logits, _ = ctx.student(x_s)
        loss = ctx.dce(logits, y_s)
    ctx.optimizer.zero_grad(set_to_none=False)
    loss.backward()
    ctx.optimizer.step()


def _reference_step_fn(cfg: Config, ctx):
    """The public code's step on copies of the pair, fp32 eager, with its own (non-fused) Adam."""
    # Fresh modules with the same weights: a copy of a compiled block would call the original's compiled code.
    device = next(ctx.student.parameters()).device
    student = build_model(cfg.model).to(device)
    student.load_state_dict(unwrap_model(ctx.student).state_dict())
    teacher = build_model(cfg.model).to(device)
    teacher.load_state_dict(unwrap_model(ctx.teacher).state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.optim.lr)
    params, teacher_params = list(student.parameters()), list(teacher.parameters())
    dce = ctx.dce

    def step(x_s, y_s, x_t, y_t):
        logits_ss, z_ss = student(x_s)
        logits_st, z_st = student(x_t)
        with torch.no_grad():
            logits_tt, z_tt = teacher(x_t)
            logits_ts, z_ts = teacher(x_s)
        l_ss, l_st = dce(logits_ss, y_s), dce(logits_st, y_t)
        sup = 0.25 * (l_ss + l_st + dce(logits_tt, y_t) + dce(logits_ts, y_s))
        con = bacl_reference(z_ss, z_st, z_ts, z_tt, mask="reference").loss
        loss = 0.8 * sup + 0.2 * con
        optimizer.zero_grad()
        l_ss.backward(retain_graph=True)
        g_src = torch.cat([p.grad.view(-1) for p in params if p.grad is not None])
        optimizer.zero_grad()
        l_st.backward(retain_graph=True)
        g_trg = torch.cat([p.grad.view(-1) for p in params if p.grad is not None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        alpha = 0.9 if F.cosine_similarity(torch.sign(g_src), torch.sign(g_trg), dim=0) > 0 else 0.999
        with torch.no_grad():
            for t, s in zip(teacher_params, params, strict=True):
                t.mul_(alpha).add_(s, alpha=1 - alpha)

    return step


def step_function(mode: str, cfg: Config, ctx, x_s, y_s, x_t, y_t):
    """A no-argument callable running one step of ``mode`` on the given batch (benchmarks call it too)."""
    if mode == "plain":
        return lambda: _plain_step(ctx, x_s, y_s)
    if mode == "gsema":
        # A step that does not log: the teacher runs only to its latent (the loop logs 1 step in train.log_every).
        return lambda: gsema_step(ctx, x_s, y_s, x_t, y_t, teacher_logits=False)
    reference = _reference_step_fn(cfg, ctx)
    return lambda: reference(x_s.float(), y_s, x_t.float(), y_t)


def _time(fn, device: torch.device, *, steps: int, warmup: int) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - started
    for _ in range(max(warmup - 1, 0)):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    times.sort()
    # inclusive: within the measured range (the default extrapolates past it, below zero for two unequal steps)
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    result = {
        "median_ms": round(statistics.median(times) * 1e3, 2),
        "p20_ms": round(quantiles[0] * 1e3, 2),
        "p80_ms": round(quantiles[-1] * 1e3, 2),
        "first_step_s": round(first, 2),
        "steps": steps,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def prepare(cfg: Config):
    """``(resolved cfg, StepContext, (x_s, y_s, x_t, y_t), target transform)`` for timing steps of ``cfg``."""
    cfg = resolve_auto(with_overrides(cfg, "ema.mode=gsema"))
    device = torch.device(cfg.train.device)
    if device.type == "cpu" and cfg.train.retain_cpu_memory:  # as train() does: every mode gains from it
        retain_freed_memory()
    seed_everything(cfg.train.seed, False)
    x_s, y_s, x_t, y_t, transform = _batch(cfg, device)
    ctx = build_context(cfg, device)
    if cfg.train.compile:
        load_compile_cache(compile_cache_file(cfg, device))
        compile_blocks(ctx)
    return cfg, ctx, (x_s, y_s, x_t, y_t), transform


def _loader_ms(cfg: Config, batches: int) -> float:
    """Median host time to draw one training batch from the configured dataset's loader (after a first batch that
    fills the caches); the built-in phantoms are synthesised first if missing."""
    data = build_data(cfg)
    batches_per_epoch = len(data.train)
    if batches_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size}: the training loader yields no batch to time")
    times, epoch = [], 0
    while len(times) < batches:
        data.set_epoch(epoch)
        iterator = iter(data.train)
        if epoch == 0:
            next(iterator)
        for _ in range(min(batches - len(times), batches_per_epoch - (epoch == 0))):
            started = time.perf_counter()
            next(iterator)
            times.append(time.perf_counter() - started)
        epoch += 1
    return round(statistics.median(times) * 1e3, 2)


def bench_step(cfg: Config, modes=MODES, *, steps: int = 5, warmup: int = 2, loader: bool = True) -> dict:
    """Time the given modes' steps on the configured model, patch and device; JSON-ready dict with ratios.

    ``loader``: also time the configured dataset's training loader (``loader_ms``), reported with the target
    transform's time (``data_ms``) next to the step times."""

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"mode: expected some of {MODES}, got {unknown}")
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps={steps}, warmup={warmup}: both must be at least 1")
    cfg, ctx, (x_s, y_s, x_t, y_t), transform = prepare(cfg)
    device = torch.device(cfg.train.device)
    cache = compile_cache_file(cfg, device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": cfg.model.name,
        "feature_size": cfg.model.feature_size,
        "patch_size": cfg.data.patch_size,
        "batch_size": cfg.data.batch_size,
        "amp": cfg.train.amp,
        "compile": cfg.train.compile,
        # warm: compiled code of an earlier run was loaded, so first_step_s shows a warm start
        "compile_cache": "off" if cache is None else "warm" if cache.is_file() else "cold",
        "threads": torch.get_num_threads(),
        "retain_cpu_memory": cfg.train.retain_cpu_memory if device.type == "cpu" else None,
        "modes": {},
    }
    report["target_transform_ms"] = _time(lambda: transform(x_s, y_s), device, steps=steps, warmup=1)["median_ms"]
    if loader:
        report["loader_ms"] = _loader_ms(cfg, max(steps, 3))
        report["data_ms"] = round(report["loader_ms"] + report["target_transform_ms"], 2)
    for mode in modes:
        log.info("bench-step: timing %s (%d warm-up + %d timed steps)", mode, warmup, steps)
        report["modes"][mode] = _time(
            step_function(mode, cfg, ctx, x_s, y_s, x_t, y_t), device, steps=steps, warmup=warmup
        )
    save_compile_cache(cache)
    if "plain" in report["modes"]:
        plain = report["modes"]["plain"]["median_ms"]
        for result in report["modes"].values():
            result["x_plain"] = round(result["median_ms"] / plain, 2)
    if "reference" in report["modes"] and "gsema" in report["modes"]:
        report["gsema_speedup_vs_reference"] = round(
            report["modes"]["reference"]["median_ms"] / report["modes"]["gsema"]["median_ms"], 2
        )
    return report
