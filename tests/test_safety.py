"""Nothing lost, nothing run: untrusted checkpoints, run folders, datasets, faults and clean failures.

Every case runs the ``gsema-fast`` command (in this process, or in a subprocess where the exit of the process or a
signal is what is tested) and checks three things: the exit code, the one-line message, and that nothing was lost
or half-written (files compared byte for byte, no temporary file left, checkpoints loadable).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.dummy import DummyProcess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from tiny import tiny_run

from gsema_fast.cli import main as cli_main
from gsema_fast.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LABELS = {"background": 0, "vessel": 1, "aneurysm": 2}
DEMO_LR = load_config("demo").optim.lr  # what a run gets without --set optim.lr


# ------------------------------------------------------------------------------------------------ helpers


def train_args(phantoms: Path, out: Path, *sets: str) -> list[str]:
    pairs = [*tiny_run(phantoms), "train.deterministic=true", *sets]
    return ["train", *[a for kv in pairs for a in ("--set", kv)], "--out", str(out)]


def run_cli(caplog, *args) -> tuple[int, list[str]]:
    """The command in this process: its exit code and its ERROR messages."""
    caplog.clear()
    try:
        rc = cli_main([str(a) for a in args])
    except KeyboardInterrupt:  # would end the test session
        pytest.fail("KeyboardInterrupt escaped the command")
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def run_subprocess(*args, prefix=(), timeout=300) -> tuple[int, list[str], str]:
    """The command in a fresh interpreter: its exit code, its ERROR messages and all of stderr."""
    job = subprocess.run(
        [*prefix, sys.executable, "-m", "gsema_fast", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )
    return job.returncode, error_lines(job.stderr), job.stderr


def error_lines(stderr: str) -> list[str]:
    return re.findall(r"ERROR \S+: (.*)", stderr)


def one_line(errors: list[str], pattern: str) -> str:
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and re.search(pattern, errors[0]), errors[0]
    return errors[0]


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of a write that did not finish."""
    return [p for p in folder.rglob("*") if ".tmp." in p.name]


def log_steps(run: Path, kind: str = "train") -> list[int]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == kind]


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


class RunsCode:
    """Pickles as a call of os.system: what a crafted checkpoint would do when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(source: Path, target: Path, marker: Path) -> Path:
    state = torch.load(source, map_location="cpu", weights_only=False)  # our own file, trusted
    state["note"] = RunsCode(marker)
    torch.save(state, target)
    return target


def can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


def read_only(folder: Path, request) -> list[str]:
    """Make ``folder`` read-only for a subprocess: a command prefix (a read-only bind mount in a private mount
    namespace where permissions do not bind root), or no prefix and the folder's write permission removed."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        request.addfinalizer(lambda: folder.chmod(0o755))
        return []
    if not can_unshare():
        pytest.skip("running as root without user namespaces: a read-only folder cannot be made")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(folder)]


def nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.5, 1.0])), path)
    return path


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def finished(phantoms, tmp_path_factory):
    """A finished tiny run (4 steps, 2 epochs); tests work on copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli_main(train_args(phantoms, run)) == 0
    return run


@pytest.fixture
def run_copy(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "run"))


@pytest.fixture
def volume(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    return nifti(folder / "case_0000.nii.gz", _image())


def _image(size: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((size,) * 3).astype(np.float32)


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["evaluate", "predict", "train --resume"])
def test_crafted_checkpoint_runs_no_code(verb, phantoms, run_copy, volume, tmp_path, caplog):
    marker = tmp_path / "code-ran"
    if verb == "train --resume":
        crafted_checkpoint(run_copy / "checkpoints" / "latest.pt", run_copy / "checkpoints" / "latest.pt", marker)
        args = [*train_args(phantoms, run_copy), "--resume"]
    else:
        checkpoint = crafted_checkpoint(run_copy / "checkpoints" / "final.pt", tmp_path / "crafted.pt", marker)
        out = ["--out", tmp_path / "evaluation"] if verb == "evaluate" else ["--input", volume, "--output", tmp_path]
        args = [verb, "--checkpoint", checkpoint, *out]
    before = digests(run_copy)
    rc, errors = run_cli(caplog, *args)
    assert rc == 2
    one_line(errors, r"(crafted|latest)\.pt: refused: it names '\w+\.system', which is not a tensor")
    assert not marker.exists()
    assert digests(run_copy) == before and not (tmp_path / "evaluation").exists()
    assert not list(tmp_path.glob("case*.nii.gz"))


@pytest.mark.slow
def test_checkpoints_hold_plain_types_and_older_ones_still_load(finished, tmp_path):
    from gsema_fast.files import read_checkpoint
    from gsema_fast.training.checkpoints import set_numpy_rng_state

    state = torch.load(finished / "checkpoints" / "latest.pt", weights_only=True)  # no allow-list needed
    numpy_state = state["rng"]["numpy"]
    assert isinstance(numpy_state["state"]["key"], list)
    # a checkpoint written before held numpy's own state tuple (a uint32 array): it still loads, and restores
    old = dict(state, rng={**state["rng"], "numpy": np.random.get_state()})
    torch.save(old, tmp_path / "old.pt")
    restored = read_checkpoint(tmp_path / "old.pt")["rng"]["numpy"]
    np.random.seed(5)
    set_numpy_rng_state(restored)
    first = np.random.random(3)
    set_numpy_rng_state(numpy_state)
    set_numpy_rng_state(restored)
    np.testing.assert_array_equal(np.random.random(3), first)
    # anything else that names a class is refused, with its name
    torch.save({"config": {}, "array": np.zeros(2)}, tmp_path / "float64.pt")
    with pytest.raises(ValueError, match=r"refused: it names '[\w.]*Float64DType'"):
        read_checkpoint(tmp_path / "float64.pt")


# ------------------------------------------------------------------------------------------------ run folders


@pytest.mark.slow
def test_fresh_run_into_a_finished_run_folder_is_refused(phantoms, run_copy, caplog):
    before = digests(run_copy)
    rc, errors = run_cli(caplog, *train_args(phantoms, run_copy, "optim.lr=0.005"))
    assert rc == 2
    one_line(errors, rf"run folder {re.escape(str(run_copy))} is not empty .*--resume .*--overwrite")
    assert digests(run_copy) == before


@pytest.mark.slow
def test_resume_and_overwrite_together_are_refused(phantoms, run_copy, caplog):
    before = digests(run_copy)
    rc, errors = run_cli(caplog, *train_args(phantoms, run_copy), "--resume", "--overwrite")
    assert rc == 2
    one_line(errors, r"--resume and --overwrite exclude each other")
    assert digests(run_copy) == before


@pytest.mark.slow
def test_overwrite_replaces_the_previous_run(phantoms, run_copy, caplog):
    (run_copy / "notes.txt").write_text("mine")
    rc, errors = run_cli(caplog, *train_args(phantoms, run_copy, "optim.lr=0.005"), "--overwrite")
    assert rc == 0 and not errors
    assert log_steps(run_copy) == [1, 2, 3, 4]  # the old records are gone, not appended to
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["optim"]["lr"] == 0.005
    for name in ("latest", "final"):
        state = torch.load(run_copy / "checkpoints" / f"{name}.pt", weights_only=True)
        assert state["config"]["optim"]["lr"] == 0.005
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert not leftovers(run_copy) and not (run_copy / ".lock").exists()


def test_a_second_process_on_a_run_folder_is_refused(phantoms, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    # what a live training holds: an exclusive lock on the folder's lock file, which names it
    with (run / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("process 4242 on elsewhere\n")
        held.flush()
        rc, errors = run_cli(caplog, *train_args(phantoms, run))
        assert rc == 2
        one_line(errors, r"is in use by process 4242 on elsewhere .*choose another --out")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
        assert (run / ".lock").read_text() == "process 4242 on elsewhere\n"


@pytest.mark.slow
def test_the_stale_lock_of_a_dead_process_is_taken_over(phantoms, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("process 999999 on elsewhere\n")  # killed: nobody holds it
    caplog.set_level(logging.INFO, logger="gsema_fast")
    rc, errors = run_cli(caplog, *train_args(phantoms, run))
    assert rc == 0 and not errors
    assert "taking over the lock of process 999999 on elsewhere" in caplog.text
    assert not (run / ".lock").exists() and (run / "checkpoints" / "final.pt").is_file()


@pytest.mark.slow
def test_two_runs_on_one_folder_and_ctrl_c(phantoms, tmp_path, caplog):
    """A long run in a subprocess; a second one on its folder is refused; Ctrl-C ends the first after a whole step
    with one line and a consistent checkpoint, from which --resume finishes with a log that has every step once."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "gsema_fast", *train_args(phantoms, run, "train.epochs=1000")]
    first = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "latest.pt").is_file() and first.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()

        rc, errors, stderr = run_subprocess(*train_args(phantoms, run, "optim.lr=0.005"))
        assert rc == 2, stderr
        one_line(errors, rf"run folder {re.escape(str(run))} is in use by process {first.pid} on ")

        first.send_signal(signal.SIGINT)
        stderr = first.communicate(timeout=120)[1]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, stderr
    assert "Traceback" not in stderr
    message = one_line(error_lines(stderr), r"^interrupted at step (\d+); resume with --resume \(from step (\d+), ")
    stopped, saved = map(int, re.search(r"step (\d+); .*from step (\d+)", message).groups())
    assert saved <= stopped
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == saved and state["config"]["optim"]["lr"] == DEMO_LR  # the first run's, whole
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == DEMO_LR
    assert not leftovers(run) and not (run / ".lock").exists()

    rc, errors = run_cli(caplog, *train_args(phantoms, run, f"train.epochs={state['epoch'] + 1}"), "--resume")
    assert rc == 0 and not errors
    assert log_steps(run) == list(range(1, saved + 3))  # each step once, whatever the first run had logged
    assert len(set(log_steps(run, "val"))) == len(log_steps(run, "val"))


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.slow
def test_resume_refuses_settings_it_cannot_change(phantoms, run_copy, caplog):
    before = digests(run_copy)
    args = train_args(phantoms, run_copy, "model.channels=[8,16,32]", "ema.mode=ema", "optim.lr=0.005")
    rc, errors = run_cli(caplog, *args, "--resume")
    assert rc == 2
    message = one_line(errors, r"--resume: .*latest\.pt was trained with other values of settings a run cannot change")
    assert "model.channels: [4, 8, 16] -> [8, 16, 32]" in message and "ema.mode: 'gsema' -> 'ema'" in message
    assert "optim.lr" not in message
    assert digests(run_copy) == before  # config.yaml included: written only after the check


