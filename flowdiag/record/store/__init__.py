"""One HDF5 file per training run: the per-step, per-layer record, and the reader for it.

Durability comes from never holding the file open, and from ordering what a flush writes. The writer
buffers rows in memory; each flush opens the file, appends the block (uncompressed chunks, rewritten in
place), has HDF5 write it all out, then raises the `committed` counts and changes the attributes in
place (fixed-width text), and closes. A run killed at any moment (SIGKILL, the OOM killer, a lost node)
leaves a file that opens and holds every row up to its last complete flush, each exact: readers read no
more than the counts say (tests/test_crash.py). The file is made under a hidden name and put in place
whole. Other processes can read the file while the run goes on. A full disk, or any write error, fails
the flush alone: each flush claims its room before HDF5 writes, so the error is a one-line UserError,
the counts still say only what reached the disk, and the buffered rows wait for a retry
(tests/test_full_disk.py).

Reading: `open_run` gives a run's head (attributes, layers, counts) and its rows a block at a time, so
that a run of any length is read in bounded memory; `read_run` reads a whole (short) run into a
RunRecord. Writing: `RunWriter`, one row (`append_step`) or a block of rows (`append_steps`) at a time.
"""

from flowdiag.record.store.inverse_rows import InverseRecord, InverseRow
from flowdiag.record.store.layout import FORMAT_VERSION, LAYER_KINDS, STATUSES
from flowdiag.record.store.null_writer import NullWriter
from flowdiag.record.store.reader import RunRecord, bytes_per_step, is_run_file, read_run, record_of
from flowdiag.record.store.scan import RunFile, RunHead, StepBlock, open_run, read_evals, read_head
from flowdiag.record.store.writer import RunWriter

__all__ = [
    "FORMAT_VERSION",
    "LAYER_KINDS",
    "STATUSES",
    "InverseRecord",
    "InverseRow",
    "NullWriter",
    "RunFile",
    "RunHead",
    "RunRecord",
    "RunWriter",
    "StepBlock",
    "bytes_per_step",
    "is_run_file",
    "open_run",
    "read_evals",
    "read_head",
    "read_run",
    "record_of",
]
