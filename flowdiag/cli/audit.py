"""`flowdiag audit`: would this model's ActNorm init fail at this batch size and M? Nothing is trained.

Its arguments, the factory's module and the data's files are checked before torch is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flowdiag.adapters import ADAPTER_NAMES
from flowdiag.cli.common import console, user_errors_exit_2
from flowdiag.cli.panels import help_panels
from flowdiag.runtime.errors import UserError
from flowdiag.settings.config import DataConfig
from flowdiag.train.data_files import check_source

if TYPE_CHECKING:
    from flowdiag.stabilize.audit import AuditResult


def _importable_from_here() -> None:
    """Import from the current folder as `python -m` does: the console script's own folder is what
    Python puts first on sys.path, so `examples.normflows_glow` run from the repository root would
    not be found."""
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)


def factory_module(spec: str) -> tuple[str, str]:
    """(module, factory) named by `package.module:factory`, the module known to exist (not imported:
    that may import torch)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserError(f"--model {spec!r} is not package.module:factory; pass e.g. mypkg.models:build_glow")
    _importable_from_here()
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as error:
        found, reason = None, str(error)
    else:
        reason = f"no module named {module_name!r}"
    if found is None:
        raise UserError(
            f"--model {spec!r}: cannot import {module_name!r} ({reason}); run from the folder that holds "
            "it, or add that folder to PYTHONPATH"
        )
    return module_name, attribute


def load_factory_model(spec: str) -> Any:
    """Call the factory named by `package.module:factory` and return the model it builds."""
    module_name, attribute = factory_module(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"--model {spec!r}: importing {module_name!r} failed ({error})") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UserError(f"--model {spec!r}: {module_name} has no callable {attribute!r}")
    return factory()


def _number(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.4g}"


def print_audit(result: AuditResult, batch_size: int, init_batches: int) -> None:
    """One row per ActNorm, then the smallest safe M."""
    from rich.table import Table

    table = Table(title=f"ActNorm init at batch {batch_size}, M = {init_batches} ({result.adapter})")
    for column in ("ActNorm", "values/channel", "min input var", "scale", "at risk", "inits when sampling"):
        table.add_column(column)
    for norm in result.actnorms:
        table.add_row(
            norm.name,
            str(norm.values_per_channel),
            f"{norm.min_input_var:.3g}",
            f"{_number(norm.scale_min)}..{_number(norm.scale_max)}",
            "[red]yes: 1 value/channel[/red]" if norm.at_risk else "no",
            "yes" if norm.inits_when_sampling else "no",
        )
    console.print(table)
    console.print(
        f"smallest M giving every ActNorm >= 2 values per channel: {result.min_safe_init_batches}"
        + (f"; {len(result.at_risk)} ActNorm(s) at risk" if result.at_risk else "")
    )


def run_audit(model: str, data: DataConfig, batch_size: int, init_batches: int, adapter: str) -> AuditResult:
    """The factory's model audited on the first batch_size x M images of the data set."""
    from flowdiag.glow.model import dequantize
    from flowdiag.stabilize.audit import audit
    from flowdiag.train.data import load_dataset

    flow = load_factory_model(model)
    images = load_dataset(data).train
    needed = batch_size * init_batches
    if len(images) < needed:
        raise UserError(f"{data.dataset}: {len(images)} images, fewer than --batch-size x --init-batches")
    reference = next(flow.parameters(), None)
    x = dequantize(images[:needed], data.n_bits)
    if reference is not None:
        x = x.to(device=reference.device, dtype=reference.dtype)
    return audit(flow, list(x.split(batch_size)), init_batches=init_batches, adapter=adapter)


@help_panels(
    Model=("model", "adapter"),
    Data=("dataset", "data_root", "image_size", "n_bits"),
    Training=("batch_size", "init_batches"),
    Output=("strict",),
)
@user_errors_exit_2
def audit_command(
    model: Annotated[
        str, typer.Option("--model", help="package.module:factory, a callable returning the flow model.")
    ],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training minibatch size.")] = 16,
    init_batches: Annotated[int, typer.Option("--init-batches", help="M of the ActNorm init.")] = 1,
    adapter: Annotated[
        str, typer.Option("--adapter", help="auto, or a library/convention name (see flowdiag.adapters).")
    ] = "auto",
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when any ActNorm is at risk.")] = False,
    dataset: Annotated[str, typer.Option("--dataset", help="Data set.")] = "digits",
    data_root: Annotated[
        str | None, typer.Option("--data-root", help="Folder (or .npz file) holding the data set.")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Resize images to this many pixels a side.")
    ] = None,
    n_bits: Annotated[
        int, typer.Option("--n-bits", help="Bits per pixel kept (dequantization bins = 2^n_bits).")
    ] = 8,
) -> None:
    """Preflight: what each ActNorm's init sees at this batch size and M, and the smallest safe M."""
    if batch_size < 1 or init_batches < 1:
        raise UserError("--batch-size and --init-batches must be positive integers")
    if adapter != "auto" and adapter not in ADAPTER_NAMES:
        raise UserError(f"unknown adapter {adapter!r}; choose one of: auto, {', '.join(ADAPTER_NAMES)}")
    data = DataConfig(dataset=dataset, root=data_root, n_bits=n_bits, image_size=image_size)  # type: ignore[arg-type]
    check_source(data)
    factory_module(model)
    result = run_audit(model, data, batch_size, init_batches, adapter)
    print_audit(result, batch_size, init_batches)
    if strict and result.at_risk:
        raise typer.Exit(code=1)
