"""The parts of `flowdiag bench` a user can choose with `--parts`. Free of torch: the CLI checks the
list before anything heavy is imported."""

from __future__ import annotations

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
