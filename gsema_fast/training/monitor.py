"""What a run reports while it trains: interval means of the step's device scalars (one host read per record) to
``log.jsonl`` and the configured sinks (TensorBoard), and the printed results table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from gsema_fast import distributed
from gsema_fast.config import Config


class IntervalLog:
    """Sums the step's device scalars (and vectors) between log records; the host reads them once per interval.
    Records go to ``path`` (JSON lines, None: nowhere) and to each of ``loggers`` (``write(record)``,
    ``figure(name, png, step)``, ``close()``). ``names``: a vector metric's entries by name (it is written as
    ``{name: value}``, e.g. ``layer_cos`` by layer)."""

    def __init__(self, path: Path | None, loggers: list = (), names: dict[str, list[str]] | None = None) -> None:
        self.path = path
        self.loggers = list(loggers)
        self.names = dict(names or {})
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}  # some terms (the teacher's) are computed on some steps only
        self.steps = 0
        self.started = time.perf_counter()
        self.nonfinite_run = 0
        self.data_wait = 0.0  # host seconds spent waiting for the loader in this interval

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.float()
            if k in self.sums:
                self.sums[k] += v
            else:
                self.sums[k] = v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def flush(self, **fields) -> dict:
        """Write one record (every rank calls this: the interval's means are averaged across ranks)."""
        keys = sorted(self.sums)
        values: dict = {}
        if keys:
            means = [(self.sums[k] / self.counts[k]).reshape(-1) for k in keys]
            flat = distributed.all_reduce_mean(torch.cat(means)).tolist()  # the interval's only host read
            for k, mean in zip(keys, means, strict=True):
                part, flat = flat[: mean.numel()], flat[mean.numel() :]
                values[k] = dict(zip(self.names[k], part, strict=True)) if k in self.names else part[0]
        skipped = round(values.get("skipped", 0.0) * self.steps)
        self.nonfinite_run = self.nonfinite_run + skipped if skipped == self.steps else skipped
        elapsed = time.perf_counter() - self.started
        record = {
            **fields,
            **values,
            "step_time_s": elapsed / self.steps,
            "data_wait_s": self.data_wait / self.steps,  # of step_time_s: data must not be what limits a step
            "skipped_steps": skipped,
        }
        if torch.cuda.is_available():
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.write(record)
        self.sums, self.counts, self.steps, self.started, self.data_wait = {}, {}, 0, time.perf_counter(), 0.0
        return record

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        for logger in self.loggers:
            logger.write(record)

    def figure(self, name: str, png: Path, step: int) -> None:
        for logger in self.loggers:
            logger.figure(name, png, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(cfg: Config, run_dir: Path, *, resume_step: int | None = None) -> list:
    """The record sinks besides log.jsonl that ``train.loggers`` asks for. ``resume_step``: a resumed run, whose
    earlier records past that step are dropped, as log.jsonl's are."""
    loggers = []
    if "tensorboard" in cfg.train.loggers:
        from gsema_fast.integrations.tensorboard import TensorBoardLogger

        loggers.append(TensorBoardLogger(run_dir / "tensorboard", resume_step=resume_step))
    return loggers


def format_table(title: str, rows: dict[str, dict[str, float]]) -> str:
    classes = sorted({c for r in rows.values() for c in r})
    width = max(len(name) for name in rows) + 2
    lines = [title, " " * width + "".join(f"{c:>12s}" for c in classes)]
    for name, r in rows.items():
        lines.append(f"{name:{width}s}" + "".join(f"{r.get(c, float('nan')):12.3f}" for c in classes))
    return "\n".join(lines)
