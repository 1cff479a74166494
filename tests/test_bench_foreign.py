"""`flowdiag bench --parts library`: the Monitor's overhead on a hand-written Glow, next to normflows'."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from flowdiag.bench import library, tables
from flowdiag.settings.config import ModelConfig, RunConfig, TrainConfig
from flowdiag.train.data import load_dataset

TINY = RunConfig(
    model=ModelConfig(n_levels=2, n_steps=2, hidden=8), train=TrainConfig(batch_size=4, device="cpu")
)


def test_the_hand_written_glow_is_timed_without_and_with_the_monitor(tmp_path: Path) -> None:
    data = load_dataset(TINY.data)
    config = replace(TINY, model=replace(TINY.model, in_channels=data.channels, image_size=data.image_size))
    result = library.foreign_overhead(config, data, 2, 1, tmp_path)
    # 2 levels x 2 steps x (ActNorm, conv, step) + a squeeze per level + one split: auto found them all.
    assert result.available and result.model == library.FOREIGN and result.n_layers == 2 * 2 * 3 + 2 + 1
    assert result.off_s > 0 and result.on_s > 0 and math.isfinite(result.overhead_percent)
    missing = library.LibraryOverhead(library.MODEL, False, note="normflows is not installed")
    console = Console(width=200, record=True, no_color=True)
    with console.capture() as capture:
        console.print(tables.library_table(missing, None, result))
    text = capture.get()
    assert library.FOREIGN in text and f"{result.overhead_percent:+.1f} %" in text
