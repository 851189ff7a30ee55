"""torch.compile of the networks' repeated blocks, and the on-disk cache of what was compiled, kept between runs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch._dynamo.config as dynamo_config
import torch._functorch.config as functorch_config

from gsema_fast.config import Config, config_to_dict, resolve_auto
from gsema_fast.files import atomic_path, cache_root
from gsema_fast.models import repeated_blocks
from gsema_fast.step import StepContext

log = logging.getLogger(__name__)


def compile_blocks(ctx: StepContext) -> int:
    """Compile each repeated block of student and teacher with static shapes; equal blocks share compiled code, so
    the first step compiles each distinct block once rather than the whole network."""
    blocks = [block for net in (ctx.student, ctx.teacher) for _, block in repeated_blocks(net)]
    # Every compiled block is one code object to dynamo (Module._call_impl), so each distinct (block, shape, grad
    # mode) is one more entry of one cache: past the default limit of 8 the rest would silently run eager.
    # Room for each block at the student's, the teacher's and the sliding window's batch, with and without grad.
    # The step walks the encoder's backward twice (its DCE pass keeps the graph for BACL's pass); compiled backward
    # graphs that donate their saved buffers allow only one walk.
    functorch_config.donated_buffer = False
    needed = 6 * len(blocks)
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, needed)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 2 * needed)
    for block in blocks:
        block.compile(dynamic=False)
    return len(blocks)


def compile_cache_file(cfg: Config, device: torch.device) -> Path | None:
    """Where the compiled code of this run's blocks is kept between runs (None: compilation or its cache is off).

    The file is named after what decides the compiled graphs: torch version, device, model, patch and batch sizes,
    AMP and the sliding window's batch. Inductor's own caches key every graph too, so a stale file only misses."""
    cfg = resolve_auto(cfg, device.type)  # "auto" settings name the same file as their resolved values
    t = cfg.train
    if not t.compile or not t.compile_cache:
        return None
    folder = t.compile_cache_dir
    if folder is None:
        folder = cache_root() / "compiled"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = [
        torch.__version__,
        device_name,
        config_to_dict(cfg)["model"],
        cfg.data.patch_size,
        cfg.data.batch_size,
        t.amp,
        cfg.eval.sw_batch_size,
    ]
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(folder).expanduser() / f"{cfg.model.name}-{digest}.bin"


def load_compile_cache(path: Path | None) -> bool:
    """Load compiled code saved by an earlier run; False when there is none (or it cannot be read).

    Inductor's own on-disk cache (generated code, compiled CPU modules, Triton binaries) moves next to the file
    unless ``TORCHINDUCTOR_CACHE_DIR`` is set: its default lives in /tmp, which does not outlast a reboot, and the
    saved artifacts alone still leave the CPU's C++ modules to be rebuilt."""
    if path is None:
        return False
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path.parent / "inductor"))
    if not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as err:  # a file from another torch build: compile afresh and overwrite it
        log.warning("compile cache %s could not be loaded (%s); compiling from scratch", path, err)
        return False
    return True


def save_compile_cache(path: Path | None) -> None:
    """Save everything compiled in this process so far (blocks of every shape and grad mode met)."""
    if path is None:
        return
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(artifacts[0])
