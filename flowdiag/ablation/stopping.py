"""Ctrl-C and SIGTERM in a process that runs cells: remembered, never raised in the middle of Optuna.

A KeyboardInterrupt raised wherever the signal happens to land can leave a trial RUNNING (inside
`ask`, after the claim) or end a cell that was never trained; the rerun then counted it "done or
running" until its heartbeat went stale. Here a signal only sets a flag: the trainer, which installs
its own handler while it trains, stops after the current step and checkpoints (status
`interrupted`); outside training the worker ends its trial as unfinished and runs no other.

The trainer's handler replaces ours while it trains, so a signal it receives in the last steps (the
run then completes) would not reach the flag. The wakeup fd sees every signal whatever Python
handler is installed: `requested` reads it too.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context in which SIGINT / SIGTERM ask the process to stop after what it is doing.

    Outside the main thread (signals cannot be handled there) it installs nothing and only ever
    reports what `ask()` was told.
    """

    def __init__(self) -> None:
        self._asked = False
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._old_fd = -1

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self._old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.requested  # noqa: B018 -- reads what the wakeup fd holds before it closes
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._old_fd)
            for end in self._wakeup:
                end.close()
            self._wakeup = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._asked = True

    def ask(self) -> None:
        """Request the stop from code (the launcher forwarding a signal, a test)."""
        self._asked = True

    @property
    def requested(self) -> bool:
        if not self._asked and self._wakeup is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                received = self._wakeup[0].recv(256)
                self._asked = any(number in received for number in STOP_SIGNALS)
        return self._asked

    def fileno(self) -> int:
        """What `multiprocessing.connection.wait` can wait on: readable when a signal arrives."""
        return self._wakeup[0].fileno() if self._wakeup is not None else -1

    def forward_to_trainer(self) -> None:
        """Inside the trainer's handler (it trains): make a stop asked before it started reach it."""
        if self.requested:
            signal.raise_signal(signal.SIGINT)
