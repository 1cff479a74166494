"""Checkpoints and replay bundles: torch files that carry the full config as JSON (nanoGPT-style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flowdiag.runtime.atomic import write_atomically
from flowdiag.runtime.errors import UserError


def save_atomically(payload: dict[str, Any], path: Path) -> None:
    """Put `payload` at `path` whole: a kill or a full disk mid-write leaves the previous file (and
    no temporary one), and a saved checkpoint survives a power cut (flowdiag.runtime.atomic)."""
    write_atomically(path, lambda handle: torch.save(payload, handle))


def load_payload(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"no {what} at {path}: check the run folder")
    try:
        # weights_only: tensors, RNG states and plain dicts are all a checkpoint holds; nothing in it
        # may run code when loaded.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise UserError(
            f"{path} is not a readable {what} ({type(error).__name__}): re-run the training"
        ) from None
