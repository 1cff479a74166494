"""The parts of `flowdiag bench` a user can choose with `--parts`, and the sizes of each. Free of torch:
the CLI checks them before anything heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass

from flowdiag.runtime.errors import UserError

PARTS: tuple[str, ...] = ("steps", "init", "workers", "competition", "library", "inverse", "ddp", "scale")
# The parts that measure a model (and load torch, the data set and the model first); `scale` writes
# synthetic run files and times the reading commands.
MODEL_PARTS: tuple[str, ...] = PARTS[:-1]


def parse_parts(text: str) -> tuple[str, ...]:
    """`steps,init` -> ("steps", "init"), in PARTS order; `all` or an empty text: every part."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names or names == ["all"]:
        return PARTS
    unknown = [name for name in names if name not in PARTS]
    if unknown:
        raise UserError(f"--parts: unknown part {unknown[0]!r}; choose from {','.join(PARTS)} (or all)")
    return tuple(part for part in PARTS if part in names)


@dataclass(frozen=True)
class BenchSettings:
    parts: tuple[str, ...] = PARTS
    timed_steps: int = 20  # steps per timed block
    blocks: int = 4  # rounds of blocks, each block in a fresh process
    init_ms: tuple[int, ...] = (1, 16, 256)
    grid_steps: int = 50  # the small grid's --steps; 0 leaves the grid out
    startup_repeats: int = 2
    nproc: int = 2  # ranks of the data-parallel part
    ddp_steps: int = 40
    scale_steps: int = 300_000  # the synthetic run of the scale part: the paper's length ...
    scale_layers: int = 288  # ... and Glow's recorded layers at K = 32, L = 3
    scale_folder_runs: int = 4  # then `report` on a folder of this many runs ...
    scale_folder_steps: int = 20_000  # ... of this many steps

    def check(self) -> None:
        if self.timed_steps < 1 or self.blocks < 1 or self.startup_repeats < 1:
            raise UserError("--timed-steps, --blocks and --startup-repeats must be positive integers")
        if any(m < 1 for m in self.init_ms):
            raise UserError("--init-ms: every M must be a positive integer")
        if self.nproc < 2 or self.ddp_steps < 1:
            raise UserError("--nproc must be 2 or more and --ddp-steps a positive integer")
        if self.grid_steps < 0:
            raise UserError("--grid-steps must be 0 (no grid) or a positive integer")
        scale = (self.scale_steps, self.scale_layers, self.scale_folder_runs, self.scale_folder_steps)
        if min(scale) < 1 or self.scale_layers < 3:
            raise UserError(
                "--scale-steps, --scale-folder-runs and --scale-folder-steps must be positive, and "
                "--scale-layers at least 3 (a level of actnorm, invconv, coupling)"
            )
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise UserError(f"--parts: unknown part {sorted(unknown)[0]!r}; choose from {','.join(PARTS)}")
