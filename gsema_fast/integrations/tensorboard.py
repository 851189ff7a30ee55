"""TensorBoard for ``gsema-fast train`` (``train.loggers: [jsonl, tensorboard]``, extra ``gsema-fast[tensorboard]``).

Every record the trainer logs becomes scalars named after its kind, at the record's step: ``train/total``,
``train/dce_student_src``, ``train/aligned``, ``train/grad_cos``, ``train/lr``, ``train/step_time_s``,
``train/peak_memory_gib`` (CUDA), ..., ``val/dice/<class>``, and at the end the unseen centre's ``test/dice/<class>``
(the chosen teacher) and ``test/untrained_dice/<class>``; each time ``progress.png`` is drawn it is added as the image
``progress``. The files go to ``<run folder>/tensorboard``; a resumed run appends a new event file there, and
TensorBoard shows each step once: what the interrupted run wrote after its checkpoint's step is hidden, what it wrote
at that step and before is kept (the records ``log.jsonl`` keeps).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from gsema_fast.integrations import optional_imports

with optional_imports("tensorboard", "train.loggers: tensorboard"):
    from torch.utils.tensorboard import SummaryWriter

# Record fields that are coordinates, not measurements.
_NOT_SCALARS = ("kind", "step", "epoch")


def scalars(record: Mapping, prefix: str) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` for every number in ``record``, nested mappings joined with ``/``."""
    for key, value in record.items():
        if key in _NOT_SCALARS:
            continue
        tag = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            yield from scalars(value, tag)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield tag, float(value)


class TensorBoardLogger:
    """A sink for the trainer's log records (``write``) and progress figures (``figure``)."""

    def __init__(self, log_dir: str | Path, *, resume_step: int | None = None) -> None:
        """``resume_step``: a resumed run, from a checkpoint written at that step. Its records up to that step stand;
        TensorBoard hides those the interrupted run wrote after it (``purge_step`` is the first step hidden)."""
        self.log_dir = Path(log_dir)
        purge_step = None if resume_step is None else int(resume_step) + 1
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def write(self, record: Mapping) -> None:
        step = int(record["step"])
        for tag, value in scalars(record, str(record.get("kind", "train"))):
            self.writer.add_scalar(tag, value, step)
        # a record per log interval: flushing each keeps the event file whole if the run dies
        self.writer.flush()

    def figure(self, name: str, png: str | Path, step: int) -> None:
        """Add a PNG written by the trainer (RGB, alpha dropped) as an image."""
        import matplotlib.image

        pixels = matplotlib.image.imread(str(png))[..., :3]
        self.writer.add_image(name, pixels, int(step), dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
