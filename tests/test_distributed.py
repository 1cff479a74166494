"""Data-parallel training on torch.distributed (gloo, 2 CPU processes): Algorithm 1 pooled across
ranks, the record reduced across ranks, and a dead rank ending the run as failed, not a hang."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdiag.glow.model import Glow, dequantize
from flowdiag.record.monitor import Monitor
from flowdiag.record.store import read_run
from flowdiag.runtime import distributed
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE
from flowdiag.settings.config import RunConfig, TrainConfig
from flowdiag.stabilize.cumulative_init import cumulative_init
from flowdiag.train.trainer import train

from .flows import tiny_glow, tiny_images

pytestmark = pytest.mark.slow
M, BATCH = 3, 2


def _minibatches(rank: int) -> list[torch.Tensor]:
    images = tiny_images(2 * M * BATCH, size=8, seed=5)
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(7))  # the same in every process
    images = dequantize(images, 8, noise).double()
    mine = images[rank * M * BATCH : (rank + 1) * M * BATCH]
    return list(mine.split(BATCH))


def _init_rank(out: Path) -> None:
    ranks = distributed.from_environment()
    distributed.start(ranks, torch.device("cpu"), 30.0)
    torch.manual_seed(0)
    model = tiny_glow(init=False, image_size=8, n_levels=3)
    cumulative_init(model, _minibatches(ranks.rank), pool=distributed.pool)
    torch.save(
        {name: (n.log_scale.detach(), n.tau.detach()) for name, n in model.actnorms()},
        out / f"rank{ranks.rank}.pt",
    )
    distributed.stop()


def test_cross_rank_init_is_the_init_on_the_union(tmp_path: Path) -> None:
    assert distributed.launch(_init_rank, 2, tmp_path) == [0, 0]
    torch.manual_seed(0)
    single = tiny_glow(init=False, image_size=8, n_levels=3)
    cumulative_init(single, _minibatches(0) + _minibatches(1))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, norm in single.actnorms():
            log_scale, tau = got[name]
            assert torch.allclose(log_scale, norm.log_scale, rtol=1e-9, atol=1e-9), (rank, name)
            assert torch.allclose(tau, norm.tau, rtol=1e-9, atol=1e-9), (rank, name)


def _train_rank(config_json: str, out: Path) -> None:
    train(RunConfig.from_json(config_json), out)


def test_main_job_at_batch_1_per_rank_on_2_ranks(tmp_path: Path) -> None:
    config = RunConfig(
        train=TrainConfig(
            batch_size=1, init_batches=128, lam=1e-3, lr=1e-5, steps=20, eval_every=10, eval_batches=1
        )
    )
    assert distributed.launch(_train_rank, 2, config.to_json(), tmp_path / "run") == [0, 0]
    record = read_run(tmp_path / "run" / RUN_FILE)
    assert record.status == "completed" and record.step.tolist() == list(range(1, 21))
    assert record.init is not None
    expected = 128 * 1 * 2 * np.asarray(record.init["pixels"])  # M x batch x ranks x h·w
    np.testing.assert_array_equal(record.init["n_values"], expected)
    assert np.isfinite(record.max_abs).all() and (tmp_path / "run" / "checkpoint.pt").exists()
    resumed = replace(config, train=replace(config.train, steps=24))
    assert distributed.launch(_resume_rank, 2, resumed.to_json(), tmp_path / "run") == [0, 0]
    again = read_run(tmp_path / "run" / RUN_FILE)
    assert again.status == "completed" and again.step.tolist() == list(range(1, 25))


def _resume_rank(config_json: str, out: Path) -> None:
    train(RunConfig.from_json(config_json), out, resume=True)


def _logdet_rank(out: Path) -> None:
    ranks = distributed.from_environment()
    distributed.start(ranks, torch.device("cpu"), 30.0)
    torch.manual_seed(0)
    model = tiny_glow(image_size=8, n_levels=3)
    x = _minibatches(ranks.rank)[0]
    with Monitor(model, out, adapter="flowdiag", ranks=ranks) as monitor:
        _, logdet = model(x)
        monitor.step(logdet.mean())
    means = distributed.gather(float(logdet.detach().mean()))
    if ranks.is_main:
        torch.save(
            {"recorded": float(monitor.last.logdet.sum()), "model": float(np.mean(means))}, out / "sums.pt"
        )
    distributed.stop()


def test_recorded_layer_logdets_sum_to_the_models_total(tmp_path: Path) -> None:
    assert distributed.launch(_logdet_rank, 2, tmp_path) == [0, 0]
    sums = torch.load(tmp_path / "sums.pt")
    assert sums["recorded"] == pytest.approx(sums["model"], rel=1e-5)
    assert len(read_run(tmp_path / RUN_FILE).step) == 1  # rank 0 wrote the one file


def _dying_rank(config_json: str, out: Path, report: Path) -> None:
    ranks = distributed.from_environment()

    def die_at_step_5(model: Glow) -> None:
        calls = {"n": 0}

        def hook(module: torch.nn.Module, inputs: tuple, output: object) -> None:
            calls["n"] += 1 if module.training else 0
            if ranks.rank == 1 and calls["n"] == 5:
                os.kill(os.getpid(), signal.SIGKILL)

        model.levels[0].steps[0].actnorm.register_forward_hook(hook)  # training calls log_prob, not forward

    started = time.monotonic()
    try:
        train(RunConfig.from_json(config_json), out, instrument=die_at_step_5)
    except UserError as error:
        report.write_text(f"{time.monotonic() - started:.1f}\n{error}")


def test_a_killed_rank_fails_the_run_within_the_timeout(tmp_path: Path) -> None:
    config = RunConfig(
        train=TrainConfig(batch_size=4, init_batches=2, steps=2000, eval_every=0, dist_timeout=10.0)
    )
    report = tmp_path / "rank0.txt"
    codes = distributed.launch(_dying_rank, 2, config.to_json(), tmp_path / "run", report)
    assert codes[1] == -signal.SIGKILL
    seconds, message = report.read_text().split("\n", 1)
    assert float(seconds) < 10.0 + 30.0  # the timeout, with room for a loaded machine; never a hang
    assert "another rank stopped answering" in message and "the run ended as failed" in message
    record = read_run(tmp_path / "run" / RUN_FILE)  # the file opens
    assert record.status == "failed" and len(record.step) >= 4


def _failing_rank(config_json: str, out: Path, report: Path) -> None:
    """Rank 0's own computation fails at its 3rd training forward (a bug, not a collective); rank 1
    then waits for it in vain."""
    ranks = distributed.from_environment()

    def fail_on_rank_0(model: Glow) -> None:
        calls = {"n": 0}

        def hook(module: torch.nn.Module, inputs: tuple, output: object) -> None:
            calls["n"] += 1 if module.training else 0
            if ranks.rank == 0 and calls["n"] == 3:
                raise RuntimeError("a bug in rank 0's own forward")

        model.levels[0].steps[0].actnorm.register_forward_hook(hook)

    try:
        train(RunConfig.from_json(config_json), out, instrument=fail_on_rank_0)
    except Exception as error:  # what each rank would show: its type and first line
        (report / f"rank{ranks.rank}.txt").write_text(f"{type(error).__name__}: {error}")


def test_a_ranks_own_error_stays_an_error_and_only_the_waiting_rank_says_lost(tmp_path: Path) -> None:
    config = RunConfig(
        train=TrainConfig(batch_size=4, init_batches=2, steps=50, eval_every=0, dist_timeout=10.0)
    )
    distributed.launch(_failing_rank, 2, config.to_json(), tmp_path / "run", tmp_path)
    own = (tmp_path / "rank0.txt").read_text()
    assert own == "RuntimeError: a bug in rank 0's own forward"  # not relabelled as a lost peer
    waiting = (tmp_path / "rank1.txt").read_text()
    assert waiting.startswith("UserError: rank 1: another rank stopped answering") and "\n" not in waiting
    assert read_run(tmp_path / "run" / RUN_FILE).status == "failed"


def test_only_collective_failures_count_as_a_lost_peer() -> None:
    gloo = "[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:5003"
    assert distributed.lost_peer(RuntimeError(gloo))
    assert distributed.lost_peer(
        torch.distributed.DistBackendError("Watchdog caught collective operation timeout")
    )
    assert distributed.lost_peer(torch.distributed.DistNetworkError("Connection reset by peer"))
    assert not distributed.lost_peer(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not distributed.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (timeout=3)"))
    assert not distributed.lost_peer(torch.distributed.DistBackendError("NCCL error: unhandled cuda error"))


def test_ablate_runs_each_cell_as_a_data_parallel_job(tmp_path: Path) -> None:
    import optuna
    from typer.testing import CliRunner

    from flowdiag.ablation.storage import default_storage_url
    from flowdiag.cli import app

    out = tmp_path / "abl"
    tiny = ["--levels", "3", "--steps-per-level", "1", "--hidden", "8", "--steps", "6", "--eval-every", "3"]
    args = ["ablate", *tiny, "--batch-size", "2", "--init-batches", "4", "--seeds", "0"]
    result = CliRunner().invoke(app, [*args, "--nproc-per-cell", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (trial,) = optuna.load_study(study_name="ablation", storage=default_storage_url(out)).trials
    record = read_run(Path(trial.user_attrs["hdf5_path"]))
    assert record.status == trial.user_attrs["status"] == "completed"
    assert record.init is not None
    np.testing.assert_array_equal(record.init["n_values"], 4 * 2 * 2 * np.asarray(record.init["pixels"]))
    assert sorted(trial.intermediate_values) == [3, 6]  # the learning curve, read back from the file


def _nan_on_rank_1(config_json: str, out: Path) -> None:
    ranks = distributed.from_environment()

    def poison(model: Glow) -> None:
        calls = {"n": 0}

        def hook(module: torch.nn.Module, inputs: tuple, output: tuple) -> tuple | None:
            calls["n"] += 1 if module.training else 0
            if ranks.rank == 1 and calls["n"] == 3:
                return output[0] * float("nan"), output[1]
            return None

        model.get_submodule("levels.1.steps.0.coupling").register_forward_hook(hook)

    train(RunConfig.from_json(config_json), out, instrument=poison)


def test_an_onset_on_one_rank_is_the_runs_and_names_the_rank(tmp_path: Path) -> None:
    config = RunConfig(train=TrainConfig(batch_size=4, init_batches=2, steps=10, eval_every=0))
    assert distributed.launch(_nan_on_rank_1, 2, config.to_json(), tmp_path / "run") == [0, 0]
    record = read_run(tmp_path / "run" / RUN_FILE)  # both ranks stopped at the same step: no hang
    assert (record.status, record.nan_onset_step) == ("diverged", 3)
    assert record.nan_onset_layer == "levels.1.steps.0.coupling" and record.nan_onset_rank == 1
    assert record.step.tolist() == [1, 2, 3]


def _rank_that_fails_on_1(folder: str) -> None:
    rank = distributed.from_environment().rank
    print(f"rank {rank} finished")  # reaches the launcher's output, though the rank skips shutdown
    Path(folder, f"rank{rank}").write_text("finished")
    if rank == 1:
        raise RuntimeError("rank 1 failed")


def test_launch_gives_each_ranks_exit_code_and_keeps_its_output(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert distributed.launch(_rank_that_fails_on_1, 2, str(tmp_path)) == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]
    output = capfd.readouterr()
    assert "rank 0 finished" in output.out and "rank 1 failed" in output.err
