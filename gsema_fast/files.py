"""Files written whole or not at all, and checkpoints read without running code.

Every output of the package (checkpoints, configs, logs' tables, NIfTI volumes, figures, cache entries) goes to a
temporary file beside its target and is renamed over it, so an interrupted run never leaves half a file where a
reader expects a whole one. A write that fails (read-only folder, full disk) says which output and why, in one line.

Checkpoints are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, so a
crafted file cannot run code when it is loaded (:func:`read_checkpoint`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import numbers
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _default_mode()  # read once: os.umask can only be read by setting it


class WriteError(OSError):
    """An output could not be written; the message names it and the cause (``errno`` is the system's)."""

    def __init__(self, path: str | os.PathLike, err: OSError) -> None:
        super().__init__(f"cannot write {path}: {err.strerror or err}")
        self.errno = err.errno
        self.filename = str(path)

    def __str__(self) -> str:
        return self.args[0]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a fresh, empty temporary file beside ``path`` for the caller to write; when the block ends without an
    error it is renamed over ``path`` (with the permissions a plainly created file would get), otherwise removed.

    The temporary name is unique (ranks on machines sharing a folder may have equal process ids) and ends with
    ``path``'s own name, so writers that pick a format from the ending (nibabel, matplotlib) pick the right one.
    ``fsync``: flush the file to the disk before the rename. An ``OSError`` of the folder or of the temporary file
    (read-only folder, disk full) becomes a :class:`WriteError` naming ``path``; ``path`` itself is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=f".tmp.{path.name}")
    except OSError as err:
        raise WriteError(path, err) from err
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            yield tmp
            if fsync:
                with tmp.open("rb+") as handle:
                    os.fsync(handle.fileno())
            os.chmod(tmp, _MODE)
            os.replace(tmp, path)
        except WriteError:
            raise
        except OSError as err:
            if err.filename not in (None, str(tmp), str(path)):  # an input the block read, not this output
                raise
            raise WriteError(path, err) from err
    finally:
        tmp.unlink(missing_ok=True)


# The name atomic_path gives its temporary file: "." + mkstemp's random letters, digits and "_" + ".tmp." + the
# target's own name. A temporary of this form that outlives its writer was left by a killed process.
_TEMPORARY = re.compile(r"\.[a-z0-9_]+\.tmp\.(?P<target>.+)")


def temporary_target(name: str) -> str | None:
    """The name of the output that ``name``, a leftover temporary file of :func:`atomic_path`, was to become; None
    when ``name`` is not such a temporary."""
    found = _TEMPORARY.fullmatch(name)
    return found.group("target") if found else None


def remove_temporaries(folder: str | os.PathLike, targets: Sequence[str]) -> list[Path]:
    """Remove the temporary files that writes of ``targets`` (names in ``folder``) left when their process was
    killed; returns what was removed. Only for a folder this process owns (a locked run folder): a live writer's
    temporary file would be removed too."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = [p for p in sorted(folder.iterdir()) if p.is_file() and temporary_target(p.name) in targets]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` when it is a file; otherwise ``FileNotFoundError`` naming ``what`` and whether the path is missing
    or a folder."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def cache_root() -> Path:
    """The per-user folder under which gsema-fast keeps what it can rebuild (synthesised datasets, preprocessed
    volumes, compiled models): ``$XDG_CACHE_HOME/gsema-fast``, or ``~/.cache/gsema-fast`` where that is unset or
    empty. Read from the environment on every call; the folder is not created."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gsema-fast"


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if missing and make sure a file can be written in it, before work whose results would
    otherwise be lost at the first write; a ``WriteError`` names the folder and the cause."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(folder, OSError(errno.ENOTDIR, "it is a file, not a folder"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise WriteError(folder, err) from err
    return folder


def require_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Check, before the work whose result it will hold, that a file can be written at ``path``: not a folder, in a
    folder where files can be written (created if missing). A ``WriteError`` or ``IsADirectoryError`` names it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; expected a file")
    check_writable(path.parent)
    return path


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON can hold it: NaN and infinities become null, numpy and torch scalars plain numbers,
    paths and other objects strings."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):  # numpy or torch scalar
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return str(value)


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``jsonable(data)`` to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(jsonable(data), indent=1) + "\n")
    return path


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str]) -> None:
    """Rows as CSV with the given columns (NaN as an empty cell), atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def _allowed_globals() -> list:
    """What a checkpoint may name besides torch's own types: numpy's uint32 arrays, which checkpoints written before
    the random states were stored as plain lists hold (numpy's generator key). Nothing that can run code."""
    import numpy as np

    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.core or numpy._core, by version
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: str | os.PathLike, *, lazy: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU; a file that names anything else (a pickle that would
    call a function on loading) is refused before it runs. ``lazy``: map the tensors from the file instead of
    reading them (for a look at a checkpoint's config and records: only the parts used are read).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (one line, naming the file) for a refused or
    unreadable one.
    """
    import pickle
    import warnings
    import zipfile

    import torch  # here, not at the top: the config module imports this one and must stay light for the CLI

    path = require_file(path, "checkpoint")
    try:
        with torch.serialization.safe_globals(_allowed_globals()), warnings.catch_warnings():
            # a foreign pickle draws a warning about its protocol before the refusal, which says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=lazy and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", text)
        if found is None:  # not a pickle torch knows (or an instruction it does not allow): unreadable
            detail = first_line(text.split("WeightsUnpickler error:", 1)[-1])
            with path.open("rb") as handle:
                pickled = handle.read(1) == b"\x80"  # the PROTO opcode every pickle of protocol 2 or later starts with
            if pickled and not zipfile.is_zipfile(path):
                # torch.save writes a zip archive (or, in its legacy format, pickles torch loads too)
                detail = "it is a plain pickle, not a file written by torch.save"
            raise ValueError(f"checkpoint {path}: cannot be read as a torch checkpoint ({detail})") from None
        raise ValueError(
            f"checkpoint {path}: refused: it names '{found.group(1) or found.group(2)}', which is not a tensor, "
            f"number, string or container (checkpoints are loaded without running code; was it written by gsema-fast "
            f"train?)"
        ) from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path}: cannot be read as a torch checkpoint ({first_line(err)})") from None


def first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (libraries append tracebacks and advice below it)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
