"""A multi-process job for ``tests/test_distributed.py``, started with ``torchrun``: a few teacher-student steps on
fixed global batches, each rank on its share, then each rank saves what it computed to ``--out/rank<r>.pt``.

``--fail-rank R``: rank R raises after its first step while the others wait in the next step's all-reduce.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tiny import make_ctx, tiny_batch

from gsema_fast import distributed
from gsema_fast.step import train_step


def global_batches(steps: int, batch: int, *, conflicting: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """``conflicting``: target labels swapped (background <-> aneurysm), so that the two gradients disagree."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(1234)
    batches = [tiny_batch(batch=batch) for _ in range(steps)]
    torch.set_rng_state(generator_state)
    if conflicting:
        batches = [(x_s, y_s, x_t, 2 - y_t) for x_s, y_s, x_t, y_t in batches]
    return batches


def run(modes: list[str], steps: int, global_batch: int, world_size: int, rank: int, fail_rank: int | None) -> dict:
    """Every mode's per-step metrics and final weights; in one process when ``world_size`` is 1."""
    share = global_batch // world_size
    results = {}
    for mode in modes:
        name, _, variant = mode.partition("-")
        ctx = make_ctx(name, bacl=variant != "nobacl", world_size=world_size)
        metrics = []
        batches = global_batches(steps, global_batch, conflicting=variant == "conflict")
        for step, batch in enumerate(batches):
            mine = [t[rank * share : (rank + 1) * share] for t in batch]
            out = train_step(ctx, *mine)
            metrics.append({k: v.item() for k, v in out.items()})
            if rank == fail_rank and step == 0:
                raise RuntimeError(f"rank {rank} fails on purpose after step {step}")
        results[mode] = {
            "metrics": metrics,
            "student": {k: v.clone() for k, v in ctx.student.state_dict().items()},
            "teacher": {k: v.clone() for k, v in ctx.teacher.state_dict().items()},
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", nargs="+", default=["gsema", "gsema-conflict", "gsema-nobacl", "ema"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    ctx = distributed.setup("cpu", timeout_s=args.timeout)
    try:
        results = run(args.modes, args.steps, args.global_batch, ctx.world_size, ctx.rank, args.fail_rank)
        torch.save(results, Path(args.out) / f"rank{ctx.rank}.pt")
    finally:
        distributed.teardown(ctx)


if __name__ == "__main__":
    main()
