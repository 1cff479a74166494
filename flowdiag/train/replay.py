"""Re-run the step at which a run diverged and name the first operation that went non-finite.

The bundle holds the weights and optimizer state from before the onset step, the minibatch and the
RNG states, so the forward pass is the recorded one (bit-for-bit on CPU). The forward runs under a
dispatch mode that inspects every aten op's output; the backward under
`torch.autograd.detect_anomaly`, which names the backward function that produced NaN.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flowdiag.glow.model import Glow
from flowdiag.runtime.files import REPLAY_FILE
from flowdiag.settings.config import RunConfig
from flowdiag.train.checkpoint import load_payload
from flowdiag.train.objective import training_loss
from flowdiag.train.precision import autocast


@dataclass(frozen=True)
class ReplayReport:
    step: int
    onset_layer: str
    recorded_loss: float
    replayed_loss: float
    first_op: str  # "" when the forward stayed finite
    first_op_module: str
    first_op_inputs_finite: bool
    backward_error: str  # "" when the backward stayed finite

    @property
    def loss_reproduced(self) -> bool:
        a, b = self.recorded_loss, self.replayed_loss
        return a == b or (math.isnan(a) and math.isnan(b))


def _all_finite(value: Any) -> bool:
    tensors = [t for t in tree_flatten(value)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class _FirstNonFinite(TorchDispatchMode):
    """Remembers the first aten op whose output holds NaN or inf, and the module it ran in."""

    def __init__(self, module_stack: list[str]) -> None:
        super().__init__()
        self.module_stack = module_stack
        self.op = ""
        self.module = ""
        self.inputs_finite = True

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.op and not _all_finite(out):
            self.op = str(func.overloadpacket.__name__)
            self.module = self.module_stack[-1] if self.module_stack else "(model)"
            self.inputs_finite = _all_finite((args, kwargs))
        return out


def _track_modules(model: Glow, stack: list[str]) -> list[Any]:
    """Keep `stack` as the path of modules the forward is inside (hooks return None: outputs untouched)."""

    def enter(name: str) -> Any:
        def hook(module: Any, inputs: Any) -> None:
            stack.append(name or "(model)")

        return hook

    def leave(module: Any, inputs: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    return handles


def _replay_backward(model: Glow, loss: Tensor) -> str:
    """ "" when the backward stays finite; else what went wrong, and where."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "anomaly detection enabled": we know
            with torch.autograd.detect_anomaly(check_nan=True):
                loss.backward()
    except RuntimeError as error:
        return str(error).splitlines()[0]
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        if not bool(torch.isfinite(grad).all()):
            return f"the gradient of {name} is non-finite"
    largest = {name: float(grad.detach().abs().max().double()) for name, grad in grads.items()}
    name = max(largest, key=largest.__getitem__)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    if not bool(torch.isfinite(norm)):
        return (
            f"every gradient is finite but their norm overflows float32: the largest, "
            f"{largest[name]:.3g}, is in {name}"
        )
    return ""


def _replay_device(bundle: dict[str, Any]) -> torch.device:
    """The run's own device when this machine has it (a CUDA onset replays on CUDA), else the CPU."""
    device = torch.device(bundle.get("device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


def replay(run_dir: Path) -> ReplayReport:
    bundle = load_payload(Path(run_dir) / REPLAY_FILE, "replay bundle")
    config = RunConfig.from_json(bundle["config"])
    device = _replay_device(bundle)
    model = Glow(config.model).to(device)
    model.load_state_dict(bundle["model"])
    model.train()
    stack: list[str] = []
    handles = _track_modules(model, stack)
    watch = _FirstNonFinite(stack)
    cuda = [device] if device.type == "cuda" else []
    # The run's RNG states, in a fork: the caller's own random streams are left as they were.
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(bundle["rng_cpu"])
        if cuda and bundle.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(bundle["rng_cuda"], device)
        try:
            with watch, autocast(device, config.train.precision):
                images = bundle["images"].to(device)
                loss, _, _ = training_loss(model, images, config.data.n_bits, config.train.lam)
        finally:
            for handle in handles:
                handle.remove()
        backward_error = ""
        if math.isfinite(float(loss.detach())):
            backward_error = _replay_backward(model, loss)
    return ReplayReport(
        step=int(bundle["step"]),
        onset_layer=str(bundle["onset_layer"]),
        recorded_loss=float(bundle["recorded"]["loss"]),
        replayed_loss=float(loss.detach()),
        first_op=watch.op,
        first_op_module=watch.module,
        first_op_inputs_finite=watch.inputs_finite,
        backward_error=backward_error,
    )
