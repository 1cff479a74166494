"""A write that fails loses nothing: one line naming the path and the fix, no temporary file left,
the previous file intact, and a run that `--resume` continues to the records an uninterrupted run
writes. Failures are injected (OSError(ENOSPC) where the file system would raise it) and, where
this process may mount one, met on a real full file system."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from flowdiag.record.store import read_run
from flowdiag.runtime.atomic import write_atomically
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import CHECKPOINT_FILE, RUN_FILE
from flowdiag.settings.config import ModelConfig, RunConfig, TrainConfig
from flowdiag.train import checkpoint as checkpoint_module
from flowdiag.train.checkpoint import save_atomically
from flowdiag.train.trainer import train

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
SMALL = ModelConfig(n_levels=3, n_steps=1, hidden=8)


def _config(**train_settings: Any) -> RunConfig:
    settings = dict(batch_size=8, init_batches=2, steps=8, eval_every=4, eval_batches=1, flush_every=2)
    settings.update(train_settings)
    return RunConfig(model=SMALL, train=TrainConfig(**settings))


def _leftovers(folder: Path) -> list[str]:
    """Anything in a run folder that is not a run's own file: temporary or hidden files."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# --- one file put in place -------------------------------------------------------------------------


def test_a_saved_file_is_synced_before_and_after_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    def replace(source: Any, target: Any) -> None:
        synced.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "checkpoint.pt"
    save_atomically({"w": torch.arange(3)}, target)
    # The content reaches the disk under its temporary name, then the rename, then the folder's entry.
    assert synced == [str(target) + ".tmp", "rename", str(tmp_path)]
    assert torch.equal(torch.load(target)["w"], torch.arange(3))


def test_a_full_disk_keeps_the_previous_checkpoint_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "checkpoint.pt"
    save_atomically({"step": 1}, target)
    before = target.read_bytes()

    def half_written(payload: Any, handle: Any) -> None:
        handle.write(b"PK half a zip")
        # What torch's zip writer raises when the file's write fails: its own error, the OSError behind.
        try:
            raise ENOSPC
        except OSError as error:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from error

    monkeypatch.setattr(checkpoint_module.torch, "save", half_written)
    with pytest.raises(UserError) as info:
        save_atomically({"step": 2}, target)
    message = str(info.value)
    assert str(target) in message and "No space left on device" in message and "--resume" in message
    assert "\n" not in message
    assert target.read_bytes() == before and _leftovers(tmp_path) == []


def test_an_error_that_is_not_the_file_systems_is_not_disguised(tmp_path: Path) -> None:
    def broken(handle: Any) -> None:
        handle.write(b"partial")
        raise ValueError("a bug in the caller")

    with pytest.raises(ValueError, match="a bug in the caller"):
        write_atomically(tmp_path / "x.bin", broken)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_went_away_names_the_folder_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"cannot write .*gone/x\.bin .*folder exists and is writable"):
        write_atomically(tmp_path / "gone" / "x.bin", lambda handle: handle.write(b"x"))


# --- a training run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The uninterrupted run every failed-and-resumed run must reproduce."""
    return read_run(train(_config(checkpoint_every=4), tmp_path_factory.mktemp("straight") / "run").h5_path)


def _assert_resumes_to(folder: Path, straight: Any) -> None:
    result = train(_config(checkpoint_every=4), folder, resume=True)
    assert result.status == "completed" and _leftovers(folder) == []
    record = read_run(folder / RUN_FILE)
    assert record.status == "completed" and record.step.tolist() == list(range(1, 9))
    np.testing.assert_allclose(record.loss, straight.loss, rtol=1e-5)
    np.testing.assert_allclose(record.eval_bpd, straight.eval_bpd, rtol=1e-5)


def _full_disk_for_run_files(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """Every opening of a run file for writing fails as a full disk does, from the `after`-th on."""
    real = h5py.File
    opened = {"n": 0}

    def file(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> h5py.File:
        if mode == "r+":
            opened["n"] += 1
            if opened["n"] > after:
                raise OSError(
                    errno.ENOSPC, f"Unable to synchronously open file ({os.strerror(errno.ENOSPC)})"
                )
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", file)


def test_a_run_file_that_cannot_be_written_stops_the_run_and_resume_continues_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight: Any
) -> None:
    folder = tmp_path / "run"
    with monkeypatch.context() as patch:
        _full_disk_for_run_files(patch, after=6)  # past the init and the first rows: mid-training
        with pytest.raises(UserError) as info:
            train(_config(checkpoint_every=4), folder)
    assert str(folder / RUN_FILE) in str(info.value) and "\n" not in str(info.value)
    assert _leftovers(folder) == []
    record = read_run(folder / RUN_FILE)  # what was counted reads back, in order
    assert 0 < len(record.step) < 8 and record.step.tolist() == list(range(1, len(record.step) + 1))
    _assert_resumes_to(folder, straight)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_resume_continues_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight: Any
) -> None:
    folder, real_save = tmp_path / "run", torch.save

    def save(payload: Any, handle: Any) -> None:
        if payload["state"]["step"] == 8:  # the last checkpoint: the run's rows are all written
            handle.write(b"PK")
            raise ENOSPC
        real_save(payload, handle)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.torch, "save", save)
        with pytest.raises(UserError, match=r"cannot write .*checkpoint\.pt \(No space left on device\)"):
            train(_config(checkpoint_every=4), folder)
    assert _leftovers(folder) == []
    assert torch.load(folder / CHECKPOINT_FILE)["state"]["step"] == 4  # the previous one, whole
    assert read_run(folder / RUN_FILE).status == "failed"
    _assert_resumes_to(folder, straight)


