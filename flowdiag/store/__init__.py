"""One HDF5 file per training run: the per-step, per-layer record, and the reader for it.

Durability comes from never holding the file open. The writer buffers rows in memory and, at each
flush, opens the file, appends the block, updates the attributes and closes it again. A run killed
outside a flush (SIGKILL, the OOM killer, a lost node) therefore leaves a closed, consistent file holding
every row up to its last flush, and other processes can read that file while the run goes on.
A kill during the few milliseconds of a flush itself is not covered: HDF5 has no journal.
"""

from flowdiag.store.inverse import InverseRecord, InverseRow
from flowdiag.store.layout import FORMAT_VERSION, LAYER_KINDS, STATUSES
from flowdiag.store.reader import RunRecord, is_run_file, read_run
from flowdiag.store.writer import NullWriter, RunWriter

__all__ = [
    "FORMAT_VERSION",
    "LAYER_KINDS",
    "STATUSES",
    "InverseRecord",
    "InverseRow",
    "NullWriter",
    "RunRecord",
    "RunWriter",
    "is_run_file",
    "read_run",
]
