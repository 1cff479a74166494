"""Finding run files, and the few settings and facts of a run's head that the report groups by.

Everything here is pure apart from `find_runs` and `collect_runs`, which glob (and read).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flowdiag.record.store import RunHead, RunRecord, is_run_file, read_run
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import RUN_FILE
from flowdiag.settings.config import ModelConfig


def _visible(path: Path, root: Path) -> bool:
    # The ablation runner moves a killed attempt's folder to .stale/: it must stay out of the report.
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_run_files(folder: Path) -> list[Path]:
    """Every run.h5 below `folder` (hidden folders skipped), sorted; any flowdiag .h5 if none is named so."""
    found = sorted(p for p in folder.rglob(RUN_FILE) if _visible(p, folder))
    if not found:
        found = sorted(p for p in folder.rglob("*.h5") if _visible(p, folder) and is_run_file(p))
    return found


def find_runs(path: Path) -> list[Path]:
    """The run files behind PATH (a run.h5 file, a run folder, or an ablation / tune-lambda output
    folder), unread: a report reads them one at a time."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path} does not exist: give a run folder, a run.h5 file or an ablation output folder"
        )
    if path.is_file():
        return [path]  # reading it names a corrupt or foreign file itself
    files = find_run_files(path)
    if not files:
        raise UserError(
            f"no {RUN_FILE} found under {path}: give a run folder, a run.h5 file or an ablation output folder"
        )
    return files


def collect_runs(path: Path) -> list[RunRecord]:
    """The runs behind PATH read whole: for short runs and tests (`find_runs` for long ones)."""
    return [read_run(f) for f in find_runs(path)]


NOT_GIVEN = "not given"  # a setting the run's config does not hold: never a default in its place


def given(value: float | None, name: str, spell: str = "{}") -> str:
    """`name=value`, or `name not given`."""
    return f"{name} {NOT_GIVEN}" if value is None else f"{name}={spell.format(value)}"


class CellKey(NamedTuple):
    """One cell of an M × λ × batch-size grid; its runs differ only by seed. None: not given."""

    init_batches: int | None
    lam: float | None
    batch_size: int | None

    def label(self) -> str:
        return " ".join(
            (given(self.init_batches, "M"), given(self.lam, "λ", "{:g}"), given(self.batch_size, "b"))
        )

    def order(self) -> tuple[tuple[bool, float], ...]:
        """Sorting key: batch size, then M, then λ; settings not given last."""
        return tuple((v is None, v or 0) for v in (self.batch_size, self.init_batches, self.lam))


class RunSettings(NamedTuple):
    """What an ablation varies: M, λ, batch size and seed, as the run's config holds them (None: not
    given, as in a Monitor run recorded without a config)."""

    init_batches: int | None
    lam: float | None
    batch_size: int | None
    seed: int | None

    @property
    def cell(self) -> CellKey:
        return CellKey(self.init_batches, self.lam, self.batch_size)


def config_section(head: RunHead, name: str) -> dict[str, Any]:
    section = head.config.get(name, {})
    return section if isinstance(section, dict) else {}


def _setting(head: RunHead, section: str, key: str, kind: type) -> Any:
    value = config_section(head, section).get(key)
    return None if value is None else kind(value)


def run_settings(head: RunHead) -> RunSettings:
    """M, λ, batch size and seed from the run's config; a key it does not hold is None, never a default."""
    return RunSettings(
        init_batches=_setting(head, "train", "init_batches", int),
        lam=_setting(head, "train", "lam", float),
        batch_size=_setting(head, "train", "batch_size", int),
        seed=_setting(head, "train", "seed", int),
    )


def precision(head: RunHead) -> str | None:
    """fp32 | bf16 | fp16 as the config says; None when it does not."""
    return _setting(head, "train", "precision", str)


def recon_threshold(head: RunHead) -> float:
    """A quarter of a quantization bin, 0.25 / 2^n_bits: a reconstruction off by more than this is no
    longer the image it came from (about 1e-3 at 8 bits). NaN when the config does not give n_bits:
    then only a non-finite reconstruction counts as failed."""
    n_bits = _setting(head, "data", "n_bits", int)
    return math.nan if n_bits is None else 0.25 / 2**n_bits


def actnorm_ceiling(head: RunHead) -> tuple[float, str]:
    """The scale an ActNorm gets from a channel that saw one value, and how to write it; (NaN, "")
    when the config does not give the eps."""
    eps = _setting(head, "model", "actnorm_eps", float)
    if eps is None:
        return math.nan, ""
    if eps <= 0:
        return math.inf, "inf"
    if config_section(head, "model").get("actnorm_init", ModelConfig.actnorm_init) == "glow":
        return 1.0 / eps, "1/eps"
    return 1.0 / math.sqrt(eps), "1/sqrt(eps)"


def layer_pixels(head: RunHead, column: int) -> int | None:
    """h·w at a layer as the run file stores it; None where it does not say (format 1, or unseen)."""
    pixels = int(head.layer_pixels[column])
    return pixels if pixels > 0 else None


def run_label(head: RunHead) -> str:
    s = run_settings(head)
    if s == RunSettings(None, None, None, None):
        return f"settings {NOT_GIVEN}"
    return f"{s.cell.label()} {given(s.seed, 'seed')}"


def run_labels(heads: list[RunHead]) -> list[str]:
    """One label per run; runs with equal settings get their folder name appended so none collide."""
    labels = [run_label(h) for h in heads]
    repeated = {label for label in labels if labels.count(label) > 1}
    return [
        f"{label} ({head.path.parent.name})" if label in repeated else label
        for label, head in zip(labels, heads, strict=True)
    ]


def is_diverged(head: RunHead) -> bool:
    return head.status == "diverged" or head.nan_onset_step >= 0


def onset_step(head: RunHead) -> int:
    """The NaN onset step; a run marked diverged without one diverged at its last recorded step."""
    if head.nan_onset_step >= 0:
        return head.nan_onset_step
    if head.status == "diverged" and head.n_rows:
        return head.last_step
    return -1


def best_eval_bpd(eval_bpd: np.ndarray) -> float:
    """Best (lowest) held-out bpd; NaN when the run has no finite evaluation."""
    finite = eval_bpd[np.isfinite(eval_bpd)]
    return float(finite.min()) if finite.size else math.nan
