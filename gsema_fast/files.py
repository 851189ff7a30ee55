"""Files written whole or not at all: every output of the package (checkpoints, configs, logs' tables, NIfTI
volumes, figures, cache entries) goes to a temporary file beside its target and is renamed over it, so an
interrupted run never leaves half a file where a reader expects a whole one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
