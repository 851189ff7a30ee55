"""TensorBoard for ``gsema-fast train`` (``train.loggers: [jsonl, tensorboard]``, extra ``gsema-fast[tensorboard]``).

Every record the trainer logs becomes scalars named after its kind, at the record's step: ``train/total``,
``train/dce_student_src``, ``train/aligned``, ``train/grad_cos``, ``train/lr``, ``train/step_time_s``,
``train/peak_memory_gib`` (CUDA), ..., and ``val/dice/<class>``; each time ``progress.png`` is drawn it is added as
the image ``progress``. The files go to ``<run folder>/tensorboard``; a resumed run appends a new event file there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from gsema_fast.integrations import MissingExtraError

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError as err:
    raise MissingExtraError("tensorboard", "train.loggers: tensorboard") from err

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

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        # purge_step: a resumed run; TensorBoard hides the events a killed run wrote past its checkpoint
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
