"""Several processes, one model: ``torch.distributed`` as ``torchrun`` sets it up (NCCL on GPUs, gloo on CPUs).

``torchrun --nproc_per_node N -m gsema_fast train ...`` starts N copies of the trainer with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` and a rendezvous in the environment; :func:`setup` joins the process group and picks
the rank's device. Without those variables (or with a world of one) everything here is a no-op and the trainer runs
as a single process.

Data parallelism is done by hand rather than with ``DistributedDataParallel``: the GS-EMA step keeps its gradients
in flat buffers that it owns (see :mod:`gsema_fast.step`) and averages them across ranks with one all-reduce per
buffer group, before the gradient statistics, so that the aligned/conflict decision is the one a single process
would make with the global batch, and every rank updates its teacher with the same bits.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process group was created by setup(), so teardown() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True when the environment describes a process group of more than one rank (as torchrun sets it)."""
    return all(k in os.environ for k in ENV_KEYS) and int(os.environ["WORLD_SIZE"]) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and logs."""
    return rank() == 0


def setup(device: str | torch.device, *, timeout_s: float = 600.0) -> Context:
    """Join the process group described by the environment (if any) and return this rank's :class:`Context`.

    ``device``: ``"cuda"`` or ``"cpu"`` (``train.device`` resolved). On CUDA each rank takes ``cuda:LOCAL_RANK``
    and the NCCL backend; on the CPU, gloo. ``timeout_s`` bounds every collective, so a rank that stops answering
    ends the job with an error instead of a hang. A process group that already exists is used as it is.
    """
    device = torch.device(device)
    if dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            device = torch.device("cuda", local)
        return Context(dist.get_rank(), dist.get_world_size(), local, device, owns_group=False)
    if not launched():
        return Context(device=device)
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local}, but this machine has {torch.cuda.device_count()} CUDA device(s): start at most "
                f"that many processes per node (--nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    ctx = Context(dist.get_rank(), dist.get_world_size(), local, device, owns_group=True)
    log.info("process group: %d ranks (%s), timeout %.0f s", ctx.world_size, backend, timeout_s)
    return ctx


def teardown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank the parameters and buffers of rank ``src`` (identical starting points)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; for metrics and small states, not tensors)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a float tensor (a copy; the input is left alone)."""
    if world_size() == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out.div_(world_size())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``gsema-fast <argv>`` in ``nproc`` processes on this machine, as ``torchrun --standalone
    --nproc_per_node nproc -m gsema_fast <argv>`` would; returns the job's exit status (non-zero, with the failing
    rank's error shown, when any rank fails: torchrun then stops the others)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ValueError(f"--nproc={nproc}: expected at least 1 process")
    # torchrun would give each process one thread; share the cores out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "--module", "gsema_fast", *argv])
    try:
        run(args)
    except ChildFailedError as err:
        sys.stderr.write(f"{err}\n")
        return 1
    return 0
