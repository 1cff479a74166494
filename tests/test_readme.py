"""The README cannot drift: every Python example in it runs as written, and every `flowdiag` command and
option it names exists (the two quickstart commands are run by the suite itself and by CI)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.main

from flowdiag.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")


def python_blocks() -> list[tuple[int, str]]:
    """(line, code) of every ```python block."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", TEXT, flags=re.S | re.M):
        blocks.append((TEXT[: match.start()].count("\n") + 1, match.group(1)))
    return blocks


@pytest.mark.parametrize(
    ("line", "code"), python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else ""
)
def test_every_python_example_runs_as_written(
    line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # examples write their runs where a user would: below the working folder
    namespace: dict[str, object] = {"__name__": f"README.md:{line}"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def _commands() -> dict[str, Any]:
    """The app's commands as its own click group holds them (typer carries a click of its own)."""
    return dict(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _mentions() -> list[tuple[str, list[str]]]:
    """(command, its options) for every `flowdiag CMD ...` the README shows as a command: in a shell
    block, or an inline code span that starts with it."""
    shell = re.findall(r"^```(?:bash|sh|console)?\n(.*?)^```", TEXT, flags=re.S | re.M)
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", TEXT, flags=re.S | re.M)
    code = shell + re.findall(r"`([^`\n]+)`", prose)
    found = []
    for snippet in code:
        snippet = snippet.replace("\\\n", " ")
        for match in re.finditer(r"(?:^|&&|;|\n)\s*flowdiag ([a-z][a-z-]*)((?: +[^\s&|;]+)*)", snippet):
            options = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(2))
            found.append((match.group(1), options))
    return found


def test_every_command_and_option_the_readme_names_exists() -> None:
    commands = _commands()
    mentions = _mentions()
    assert len(mentions) > 20  # the README shows the commands: a parser that finds none is broken
    for name, options in mentions:
        assert name in commands, f"the README names `flowdiag {name}`, which does not exist"
        params = commands[name].params
        known = {"--help"} | {opt for param in params for opt in (*param.opts, *param.secondary_opts)}
        for option in options:
            assert option in known, f"the README gives `flowdiag {name} {option}`, which it does not take"
