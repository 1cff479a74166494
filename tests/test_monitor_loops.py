"""`Monitor` with adapter="auto" in the loops people write, on flows written in each convention: the
user's forward untouched, only flow layers listed, Σ per-layer log-dets = the model's own total,
gradient accumulation, partial forwards, validation forwards, a forced NaN, calls it cannot read."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import flowdiag
from flowdiag.record.run_state import StepRecord
from flowdiag.record.store import read_run
from flowdiag.runtime.files import RUN_FILE
from tests.handwritten_flows import ActNorm, tarflow, threaded_glow, tuple_glow
from tests.library_flows import images


@dataclass
class Loop:
    model: nn.Module
    objective: Callable[[object], Tensor]  # the loss from the model's output, as its users write it
    total: Callable[[nn.Module, Tensor], Tensor]  # the model's own total log-det, (B,)
    size: int

    def loss(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.objective(model(x))


def _tuple() -> Loop:
    def objective(output: object) -> Tensor:
        log_p, logdet, _ = output  # type: ignore[misc]
        return -(log_p + logdet).mean()

    return Loop(tuple_glow(), objective, lambda model, x: model(x)[1], 8)


def _accumulated() -> Loop:
    # The total includes what each split adds: its prior's log-likelihood of the factored-out half.
    return Loop(threaded_glow(noise=False), lambda out: out[1].mean(), lambda m, x: m.flow(x, 0.0)[1], 8)  # type: ignore[index]


def _transformer() -> Loop:
    def objective(output: object) -> Tensor:
        z, _, logdets = output  # type: ignore[misc]
        return 0.5 * z.pow(2).mean() - logdets.mean()

    return Loop(tarflow(), objective, lambda model, x: model(x)[2] * 16, 4)  # TarFlow's mean over T · D = 16


LOOPS = {"tuple": _tuple, "accumulated": _accumulated, "transformer": _transformer}


def _step(monitor: flowdiag.Monitor, loop: Loop, *xs: Tensor) -> str | None:
    """One optimizer step over the microbatches `xs` (gradient accumulation when several)."""
    loop.model.zero_grad()
    for x in xs:
        loss = loop.loss(loop.model, x)
        loss.backward()
    return monitor.step(loss)


@pytest.mark.parametrize("convention", LOOPS)
def test_auto_lists_flow_layers_changes_no_output_and_adds_up(convention: str, tmp_path: Path) -> None:
    loop = LOOPS[convention]()
    x = images(4, size=loop.size)
    loop.loss(loop.model, x)  # the flow's own ActNorm init, before the copy
    plain = copy.deepcopy(loop.model)
    with flowdiag.Monitor(loop.model, tmp_path) as monitor:
        assert monitor.adapter.name == convention
        ours, theirs = loop.model(x), plain(x)  # a training forward, recorded
        for a, b in zip(_tensors(ours), _tensors(theirs), strict=True):
            assert torch.equal(a, b)  # bit for bit
        loss = loop.objective(ours)
        loss.backward()
        assert monitor.step(loss) is None
        with torch.no_grad():
            total = loop.total(loop.model, x).mean()
    assert not any(".block." in name or ".net." in name for name in monitor.layer_names)
    assert monitor.last.logdet.sum() == pytest.approx(float(total), rel=1e-6)
    assert monitor.last.ran.all() and monitor.last.forwards == 1
    record = read_run(tmp_path / RUN_FILE)
    assert record.status == "completed" and record.layer_names == monitor.layer_names
    if convention == "accumulated":
        assert "split" in monitor.layer_kinds and record.layer_kinds == monitor.layer_kinds


def _tensors(output: object) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, tuple | list):
        return [t for item in output for t in _tensors(item)]
    return []


def _per_layer_max(monitor: flowdiag.Monitor, run: Callable[[], object]) -> np.ndarray:
    """max |output| per listed layer of one forward, read with plain hooks (no Monitor involved)."""
    seen = np.full(len(monitor.layer_names), np.nan)
    layers = monitor.adapter.layers()

    def hook(index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, output: tuple) -> None:
            seen[index] = float(output[0].detach().abs().max())

        return record

    handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    with torch.no_grad(), monitor.paused():
        run()
    for handle in handles:
        handle.remove()
    return seen


def test_accumulation_keeps_the_spike_of_an_earlier_microbatch_and_weighs_by_batch(tmp_path: Path) -> None:
    loop = _accumulated()
    spike, calm = images(3, size=8, seed=1) * 3.0, images(1, size=8, seed=2)
    loop.loss(loop.model, calm)
    with flowdiag.Monitor(loop.model, tmp_path) as monitor:
        expected = np.fmax(
            _per_layer_max(monitor, lambda: loop.model(spike)),
            _per_layer_max(monitor, lambda: loop.model(calm)),
        )
        assert _step(monitor, loop, spike, calm) is None
        with torch.no_grad():
            totals = torch.cat([loop.total(loop.model, spike), loop.total(loop.model, calm)])
    np.testing.assert_allclose(monitor.last.max_abs, expected, rtol=1e-6)
    assert monitor.last.max_abs.max() > 2 * _per_layer_max(monitor, lambda: loop.model(calm)).max()
    assert monitor.last.forwards == 2 and read_run(tmp_path / RUN_FILE).forwards.tolist() == [2]
    # The mean over all 4 samples, not the mean of the two microbatches' means.
    assert monitor.last.logdet.sum() == pytest.approx(float(totals.mean()), rel=1e-6)


def test_a_nan_in_an_earlier_microbatch_is_the_onset(tmp_path: Path) -> None:
    loop = _accumulated()
    x = images(2, size=8)
    loop.loss(loop.model, x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with flowdiag.Monitor(loop.model, tmp_path) as monitor:
        onset = _step(monitor, loop, bad, x)  # the last microbatch is finite
    assert onset == monitor.layer_names[0] and monitor.last.nonfinite[0]
    assert read_run(tmp_path / RUN_FILE).status == "diverged"


def test_a_partial_forward_is_no_divergence(tmp_path: Path) -> None:
    loop = _accumulated()
    x = images(2, size=8)
    loop.loss(loop.model, x)
    layers = loop.model.flow.layers
    with flowdiag.Monitor(loop.model, tmp_path) as monitor:
        assert _step(monitor, loop, x) is None
        z, logdet = layers[1](*layers[0](x, 0.0))  # only the squeeze and the first step
        monitor.model.zero_grad()
        (z.pow(2).mean() - logdet.mean()).backward()
        onset = monitor.step(z.pow(2).mean())
    ran = monitor.last.ran
    assert onset is None and ran.sum() == 4 and ran[:4].all()  # squeeze, actnorm, invconv, the step
    assert not monitor.last.nonfinite.any() and np.isnan(monitor.last.max_abs[~ran]).all()
    record = read_run(tmp_path / RUN_FILE)
    assert record.status == "completed" and record.nan_onset_step == -1
    assert record.ran[1].tolist() == ran.tolist() and not record.nonfinite.any()


def test_validation_and_sampling_forwards_change_nothing_in_the_training_row(tmp_path: Path) -> None:
    loop = _accumulated()
    x, held_out = images(2, size=8), images(3, size=8, seed=5) * 3.0
    loop.loss(loop.model, x)
    twin = copy.deepcopy(loop)
    with (
        flowdiag.Monitor(loop.model, tmp_path / "a") as plain,
        flowdiag.Monitor(twin.model, tmp_path / "b") as other,
    ):
        _step(plain, loop, x)
        twin.model.zero_grad()
        loss = twin.loss(twin.model, x)
        loss.backward()
        with torch.no_grad():
            twin.model(held_out)  # validation between backward and step
        twin.model.eval()
        twin.model(held_out)  # and in eval()
        twin.model.train()
        other.step(loss)
        evaluated = other.eval_forwards()
    np.testing.assert_array_equal(plain.last.max_abs, other.last.max_abs)
    np.testing.assert_array_equal(plain.last.logdet, other.last.logdet)
    assert other.last.forwards == 1
    assert evaluated is not None and evaluated.forwards == 2 and evaluated.ran.all()
    assert (evaluated.max_abs > plain.last.max_abs).all()  # what the held-out forwards saw, kept apart
    assert other.eval_forwards() is None


def test_a_forced_non_finite_value_at_batch_1_is_named_at_its_layer_and_step(tmp_path: Path) -> None:
    loop = _accumulated()
    x = images(1, size=8)
    loop.loss(loop.model, x)
    with flowdiag.Monitor(loop.model, tmp_path) as monitor:
        assert _step(monitor, loop, x) is None
        with torch.no_grad():
            loop.model.flow.layers[5].invconv.log_s[0] = float("inf")
        onset = _step(monitor, loop, x)
    assert onset == "flow.layers.5.invconv"
    record = read_run(tmp_path / RUN_FILE)
    assert (record.status, record.nan_onset_step, record.nan_onset_layer) == ("diverged", 2, onset)


class BareActNorm(ActNorm):
    """Named like a flow layer, but returns a bare tensor (rosinality's ActNorm(logdet=False))."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[0]


def test_a_call_it_cannot_read_records_nothing_warns_once_and_never_raises(tmp_path: Path) -> None:
    loop = _accumulated()
    x = images(2, size=8)
    loop.loss(loop.model, x)
    norm = loop.model.flow.layers[1].actnorm
    expected = norm(layers_input := loop.model.flow.layers[0](x)[0])[0]
    with flowdiag.Monitor(loop.model, tmp_path / "a") as monitor, pytest.warns(RuntimeWarning) as caught:
        out, total = norm(layers_input)  # no running log-det: it cannot be read
        norm(layers_input)
        assert total is None and torch.equal(out, expected)
    assert len([w for w in caught if "cannot read" in str(w.message)]) == 1
    assert monitor._train.forwards == 0  # nothing recorded for either call
    bare = nn.Sequential(BareActNorm(1)).double()
    with flowdiag.Monitor(bare, tmp_path / "b"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bare(images(2)).shape == (2, 1, 4, 4)
    assert any("cannot read" in str(w.message) for w in caught)


def test_listeners_hear_every_step(tmp_path: Path) -> None:
    loop = _tuple()
    heard: list[tuple[int, str | None]] = []
    with flowdiag.Monitor(loop.model, tmp_path) as monitor:
        remove = monitor.add_listener(lambda record, onset: heard.append((record.step, onset)))
        for _ in range(2):
            _step(monitor, loop, images(2, size=8))
        remove()
        _step(monitor, loop, images(2, size=8))
    assert heard == [(1, None), (2, None)]


def test_flowdiags_own_passes_are_never_recorded(tmp_path: Path) -> None:
    loop = _accumulated()
    with flowdiag.Monitor(loop.model, tmp_path) as monitor:
        flowdiag.cumulative_init(loop.model, [images(2, size=8, seed=s) for s in range(3)])  # not paused
        assert monitor._train.forwards == 0 and monitor.eval_forwards() is None
        assert _step(monitor, loop, images(2, size=8)) is None
    assert monitor.last.forwards == 1 and np.isfinite(monitor.last.max_abs).all()


def _break_tuple(model: nn.Module) -> str:
    with torch.no_grad():
        model.blocks[1].flows[0].invconv.w_s[0] = float("inf")
    return "blocks.1.flows.0.invconv"


def _break_transformer(model: nn.Module) -> str:
    with torch.no_grad():
        model.blocks[1].proj_out.weight.fill_(float("nan"))
    return "blocks.1"


@pytest.mark.parametrize(
    ("convention", "breaks"), [("tuple", _break_tuple), ("transformer", _break_transformer)]
)
def test_a_forced_non_finite_layer_is_named_in_the_other_conventions(
    convention: str, breaks: Callable[[nn.Module], str], tmp_path: Path
) -> None:
    loop = LOOPS[convention]()
    x = images(1, size=loop.size)
    loop.loss(loop.model, x)
    with flowdiag.Monitor(loop.model, tmp_path) as monitor:
        assert _step(monitor, loop, x) is None
        layer = breaks(loop.model)
        assert _step(monitor, loop, x) == layer
    assert (read_run(tmp_path / RUN_FILE).nan_onset_step, monitor.state.onset_layer) == (2, layer)


def test_a_transformer_flow_under_bf16_autocast_is_recorded_in_true_units(tmp_path: Path) -> None:
    model = tarflow().float()
    x = images(4).float()
    with flowdiag.Monitor(model, tmp_path) as monitor, torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _per_layer_max(monitor, lambda: model(x))
        z, _, logdets = model(x)
        loss = 0.5 * z.float().pow(2).mean() - logdets.float().mean()
        loss.backward()
        assert monitor.step(loss) is None
    assert np.isfinite(monitor.last.max_abs).all() and monitor.last.ran.all()
    np.testing.assert_allclose(monitor.last.max_abs, expected, rtol=1e-2)
    # The blocks' per-dimension means, scaled by T · D = 16, add up to the model's own total in true units.
    assert monitor.last.logdet.sum() == pytest.approx(
        16 * float(logdets.detach().float().mean()), rel=2e-2, abs=1e-2
    )


class _Calls:
    """A run-file writer that remembers the order of what it was asked to do."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: self.calls.append(name)


def test_the_onset_rank_is_set_before_the_flush_that_writes_the_onset(tmp_path: Path) -> None:
    loop = _tuple()
    monitor = flowdiag.Monitor(loop.model, tmp_path)
    writer = _Calls()
    monitor._writer = writer  # type: ignore[assignment]
    record = monitor.state.step + 1
    monitor.state.onset_step = record  # as `advance` leaves it at an onset
    nothing = np.zeros(len(monitor.layer_names))
    monitor._write(
        StepRecord(record, 0.0, 0.0, 0.0, 0.0, 0.0, nothing, nothing, nothing > 0),
        "loss",
        np.array([1]),
    )
    assert writer.calls == ["append_step", "set_onset_rank", "set_status"]  # set_status flushes all three
    assert monitor.state.onset_rank == 1


def test_the_gradient_norm_it_computes_is_the_total_norm(tmp_path: Path) -> None:
    loop = _accumulated()
    with flowdiag.Monitor(loop.model, tmp_path) as monitor:
        _step(monitor, loop, images(2, size=8))
        grads = [p.grad for p in loop.model.parameters() if p.grad is not None]
        expected = float(torch.nn.utils.get_total_norm(grads))
    assert monitor.last.grad_norm == pytest.approx(expected, rel=1e-9)
