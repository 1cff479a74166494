"""`export`: run files converted, after the fact, into what other tools read.

TensorBoard: one event directory per run, named after the run's folder. Converting the HDF5 file
afterwards keeps the training loop's cost unchanged and works on runs recorded long before. The
`tensorboard` package is an optional extra, imported only inside `export_tensorboard`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flowdiag.record.store import RunRecord
from flowdiag.report.diagnose import diagnose
from flowdiag.report.runs import best_eval_bpd, collect_runs, final_bpd, is_diverged, onset_step
from flowdiag.report.watch import run_name
from flowdiag.report.wording import diagnosis_lines, fmt_step
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import RunConfig

INSTALL_TENSORBOARD = "pip install 'flowdiag[tensorboard]'"
SCALARS = ("loss", "bpd", "penalty", "grad_norm", "lr")
LAYER_SERIES = ("max_abs", "logdet")  # layers/<series>/<layer>
HISTOGRAM_TAG = "layers/log10_max_abs"
# What the HParams view shows as columns: (name there, config section, key). M and λ first, the
# ablation's usual axes. TensorBoard takes its columns from one run's hparams, so every run must
# give the same keys: a None becomes 0 (epochs: "set by steps"), the only optional value here.
HPARAMS = (
    ("M", "train", "init_batches"),
    ("lam", "train", "lam"),
    ("batch_size", "train", "batch_size"),
    ("seed", "train", "seed"),
    ("lr", "train", "lr"),
    ("steps", "train", "steps"),
    ("epochs", "train", "epochs"),
    ("warmup", "train", "warmup"),
    ("grad_clip", "train", "grad_clip"),
    ("early_stop", "train", "early_stop"),
    ("coupling", "model", "coupling"),
    ("affine_scale", "model", "affine_scale"),
    ("conv", "model", "conv"),
    ("levels", "model", "n_levels"),
    ("steps_per_level", "model", "n_steps"),
    ("hidden", "model", "hidden"),
    ("actnorm_eps", "model", "actnorm_eps"),
    ("image_size", "model", "image_size"),
    ("dataset", "data", "dataset"),
    ("n_bits", "data", "n_bits"),
)


class ExportedRun(NamedTuple):
    name: str
    source: Path
    event_dir: Path
    steps: int  # step rows exported
    status: str


# --- what goes in: pure --------------------------------------------------------------------------


def run_hparams(record: RunRecord) -> dict[str, bool | int | float | str]:
    """The run's settings for TensorBoard's HParams view, plus its status (a column to filter on)."""
    try:  # through the dataclasses, so that a file from an older flowdiag gets today's defaults
        config = RunConfig.from_dict(record.config).to_dict()
    except (TypeError, ValueError):  # a newer file's unknown keys: its own values as they are
        config = record.config
    hparams: dict[str, bool | int | float | str] = {}
    for name, section, key in HPARAMS:
        values = config.get(section, {})
        value = values.get(key) if isinstance(values, dict) else None
        if value is None:
            value = 0
        hparams[name] = value if isinstance(value, bool | int | float | str) else str(value)
    hparams["status"] = record.status
    return hparams


def run_outcome(record: RunRecord) -> dict[str, float]:
    """The HParams view's metrics; NaN best bpd when the run has no finite evaluation, onset -1 if none."""
    return {
        "outcome/best_eval_bpd": best_eval_bpd(record),
        "outcome/final_bpd": final_bpd(record),
        "outcome/diverged": float(is_diverged(record)),
        "outcome/onset_step": float(onset_step(record)),
    }


def onset_text(record: RunRecord) -> str:
    if record.nan_onset_step < 0:
        return f"NaN onset: none (status {record.status})"
    layer = record.nan_onset_layer or "(layer not recorded)"
    return f"NaN onset: step {fmt_step(record.nan_onset_step)}, layer {layer}"


def diagnosis_markdown(record: RunRecord) -> str:
    diagnosis = diagnose(record)
    if diagnosis is None:
        return f"no divergence (status {record.status}): no layer's max |output| went past the threshold"
    return "\n".join(f"- {line}" for line in [diagnosis.severity, *diagnosis_lines(diagnosis)])


def event_walltimes(record: RunRecord, source: Path) -> np.ndarray | None:
    """Absolute times for the step rows: the file's last write minus the run's clock at its last row
    (approximate, within a flush). None for a file without a wall clock: TensorBoard then uses now."""
    wall = np.asarray(record.wall_time, dtype=np.float64)
    if not len(wall) or not np.isfinite(wall).all():
        return None
    return source.stat().st_mtime - wall[-1] + wall


