"""The storage URL and the cells file: the README's `--storage postgresql://…` (issue 23.3), a missing
driver named as it is, bad input refused before torch or optuna is imported (issue 23.5), and
OUT/cells.json, the contract with `flowdiag watch` (issue 22.4)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from flowdiag.ablation.cells_file import publish
from flowdiag.ablation.storage_url import check_storage_url
from flowdiag.runtime.errors import UserError
from flowdiag.runtime.files import CELLS_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
README_URL = "postgresql://USER:secret@HOST/DB"  # the form the README's Scaling out shows


def test_the_postgres_extra_installs_the_driver_sqlalchemy_picks_for_the_readme_url() -> None:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = {
        re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower() for requirement in extras["postgres"]
    }
    module = make_url(README_URL).get_dialect().driver  # the module it imports, by the same name
    assert module == "psycopg"  # SQLAlchemy 2 maps postgresql:// to psycopg 3
    providers = importlib.metadata.packages_distributions().get(module)
    if providers is None:
        pytest.skip(f"{module} is not installed here (pip install -e '.[postgres]')")
    assert wanted & {name.lower() for name in providers}, (wanted, providers)


@pytest.mark.parametrize(
    ("url", "module", "fix"),
    [
        (README_URL, "psycopg", "pip install 'flowdiag[postgres]'"),
        ("postgresql+psycopg2://u:secret@h/db", "psycopg2", "pip install psycopg2-binary"),
        ("mysql://u:secret@h/db", "MySQLdb", "provides 'MySQLdb'"),
    ],
)
def test_a_missing_driver_is_named_with_what_installs_it(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, fix: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(UserError) as caught:
        check_storage_url(url)
    message = str(caught.value)
    assert f"module {module!r} is not installed" in message and fix in message, message
    assert "secret" not in message and "\n" not in message


@pytest.mark.parametrize("url", ["not a url", "foo://bar", "sqlite"])
def test_a_url_sqlalchemy_cannot_parse_is_refused(url: str) -> None:
    with pytest.raises(UserError, match="is not a storage URL: use sqlite:///PATH or postgresql://"):
        check_storage_url(url)


# Each command and bad input; the script below runs them all in one fresh interpreter and says, after
# each, whether torch or optuna had been imported by then.
BAD = [
    ["ablate", "--workers", "0"],
    ["ablate", "--workers", "two"],
    ["ablate", "--nproc-per-cell", "0"],
    ["ablate", "--batch-size", "1,abc"],
    ["ablate", "--init-batches", "1,,2"],
    ["ablate", "--lam", "1e-3,-1"],
    ["ablate", "--lr", "0"],
    ["ablate", "--flush-every", "3,6"],
    ["ablate", "--coupling", "bogus"],
    ["ablate", "--config", "MISSING"],
    ["ablate", "--config", "NOT_TOML"],
    ["ablate", "--config", "UNKNOWN_KEY"],
    ["ablate", "--storage", "not a url"],
    ["ablate", "--storage", "foo://bar"],
    ["ablate", "--out", "A_FILE"],
    ["ablate", "--dataset", "mnist"],
    ["ablate", "--dataset", "mnist", "--data-root", "MISSING"],
    ["tune-lambda", "--lam-min", "1e-2", "--lam-max", "1e-3"],
    ["tune-lambda", "--n-trials", "0"],
    ["tune-lambda", "--timeout", "0"],
    ["tune-lambda", "--workers", "0"],
    ["tune-lambda", "--batch-size", "0"],
    ["tune-lambda", "--storage", "not a url"],
    ["tune-lambda", "--out", "A_FILE"],
    ["tune-lambda", "--dataset", "cifar10", "--data-root", "MISSING"],
]
SCRIPT = """
import json, sys
from typer.testing import CliRunner
from flowdiag.cli import app
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    loaded = sorted(m for m in ("torch", "optuna") if m in sys.modules)
    print(json.dumps([args, result.exit_code, result.output, loaded]))
"""


def test_bad_input_is_refused_before_torch_or_optuna_is_imported(tmp_path: Path) -> None:
    files = {
        "MISSING": tmp_path / "missing.toml",
        "NOT_TOML": tmp_path / "bad.toml",
        "UNKNOWN_KEY": tmp_path / "unknown.toml",
        "A_FILE": tmp_path / "a-file",
    }
    files["NOT_TOML"].write_text("init-batches = [1, 16\n")
    files["UNKNOWN_KEY"].write_text("bogus = 1\n")
    files["A_FILE"].write_text("someone's file")
    cases = [[str(files.get(arg, arg)) for arg in args] for args in BAD]
    cases = [[*args, *([] if "--out" in args else ["--out", str(tmp_path / "out")])] for args in cases]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200", "NO_COLOR": "1"}
    finished = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    lines = [json.loads(line) for line in finished.stdout.splitlines()]
    assert len(lines) == len(cases)
    for args, code, output, loaded in lines:
        assert code == 2 and output.startswith("error: ") and output.count("\n") == 1, (args, output)
        assert loaded == [], f"{args}: {loaded} imported before the error"
    assert not (tmp_path / "out").exists()


def test_the_cells_file_is_written_whole_in_the_agreed_format(tmp_path: Path) -> None:
    cells = {"M1-lam0.001-b1-seed0": "running", "M256-lam0.001-b1-seed0": "waiting"}
    publish(tmp_path, "abl", "ablation", lambda: (cells, 1))
    body = json.loads((tmp_path / CELLS_FILE).read_text())
    assert set(body) == {"format", "study", "kind", "updated", "running", "cells"}
    assert (body["format"], body["study"], body["kind"], body["running"], body["cells"]) == (
        1,
        "abl",
        "ablation",
        1,
        cells,
    )
    assert isinstance(body["updated"], float)
    publish(tmp_path, "abl", "ablation", lambda: ({**cells, "M1-lam0.001-b1-seed0": "done"}, 0))
    assert json.loads((tmp_path / CELLS_FILE).read_text())["cells"]["M1-lam0.001-b1-seed0"] == "done"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".cells.lock")) == [CELLS_FILE]
    assert oct((tmp_path / CELLS_FILE).stat().st_mode & 0o777) == "0o644"


def test_a_cells_file_that_cannot_be_written_is_a_warning_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / CELLS_FILE).mkdir()  # os.replace onto a folder fails
    publish(tmp_path, "abl", "ablation", lambda: ({}, 0))
    err = capsys.readouterr().err
    assert err.startswith("warning: cannot write") and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temp file left
