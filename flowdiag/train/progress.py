"""What the trainer says about its progress, and to whom: a bar, log lines, or the Optuna study.

Kept free of torch, so the CLI can build its sinks without importing the trainer.
"""

from __future__ import annotations


class ProgressSink:
    """What the trainer tells whoever shows its progress; every method is optional (no-op here)."""

    def start(self, total_steps: int, description: str) -> None:
        """Before anything runs."""

    def phase(self, name: str) -> None:
        """`init` while the cumulative ActNorm init runs (M minibatches can take a while), then `train`."""

    def advance(self, step: int, bpd: float, steps_per_second: float) -> None:
        """After every training step."""

    def evaluated(self, step: int, bpd: float) -> None:
        """After every held-out evaluation."""

    def stop(self) -> None:
        """At the end, however the run ended."""
