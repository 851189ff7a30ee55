"""Multi-process training on the CPU (torchrun, gloo): the GS-EMA step across ranks equals one process with the
global batch, ranks stay bitwise identical, data and evaluation are sharded, and a failing rank ends the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import tiny_run

from gsema_fast.data.sampling import DomainBalancedSampler

TESTS = Path(__file__).parent
MODES = ["gsema", "gsema-conflict", "gsema-nobacl", "ema"]


def torchrun(nproc: int, *args: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=TESTS, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' results of 2 steps x batch 1 per rank, for every mode, and one process's with batch 2."""
    from dist_worker import run

    out = tmp_path_factory.mktemp("two_ranks")
    job = torchrun(2, "dist_worker.py", "--out", str(out), "--modes", *MODES, timeout=600)
    assert job.returncode == 0, job.stdout + job.stderr
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = run(MODES, steps=2, global_batch=2, world_size=1, rank=0, fail_rank=None)
    return ranks, single


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_make_the_steps_of_one_process_with_the_global_batch(two_ranks, mode):
    ranks, single = two_ranks
    for step, want in enumerate(single[mode]["metrics"]):
        got = [r[mode]["metrics"][step] for r in ranks]
        # each rank's losses are over its half of the batch: their mean is the global batch's loss
        for key in ("dce_student_src", "dce_student_trg", "bacl", "total"):
            if key in want:
                assert np.mean([g[key] for g in got]) == pytest.approx(want[key], rel=1e-5), (key, step)
        for key in ("aligned", "grad_cos", "skipped"):  # decided on averaged gradients: one value for all ranks
            if key in want:
                assert [g[key] for g in got] == pytest.approx([want[key]] * 2, rel=1e-4, abs=1e-6), (key, step)
    if mode == "gsema-conflict":
        assert [m["aligned"] for m in single[mode]["metrics"]] == [0.0, 0.0]
    elif mode.startswith("gsema"):
        assert [m["aligned"] for m in single[mode]["metrics"]] == [1.0, 1.0]
    for name, want in single[mode]["teacher"].items():
        torch.testing.assert_close(ranks[0][mode]["teacher"][name], want, rtol=1e-4, atol=1e-6)
    for name, want in single[mode]["student"].items():
        torch.testing.assert_close(ranks[0][mode]["student"][name], want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_teacher_and_student_are_bitwise_identical_across_ranks(two_ranks, mode):
    (rank0, rank1), _ = two_ranks
    for net in ("teacher", "student"):
        for name, value in rank0[mode][net].items():
            assert torch.equal(rank1[mode][net][name], value), (net, name)


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_promptly_with_its_error(tmp_path):
    started = time.monotonic()
    # rank 0 waits in the second step's all-reduce for a rank that has died; the collective timeout is 10 minutes
    job = torchrun(
        2,
        "dist_worker.py",
        "--out",
        str(tmp_path),
        "--modes",
        "gsema",
        "--fail-rank",
        "1",
        "--timeout",
        "600",
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert job.returncode != 0
    assert "rank 1 fails on purpose after step 0" in job.stdout + job.stderr
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"
    assert not list(tmp_path.glob("rank*.pt"))


@pytest.mark.parametrize("world, per_rank", [(2, 1), (3, 2), (2, 3)])
def test_sampler_ranks_split_the_global_batches_of_one_process(world, per_rank):
    domains = [0] * 5 + [1] * 4 + [2] * 6
    steps = 7
    single = list(DomainBalancedSampler(domains, steps * per_rank * world, seed=3, batch_size=per_rank * world))
    shares = [
        list(DomainBalancedSampler(domains, steps * per_rank, seed=3, batch_size=per_rank, num_replicas=world, rank=r))
        for r in range(world)
    ]
    for step in range(steps):
        global_batch = single[step * per_rank * world : (step + 1) * per_rank * world]
        parts = [share[step * per_rank : (step + 1) * per_rank] for share in shares]
        assert [i for part in parts for i in part] == global_batch
        assert len(set(global_batch)) == len(global_batch), f"a case repeats within step {step}"


def test_sampler_balances_domains_and_rejects_a_bad_rank():
    domains = [0] * 2 + [1] * 3 + [2] * 2
    order = list(DomainBalancedSampler(domains, 12, seed=0, batch_size=6))
    for start in range(0, 12, 6):
        batch = order[start : start + 6]
        assert sorted(domains[i] for i in batch) == [0, 0, 1, 1, 2, 2]
        assert len(set(batch)) == 6  # domains 0 and 2 have exactly two cases: both, never one twice
    with pytest.raises(ValueError, match="rank=2"):
        DomainBalancedSampler(domains, 4, num_replicas=2, rank=2)


@pytest.fixture(scope="module")
def three_case_phantoms(tmp_path_factory):
    """Three cases per centre, where the session's phantoms have two: evaluation splits an odd number of cases over
    two ranks, which a sampler that pads the ranks' shares to equal length would score twice."""
    from gsema_fast.data import synthesize

    return synthesize(tmp_path_factory.mktemp("phantoms"), domains=3, cases_per_domain=3, size=32, seed=0, workers=1)


def test_loaders_give_each_rank_its_share_of_the_evaluation_cases(three_case_phantoms, tmp_path):
    from gsema_fast.config import DataConfig
    from gsema_fast.data import build_loaders

    data = DataConfig(test_domain=2, patch_size=16, batch_size=1, val_per_domain=1, cache_dir=tmp_path / "cache")
    common = dict(steps_per_epoch=2)
    shares = [build_loaders(three_case_phantoms, data, rank=r, world_size=2, **common) for r in range(2)]
    one = build_loaders(three_case_phantoms, data, **common)
    for kind in ("val", "test"):
        names = [[item["case"][0] for item in getattr(s, kind) or []] for s in shares]
        assert not set(names[0]) & set(names[1])
        assert sorted(names[0] + names[1]) == sorted(item["case"][0] for item in getattr(one, kind))
    with pytest.raises(ValueError, match="rank=2"):
        build_loaders(three_case_phantoms, data, rank=2, world_size=2, **common)


@pytest.mark.slow
def test_train_in_two_processes(three_case_phantoms, tmp_path):
    """``gsema-fast train --nproc 2``: rank 0 alone writes the run folder; evaluation gathers every rank's cases."""
    out = tmp_path / "run"
    overrides = [*tiny_run(three_case_phantoms, batch_size=1), "train.device=cpu"]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "gsema_fast", "train", "--nproc", "2", "--out", str(out)]
    cmd += [a for kv in overrides for a in ("--set", kv)]
    job = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert job.returncode == 0, job.stdout + job.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # one writer
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["test"]["cases"]) == 3  # the unseen centre's 3 cases, split over 2 ranks and gathered
    final = torch.load(out / "checkpoints" / "final.pt", weights_only=False)
    assert len(final["ranks"]) == 2 and final["step"] == 4
    assert list((tmp_path / "cache" / "gsema-fast" / "preprocessed").glob("*.pt"))  # shared on disk, not in memory
    assert "INFO [rank 0]" in job.stderr and "INFO [rank 1]" not in job.stderr  # rank 0 alone reports progress


