"""flowdiag: trainable Glow at small batch sizes, and evidence for why a run diverges."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flowdiag")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from flowdiag.model import Glow, bits_per_dim

__all__ = ["Glow", "__version__", "bits_per_dim"]
