"""The run folder: one training process at a time (a lock), a fresh run only in an empty folder (or with
``overwrite``, which removes the previous run's outputs and nothing else), a resumed run's log cut back to its
checkpoint, the temporary files of writes a killed run left removed, and Ctrl-C or SIGTERM that stops after a whole
step."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import threading
from pathlib import Path

from gsema_fast.files import WriteError, atomic_path, remove_temporaries

log = logging.getLogger(__name__)


LOCK_NAME = ".lock"
# What a run writes into its folder; --overwrite removes these (and only these) of the previous run.
RUN_FILES = ("config.yaml", "log.jsonl", "progress.png", "layer_agreement.png", "summary.json")
RUN_FOLDERS = ("tensorboard",)
CHECKPOINT_FILES = ("latest.pt", "best.pt", "final.pt")


class RunFolderLock:
    """One training process per run folder, for the whole run: ``fcntl.flock`` on ``<folder>/.lock``, a file that
    names the holder's process and host.

    The kernel drops the lock when its process ends, however it ends, so the lock file of a killed run is simply
    taken over; a second live process is refused, naming the first. Folders this lock created are removed again
    when the run leaves them empty (a run that failed before writing anything)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []

    def acquire(self) -> RunFolderLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"run folder {self.folder} is a file, not a folder")
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise ValueError(
                        f"run folder {self.folder} is in use by {holder} (lock {self.path}); wait for that run to "
                        f"end or choose another --out"
                    ) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self.fd = fd
                else:  # the holder ended and removed the file while this process opened it: lock the new one
                    os.close(fd)
            stale = os.read(self.fd, 256).decode(errors="replace").strip()
            if stale:
                log.info("run folder %s: taking over the lock of %s, which no longer runs", self.folder, stale)
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as err:  # a read-only or full file system
            self.release()
            raise WriteError(self.folder, err) from err
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: nobody locks a file that is about to vanish
            os.close(self.fd)
            self.fd = None
        for folder in self.created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


def run_outputs(folder: Path) -> list[str]:
    """The outputs of a training run that ``folder`` holds (names; folders end with ``/``): [] for a folder that
    holds no run."""
    names = [n for n in RUN_FILES if (folder / n).is_file()]
    names += [f"{n}/" for n in ("checkpoints", *RUN_FOLDERS) if (folder / n).is_dir()]
    return names if set(names) - {"summary.json"} else []  # a summary.json alone is not a run's


def check_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """A fresh run needs an empty folder, or ``overwrite``; a resumed one its ``checkpoints/latest.pt``."""
    latest = folder / "checkpoints" / "latest.pt"
    if resume:
        if not latest.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {latest}")
        return
    entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME) if folder.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise FileExistsError(
            f"run folder {folder} is not empty ({shown}): pass --resume to continue its run, --overwrite to replace "
            f"it, or choose another --out"
        )


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary files that writes of a killed run left beside its outputs (``.<random>.tmp.<name>``):
    whole outputs replace them, and nothing reads them. Called with the folder's lock held, when no writer is
    alive."""
    removed = remove_temporaries(folder, RUN_FILES) + remove_temporaries(folder / "checkpoints", CHECKPOINT_FILES)
    if removed:
        log.info(
            "removed %d temporary file(s) that an interrupted write left in %s (%s)",
            len(removed),
            folder,
            ", ".join(p.name for p in removed[:3]),
        )
    return removed


def clear_run_folder(folder: Path) -> None:
    """--overwrite: remove the previous run's outputs (other files in the folder stay)."""
    remove_leftovers(folder)
    paths = [folder / name for name in RUN_FILES] + [folder / "checkpoints" / name for name in CHECKPOINT_FILES]
    removed = [p for p in paths if p.is_file()]
    for path in removed:
        path.unlink()
    for name in RUN_FOLDERS:  # the event files of the previous run would otherwise mix with the new run's
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)
            removed.append(folder / name)
    if removed:
        log.info("--overwrite: removed %d file(s) of the previous run in %s", len(removed), folder)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended the run after a whole step; the message says where it stopped and how to go on."""


# Ctrl-C, and SIGTERM (kill, a scheduler's stop, torchrun forwarding either to its ranks): one meaning, stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptFlag:
    """While armed, Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the step in flight instead of raising
    wherever it lands, so the run ends with its files whole; a second signal of the same kind raises at once. In the
    main thread only; a signal ignored when the process started (nohup, &) stays ignored. In a multi-process run the
    loop asks every rank (:func:`gsema_fast.distributed.any_rank`), so that all stop after the same step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            handler = signal.getsignal(sig)
            if handler is signal.SIG_IGN or handler is None:
                continue
            self._previous[sig] = handler
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self._restore(signum)  # the next signal of this kind acts at once

    def _restore(self, sig) -> None:
        previous = self._previous.pop(sig, None)
        if previous is not None:
            signal.signal(sig, previous)

    def disarm(self) -> None:
        for sig in list(self._previous):
            self._restore(sig)


def interrupted(step: int, saved_at: int | None, latest: Path) -> TrainingInterrupted:
    if saved_at is None:
        return TrainingInterrupted(f"interrupted at step {step} before the first checkpoint; start again (--overwrite)")
    return TrainingInterrupted(f"interrupted at step {step}; resume with --resume (from step {saved_at}, {latest})")


def truncate_log(path: Path, step: int) -> None:
    """Drop the records written after the checkpoint a run resumes from (and a last line cut short by a kill):
    the resumed run writes those steps again, once."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept))
        log.info("%s: dropped %d record(s) written after step %d, where the run resumes", path, dropped, step)
