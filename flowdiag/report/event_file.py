"""A TensorBoard event file written directly, a batch of events at a time.

The format is TFRecord: per record, its length (uint64), the masked CRC-32C of those 8 bytes, the
serialized `Event`, and the masked CRC-32C of it. tensorboard's own writer computes each CRC byte by
byte in Python (the `tensorboard.compat` stub that stands in for TensorFlow's C code), about 0.5 µs a
byte: 100 s for the 200 MB a paper-length run could export. Here the CRCs of a whole batch are computed
at once in numpy, one step per byte position over the records still that long, so keeping records
short (`MAX_VALUES` per event) keeps that loop short.
"""

from __future__ import annotations

import os
import socket
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

MAX_VALUES = 32  # values per event: the longest record, and so the CRC loop, stays about 1.5 kB


def _crc_table() -> np.ndarray:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one entry per byte value."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
    return table


_TABLE = _crc_table()


def crc32c(records: list[bytes]) -> np.ndarray:
    """The CRC-32C of each record, all at once (uint32, in the records' order)."""
    if not records:
        return np.zeros(0, np.uint32)
    lengths = np.fromiter((len(r) for r in records), np.int64, len(records))
    order = np.argsort(-lengths, kind="stable")  # longest first: the records still going are a prefix
    ordered = lengths[order]
    flat = np.frombuffer(b"".join(records[i] for i in order), np.uint8)
    starts = np.concatenate([[0], np.cumsum(ordered)[:-1]])
    going = np.searchsorted(-ordered, -np.arange(int(ordered[0])), side="left")  # records longer than j
    crc = np.full(len(records), 0xFFFFFFFF, np.uint32)
    for j, k in enumerate(going.tolist()):
        head = crc[:k]
        crc[:k] = _TABLE[(head ^ flat[starts[:k] + j]) & 0xFF] ^ (head >> 8)
    out = np.empty_like(crc)
    out[order] = crc ^ np.uint32(0xFFFFFFFF)
    return out


def masked(crc: np.ndarray) -> np.ndarray:
    """TFRecord's masking of a CRC: rotated right by 15 bits, plus a constant."""
    crc = crc.astype(np.uint64)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8).astype(np.uint64) & 0xFFFFFFFF


def framed(records: list[bytes]) -> bytes:
    """Records in TFRecord framing."""
    headers = [struct.pack("<Q", len(r)) for r in records]
    crcs = masked(crc32c(headers + records))
    n = len(records)
    parts = []
    for i, record in enumerate(records):
        parts += [headers[i], struct.pack("<I", int(crcs[i])), record, struct.pack("<I", int(crcs[n + i]))]
    return b"".join(parts)


class EventFile:
    """One run's events: `add` keeps them, `flush` frames and appends them, `close` flushes."""

    def __init__(self, folder: Path, event_class: Any) -> None:
        self.event_class = event_class  # tensorboard's Event protobuf message
        folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        # TensorBoard reads the files whose name holds "tfevents", in name order; the rest only tells
        # them apart (an export replaced within the same second gets a new file).
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.path = folder / name
        self._file = self.path.open("wb")
        self._pending: list[bytes] = [
            event_class(wall_time=now, file_version="brain.Event:2").SerializeToString()
        ]

    def add(self, summary: Any, step: int, wall_time: float | None) -> None:
        """An Event of `summary` at `step`; `wall_time` None: now."""
        when = time.time() if wall_time is None else wall_time
        event = self.event_class(wall_time=when, step=int(step), summary=summary)
        self._pending.append(event.SerializeToString())

    def flush(self) -> None:
        if self._pending:
            self._file.write(framed(self._pending))
            self._pending = []

    def close(self) -> None:
        self.flush()
        self._file.close()
