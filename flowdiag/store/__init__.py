"""One HDF5 file per training run: the per-step, per-layer record, and the reader for it.

Durability comes from never holding the file open. The writer buffers rows in memory and, at each
flush, opens the file, appends the block, updates the attributes that changed and closes it again. A run
killed outside a flush (SIGKILL, the OOM killer, a lost node) therefore leaves a closed, consistent file
holding every row up to its last flush, and other processes can read that file while the run goes on.
A kill inside a flush of rows leaves the rows of the flushes before it, each exact: the datasets are
uncompressed, so a flush rewrites chunks in place and moves nothing the file's index points at
(tests/test_crash.py). HDF5 has no journal, so a kill inside one of the rare flushes that change an
attribute (status, phase, onset) or write the init is not covered.
"""

from flowdiag.store.inverse import InverseRecord, InverseRow
from flowdiag.store.layout import FORMAT_VERSION, LAYER_KINDS, STATUSES
from flowdiag.store.reader import RunRecord, bytes_per_step, is_run_file, read_run
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
    "bytes_per_step",
    "is_run_file",
    "read_run",
]
