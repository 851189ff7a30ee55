"""Files written whole or not at all: every output of the package (checkpoints, configs, logs' tables, NIfTI
volumes, figures, cache entries) goes to a temporary file beside its target and is renamed over it, so an
interrupted run never leaves half a file where a reader expects a whole one."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _default_mode()  # read once: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a fresh, empty temporary file beside ``path`` for the caller to write; when the block ends without an
    error it is renamed over ``path`` (with the permissions a plainly created file would get), otherwise removed.

    The temporary name is unique (ranks on machines sharing a folder may have equal process ids) and ends with
    ``path``'s own name, so writers that pick a format from the ending (nibabel, matplotlib) pick the right one.
    ``fsync``: flush the file to the disk before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=f".tmp.{path.name}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, _MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def jsonable(value: Any) -> Any:
    """``value`` with NaN and infinities as None (strict JSON has neither), numpy scalars as Python numbers and
    paths as strings, in nested dicts, lists and tuples."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(data: Any, path: str | os.PathLike) -> None:
    """``data`` as strict JSON (see :func:`jsonable`), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(data), indent=1) + "\n")


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str]) -> None:
    """Rows as CSV with the given columns (NaN as an empty cell), atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