def log10_finite(values: np.ndarray) -> np.ndarray:
    """log10 of the finite, positive values: what a histogram can bin."""
    v = np.asarray(values, dtype=np.float64)
    return np.log10(v[np.isfinite(v) & (v > 0)])


# --- writing -------------------------------------------------------------------------------------


class _TensorBoard(NamedTuple):
    summary_writer: Any  # torch.utils.tensorboard.SummaryWriter
    summary: Any  # the Summary protobuf message


def _tensorboard() -> _TensorBoard:
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            f"exporting to TensorBoard needs the tensorboard package: {INSTALL_TENSORBOARD}"
        ) from None
    return _TensorBoard(SummaryWriter, Summary)


def _event_files(folder: Path) -> list[Path]:
    return (
        sorted(p for p in folder.iterdir() if p.is_file() and "tfevents" in p.name) if folder.is_dir() else []
    )


def _targets(path: Path, records: list[RunRecord], out: Path) -> list[Path]:
    root = path if path.is_dir() else path.parent
    dirs: list[Path] = []
    for record in records:
        name, n = run_name(record.path, root), 2
        candidate = out / name
        while candidate in dirs:  # `a/run.h5` and `a.h5` would share a name
            candidate, n = out / f"{name}-{n}", n + 1
        dirs.append(candidate)
    return dirs


def write_events(tb: _TensorBoard, writer: Any, record: RunRecord, walltimes: np.ndarray | None) -> None:
    """One run through a SummaryWriter: scalars, per-layer series, histograms, text and hparams."""
    steps = [int(s) for s in record.step]

    def at(i: int) -> float | None:
        return None if walltimes is None else float(walltimes[i])

    # One event per step carrying every scalar of that step: one event per value (add_scalar) took
    # 35 s for 2,000 steps of 60 layers, this takes 3 s; TensorBoard reads both the same way.
    columns = [(f"train/{name}", getattr(record, name)) for name in SCALARS]
    for series in LAYER_SERIES:
        table = getattr(record, series)
        columns += [(f"layers/{series}/{layer}", table[:, j]) for j, layer in enumerate(record.layer_names)]
    for i, step in enumerate(steps):
        values = [tb.summary.Value(tag=tag, simple_value=float(column[i])) for tag, column in columns]
        writer.file_writer.add_summary(tb.summary(value=values), step, at(i))
    if len(record.eval_step):
        eval_times = None if walltimes is None else np.interp(record.eval_step, record.step, walltimes)
        for i, (step, bpd) in enumerate(zip(record.eval_step, record.eval_bpd, strict=True)):
            wt = None if eval_times is None else float(eval_times[i])
            writer.add_scalar("eval/bpd", float(bpd), int(step), walltime=wt)
    for i, step in enumerate(steps):
        logs = log10_finite(record.max_abs[i])
        if logs.size:
            writer.add_histogram(HISTOGRAM_TAG, logs, step, walltime=at(i))
    text_step = record.nan_onset_step if record.nan_onset_step >= 0 else (steps[-1] if steps else 0)
    writer.add_text("diagnosis", diagnosis_markdown(record), text_step)
    writer.add_text("onset", onset_text(record), text_step)
    # run_name ".": the hparams go into this run's own directory, not a timestamped one below it.
    writer.add_hparams(run_hparams(record), run_outcome(record), run_name=".")


def export_tensorboard(path: Path, out: Path, *, overwrite: bool = False) -> list[ExportedRun]:
    """One TensorBoard event directory per run under `out`; existing events are replaced only with
    `overwrite`. Every check (runs readable, no event directory taken) passes before anything is written."""
    path, out = Path(path), Path(out)
    records = collect_runs(path)
    tb = _tensorboard()
    targets = _targets(path, records, out)
    for target in targets:
        if target.exists() and not target.is_dir():
            raise UserError(f"{target} exists and is not a folder: choose another --tensorboard DIR")
        if _event_files(target) and not overwrite:
            raise UserError(
                f"{target} already holds TensorBoard events: pass --overwrite to replace them, "
                "or choose another --tensorboard DIR"
            )
    exported = []
    for record, target in zip(records, targets, strict=True):
        try:
            for old in _event_files(target):
                old.unlink()
            writer = tb.summary_writer(log_dir=str(target))
            try:
                write_events(tb, writer, record, event_walltimes(record, record.path))
            finally:
                writer.close()
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise UserError(f"cannot write {target} ({reason}): choose another --tensorboard DIR") from None
        name = target.relative_to(out).as_posix()
        exported.append(ExportedRun(name, record.path, target, len(record.step), record.status))
    return exported
