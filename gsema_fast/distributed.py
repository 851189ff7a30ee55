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

import contextlib
import json
import logging
import os
import re
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Set by launch() for its ranks: the folder where each leaves how it ended (report_outcome), for the launcher to end
# the job as one process would, with one line.
OUTCOME_DIR_ENV = "GSEMA_FAST_OUTCOME_DIR"
_control_group = None  # a gloo group for host-side agreement when the default group is NCCL (any_rank)


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
    global _control_group
    _control_group = None
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is True on any rank: one all-reduce of one number on the host (gloo), so that every rank takes
    the same decision at the same step. A single process gets ``flag`` back, at no cost."""
    global _control_group
    if world_size() == 1:
        return flag
    if _control_group is None:
        # the default group itself where it is gloo; NCCL reduces only device tensors, which would need a host sync
        _control_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(value.item())


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank went away (it crashed, was stopped or
    stopped answering): the cause, and its message, are that rank's."""
    if isinstance(err, (dist.DistBackendError, dist.DistNetworkError)):
        return True
    return isinstance(err, RuntimeError) and bool(
        re.search(r"Connection (closed|reset) by peer|gloo/transport|Broken pipe|timed out", str(err), re.IGNORECASE)
    )


def report_outcome(code: int, kind: str, message: str) -> bool:
    """In a rank started by :func:`launch`: leave how it ended (exit ``code``; ``kind`` one of ``error``,
    ``interrupted``, ``crash``, ``peer``; a one-line ``message``) for the launcher, which reports the job's end in one
    line. Returns False (nothing left) in any other process, which then reports for itself."""
    folder = os.environ.get(OUTCOME_DIR_ENV)
    if not folder or "RANK" not in os.environ:
        return False
    record = {"rank": int(os.environ["RANK"]), "code": code, "kind": kind, "message": message, "time": time.time()}
    Path(folder, f"rank{record['rank']}.json").write_text(json.dumps(record))
    return True


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


def launch(nproc: int, argv: Sequence[str], *, verbose: bool = False) -> tuple[int, str | None]:
    """Run ``gsema-fast <argv>`` in ``nproc`` processes on this machine, as ``torchrun --standalone
    --nproc_per_node nproc -m gsema_fast <argv>`` would, and end as one process would: returns the exit code and the
    one line to report (None for success). 2 and the rank's message when a rank met a bad input (the other ranks'
    failure to reach it is its consequence, not reported); 130 and the ranks' ``interrupted at step N ...`` after
    Ctrl-C or SIGTERM (torchrun forwards either to the ranks, which stop together after a whole step); 1 and a line
    naming the rank otherwise (a crash has shown its traceback). ``verbose``: torchrun's own log too."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ValueError(f"--nproc={nproc}: expected at least 1 process")
    # torchrun would give each process one thread; share the cores out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "--module", "gsema_fast", *argv])
    if not verbose:  # its warnings and failure report would bury the one line that says what happened
        for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # torchrun installs its own
    failures: dict[int, int] = {}
    signalled = False
    with tempfile.TemporaryDirectory(prefix="gsema-fast-ranks-") as outcomes:
        os.environ[OUTCOME_DIR_ENV] = outcomes
        try:
            run(args)
        except ChildFailedError as err:
            failures = {rank: failure.exitcode for rank, failure in err.failures.items()}
        except SignalException:
            signalled = True  # the ranks got the signal too, and have ended
        finally:
            del os.environ[OUTCOME_DIR_ENV]
            for sig, handler in handlers.items():
                with contextlib.suppress(TypeError, ValueError):
                    signal.signal(sig, handler)
        reports = {}
        for path in Path(outcomes).glob("rank*.json"):
            with contextlib.suppress(ValueError, KeyError, OSError):
                record = json.loads(path.read_text())
                reports[record["rank"]] = record
    return _job_outcome(reports, failures, signalled)


def _exit_text(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _job_outcome(reports: dict[int, dict], failures: dict[int, int], signalled: bool) -> tuple[int, str | None]:
    """The job's exit code and its one line, from what its ranks reported and how they exited."""

    def first(kind: str) -> dict | None:
        found = sorted((r for r in reports.values() if r["kind"] == kind), key=lambda r: (r["time"], r["rank"]))
        return found[0] if found else None

    # A rank stopped by torchrun because another failed reports an interruption: the failure is the job's cause.
    if signalled:
        stopped = sorted((r for r in reports.values() if r["kind"] == "interrupted"), key=lambda r: r["rank"])
        return 130, stopped[0]["message"] if stopped else "interrupted"
    error = first("error")
    if error is not None:
        return error["code"], error["message"]
    crash = first("crash")
    if crash is not None:
        return 1, f"rank {crash['rank']} failed: {crash['message']} (its traceback is above)"
    silent = sorted(rank for rank in failures if rank not in reports)
    if silent:
        return 1, f"rank {silent[0]} {_exit_text(failures[silent[0]])}; the job stopped"
    stopped = sorted((r for r in reports.values() if r["kind"] == "interrupted"), key=lambda r: r["rank"])
    if stopped:  # SIGTERM sent to the ranks themselves: they stopped together
        return 130, stopped[0]["message"]
    peer = first("peer")
    if peer is not None:
        return 1, f"rank {peer['rank']}: {peer['message']}"
    if failures:
        return 1, f"ranks {sorted(failures)} failed"
    return 0, None
