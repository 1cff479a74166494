"""What an ablation or a λ tuning is asked to do, checked before optuna or torch is imported: a bad
flag, file or setting is refused in a fraction of a second, with nothing written."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from flowdiag.ablation.grid import Grid
from flowdiag.ablation.storage_url import check_storage_url
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import RunConfig, placement_fields, validate_config
from flowdiag.train.data_files import check_source


@dataclass(frozen=True)
class AblationSpec:
    grid: Grid
    out: Path
    storage_url: str
    study_name: str
    workers: int = 1
    nproc_per_cell: int = 1  # > 1: each cell is a data-parallel job of that many ranks


@dataclass(frozen=True)
class TuneSpec:
    config: RunConfig  # everything but λ
    lam_min: float
    lam_max: float
    n_trials: int
    out: Path
    storage_url: str
    study_name: str
    timeout: float | None = None
    sampler_seed: int = 0
    startup_trials: int = 4
    seeds: tuple[int, ...] = ()  # each trial's λ is trained on every one; () = the config's seed

    @property
    def trial_seeds(self) -> tuple[int, ...]:
        """The seeds each trial trains its λ on."""
        return self.seeds or (self.config.train.seed,)

    def fixed_json(self) -> str:
        """What defines the study: the config but λ, the seed and the placement settings; λ's range;
        the seeds (a trial's objective is their mean: other seeds, another objective)."""
        config = self.config.to_dict()
        config["train"].pop("lam")
        config["train"].pop("seed")
        for section, name in placement_fields():
            config[section].pop(name)
        fixed = {"config": config, "lam_range": [self.lam_min, self.lam_max], "seeds": list(self.trial_seeds)}
        return json.dumps(fixed, sort_keys=True)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1,2`: distinct whole numbers ≥ 0, in the order given."""
    try:
        seeds = tuple(int(item) for item in text.split(","))
    except ValueError:
        seeds = ()
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds {text!r}: pass whole numbers ≥ 0 separated by commas, e.g. --seeds 0,1,2")
    check_seeds(seeds)
    return seeds


def check_seeds(seeds: tuple[int, ...]) -> None:
    """No seed twice: a trial would train the same run twice and count it twice in its mean."""
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise UserError(f"--seeds: seed {repeated[0]} is given twice; each seed is one run of every λ")


def check_out(out: Path) -> None:
    """An --out that exists must be a folder (it is created only once everything else is checked)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot create --out {out} (it is a file); choose another folder")


def check_ablation(spec: AblationSpec, storage_given: bool) -> None:
    """Everything about an ablation that needs neither torch nor optuna: every cell's settings, the
    ranks per cell, the data's files, the output folder and a given storage URL. The device comes later."""
    if spec.nproc_per_cell < 1:
        raise UserError(f"--nproc-per-cell {spec.nproc_per_cell}: pass a positive integer, e.g. 2")
    configs = [spec.grid.config_for(cell) for cell in spec.grid.cells]
    for config in configs:
        validate_config(config)
    for data in {config.data for config in configs}:
        check_source(data)  # a missing --data-root fails here, not after torch has loaded
    check_out(spec.out)
    if storage_given:
        check_storage_url(spec.storage_url)


def check_tuning(spec: TuneSpec, storage_given: bool) -> None:
    """The same for `tune-lambda`: λ's range, the trial budget, the settings, folder and URL."""
    if not (0 < spec.lam_min < spec.lam_max) or not math.isfinite(spec.lam_max):
        raise UserError(f"--lam-min/--lam-max: need 0 < min < max, got {spec.lam_min:g}, {spec.lam_max:g}")
    if spec.n_trials < 1:
        raise UserError(f"--n-trials must be a positive integer, got {spec.n_trials}")
    if spec.timeout is not None and spec.timeout <= 0:
        raise UserError(f"--timeout must be positive seconds, got {spec.timeout:g}")
    check_seeds(spec.trial_seeds)
    for seed in spec.trial_seeds:
        validate_config(replace(spec.config, train=replace(spec.config.train, seed=seed)))
    check_source(spec.config.data)
    check_out(spec.out)
    if storage_given:
        check_storage_url(spec.storage_url)
