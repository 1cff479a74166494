"""Two costs a user weighs before turning a feature on: the inverse check at every evaluation, and a
data-parallel run against one process at the same global batch."""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from flowdiag.bench.processes import in_fresh_process, sync
from flowdiag.bench.results import DataParallelResult, InverseCost
from flowdiag.bench.steps import open_trainer, step_times
from flowdiag.record.store import read_run
from flowdiag.runtime import distributed
from flowdiag.runtime.files import RUN_FILE
from flowdiag.settings.config import RunConfig
from flowdiag.train.data import ImageData
from flowdiag.train.trainer import train


def _inverse_block(config_json: str, data: ImageData, steps: int, folder: str) -> tuple[float, float]:
    trainer = open_trainer(RunConfig.from_json(config_json), data, "hooks + HDF5", Path(folder))
    step = statistics.median(step_times(trainer, steps))
    checks = []
    for _ in range(5):
        sync(trainer.device)
        began = time.perf_counter()
        trainer.run_inverse_check()  # exactly what an evaluation adds
        sync(trainer.device)
        checks.append(time.perf_counter() - began)
    trainer.monitor.close()
    return step, statistics.median(checks)


def inverse_cost(config: RunConfig, data: ImageData, steps: int, workdir: Path) -> InverseCost:
    """One inverse check (16 samples, one reconstruction, every conv's SVD) against the steps between
    two evaluations at the run's --eval-every."""
    step_s, check_s = in_fresh_process(
        _inverse_block, config.to_json(), data, steps, str(workdir / "inverse")
    )
    return InverseCost(step_s, check_s, config.train.eval_every)


def _single(config_json: str, data: ImageData, folder: str) -> float:
    result = train(RunConfig.from_json(config_json), Path(folder), data=data)
    return float(read_run(result.h5_path).wall_time[-1])


def _rank(config_json: str, folder: str) -> None:
    train(RunConfig.from_json(config_json), Path(folder))


def data_parallel(
    config: RunConfig, data: ImageData, nproc: int, steps: int, workdir: Path
) -> DataParallelResult:
    """`steps` steps at global batch nproc x batch: one process, then nproc ranks (gloo or nccl).
    Wall times are the run files' own clocks, from the first step to the last."""
    per_rank = config.train.batch_size
    base = replace(config.train, steps=steps, eval_every=0, checkpoint_every=0, threads=1)
    single = replace(config, train=replace(base, batch_size=per_rank * nproc))
    single_s = in_fresh_process(_single, single.to_json(), data, str(workdir / "ddp-single"))
    ranks = replace(config, train=replace(base, batch_size=per_rank))
    distributed.launch(_rank, nproc, ranks.to_json(), str(workdir / "ddp-ranks"))
    ranks_s = float(read_run(workdir / "ddp-ranks" / RUN_FILE).wall_time[-1])
    return DataParallelResult(nproc, per_rank * nproc, steps, single_s, ranks_s, torch.cuda.device_count())