def _report(rank: int, kind: str, message: str, at: float, code: int | None = None) -> dict:
    codes = {"error": 2, "interrupted": 130, "crash": 1, "peer": 1}
    return {"rank": rank, "kind": kind, "message": message, "time": at, "code": codes[kind] if code is None else code}


BAD = "case c0_00: label holds values [7] outside the label map [0, 1, 2]"
STOPPED = "interrupted at step 5; resume with --resume (from step 4, run/checkpoints/latest.pt)"


@pytest.mark.parametrize(
    "reports, failures, signalled, expected",
    [
        # a bad case on rank 1; rank 0 lost it in a collective, or was stopped by torchrun: the bad case is the cause
        ([_report(1, "error", BAD, 2.0), _report(0, "peer", "lost contact", 3.0)], {0: 1, 1: 2}, False, (2, BAD)),
        ([_report(1, "error", BAD, 2.0), _report(0, "interrupted", STOPPED, 3.0)], {0: 130, 1: 2}, False, (2, BAD)),
        # the same bad input on both ranks: said once, the first
        ([_report(0, "error", BAD, 2.0), _report(1, "error", "other", 1.0)], {0: 2, 1: 2}, False, (2, "other")),
        # Ctrl-C or SIGTERM to the launcher, forwarded to the ranks
        ([_report(1, "interrupted", STOPPED, 2.0), _report(0, "interrupted", STOPPED, 2.0)], {}, True, (130, STOPPED)),
        ([], {}, True, (130, "interrupted")),
        # SIGTERM to the ranks themselves: they stopped together
        ([_report(0, "interrupted", STOPPED, 2.0), _report(1, "interrupted", STOPPED, 2.0)], {0: 130, 1: 130}, False,
         (130, STOPPED)),
        # a rank killed without a word (out of memory): it is named, not the others' consequences
        ([_report(0, "interrupted", STOPPED, 3.0)], {0: 130, 1: -9}, False, (1, "rank 1 was killed by SIGKILL; the job "
                                                                             "stopped")),
        ([_report(0, "peer", "lost contact", 3.0)], {0: 1, 1: 137}, False, (1, "rank 1 exited with code 137; the job "
                                                                          "stopped")),
        ([_report(1, "crash", "RuntimeError: boom", 1.0)], {1: 1}, False, (1, "rank 1 failed: RuntimeError: boom (its "
                                                                            "traceback is above)")),
        ([], {}, False, (0, None)),
    ],
)  # fmt: skip
def test_a_job_of_several_ranks_ends_as_one_process_would(reports, failures, signalled, expected):
    from gsema_fast.distributed import _job_outcome

    assert _job_outcome({r["rank"]: r for r in reports}, failures, signalled) == expected


@pytest.mark.parametrize(
    "err, lost",
    [
        (RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:64214"), True),
        (RuntimeError("Timed out waiting 600000ms for recv operation to complete"), True),
        (torch.distributed.DistBackendError("NCCL communicator was aborted"), True),
        (RuntimeError("CUDA out of memory"), False),
        (ValueError("Connection closed by peer"), False),  # not a collective's error
    ],
)
def test_a_collective_that_lost_its_peer_is_told_from_other_errors(err, lost):
    from gsema_fast.distributed import lost_peer

    assert lost_peer(err) is lost
