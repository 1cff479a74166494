"""`flowdiag bench`: what diagnostics, the cumulative init and parallel workers cost on this machine.

One module per part, each a library function that returns a dataclass (`results`):
- `steps`: the trainer step without hooks, with hooks, with hooks plus HDF5 (fresh process per block);
  on CUDA also the check that a recorded step syncs with the host once, not per layer (`sync_check`);
- `init_cost`: the cumulative ActNorm init against M plain forward passes;
- `workers`: a worker's start-up time (fork and spawn), and a small grid on 1 against N workers
  (`small_grid`);
- `competition`: the step and the grid with one competing CPU-bound process (`competitor`);
- `library`: the Monitor's overhead on a normflows Glow, next to flowdiag's own;
- `tables`: the rich tables the CLI prints. `suite.run_bench` runs the chosen parts.
Benchmarks are commands, not tests: nothing here asserts a speed.

The public names load on first use, so `flowdiag.bench.parts` (the CLI's check of `--parts`) stays
free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowdiag.runtime.lazy import lazy_exports

_PUBLIC = {
    "BenchResult": "flowdiag.bench.results",
    "BenchSettings": "flowdiag.bench.parts",
    "run_bench": "flowdiag.bench.suite",
    "PARTS": "flowdiag.bench.parts",
    "parse_parts": "flowdiag.bench.parts",
}

if TYPE_CHECKING:
    from flowdiag.bench.parts import PARTS, BenchSettings, parse_parts
    from flowdiag.bench.results import BenchResult
    from flowdiag.bench.suite import run_bench


__getattr__ = lazy_exports("flowdiag.bench", _PUBLIC)


__all__ = ["PARTS", "BenchResult", "BenchSettings", "parse_parts", "run_bench"]
