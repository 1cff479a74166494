"""The preflight audit flags exactly the ActNorms whose init sees one value per channel."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from flowdiag.cli.audit import audit_command
from flowdiag.stabilize.audit import audit
from tests.flows import tiny_glow
from tests.library_flows import images, normflows_glow_at_risk


def test_audit_flags_the_one_value_actnorms_of_flowdiag_glow() -> None:
    model = tiny_glow(init=False, image_size=8, n_levels=3)
    result = audit(model, images(1, size=8))
    # Level 2 runs at 1x1: its step ActNorms and the ActNorms inside its coupling nets see 1 value.
    assert result.at_risk == [name for name, _ in model.actnorms() if name.startswith("levels.2.")]
    at_risk = [norm for norm in result.actnorms if norm.at_risk]
    assert all(norm.values_per_channel == 1 and norm.scale_min == 1e3 for norm in at_risk)
    assert result.min_safe_init_batches == 2
    assert not any(norm.is_initialized for _, norm in model.actnorms())  # the model is untouched
    assert not audit(model, images(2, size=8)).at_risk


def test_audit_flags_the_one_value_actnorms_of_a_normflows_glow() -> None:
    model = normflows_glow_at_risk()
    result = audit(model, images(1, size=8))
    flagged = {norm.name for norm in result.actnorms if norm.values_per_channel == 1}
    assert flagged and set(result.at_risk) == flagged
    assert all(norm.scale_min != norm.scale_min for norm in result.actnorms if norm.at_risk)  # NaN
    assert all(norm.inits_when_sampling for norm in result.actnorms)
    assert result.min_safe_init_batches == 2
    assert not audit(model, [images(1, size=8, seed=s) for s in range(2)], init_batches=2).at_risk


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("audit")(audit_command)

    @app.command("other")
    def other() -> None:  # a second command, so "audit" stays a subcommand
        pass

    return app


def _run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(_app(), ["audit", *args], env={"COLUMNS": "200"})


def test_cli_prints_the_table_and_strict_exits_1_at_risk() -> None:
    spec = "tests.library_flows:normflows_glow_at_risk"
    result = _run("--model", spec, "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert "values/channel" in result.output and "smallest M" in result.output
    assert _run("--model", spec, "--batch-size", "1", "--strict").exit_code == 1
    safe = _run("--model", spec, "--batch-size", "1", "--init-batches", "2", "--strict")
    assert safe.exit_code == 0, safe.output


def test_cli_bad_input_is_one_line_and_exit_2() -> None:
    for args, words in [
        (("--model", "tests.library_flows:plain_cnn"), "no recognizable flow layers"),
        (("--model", "tests.library_flows:normflows_glow_at_risk", "--adapter", "keras"), "unknown adapter"),
        (("--model", "no_such_package.models:build"), "cannot import"),
        (("--model", "tests.library_flows"), "package.module:factory"),
    ]:
        result = _run(*args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0], result.output
