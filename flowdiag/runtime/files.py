"""The names of what a run folder holds, defined once: every reader and writer imports them."""

RUN_FILE = "run.h5"  # the per-step, per-layer record (flowdiag.record.store)
CHECKPOINT_FILE = "checkpoint.pt"  # weights, optimizer, batch stream, RNG and run state
REPLAY_FILE = "replay.pt"  # written at a NaN onset: what `flowdiag replay` re-runs
SAMPLES_FILE = "samples.png"  # samples at the end of a completed run
# In an ablation or tune-lambda output folder: each cell's state as the runner last wrote it (JSON,
# replaced atomically), so `watch` follows a study without reading the study's database.
CELLS_FILE = "cells.json"
