"""The one frame format of timed messages, read and written by every client of the bench.

    magic u32 | step u32 | sender u32 | seq u32 | send time u64 (monotonic ns) | pad | trailer u32

Little-endian, a fixed size per run (at least ``MIN_SIZE``). ``time.monotonic_ns`` is
CLOCK_MONOTONIC, shared by every process on Linux, so a receiver in another process measures
one-way latency as its receive time less the frame's send time. The magic and the trailer let
a receiver see a frame cut apart or another sender's bytes inside one, and resynchronise on the
next magic.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = 0xF5C4A7E1
TRAILER = 0x1E7A4C5F
HEADER = struct.Struct("<IIIIQ")  # magic, step, sender, seq, send time (ns)
MAGIC_BYTES = struct.pack("<I", MAGIC)
TRAILER_BYTES = struct.pack("<I", TRAILER)
MIN_SIZE = HEADER.size + len(TRAILER_BYTES) + 4
PROBE_STEP = 0xFFFFFFFF  # frames of the "is everyone in the chat" barrier
CHURN_STEP = 0xFFFFFFFE  # frames of the accept-rate test


def frame_dtype(size: int) -> np.dtype[np.void]:
    """The frame as a numpy record, to parse a batch of frames at once."""
    return np.dtype({
        "names": ["magic", "step", "sender", "seq", "ts", "trailer"],
        "formats": ["<u4", "<u4", "<u4", "<u4", "<u8", "<u4"],
        "offsets": [0, 4, 8, 12, 16, size - 4],
        "itemsize": size,
    })


def frame_struct(size: int) -> struct.Struct:
    """The whole frame as a struct: magic, step, sender, seq, send time, trailer."""
    return struct.Struct(f"<IIIIQ{size - HEADER.size - len(TRAILER_BYTES)}xI")


def frame_tail(size: int) -> bytes:
    """What follows the header: the padding and the trailer, the same in every frame."""
    return b"." * (size - HEADER.size - len(TRAILER_BYTES)) + TRAILER_BYTES
