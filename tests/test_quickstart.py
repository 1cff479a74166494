"""The README's first command, as written (less its `pip install .`): the main job on the embedded
digits, then its report, whose summary says what the README says it will."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_command() -> str:
    """The first ```bash block of the README, its install taken off (the suite runs installed)."""
    block = re.search(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    assert block is not None, "the README has no bash block"
    command = block.group(1).strip()
    assert command.startswith("pip install . && flowdiag ablate "), command
    return command.removeprefix("pip install . && ")


def test_the_main_job_and_its_report_say_what_the_readme_says(tmp_path: Path) -> None:
    command = quickstart_command()
    main_job = "flowdiag ablate --batch-size 1 --init-batches 1,16,256"
    assert command == f"{main_job} && flowdiag report runs/ablation"
    # `flowdiag` as the console script would run it, from this interpreter (whatever PATH holds).
    shim = tmp_path / "bin" / "flowdiag"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m flowdiag "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    done = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = tmp_path / "runs" / "ablation" / "report"
    summary = json.loads((report / "summary.json").read_text())
    counts = {cell["settings"]["init_batches"]: (cell["diverged"], cell["runs"]) for cell in summary["cells"]}
    assert counts == {1: (6, 6), 16: (0, 6), 256: (0, 6)}
    onsets = next(c["onset_steps"] for c in summary["cells"] if c["settings"]["init_batches"] == 1)
    assert onsets == [1] * 6  # at step 1, before any update
    said = (report / "report.md").read_text()
    assert "- M 1 → 16: diverged 6/6 → 0/6, Fisher p = 0.0022: better." in said
    for name in ("report.html", "summary.csv", "grid.png", "survival.png"):
        assert (report / name).is_file(), name


def test_ci_runs_the_readmes_test_command_word_for_word() -> None:
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    test_command = blocks[1].strip()
    assert test_command == "pip install -e '.[dev,all]' && python -m pytest -q"
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.rstrip().splitlines()[-1] == test_command
