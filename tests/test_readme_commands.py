"""What the README and the committed files claim holds as written: `--model package.module:factory`
imports from the current folder, the public names exist, the main job's TOML is the main job, and
every example says how long it runs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import flowdiag
from flowdiag.ablation.grid import build_grid
from flowdiag.cli import app
from flowdiag.record.store import read_run

REPO = Path(__file__).resolve().parents[1]
FLOWDIAG_ROOT = Path(flowdiag.__file__).resolve().parents[1]  # the folder that holds flowdiag/
MAIN_JOB = {
    "batch_size": "1",
    "init_batches": "1,16,256",
}  # flowdiag ablate --batch-size 1 --init-batches 1,16,256

FACTORY = """
from flowdiag.glow.model import Glow
from flowdiag.settings.config import ModelConfig


def build():
    return Glow(ModelConfig(n_levels=3, n_steps=1, hidden=4))
"""


def test_audit_imports_the_factory_from_the_current_folder(tmp_path: Path) -> None:
    """As the console script runs: sys.path[0] is the script's folder, not the current one; only
    flowdiag itself is on PYTHONPATH. `python -m` would find mypkg; the console script must too."""
    project, scripts = tmp_path / "project", tmp_path / "bin"
    (project / "mypkg").mkdir(parents=True)
    (project / "mypkg" / "__init__.py").write_text("")
    (project / "mypkg" / "models.py").write_text(FACTORY)
    scripts.mkdir()
    (scripts / "flowdiag").write_text("import sys\nfrom flowdiag.cli import run\nsys.exit(run())\n")
    done = subprocess.run(
        [
            sys.executable,
            str(scripts / "flowdiag"),
            "audit",
            "--model",
            "mypkg.models:build",
            "--batch-size",
            "1",
        ],
        cwd=project,
        env={"PYTHONPATH": str(FLOWDIAG_ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "smallest M giving every ActNorm >= 2 values per channel: 2; 3 ActNorm(s) at risk" in done.stdout


def test_the_readme_audit_command_runs_from_the_repository_root(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("normflows")
    monkeypatch.chdir(REPO)
    args = ["audit", "--model", "examples.normflows_glow:build_model", "--batch-size", "1"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "at risk" in result.output and "smallest M" in result.output


def test_every_public_name_exists_and_read_run_is_the_readers() -> None:
    for name in flowdiag.__all__:
        assert getattr(flowdiag, name) is not None, name
    assert flowdiag.read_run is read_run
    with pytest.raises(AttributeError, match="no attribute 'read_runs'"):
        flowdiag.read_runs  # noqa: B018 -- a misspelt name is an error, not None


def test_main_digits_toml_is_the_main_job() -> None:
    path = REPO / "ablations" / "main-digits.toml"
    from_file, main_job = build_grid({}, path), build_grid(MAIN_JOB)
    assert from_file.axes == main_job.axes and from_file.fixed == main_job.fixed
    assert len(from_file.cells) == 18 and from_file.fixed["steps"] == 200
    assert "Same as: flowdiag ablate --batch-size 1 --init-batches 1,16,256" in path.read_text()


@pytest.mark.parametrize("path", sorted((REPO / "ablations").glob("*.toml")), ids=lambda p: p.name)
def test_every_committed_toml_builds_its_grid_and_says_its_time(path: Path) -> None:
    tomllib.loads(path.read_text())
    assert build_grid({}, path).cells
    assert re.search(r"^# .*\btime\b", path.read_text(), flags=re.IGNORECASE | re.MULTILINE), path.name


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.py")), ids=lambda p: p.name)
def test_every_example_states_its_run_time(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert re.search(r"Run time here .*\d+ s", docstring), path.name