@pytest.mark.slow
def test_resume_changes_that_are_allowed_take_effect(phantoms, run_copy, caplog):
    caplog.set_level(logging.INFO, logger="gsema_fast")
    rc, errors = run_cli(caplog, *train_args(phantoms, run_copy, "train.epochs=3", "optim.lr=0.004"), "--resume")
    assert rc == 0 and not errors
    assert f"take effect from step 4: optim.lr: {DEMO_LR} -> 0.004; train.epochs: 2 -> 3" in caplog.text
    records = {r["step"]: r for r in map(json.loads, (run_copy / "log.jsonl").read_text().splitlines())}
    # the demo schedule is a cosine to 0 over the run, now 6 steps from lr 0.004
    assert records[5]["lr"] == pytest.approx(0.004 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["train"]["epochs"] == 3


@pytest.mark.slow
def test_resume_truncates_the_log_to_the_checkpoint(phantoms, tmp_path, caplog, monkeypatch):
    import gsema_fast.training.loop as train_module

    run = tmp_path / "run"
    calls = []
    step = train_module.train_step

    def stop_at_the_fourth(*args, **kwargs):  # steps 1-3 logged, the checkpoint after step 2
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "train_step", stop_at_the_fourth)
        rc, errors = run_cli(caplog, *train_args(phantoms, run))
    assert rc == 130
    one_line(errors, "^interrupted$")
    assert log_steps(run) == [1, 2, 3]
    with (run / "log.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # a record cut short by a kill
    rc, errors = run_cli(caplog, *train_args(phantoms, run), "--resume")
    assert rc == 0 and not errors
    assert log_steps(run) == [1, 2, 3, 4] and log_steps(run, "val") == [2, 4]


# ------------------------------------------------------------------------------------------------ bad data


BAD_DATA = {
    "label 7": r"case c0_00: label .*c0_00\.nii\.gz holds values \[7\] outside the label map \[0, 1, 2\]",
    "float labels": r"case c0_00: label .*c0_00\.nii\.gz holds values \[1\.5\] outside the label map",
    "truncated image": r"case c0_00: cannot read image file .*c0_00_0000\.nii\.gz: .*(ended|truncated|EOF)",
    "NaN image": r"case c0_00: image .*c0_00_0000\.nii\.gz has 1 non-finite voxels",
    "2D image": r"case c0_00: image .*c0_00_0000\.nii\.gz has shape \(24, 24\); a 3D volume is expected",
}


def bad_dataset(root: Path, kind: str, *, size: int = 24, per_domain: int = 4) -> Path:
    """Three domains of ``per_domain`` cases; the first case, the first the cache loads, is bad as ``kind`` says."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for d in range(3):
        for i in range(per_domain):
            name = f"c{d}_{i:02d}"
            image = np.zeros((size,) * 3, np.float32)
            image[4:12, 4:12, 4:12] = 1.0
            label = (image > 0).astype(np.uint8)
            label[6:8, 6:8, 6:8] = 2
            if name == "c0_00":
                if kind == "label 7":
                    label[0, 0, 0] = 7
                elif kind == "float labels":
                    label = label.astype(np.float32)
                    label[0, 0, 0] = 1.5
                elif kind == "NaN image":
                    image[1, 2, 3] = np.nan
                elif kind == "truncated image":
                    image += _image(size, seed=1)  # noise: a file long enough to cut in the middle of its voxels
                elif kind == "2D image":
                    image, label = image[:, :, 0], label[:, :, 0]
                elif kind == "huge image":  # finite float32, but beyond what float32 arithmetic can normalise
                    image = ((2 * _image(size, seed=2) - 1) * np.float32(1e38) + image * np.float32(1e38)) / 2
            image_file = nifti(root / "imagesTr" / f"{name}_0000.nii.gz", image)
            nifti(root / "labelsTr" / f"{name}.nii.gz", label)
            if name == "c0_00" and kind == "truncated image":
                data = image_file.read_bytes()
                image_file.write_bytes(data[: len(data) // 2])
            entries.append({"case": name, "image": f"./{image_file.relative_to(root)}",
                            "label": f"./labelsTr/{name}.nii.gz", "domain": str(d)})  # fmt: skip
    meta = {"channel_names": {"0": "3DRA"}, "labels": LABELS, "file_ending": ".nii.gz", "training": entries}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def bad_data_args(root: Path, out: Path) -> list[str]:
    sets = [f"data.root={root}", "data.val_per_domain=0", "data.patch_size=[16,16,16]", "model.channels=[4,8,16]"]
    return ["train", *[a for kv in sets for a in ("--set", kv)], "--out", str(out)]


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_bad_data_is_one_line_and_leaves_no_thread_running(kind, tmp_path, caplog):
    root = bad_dataset(tmp_path / "data", kind)
    before = digests(root)
    rc, errors = run_cli(caplog, *bad_data_args(root, tmp_path / "run"))
    assert rc == 2
    one_line(errors, BAD_DATA[kind])
    # the cache's loading threads are joined: one still inside torch at exit aborts the process (exit code 134)
    assert not [t for t in threading.enumerate() if isinstance(t, DummyProcess)]
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder
    assert digests(root) == before


@pytest.mark.slow
def test_bad_data_exits_2_every_time(tmp_path):
    """The exit code of whole processes, one per bad dataset, all at once (a busy machine, as in real use)."""
    runs = []
    for kind in BAD_DATA:
        root = bad_dataset(tmp_path / kind.replace(" ", "-"), kind)
        args = [sys.executable, "-m", "gsema_fast", *bad_data_args(root, tmp_path / f"run-{root.name}")]
        job = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
        runs.append((kind, job))
    for kind, job in runs:
        stderr = job.communicate(timeout=300)[1]
        assert job.returncode == 2, (kind, job.returncode, stderr[-2000:])
        one_line(error_lines(stderr), BAD_DATA[kind])
        assert "Traceback" not in stderr and "terminate called" not in stderr
    assert not list(tmp_path.glob("run-*"))


# ------------------------------------------------------------------------------------------------ faults


@pytest.mark.slow
def test_read_only_output_folders(phantoms, finished, volume, tmp_path, request):
    locked = tmp_path / "locked"
    locked.mkdir()
    prefix = read_only(locked, request)
    rc, errors, stderr = run_subprocess(*train_args(phantoms, locked / "run"), prefix=prefix)
    assert rc == 2, stderr
    one_line(errors, rf"^cannot write {re.escape(str(locked / 'run'))}: (Read-only file system|Permission denied)$")
    checkpoint = finished / "checkpoints" / "final.pt"
    rc, errors, stderr = run_subprocess(
        "predict", "--checkpoint", checkpoint, "--input", volume, "--output", locked, prefix=prefix
    )
    assert rc == 2, stderr
    one_line(errors, rf"^cannot write {re.escape(str(locked))}: (Read-only file system|Permission denied)$")
    assert list(locked.iterdir()) == []


@pytest.mark.slow
def test_disk_full_keeps_the_last_checkpoint(phantoms, run_copy, caplog, monkeypatch):
    """A full disk while a resumed run writes its next checkpoint: one line naming the file, and the checkpoint of
    before intact (no file system needs to fill: the write fails as ENOSPC does)."""
    before = (run_copy / "checkpoints" / "latest.pt").read_bytes()
    save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "ab") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as handle:
            handle.write(b"PK\x03\x04 the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    rc, errors = run_cli(caplog, *train_args(phantoms, run_copy, "train.epochs=3"), "--resume")
    monkeypatch.setattr(torch, "save", save)
    assert rc == 2
    one_line(errors, r"^cannot write .*/checkpoints/(best|latest)\.pt: No space left on device$")
    assert (run_copy / "checkpoints" / "latest.pt").read_bytes() == before
    assert not leftovers(run_copy) and not (run_copy / ".lock").exists()


@pytest.mark.slow
@pytest.mark.skipif(not can_unshare(), reason="needs user namespaces to mount a small tmpfs")
def test_disk_full_on_a_real_file_system(phantoms, tmp_path):
    """Training into a 160 KiB tmpfs: the first checkpoint does not fit."""
    folder, kept = tmp_path / "small", tmp_path / "kept"
    folder.mkdir()
    script = f'mount -t tmpfs -o size=160k tmpfs "$0" && "$@"; rc=$?; cp -a "$0" {kept}; exit $rc'
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(folder)]
    rc, errors, stderr = run_subprocess(*train_args(phantoms, folder / "run"), prefix=prefix)
    assert rc == 2, stderr
    one_line(errors, r"^cannot write .*/run/checkpoints/best\.pt: No space left on device$")
    assert not leftovers(kept) and not (kept / "run" / ".lock").exists()
    assert yaml.safe_load((kept / "run" / "config.yaml").read_text())["train"]["out_dir"] == str(folder / "run")
    assert not (kept / "run" / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
def test_predict_output_that_is_a_file(finished, volume, tmp_path, caplog):
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"mine")
    rc, errors = run_cli(
        caplog, "predict", "--checkpoint", finished / "checkpoints" / "final.pt", "--input", volume, "--output", target
    )
    assert rc == 2
    one_line(errors, rf"^--output {re.escape(str(target))} is a file; expected a folder")
    assert target.read_bytes() == b"mine"


@pytest.mark.slow
def test_predict_refuses_to_replace_outputs_without_overwrite(finished, volume, tmp_path, caplog):
    args = ["predict", "--checkpoint", finished / "checkpoints" / "final.pt", "--input", volume]
    out = tmp_path / "out"
    assert run_cli(caplog, *args, "--output", out) == (0, [])
    (out / "case.nii.gz").write_bytes(b"edited by hand")
    rc, errors = run_cli(caplog, *args, "--output", out)
    assert rc == 2
    one_line(errors, r"--output .*out already holds 1 of the outputs \(case\.nii\.gz\); pass --overwrite")
    assert (out / "case.nii.gz").read_bytes() == b"edited by hand"
    assert run_cli(caplog, *args, "--output", out, "--overwrite") == (0, [])
    assert nib.load(out / "case.nii.gz").shape == (20, 20, 20)


@pytest.mark.slow
def test_predict_reports_each_bad_file_in_one_line(finished, tmp_path, caplog):
    inputs = tmp_path / "in"
    inputs.mkdir()
    nifti(inputs / "good.nii.gz", _image())
    nifti(inputs / "flat.nii.gz", _image()[0])
    (inputs / "junk.nii.gz").write_bytes(b"not a NIfTI file")  # MONAI tries every reader, each with a traceback
    rc, errors = run_cli(
        caplog, "predict", "--checkpoint", finished / "checkpoints" / "final.pt", "--input", inputs, "--output",
        tmp_path / "out",
    )  # fmt: skip
    assert rc == 1
    assert len(errors) == 2 and all("\n" not in e for e in errors), errors
    assert re.search(
        r"flat\.nii\.gz: failed: case flat: image .* has shape \(20, 20\); a 3D volume is expected", errors[0]
    )
    assert re.search(
        r"junk\.nii\.gz: failed: case junk: cannot read image file .*junk\.nii\.gz: .*not a gzip", errors[1]
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.nii.gz"]


# ------------------------------------------------------------------------------------------------ quiet oddities


@pytest.mark.slow
def test_single_domain_run_says_so_and_writes_its_summary(tmp_path, caplog):
    from gsema_fast.data import synthesize

    root = synthesize(tmp_path / "one", domains=1, cases_per_domain=3, size=32, seed=0)
    run = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="gsema_fast")
    rc, errors = run_cli(caplog, *train_args(root, run))
    assert rc == 0 and not errors
    assert re.search(r"no unseen centre: .*dataset\.json has the one domain 0", caplog.text)
    summary = strict_json(run / "summary.json")
    assert summary["test_domain"] is None and summary["test"] is None and summary["steps"] == 4
    assert set(summary["validation"]["dice"]) == {"vessel", "aneurysm"}


@pytest.mark.slow
def test_summary_is_strict_json_with_nan_as_null(phantoms, tmp_path, caplog, monkeypatch):
    import gsema_fast.training.loop as train_module

    evaluate = train_module.score_volumes

    def no_aneurysm_anywhere(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        result["mean"]["aneurysm"] = float("nan")
        return result

    monkeypatch.setattr(train_module, "score_volumes", no_aneurysm_anywhere)
    run = tmp_path / "run"
    assert run_cli(caplog, *train_args(phantoms, run)) == (0, [])
    summary = strict_json(run / "summary.json")
    assert summary["test"]["mean"]["aneurysm"] is None and summary["untrained"]["aneurysm"] is None
    assert summary["test"]["mean"]["vessel"] >= 0 and not leftovers(run)


# ------------------------------------------------------------------------------------------------ synth --out


def test_synth_refuses_a_folder_holding_another_dataset(tmp_path, caplog):
    other = tmp_path / "other"
    (other / "imagesTr").mkdir(parents=True)
    nifti(other / "imagesTr" / "p1_0000.nii.gz", _image())
    (other / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    before = digests(other)
    rc, errors = run_cli(caplog, "synth", "--out", other, "--domains", "2", "--cases-per-domain", "1", "--size", "24")
    assert rc == 2
    one_line(
        errors, r"holds files this generator did not write \(dataset\.json, imagesTr/p1_0000\.nii\.gz\); .*--overwrite"
    )
    assert digests(other) == before


def test_synth_overwrite_leaves_exactly_the_new_dataset(tmp_path, caplog):
    other = tmp_path / "other"
    (other / "imagesTr").mkdir(parents=True)
    nifti(other / "imagesTr" / "p1_0000.nii.gz", _image())
    (other / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    (other / "notes.txt").write_text("mine")
    args = ["synth", "--out", other, "--domains", "2", "--cases-per-domain", "1", "--size", "24"]
    assert run_cli(caplog, *args, "--overwrite") == (0, [])
    assert sorted(p.name for p in (other / "imagesTr").iterdir()) == ["A_000_0000.nii.gz", "B_000_0000.nii.gz"]
    assert (other / "notes.txt").read_text() == "mine" and not leftovers(other)
    # a dataset of this generator with other settings is another dataset: refused, then replaced with --overwrite,
    # the cases it no longer has removed
    (other / "notes.txt").unlink()
    before = digests(other)
    smaller = ["synth", "--out", other, "--domains", "1", "--cases-per-domain", "1", "--size", "24"]
    rc, errors = run_cli(caplog, *smaller)
    assert rc == 2
    one_line(
        errors,
        r"holds another synthesised dataset \(2 centre\(s\) x 1 case\(s\), size 24, seed 0, format \d+\); pass "
        r"--overwrite to replace it with this one \(1 centre\(s\) x 1 case\(s\)",
    )
    assert digests(other) == before
    assert run_cli(caplog, *smaller, "--overwrite") == (0, [])
    assert sorted(p.name for p in (other / "labelsTr").iterdir()) == ["A_000.nii.gz"]


def test_synth_checks_memory_before_it_allocates(tmp_path, caplog, monkeypatch):
    out = tmp_path / "big"
    rc, errors = run_cli(caplog, "synth", "--out", out, "--size", "5000")
    assert rc == 2
    one_line(errors, r"^synth: size=5000 needs about \d+\.\d GiB of memory to generate one case, and \d+\.\d GiB is "
                     r"available; choose a size of at most \d+$")  # fmt: skip
    assert not out.exists()  # nothing created, not even empty folders
    # workers are lowered to what fits: here one case at a time
    from gsema_fast.data.phantoms import writer as synth

    monkeypatch.setattr(synth, "available_memory", lambda: int(1.5 * synth.PEAK_BYTES_PER_VOXEL * 24**3))
    caplog.set_level(logging.INFO, logger="gsema_fast")
    rc, errors = run_cli(caplog, "synth", "--out", out, "--domains", "2", "--cases-per-domain", "1", "--size", "24",
                         "--workers", "4")  # fmt: skip
    assert rc == 0 and not errors
    assert re.search(r"synth: 2 worker process\(es\) would need .* GiB is available: using 1", caplog.text)
    assert "with 1 process(es)" in caplog.text


# ------------------------------------------------------------------------------------------------ results and settings


def lodo_args(data: Path, out: Path, *sets: str) -> list[str]:
    pairs = [*tiny_run(data), *sets]
    return ["lodo", *[a for kv in pairs for a in ("--set", kv)], "--row", "no EMA", "--domain", "2", "--out", str(out)]


def run_list(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lodo_never_reports_old_results_under_new_settings(phantoms, tmp_path, caplog):
    """A rerun of a study into its folder with other settings is refused in one line naming them, and nothing there
    changes; --overwrite trains the run again; the run list has one line per run however often the study runs."""
    data = Path(shutil.copytree(phantoms, tmp_path / "data"))
    out = tmp_path / "L"
    caplog.set_level(logging.INFO, logger="gsema_fast")
    assert run_cli(caplog, *lodo_args(data, out)) == (0, [])
    assert len(run_list(out)) == 1
    before = digests(out)

    rc, errors = run_cli(caplog, *lodo_args(data, out, "optim.lr=0.5", "train.epochs=1"))
    assert rc == 2
    one_line(
        errors,
        rf"^lodo: {re.escape(str(out))}/no-ema/centre-2/seed-0 holds a finished run made with other settings than "
        rf"this study's \(optim\.lr: {DEMO_LR!r} -> 0\.5; train\.epochs: 2 -> 1\): its results are not this study's; "
        r"pass --overwrite to train it again, or choose another --out$",
    )
    rc, errors = run_cli(caplog, *lodo_args(data, out), "--use", "final")
    assert rc == 2
    one_line(errors, r"\(its evaluation scored best\.pt, this study scores final\.pt \(--use final\)\)")
    assert digests(out) == before

    assert run_cli(caplog, *lodo_args(data, out)) == (0, [])  # the same settings: read back, not trained
    assert "already evaluated" in caplog.text and len(run_list(out)) == 1

    rc, errors = run_cli(caplog, *lodo_args(data, out, "optim.lr=0.5", "train.epochs=1"), "--overwrite")
    assert rc == 0 and not errors
    assert "--overwrite: " in caplog.text and "training it again" in caplog.text
    assert "- training: 1 epochs x 2 steps" in (out / "lodo_table.md").read_text()
    (record,) = run_list(out)
    run = out / "no-ema" / "centre-2" / "seed-0"
    summary = strict_json(run / "evaluation" / "summary.json")
    assert summary["step"] == torch.load(run / "checkpoints" / "best.pt", weights_only=True)["step"] <= 2
    assert record["unseen"]["vessel"]["dice"] == pytest.approx(summary["mean"]["vessel"]["dice"])


@pytest.mark.slow
def test_evaluate_never_replaces_a_run_or_earlier_results_unasked(run_copy, tmp_path, caplog):
    checkpoint = run_copy / "checkpoints" / "final.pt"
    before = digests(run_copy)
    rc, errors = run_cli(caplog, "evaluate", "--checkpoint", checkpoint, "--out", run_copy)
    assert rc == 2
    one_line(
        errors,
        rf"^evaluate: --out {re.escape(str(run_copy))} is the folder of a training run \(config\.yaml, log\.jsonl, "
        r"progress\.png, layer_agreement\.png, summary\.json, checkpoints/\): the evaluation's summary\.json "
        r"would replace the run's; .*--overwrite",
    )
    assert digests(run_copy) == before

    out = tmp_path / "evaluation"
    args = ["evaluate", "--checkpoint", checkpoint, "--out", out, "--save-predictions"]
    assert run_cli(caplog, *args) == (0, [])
    (out / "predictions" / "a-case-not-scored-now.nii.gz").write_bytes(b"an earlier evaluation's")
    results = digests(out)
    rc, errors = run_cli(caplog, *args)
    assert rc == 2
    one_line(errors, r"already holds the results of an evaluation \(summary\.json, metrics\.csv, predictions/.*\); "
                     r"pass --overwrite to replace them")  # fmt: skip
    assert digests(out) == results
    caplog.set_level(logging.INFO, logger="gsema_fast")
    assert run_cli(caplog, *args, "--overwrite") == (0, [])
    assert re.search(
        r"--overwrite: the results in .* replaced \(summary\.json, metrics\.csv, 3 prediction", caplog.text
    )
    assert "removed 1 earlier file(s) of cases not scored now (a-case-not-scored-now.nii.gz)" in caplog.text
    assert not (out / "predictions" / "a-case-not-scored-now.nii.gz").exists()

    assert run_cli(caplog, "evaluate", "--checkpoint", checkpoint, "--out", run_copy, "--overwrite") == (0, [])
    assert "replaced (the training run's summary.json)" in caplog.text
    assert strict_json(run_copy / "summary.json")["checkpoint"] == str(checkpoint)
    assert {k: v for k, v in digests(run_copy).items() if k.startswith("checkpoints/")} == {
        k: v for k, v in before.items() if k.startswith("checkpoints/")
    }


@pytest.mark.slow
def test_evaluate_refuses_a_dataset_whose_classes_mean_something_else(phantoms, finished, tmp_path, caplog):
    data = Path(shutil.copytree(phantoms, tmp_path / "data"))
    manifest = json.loads((data / "dataset.json").read_text())
    manifest["labels"] = {**manifest["labels"], "calcification": 3}
    (data / "dataset.json").write_text(json.dumps(manifest))
    checkpoint = finished / "checkpoints" / "final.pt"
    args = ["--data", data, "--out", tmp_path / "evaluation"]
    rc, errors = run_cli(caplog, "evaluate", "--checkpoint", checkpoint, *args)
    assert rc == 2
    one_line(errors, r"label map of .*data/dataset\.json \(\{'background': 0, 'vessel': 1, 'aneurysm': 2, "
                     r"'calcification': 3\}\) is not the one .*final\.pt was trained with \(\{'background': 0, "
                     r"'vessel': 1, 'aneurysm': 2\}\): its classes would be scored under other names")  # fmt: skip
    # a checkpoint of an earlier version records no label map: the number of classes still must agree
    state = torch.load(checkpoint, weights_only=True)
    del state["dataset"]
    torch.save(state, tmp_path / "older.pt")
    rc, errors = run_cli(caplog, "evaluate", "--checkpoint", tmp_path / "older.pt", *args)
    assert rc == 2
    one_line(errors, r"has 4 label values .* but the network of .*older\.pt predicts 3 classes")
    assert not (tmp_path / "evaluation").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["is the input folder", "lies inside it", "is the folder of an input file"])
def test_predict_never_writes_among_its_inputs(finished, tmp_path, caplog, where):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    scan = nifti(inputs / "a.nii.gz", _image())  # its label map would be a.nii.gz: the scan itself
    output = inputs / "labels" if where == "lies inside it" else inputs
    given = scan if where == "is the folder of an input file" else inputs
    before = digests(inputs)
    for extra in ([], ["--overwrite"]):
        rc, errors = run_cli(
            caplog, "predict", "--checkpoint", finished / "checkpoints" / "final.pt", "--input", given, "--output",
            output, *extra,
        )  # fmt: skip
        assert rc == 2
        pattern = rf"^--output {re.escape(str(output))} (is|lies inside) the folder {re.escape(str(inputs))} of the "
        one_line(errors, pattern + "inputs: the label maps would land among the scans")
        assert digests(inputs) == before and sorted(p.name for p in inputs.iterdir()) == ["a.nii.gz"]


@pytest.mark.slow
def test_predict_may_write_below_the_folder_of_a_file_it_was_given(finished, tmp_path, caplog):
    """Only a folder given as input is read whole: a folder below that of a file given alone is not read next time."""
    scan = nifti(tmp_path / "a_0000.nii.gz", _image())
    out = tmp_path / "labels"
    args = ["predict", "--checkpoint", finished / "checkpoints" / "final.pt", "--input", scan, "--output", out]
    assert run_cli(caplog, *args) == (0, [])
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "names, clash",
    [
        (["a.nii.gz", "a_probabilities.nii.gz"], r"a_probabilities\.nii\.gz would be the probabilities of .*/"
         r"a\.nii\.gz and the label map of .*/a_probabilities\.nii\.gz"),
        (["a.nii", "a.nii.gz"], r"a\.nii\.gz would be the label map of .*/a\.nii and the label map of .*/a\.nii\.gz"),
    ],
)  # fmt: skip
def test_predict_refuses_inputs_whose_outputs_would_be_one_file(finished, tmp_path, caplog, names, clash):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    for name in names:
        nifti(inputs / name, _image())
    out = tmp_path / "out"
    rc, errors = run_cli(
        caplog, "predict", "--checkpoint", finished / "checkpoints" / "final.pt", "--input", inputs, "--output", out,
        "--probabilities",
    )  # fmt: skip
    assert rc == 2
    one_line(errors, rf"^inputs would overwrite each other's outputs: {clash}; rename an input")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ extreme intensities


@pytest.mark.slow
@pytest.mark.parametrize("dtype, peak", [(np.float32, 1e38), (np.float64, 3e303)])
def test_predict_extreme_finite_intensities_as_the_same_image_at_any_scale(finished, tmp_path, caplog, dtype, peak):
    """zscore normalisation does not depend on the image's scale: an image of +-1e38 (float32) or 3e303 (float64)
    is segmented as the same image in [-1, 1], not as NaN (or as 'non-finite voxels')."""
    plain = (2 * _image() - 1).astype(np.float32)
    (tmp_path / "in").mkdir()
    nifti(tmp_path / "in" / "plain.nii.gz", plain)
    nifti(tmp_path / "in" / "huge.nii.gz", (plain.astype(np.float64) * peak).astype(dtype))
    out = tmp_path / "out"
    checkpoint = finished / "checkpoints" / "final.pt"
    args = ["predict", "--checkpoint", checkpoint, "--output", out, "--probabilities", "--input", tmp_path / "in"]
    assert run_cli(caplog, *args) == (0, [])
    probs = {n: np.asarray(nib.load(out / f"{n}_probabilities.nii.gz").dataobj) for n in ("plain", "huge")}
    assert np.isfinite(probs["huge"]).all()
    np.testing.assert_allclose(probs["huge"], probs["plain"], atol=1e-4)
    labels = {n: np.asarray(nib.load(out / f"{n}.nii.gz").dataobj) for n in ("plain", "huge")}
    np.testing.assert_array_equal(labels["huge"], labels["plain"])


@pytest.mark.slow
def test_predict_never_reports_success_for_an_output_it_could_not_compute(finished, tmp_path, caplog):
    state = torch.load(finished / "checkpoints" / "final.pt", weights_only=True)
    broken = {**state, "teacher": {k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                                   for k, v in state["teacher"].items()}}  # fmt: skip
    torch.save(broken, tmp_path / "nan.pt")
    unscaled = {**state, "config": {**state["config"], "data": {**state["config"]["data"], "intensity": "none"}}}
    torch.save(unscaled, tmp_path / "unscaled.pt")
    (tmp_path / "in").mkdir()
    huge = nifti(tmp_path / "in" / "huge.nii.gz", (2 * _image() - 1).astype(np.float32) * np.float32(1e38))
    out = tmp_path / "out"
    rc, errors = run_cli(caplog, "predict", "--checkpoint", tmp_path / "nan.pt", "--input", huge, "--output", out)
    assert rc == 1
    one_line(errors, r"huge\.nii\.gz: failed: case huge: the network's output is not finite in 24000 of 24000 values")
    rc, errors = run_cli(caplog, "predict", "--checkpoint", tmp_path / "unscaled.pt", "--input", huge, "--output", out)
    assert rc == 1
    one_line(errors, r"failed: case huge: image .*huge\.nii\.gz has intensities in \[-9\.998e\+37, 1e\+38\], beyond "
                     r"\+-4\.295e\+09, which data.intensity 'none' would give the network unscaled")  # fmt: skip
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_training_on_extreme_intensities(tmp_path, caplog):
    root = bad_dataset(tmp_path / "data", "huge image")
    short = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "train.log_every=1"]
    rc, errors = run_cli(caplog, *bad_data_args(root, tmp_path / "run"), *short)
    assert rc == 0 and not errors
    losses = [json.loads(line)["total"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]  # fmt: skip
    assert losses and all(math.isfinite(v) for v in losses)
    rc, errors = run_cli(caplog, *bad_data_args(root, tmp_path / "none"), *short, "--set", "data.intensity=none")
    assert rc == 2
    one_line(
        errors, r"^case c0_00: image .*c0_00_0000\.nii\.gz has intensities in \[-?\d.*e\+3\d, \d.*e\+3\d\], beyond"
    )
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------------------------------------ the dataset of a run


@pytest.fixture(scope="module")
def own_data_run(phantoms, tmp_path_factory):
    """A finished tiny run on a dataset of its own (tests change copies of both)."""
    root = tmp_path_factory.mktemp("own")
    data = Path(shutil.copytree(phantoms, root / "data"))
    assert cli_main(train_args(data, root / "run")) == 0
    return data, root / "run"


@pytest.fixture
def moved_run(own_data_run, tmp_path):
    """Copies of the run and of its dataset, the dataset in another folder than the one the run recorded."""
    data, run = own_data_run
    return Path(shutil.copytree(data, tmp_path / "data")), Path(shutil.copytree(run, tmp_path / "run"))


def _move_to_domain_1(data: Path) -> None:
    manifest = json.loads((data / "dataset.json").read_text())
    manifest["training"][0]["domain"] = 1  # A_000, of centre 0
    (data / "dataset.json").write_text(json.dumps(manifest))


def _rewrite_image(data: Path) -> None:
    path = data / "imagesTr" / "B_001_0000.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine, img.header), path)


def _drop_case(data: Path) -> None:
    manifest = json.loads((data / "dataset.json").read_text())
    manifest["training"] = [e for e in manifest["training"] if e["case"] != "C_001"]
    (data / "dataset.json").write_text(json.dumps(manifest))


DATASET_CHANGES = {
    "a case moved to another domain": (_move_to_domain_1, r"1 case\(s\) moved to another domain \(A_000 0 -> 1\)"),
    "an image rewritten in place": (_rewrite_image, r"1 image file\(s\) changed \(B_001: rewritten"),
    "a case removed": (_drop_case, r"1 case\(s\) removed \(C_001\)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("change", list(DATASET_CHANGES))
def test_resume_refuses_a_changed_dataset(moved_run, caplog, change):
    data, run = moved_run
    edit, pattern = DATASET_CHANGES[change]
    edit(data)
    before = digests(run)
    rc, errors = run_cli(caplog, *train_args(data, run, "train.epochs=3"), "--resume")
    assert rc == 2
    one_line(errors, rf"^--resume: the dataset .*data/dataset\.json is not the one .*latest\.pt was trained on: "
                     rf"{pattern}.*; resume on the original data, or start a new run")  # fmt: skip
    assert digests(run) == before


@pytest.mark.slow
def test_resume_accepts_the_same_dataset_moved_and_touched(moved_run, caplog):
    """The identity is the content: a dataset copied to another folder, its files touched, is the same dataset."""
    data, run = moved_run
    for path in data.rglob("*.nii.gz"):
        os.utime(path, (time.time() + 60, time.time() + 60))
    caplog.set_level(logging.INFO, logger="gsema_fast")
    rc, errors = run_cli(caplog, *train_args(data, run, "train.epochs=3"), "--resume")
    assert rc == 0 and not errors
    assert re.search(r"take effect from step 4: data\.root: '[^']*/own\d*/data' -> '[^']*/data'", caplog.text)
    state = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    assert state["step"] == 6 and set(state["dataset"]["cases"]) == {f"{c}_00{i}" for c in "ABC" for i in (0, 1)}


@pytest.mark.slow
def test_a_run_records_absolute_dataset_paths(phantoms, tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(phantoms.parent)
    run = tmp_path / "run"
    args = train_args(Path(phantoms.name), run)
    assert f"data.root={phantoms.name}" in args  # typed relative
    assert run_cli(caplog, *args) == (0, [])
    state = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    assert state["config"]["data"]["root"] == str(phantoms)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] == str(phantoms)
    assert state["dataset"]["labels"] == LABELS
    image = state["dataset"]["cases"]["A_000"]["image"]
    assert image["path"] == "imagesTr/A_000_0000.nii.gz" and len(image["sha256"]) == 64


# ------------------------------------------------------------------------------------------------ smaller cases


@pytest.mark.slow
def test_leftover_temporary_files_go_on_resume_and_overwrite(phantoms, run_copy, caplog):
    """A killed write leaves '.<random>.tmp.<name>' beside the output; a resumed or replaced run removes them (with
    the folder locked, no writer can be alive)."""
    made = [run_copy / ".k2j3h4g5.tmp.progress.png", run_copy / "checkpoints" / ".ab_12cd3.tmp.latest.pt"]
    mine = run_copy / ".k2j3h4g5.tmp.notes.txt"  # not a run's output: stays
    for path in [*made, mine]:
        path.write_bytes(b"half")
    caplog.set_level(logging.INFO, logger="gsema_fast")
    assert run_cli(caplog, *train_args(phantoms, run_copy, "train.epochs=3"), "--resume") == (0, [])
    assert "removed 2 temporary file(s) that an interrupted write left" in caplog.text
    assert not any(p.exists() for p in made) and mine.exists()
    made[0].write_bytes(b"half")
    assert run_cli(caplog, *train_args(phantoms, run_copy), "--overwrite") == (0, [])
    assert not made[0].exists() and mine.exists()


def test_a_patch_larger_than_the_volumes_is_said(phantoms, caplog):
    from gsema_fast.config import DataConfig
    from gsema_fast.data import build_loaders

    caplog.set_level(logging.WARNING, logger="gsema_fast")
    build_loaders(phantoms, DataConfig(patch_size=(48, 16, 16), batch_size=1, val_per_domain=1), steps_per_epoch=1)
    assert re.search(r"data\.patch_size \[48, 16, 16\] is larger than 3 of the 3 training volumes along some axis "
                     r"\(smallest grid \[\d+, \d+, \d+\] after preprocessing, e\.g\. case A_00\d\): they are padded up "
                     r"to the patch", caplog.text)  # fmt: skip
    caplog.clear()
    build_loaders(phantoms, DataConfig(patch_size=16, batch_size=1, val_per_domain=1), steps_per_epoch=1)
    assert "is larger than" not in caplog.text


def test_bench_step_checks_its_output_before_it_runs(tmp_path, caplog, monkeypatch):
    import gsema_fast.training.benchstep

    ran = []
    monkeypatch.setattr(gsema_fast.training.benchstep, "bench_step", lambda *args, **kwargs: ran.append(1) or {})
    (tmp_path / "a-file").write_text("mine")
    for out, pattern in (
        (tmp_path, rf"^--out {re.escape(str(tmp_path))} is a folder; expected a file$"),
        (tmp_path / "a-file" / "x.json", rf"^cannot write {re.escape(str(tmp_path / 'a-file'))}: it is a file, not a"),
    ):
        rc, errors = run_cli(caplog, "bench-step", "--no-loader", "--out", out)
        assert rc == 2
        one_line(errors, pattern)
    assert not ran and (tmp_path / "a-file").read_text() == "mine"


def test_a_folder_where_a_file_is_expected_is_named_so(phantoms, tmp_path, caplog):
    (tmp_path / "folder").mkdir()
    folder = tmp_path / "folder"
    rc, errors = run_cli(caplog, "evaluate", "--checkpoint", folder)
    assert rc == 2
    one_line(errors, rf"^checkpoint {re.escape(str(folder))} is a folder; expected a file$")
    rc, errors = run_cli(caplog, *train_args(phantoms, tmp_path / "run"), "--config", folder)
    assert rc == 2
    one_line(errors, rf"^config file {re.escape(str(folder))} is a folder; expected a file$")
    rc, errors = run_cli(caplog, *train_args(phantoms, tmp_path / "run", f"data.manifest={folder}"))
    assert rc == 2
    one_line(errors, rf"{re.escape(str(folder))} is a folder; expected a file$")


def test_a_plain_pickle_is_named_so(tmp_path, caplog):
    import pickle

    (tmp_path / "weights.pkl").write_bytes(pickle.dumps({"teacher": {"w": [1.0]}}))
    rc, errors = run_cli(caplog, "evaluate", "--checkpoint", tmp_path / "weights.pkl")
    assert rc == 2
    one_line(errors, r"^checkpoint .*weights\.pkl: cannot be read as a torch checkpoint \(it is a plain pickle, not a "
                     r"file written by torch\.save\)$")  # fmt: skip


# ------------------------------------------------------------------------------------------------ signals, processes


def error_records(stderr: str) -> list[str]:
    """Every ERROR line, of any process and rank."""
    return [line for line in stderr.splitlines() if " ERROR " in line]


def wait_for_checkpoint(job: subprocess.Popen, run: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints" / "latest.pt").is_file() and job.poll() is None:
        assert time.monotonic() < deadline, f"no checkpoint after {timeout} s"
        time.sleep(0.2)
    assert job.poll() is None, job.stderr.read()


INTERRUPTED = r"interrupted at step (\d+); resume with --resume \(from step (\d+), .*latest\.pt\)$"


@pytest.mark.slow
def test_sigterm_ends_a_training_as_ctrl_c_does(phantoms, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "gsema_fast", *train_args(phantoms, run, "train.epochs=1000")]
    job = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
    try:
        wait_for_checkpoint(job, run)
        job.send_signal(signal.SIGTERM)
        stderr = job.communicate(timeout=120)[1]
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130, stderr
    stopped, saved = map(int, re.search(INTERRUPTED, one_line(error_lines(stderr), "^" + INTERRUPTED)).groups())
    assert "Traceback" not in stderr and saved <= stopped
    assert torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["step"] == saved
    assert not leftovers(run) and not (run / ".lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_nproc_stops_on_ctrl_c_or_sigterm_as_one_process_does(phantoms, tmp_path, sig):
    """Ctrl-C (SIGINT to the launcher, as a terminal sends it) or SIGTERM: both ranks stop after the same whole step;
    one line, exit code 130, the checkpoint whole, with both ranks' random streams."""
    run = tmp_path / "run"
    sets = train_args(phantoms, run, "train.epochs=1000", "data.batch_size=1", "train.device=cpu")
    env = {**ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    job = subprocess.Popen(
        [sys.executable, "-m", "gsema_fast", *sets, "--nproc", "2"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        wait_for_checkpoint(job, run)
        job.send_signal(sig)
        stderr = job.communicate(timeout=180)[1]
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130, stderr
    (line,) = error_records(stderr)
    stopped, saved = map(int, re.search(INTERRUPTED, line).groups())
    assert re.search(r"ERROR gsema_fast: " + INTERRUPTED, line) and saved <= stopped
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == saved and len(state["ranks"]) == 2
    assert not leftovers(run) and not (run / ".lock").exists()


@pytest.mark.slow
def test_nproc_a_bad_case_is_one_line_and_exit_2(tmp_path):
    """A bad case met by one rank while the other waits for it in a collective: the bad case's line alone, exit 2,
    no traceback of the rank that lost its peer, nothing of torchrun's."""
    root = bad_dataset(tmp_path / "data", "label 7")
    env = {**ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = [*bad_data_args(root, tmp_path / "run"), "--set", "train.device=cpu", "--set", "data.batch_size=1"]
    job = subprocess.run(
        [sys.executable, "-m", "gsema_fast", *args, "--nproc", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert job.returncode == 2, job.stderr[-3000:]
    (line,) = error_records(job.stderr)
    assert re.search(r"ERROR gsema_fast: " + BAD_DATA["label 7"], line), line
    for noise in ("Traceback", "Connection closed", "ChildFailedError", "Root Cause", "SIGTERM"):
        assert noise not in job.stderr, job.stderr[-3000:]