def test_samples_that_cannot_be_written_leave_a_finished_run_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight: Any
) -> None:
    from PIL import Image

    folder = tmp_path / "run"

    def save(self: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"\x89PNG")
        raise ENOSPC

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", save)
        with pytest.raises(UserError, match=r"cannot write .*samples\.png"):
            train(_config(checkpoint_every=4), folder)
    assert _leftovers(folder) == [] and not (folder / "samples.png").exists()
    assert torch.load(folder / CHECKPOINT_FILE)["state"]["step"] == 8  # saved before the samples
    _assert_resumes_to(folder, straight)
    assert (folder / "samples.png").exists()


def test_a_fresh_run_that_could_save_nothing_starts_again_with_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight: Any
) -> None:
    """The first checkpoint comes before the run file: a disk full from the start leaves nothing, and
    the command the message names (`--resume`) starts the run."""
    folder = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.torch, "save", lambda payload, handle: (_ for _ in ()).throw(ENOSPC))
        with pytest.raises(UserError, match="--resume"):
            train(_config(checkpoint_every=4), folder)
    assert list(folder.iterdir()) == []
    _assert_resumes_to(folder, straight)


# --- a real full file system ----------------------------------------------------------------------

TINY = [
    "--levels",
    "3",
    "--steps-per-level",
    "1",
    "--hidden",
    "8",
    "--batch-size",
    "4",
    "--init-batches",
    "2",
]


def _flowdiag(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowdiag", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own, resized by the test (root only; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _resize(disk: Path, kilobytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={kilobytes}k", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_during_train_is_one_line_and_resume_finishes_the_run(
    tmp_path: Path, small_disk: Path
) -> None:
    command = [*TINY, "--steps", "60", "--eval-every", "20", "--checkpoint-every", "20"]
    reference = _flowdiag("train", *command, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "reference").iterdir()}
    # Room for the whole run file beside one checkpoint, not for a second checkpoint beside them: the
    # run's rows all fit and a checkpoint's replacement does not.
    room = sizes[RUN_FILE] + sizes[CHECKPOINT_FILE] + sizes[CHECKPOINT_FILE] // 2
    _resize(small_disk, room // 1024)
    run = small_disk / "run"
    failed = _flowdiag("train", *command, "--out", str(run))
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(lines) == 1, failed.stderr  # no traceback, no segfault (139)
    assert "cannot write" in lines[0] and "No space left on device" in lines[0] and "--resume" in lines[0]
    assert _leftovers(run) == []
    written = read_run(run / RUN_FILE)
    assert written.step.tolist() == list(range(1, len(written.step) + 1))
    _resize(small_disk, 4096)  # space freed
    resumed = _flowdiag("train", *command, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    again, expected = read_run(run / RUN_FILE), read_run(tmp_path / "reference" / RUN_FILE)
    assert again.status == "completed" and again.step.tolist() == list(range(1, 61))
    np.testing.assert_allclose(again.loss, expected.loss, rtol=1e-5)
    assert _leftovers(run) == []


@pytest.mark.slow
def test_a_run_file_that_fills_the_disk_ends_in_one_line_not_a_crash(
    tmp_path: Path, small_disk: Path
) -> None:
    """HDF5 keeps a file open when closing it fails (closing must write), and its own shutdown then
    crashed the interpreter (exit 139) after a three-deep traceback: the process now ends with the
    one line and exit 2, and what the file counted reads back."""
    command = [*TINY, "--steps", "200", "--eval-every", "0"]
    reference = _flowdiag("train", *command, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "reference").iterdir()}
    # The first checkpoint (before any optimizer state: about two thirds of the last) fits, and the run
    # file with the space its first flush reserves (a chunk of every dataset); its 200 rows do not.
    _resize(small_disk, (sizes[CHECKPOINT_FILE] + sizes[RUN_FILE] * 6 // 7) // 1024)
    run = small_disk / "run"
    failed = _flowdiag("train", *command, "--out", str(run))
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(lines) == 1, (failed.returncode, failed.stderr[-2000:])
    assert str(run / RUN_FILE) in lines[0]
    assert _leftovers(run) == []
    written = read_run(run / RUN_FILE)
    assert 0 < len(written.step) < 200 and written.step.tolist() == list(range(1, len(written.step) + 1))
