"""The CLI as a user meets it: exit codes, one-line errors, signals, and nothing overwritten."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowdiag import __version__
from flowdiag.cli import app
from flowdiag.record.store import read_run
from flowdiag.runtime.errors import UserError

RUNNER = CliRunner()
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
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


def invoke(*args: str):
    return RUNNER.invoke(app, list(args), env=ENV)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_help_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    for command in ("train", "ablate", "tune-lambda", "report", "watch", "replay", "bench"):
        assert command in result.output
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_train_writes_a_run_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("train", *TINY, "--steps", "4", "--eval-every", "2", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "completed after 4 steps" in result.output
    # Not a terminal: log lines (the init, each evaluation, the last step), never a stale bar.
    assert "ActNorm init..." in result.output and "held-out bpd" in result.output
    assert "stopped at step 4/4" in result.output and "0/4" not in result.output
    assert str(out / "run.h5") in result.output.replace("\n", "")
    assert read_run(out / "run.h5").status == "completed"


def test_a_diverged_run_exits_3_says_where_and_replays(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("train", "--batch-size", "1", "--init-batches", "1", "--steps", "5", "--out", str(out))
    assert result.exit_code == 3, result.output  # a script can tell it from a completed run
    record = read_run(out / "run.h5")
    assert record.status == "diverged"
    outcome = next(line for line in result.output.splitlines() if line.startswith("diverged"))
    assert outcome.startswith(f"diverged at step {record.nan_onset_step} in {record.nan_onset_layer},")
    assert ", bpd " not in outcome  # the bpd of a diverged step is no result (it read 3.696e+24)
    assert f"flowdiag replay {out}" in result.output.replace("\n", "")
    replayed = invoke("replay", str(out))
    assert replayed.exit_code == 0, replayed.output
    assert "reproduced exactly" in replayed.output


def test_train_help_documents_the_exit_codes_and_groups_the_options_in_panels() -> None:
    train = invoke("train", "--help").output
    for code in ("0    completed", "2    bad input", "3    diverged", "130  interrupted"):
        assert code in train, train
    for command in ("train", "ablate", "tune-lambda", "bench"):
        text = invoke(command, "--help").output
        headings = [
            line[:-1] for line in text.splitlines() if line and not line[0].isspace() and line.endswith(":")
        ]
        shown = [h for h in headings if h in ("Model", "Data", "Training", "Ablation", "Output")]
        assert shown == sorted(shown, key=["Model", "Data", "Training", "Ablation", "Output"].index), headings
        assert {"Model", "Data", "Training", "Output"} <= set(headings), (command, headings)
        panel_of = _panel_of(text)
        assert panel_of["--levels"] == "Model" and panel_of["--dataset"] == "Data"
        assert panel_of["--flush-every"] == "Output" and panel_of["--lr"] == "Training"
    ablate = _panel_of(invoke("ablate", "--help").output)
    assert ablate["--seeds"] == ablate["--workers"] == ablate["--storage"] == "Ablation"
    assert ablate["--out"] == "Output"


def _panel_of(help_text: str) -> dict[str, str]:
    """Each option's flag -> the panel heading it is listed under."""
    panels, heading = {}, ""
    for line in help_text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            heading = line[:-1]
        elif line.strip().startswith("--"):
            panels[line.split()[0]] = heading
    return panels


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--batch-size", "-1"], "--batch-size"),
        (["--batch-size", "abc"], "--batch-size"),
        (["--init-batches", "0"], "--init-batches"),
        (["--steps", "0"], "--steps"),
        (["--lam", "-1"], "--lam"),
        (["--lr", "nan"], "--lr"),
        (["--dataset", "imagenet"], "imagenet"),
        (["--coupling", "spline"], "--coupling"),
        (["--dataset", "mnist", "--data-root", "/nonexistent/mnist"], "/nonexistent/mnist"),
        (["--dataset", "cifar10"], "--data-root"),
        (["--device", "cuda"], "cuda"),
        (["--levels", "4"], "--levels"),
    ],
)
def test_bad_options_one_line_exit_2_nothing_touched(tmp_path: Path, args: list[str], needle: str) -> None:
    if "--device" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    out = tmp_path / "run"
    result = invoke(
        "train", *args, "--steps", str(3) if "--steps" not in args else args[-1], "--out", str(out)
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert invoke("train", *TINY, "--steps", "2", "--out", str(out)).exit_code == 0
    before = {p.name: _digest(p) for p in out.iterdir()}
    for args in (["--steps", "2"], ["--batch-size", "-3"], ["--dataset", "nope"]):
        result = invoke("train", *TINY, *args, "--out", str(out))
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert "--resume" in invoke("train", *TINY, "--steps", "2", "--out", str(out)).output
    assert {p.name: _digest(p) for p in out.iterdir()} == before


def test_unwritable_output(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = invoke("train", *TINY, "--steps", "2", "--out", str(blocker / "run"))
    assert result.exit_code == 2 and "--out" in result.output and len(result.output.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"


def _start_training(out: Path, flush_every: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "flowdiag", "train", *TINY, "--steps", "100000", "--eval-every", "0"]
    # A flush timer of an hour: these tests count rows per flush.
    command += ["--flush-every", str(flush_every), "--flush-seconds", "3600", "--out", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_rows(path: Path, rows: int, process: subprocess.Popen, timeout: float = 90.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        try:
            seen = len(read_run(path).step)
        except UserError:
            seen = 0  # not created yet, or caught mid-flush
        if seen >= rows:
            return seen
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"no {rows} rows in {path} after {timeout} s")


@pytest.mark.slow
def test_sigkill_leaves_a_readable_file(tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = _start_training(out, flush_every=5)
    _wait_for_rows(out / "run.h5", 10, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    record = read_run(out / "run.h5")
    assert record.status == "running"
    assert len(record.step) >= 10 and len(record.step) % 5 == 0
    assert record.step.tolist() == list(range(1, len(record.step) + 1))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_end_interrupted_with_checkpoint(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "run"
    process = _start_training(out, flush_every=5)
    _wait_for_rows(out / "run.h5", 5, process)
    process.send_signal(sig)
    assert process.wait(timeout=60) == 130
    record = read_run(out / "run.h5")
    assert record.status == "interrupted"
    assert (out / "checkpoint.pt").exists()
    # every step up to the interruption was written, not only the flushed blocks
    resumed = invoke("train", *TINY, "--steps", str(int(record.step[-1]) + 2), "--out", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.output
    again = read_run(out / "run.h5")
    assert again.status == "completed" and again.step.tolist() == list(range(1, int(record.step[-1]) + 3))


def test_report_and_watch_on_a_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert invoke("train", *TINY, "--steps", "3", "--out", str(out)).exit_code == 0
    report_dir = tmp_path / "report"
    result = invoke("report", str(out), "--out", str(report_dir))
    assert result.exit_code == 0, result.output
    assert (report_dir / "report.md").exists() and (report_dir / "report.html").exists()
    watched = invoke("watch", str(out), "--timeout", "10")
    assert watched.exit_code == 0 and "completed" in watched.output


def test_report_on_corrupt_file_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "run.h5"
    bad.write_bytes(os.urandom(4096))
    result = invoke("report", str(bad), "--out", str(tmp_path / "report"))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "report").exists()
    missing = invoke("report", str(tmp_path / "nothing-here"))
    assert missing.exit_code == 2 and len(missing.output.strip().splitlines()) == 1


def test_bench_prints_its_tables(tmp_path: Path) -> None:
    # The parts that cost little (workers and competition run `flowdiag ablate`: tests/test_bench.py).
    tiny_budget = ["--timed-steps", "2", "--blocks", "1", "--init-ms", "1"]
    result = invoke("bench", *TINY, *tiny_budget, "--parts", "steps,init,library")
    assert result.exit_code == 0, result.output
    for column in ("median step", "overhead", "HDF5 bytes/step", "no hooks", "hooks + HDF5"):
        assert column in result.output, result.output
    assert "CUDA sync check: skipped on cpu" in result.output
    assert "cumulative ActNorm init" in result.output and "M forwards" in result.output
    assert "Monitor overhead" in result.output and "flowdiag Glow" in result.output
    assert "worker start-up" not in result.output  # a part not asked for
    for args, needle in ((["--init-ms", "1,x"], "--init-ms"), (["--parts", "steps,speed"], "'speed'")):
        bad = invoke("bench", *args)
        assert bad.exit_code == 2 and needle in bad.output, bad.output
        assert len(bad.output.strip().splitlines()) == 1, bad.output


def _help_line(output: str, flag: str) -> str:
    """The help text of one option, joined across the formatter's wrapped lines."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{flag} "))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("    ") or line.strip().startswith("--"):
            break
        block.append(line)
    return " ".join(" ".join(block).split())


def test_help_shows_the_defaults_each_command_uses() -> None:
    ablate = invoke("ablate", "--help").output
    assert "[default: 0.001]" in _help_line(ablate, "--lam")
    assert "[default: 1e-05]" in _help_line(ablate, "--lr")
    assert "[default: 100]" in _help_line(ablate, "--eval-every")
    assert "[default: 100]" in _help_line(ablate, "--flush-every")
    assert "[default: 0,1,2,3,4,5]" in _help_line(ablate, "--seeds")
    assert "[default: 1,256]" in _help_line(ablate, "--init-batches")
    assert "FLOAT,..." in _help_line(ablate, "--lam") and "<str>" not in _help_line(ablate, "--batch-size")
    train = invoke("train", "--help").output
    assert "[default: 0]" in _help_line(train, "--lam") and "FLOAT" in _help_line(train, "--lam")
    assert "[default: 0.001]" in _help_line(train, "--lr")
    assert "additive|affine" in _help_line(train, "--coupling")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lam", "-1"], "--lam -1.0: must be at least 0; pass e.g. 0"),
        (["--lr", "0"], "--lr 0.0: must be greater than 0; pass e.g. 0.001"),
        (["--actnorm-eps", "0"], "--actnorm-eps 0.0: must be greater than 0; pass e.g. 1e-06"),
        (["--actnorm-init", "other"], "--actnorm-init: 'other' is not one of paper, glow"),
    ],
)
def test_range_errors_name_the_fix(tmp_path: Path, args: list[str], needle: str) -> None:
    for command in ("train", "ablate"):
        result = invoke(command, *args, "--out", str(tmp_path / command))
        assert result.exit_code == 2 and needle in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / command).exists()


def test_cli_imports_no_torch() -> None:
    code = "import sys, flowdiag.cli; print(sorted({'torch', 'matplotlib', 'optuna'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_training_imports_neither_dynamo_nor_torchvision(tmp_path: Path) -> None:
    # Each costs a second or more in every process that trains (torch.optim's optimizers import
    # torch._dynamo; torchvision.utils imports torchvision.ops, which imports it too).
    code = (
        "import sys; from flowdiag.cli import app\n"
        f"app(['train', '--steps', '3', '--eval-every', '3', '--out', {str(tmp_path / 'run')!r}],"
        " standalone_mode=False)\n"
        "print(sorted({'torch._dynamo', 'torchvision'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "run" / "samples.png").exists()


def _poll(read, done, process: subprocess.Popen, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        try:
            value = read()
        except UserError:
            value = None  # not created yet, or caught mid-flush
        if value is not None and done(value):
            return value
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"nothing after {timeout} s")


@pytest.mark.slow
def test_the_flush_timer_writes_rows_that_survive_sigkill(tmp_path: Path) -> None:
    """The flush timer: at batch 1 on the digits, with a step count that would not flush for hours."""
    out, path = tmp_path / "run", tmp_path / "run" / "run.h5"
    command = [sys.executable, "-m", "flowdiag", "train", "--batch-size", "1", "--init-batches", "16"]
    command += ["--steps", "1000000", "--eval-every", "0", "--flush-every", "1000000", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _poll(lambda: read_run(path).phase, lambda phase: phase == "train", process)  # step 1 began
        # --flush-every 1000000: only the flush timer (--flush-seconds, default 2 s) writes rows; how
        # soon is a timing, measured by `flowdiag bench`, not asserted here.
        rows = _poll(lambda: len(read_run(path).step), lambda n: n >= 1, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    record = read_run(path)
    assert len(record.step) >= rows and record.step.tolist() == list(range(1, len(record.step) + 1))


@pytest.mark.slow
def test_ablate_to_a_file_logs_every_finished_cell(tmp_path: Path) -> None:
    out, log = tmp_path / "abl", tmp_path / "log.txt"
    command = [
        sys.executable,
        "-m",
        "flowdiag",
        "ablate",
        *TINY,
        "--batch-size",
        "1",
        "--init-batches",
        "1,4",
    ]
    command += ["--seeds", "0", "--steps", "4", "--eval-every", "2", "--out", str(out)]
    with log.open("w") as handle:
        finished = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert finished.returncode == 0, text
    for m in (1, 4):
        lines = [line for line in text.splitlines() if line.startswith(f"M{m}-lam0.001-b1-seed0: ")]
        assert len(lines) == 1, text
        assert "best held-out bpd" in lines[0]
    assert "\x1b[" not in text  # no terminal control codes in a file


def test_audit_through_the_real_app() -> None:
    at_risk = invoke("audit", "--model", "tests.library_flows:normflows_glow_at_risk", "--batch-size", "1")
    assert at_risk.exit_code == 0, at_risk.output
    strict = invoke(
        "audit", "--model", "tests.library_flows:normflows_glow_at_risk", "--batch-size", "1", "--strict"
    )
    assert strict.exit_code == 1
    not_a_flow = invoke("audit", "--model", "tests.library_flows:plain_cnn")
    assert not_a_flow.exit_code == 2 and len(not_a_flow.output.strip().splitlines()) == 1
    assert "no recognizable flow layers" in not_a_flow.output
