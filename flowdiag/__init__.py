"""flowdiag: trainable Glow at small batch sizes, and evidence for why a run diverges, in any flow.

The public names load on first use: `import flowdiag` (and the CLI's start) stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowdiag.runtime.lazy import lazy_exports
from flowdiag.runtime.version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "Glow": "flowdiag.glow.model",
    "bits_per_dim": "flowdiag.glow.model",
    "Monitor": "flowdiag.record.monitor",
    "cumulative_init": "flowdiag.stabilize.cumulative_init",
    "logdet_penalty": "flowdiag.stabilize.penalty",
    "audit": "flowdiag.stabilize.audit",
    "read_run": "flowdiag.record.store",
}

if TYPE_CHECKING:
    from flowdiag.glow.model import Glow, bits_per_dim
    from flowdiag.record.monitor import Monitor
    from flowdiag.record.store import read_run
    from flowdiag.stabilize.audit import audit
    from flowdiag.stabilize.cumulative_init import cumulative_init
    from flowdiag.stabilize.penalty import logdet_penalty


__getattr__ = lazy_exports("flowdiag", _PUBLIC)


__all__ = [
    "Glow",
    "Monitor",
    "__version__",
    "audit",
    "bits_per_dim",
    "cumulative_init",
    "logdet_penalty",
    "read_run",
]
