"""`export`: run files converted, after the fact, into what other tools read.

TensorBoard: one event directory per run, named after the run's folder. Converting the HDF5 file
afterwards keeps the training loop's cost unchanged and works on runs recorded long before. Each run is
read twice a block at a time (its digest for the diagnosis, then its rows for the events,
`export_events`), so a run of any length exports in bounded memory. The `tensorboard` package is an
optional extra, imported only inside `export_tensorboard`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from flowdiag.record.store import RunHead, open_run, read_head
from flowdiag.report.diagnose import diagnose
from flowdiag.report.digest import RunDigest, digest_run
from flowdiag.report.event_file import EventFile
from flowdiag.report.export_events import EventRows, TensorBoard, auto_stride, base_time
from flowdiag.report.runs import NOT_GIVEN, best_eval_bpd, find_runs, is_diverged, onset_step
from flowdiag.report.watch_data import run_name
from flowdiag.report.wording import diagnosis_lines, fmt_step
from flowdiag.runtime.errors import UserError

INSTALL_TENSORBOARD = "pip install 'flowdiag[tensorboard]'"
# What the HParams view shows as columns: (name there, config section, key). M and λ first, the
# ablation's usual axes. TensorBoard takes its columns from one run's hparams, so every run must
# give the same keys: a None becomes 0 (epochs: "set by steps"), the only optional value here, and a
# key the run's config does not hold is "not given" (a Monitor run recorded without a config).
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
    steps: int  # step rows exported (each with its global scalars)
    status: str
    stride: int  # steps pooled into one point of the per-layer series


# (run name, rows done, rows in all): what a progress bar shows, after each block of rows.
ExportProgress = Callable[[str, int, int], None]


# --- what goes in: pure --------------------------------------------------------------------------


def run_hparams(head: RunHead) -> dict[str, bool | int | float | str]:
    """The run's settings for TensorBoard's HParams view, plus its status (a column to filter on). A
    setting its config does not hold is "not given", never a default."""
    hparams: dict[str, bool | int | float | str] = {}
    for name, section, key in HPARAMS:
        values = head.config.get(section, {})
        if not isinstance(values, dict) or key not in values:
            hparams[name] = NOT_GIVEN
            continue
        value = values[key]
        if value is None:
            value = 0
        hparams[name] = value if isinstance(value, bool | int | float | str) else str(value)
    hparams["status"] = head.status
    return hparams


def run_outcome(run: RunDigest) -> dict[str, float]:
    """The HParams view's metrics; NaN best bpd when the run has no finite evaluation, onset -1 if none."""
    return {
        "outcome/best_eval_bpd": best_eval_bpd(run.eval_bpd),
        "outcome/final_bpd": run.final_bpd,
        "outcome/diverged": float(is_diverged(run.head)),
        "outcome/onset_step": float(onset_step(run.head)),
    }


def onset_text(head: RunHead) -> str:
    if head.nan_onset_step < 0:
        return f"NaN onset: none (status {head.status})"
    layer = head.nan_onset_layer or "(layer not recorded)"
    return f"NaN onset: step {fmt_step(head.nan_onset_step)}, layer {layer}"


def diagnosis_markdown(run: RunDigest) -> str:
    diagnosis = diagnose(run)
    if diagnosis is None:
        return f"no divergence (status {run.head.status}): no layer's max |output| went past the threshold"
    return "\n".join(f"- {line}" for line in [diagnosis.severity, *diagnosis_lines(diagnosis)])


# --- writing -------------------------------------------------------------------------------------


def _tensorboard() -> TensorBoard:
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

        from flowdiag.report import tb_summaries as builders  # tensorboard's protos: here, not above
    except ImportError:
        raise UserError(
            f"exporting to TensorBoard needs the tensorboard package: {INSTALL_TENSORBOARD}"
        ) from None
    return TensorBoard(Event, Summary, HistogramProto, builders)


def _event_files(folder: Path) -> list[Path]:
    return (
        sorted(p for p in folder.iterdir() if p.is_file() and "tfevents" in p.name) if folder.is_dir() else []
    )


def _targets(path: Path, files: list[Path], out: Path) -> list[Path]:
    root = path if path.is_dir() else path.parent
    dirs: list[Path] = []
    for file in files:
        name, n = run_name(file, root), 2
        candidate = out / name
        while candidate in dirs:  # `a/run.h5` and `a.h5` would share a name
            candidate, n = out / f"{name}-{n}", n + 1
        dirs.append(candidate)
    return dirs


def _check_targets(targets: list[Path], overwrite: bool) -> None:
    for target in targets:
        if target.exists() and not target.is_dir():
            raise UserError(f"{target} exists and is not a folder: choose another --tensorboard DIR")
        if _event_files(target) and not overwrite:
            raise UserError(
                f"{target} already holds TensorBoard events: pass --overwrite to replace them, "
                "or choose another --tensorboard DIR"
            )


def _export_run(
    tb: TensorBoard, file: Path, target: Path, stride: int | None, progress: ExportProgress | None, name: str
) -> ExportedRun:
    """One run: its digest (the diagnosis, the outcome), then its rows' events, text and hparams."""
    digest = digest_run(file)
    for old in _event_files(target):
        old.unlink()
    with open_run(file) as run:
        step = stride or auto_stride(run.head.n_rows, run.head.layer_names)
        events = EventFile(target, tb.event)
        try:
            tell = None if progress is None else lambda done, total: progress(name, done, total)
            rows = EventRows(tb, events, run, step, base_time(run, file)).write(tell)
            _summaries(tb, events, digest)
        finally:
            events.close()
    return ExportedRun(name, file, target, rows, run.head.status, step)


def _summaries(tb: TensorBoard, events: EventFile, digest: RunDigest) -> None:
    """The diagnosis and the onset as text, and the hparams with the outcome (the HParams view)."""
    head = digest.head
    text_step = head.nan_onset_step if head.nan_onset_step >= 0 else head.last_step
    events.add(tb.builders.text("diagnosis", diagnosis_markdown(digest)), text_step, None)
    events.add(tb.builders.text("onset", onset_text(head)), text_step, None)
    outcome = run_outcome(digest)
    for part in tb.builders.hparams(run_hparams(head), outcome):  # experiment, session start, end
        events.add(part, 0, None)
    value = tb.summary.Value
    for tag, number in outcome.items():  # the metrics the HParams view shows, as scalars
        events.add(tb.summary(value=[value(tag=tag, simple_value=number)]), 0, None)


def export_tensorboard(
    path: Path,
    out: Path,
    *,
    overwrite: bool = False,
    stride: int | None = None,
    progress: ExportProgress | None = None,
) -> list[ExportedRun]:
    """One TensorBoard event directory per run under `out`; existing events are replaced only with
    `overwrite`. `stride`: steps pooled into one point of the per-layer series (None: `auto_stride`).
    Every check (runs readable, no event directory taken) passes before anything is written."""
    path, out = Path(path), Path(out)
    files = find_runs(path)
    for file in files:
        read_head(file)  # a bad file is named now, before any event is written
    tb = _tensorboard()
    targets = _targets(path, files, out)
    _check_targets(targets, overwrite)
    exported = []
    for file, target in zip(files, targets, strict=True):
        name = target.relative_to(out).as_posix()
        try:
            exported.append(_export_run(tb, file, target, stride, progress, name))
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise UserError(f"cannot write {target} ({reason}): choose another --tensorboard DIR") from None
    return exported
