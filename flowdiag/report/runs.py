"""Finding run files and reading the few settings the report groups them by.

Everything here is pure apart from `collect_runs`, which only globs and calls `read_run`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flowdiag.record.store import RunRecord, is_run_file, read_run
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE
from flowdiag.settings.config import DataConfig, ModelConfig, TrainConfig


def _visible(path: Path, root: Path) -> bool:
    # The ablation runner moves a killed attempt's folder to .stale/: it must stay out of the report.
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_run_files(folder: Path) -> list[Path]:
    """Every run.h5 below `folder` (hidden folders skipped), sorted; any flowdiag .h5 if none is named so."""
    found = sorted(p for p in folder.rglob(RUN_FILE) if _visible(p, folder))
    if not found:
        found = sorted(p for p in folder.rglob("*.h5") if _visible(p, folder) and is_run_file(p))
    return found


def collect_runs(path: Path) -> list[RunRecord]:
    """The runs behind PATH: a run.h5 file, a run folder, or an ablation / tune-lambda output folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path} does not exist: give a run folder, a run.h5 file or an ablation output folder"
        )
    if path.is_file():
        return [read_run(path)]  # read_run names a corrupt or foreign file itself
    files = find_run_files(path)
    if not files:
        raise UserError(
            f"no {RUN_FILE} found under {path}: give a run folder, a run.h5 file or an ablation output folder"
        )
    return [read_run(f) for f in files]


class CellKey(NamedTuple):
    """One cell of an M × λ × batch-size grid; its runs differ only by seed."""

    init_batches: int
    lam: float
    batch_size: int

    def label(self) -> str:
        return f"M={self.init_batches} λ={self.lam:g} b={self.batch_size}"


class RunSettings(NamedTuple):
    """What an ablation varies: M, λ, batch size and seed."""

    init_batches: int
    lam: float
    batch_size: int
    seed: int

    @property
    def cell(self) -> CellKey:
        return CellKey(self.init_batches, self.lam, self.batch_size)


def config_section(run: RunRecord, name: str) -> dict[str, Any]:
    section = run.config.get(name, {})
    return section if isinstance(section, dict) else {}


def run_settings(run: RunRecord) -> RunSettings:
    # Defaults from the config dataclasses, so a file from an older flowdiag still groups sensibly.
    train = config_section(run, "train")
    return RunSettings(
        init_batches=int(train.get("init_batches", TrainConfig.init_batches)),
        lam=float(train.get("lam", TrainConfig.lam)),
        batch_size=int(train.get("batch_size", TrainConfig.batch_size)),
        seed=int(train.get("seed", TrainConfig.seed)),
    )


def actnorm_eps(run: RunRecord) -> float:
    return float(config_section(run, "model").get("actnorm_eps", ModelConfig.actnorm_eps))


def recon_threshold(run: RunRecord) -> float:
    """A quarter of a quantization bin, 0.25 / 2^n_bits: a reconstruction off by more than this is no
    longer the image it came from (about 1e-3 at 8 bits)."""
    return 0.25 / 2 ** int(config_section(run, "data").get("n_bits", DataConfig.n_bits))


def actnorm_ceiling(run: RunRecord) -> tuple[float, str]:
    """The scale an ActNorm gets from a channel that saw one value, and how to write it."""
    eps = actnorm_eps(run)
    if eps <= 0:
        return math.inf, "inf"
    if config_section(run, "model").get("actnorm_init", ModelConfig.actnorm_init) == "glow":
        return 1.0 / eps, "1/eps"
    return 1.0 / math.sqrt(eps), "1/sqrt(eps)"


def layer_pixels(run: RunRecord, column: int) -> int | None:
    """h·w at a layer as the run file stores it; None where it does not say (format 1, or unseen)."""
    pixels = int(run.layer_pixels[column])
    return pixels if pixels > 0 else None


def run_label(run: RunRecord) -> str:
    s = run_settings(run)
    return f"M={s.init_batches} λ={s.lam:g} b={s.batch_size} seed={s.seed}"


def run_labels(runs: list[RunRecord]) -> list[str]:
    """One label per run; runs with equal settings get their folder name appended so none collide."""
    labels = [run_label(r) for r in runs]
    repeated = {label for label in labels if labels.count(label) > 1}
    return [
        f"{label} ({run.path.parent.name})" if label in repeated else label
        for label, run in zip(labels, runs, strict=True)
    ]


def is_diverged(run: RunRecord) -> bool:
    return run.status == "diverged" or run.nan_onset_step >= 0


def onset_step(run: RunRecord) -> int:
    """The NaN onset step; a run marked diverged without one diverged at its last recorded step."""
    if run.nan_onset_step >= 0:
        return run.nan_onset_step
    if run.status == "diverged" and len(run.step):
        return int(run.step[-1])
    return -1


def best_eval_bpd(run: RunRecord) -> float:
    """Best (lowest) held-out bpd; NaN when the run has no finite evaluation."""
    finite = run.eval_bpd[np.isfinite(run.eval_bpd)]
    return float(finite.min()) if finite.size else math.nan


def final_bpd(run: RunRecord) -> float:
    return float(run.bpd[-1]) if len(run.bpd) else math.nan


def has_layer_records(run: RunRecord) -> bool:
    """False for a run trained with diagnostics off: its per-layer columns are NaN and never flagged."""
    if not run.max_abs.size:
        return False
    return bool(np.isfinite(run.max_abs).any() or run.nonfinite.any())


def row_at_step(run: RunRecord, step: int) -> int | None:
    """Row index of `step` (steps are 1-based); None when the run never recorded it."""
    rows = np.flatnonzero(run.step == step)
    return int(rows[-1]) if rows.size else None
