"""The disk tier: one file per page slot, with a CRC32 for every layer's slice.

File layout: a header (magic, layer count, slice bytes, then one CRC32 per layer) followed by the page's
layer slices in order. A per-layer checksum lets attention read and verify just the slice of one layer
(dense decode reads every disk page once per step, one layer at a time), while a whole-page read
verifies them all. A missing, truncated or corrupt file raises KVCorruptError naming the file: the step
fails with that message, never with garbage KV.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from megatier.errors import MegatierError

MAGIC = b"MTKV"


class KVCorruptError(MegatierError):
    """A KV page read back from disk is missing or does not match its checksum."""


class DiskPool:
    def __init__(self, directory: Path, num_slots: int, num_layers: int, slice_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.slice_bytes = slice_bytes
        self.header = struct.Struct(f"<4sIQ{num_layers}I")

    def path(self, slot: int) -> Path:
        return self.directory / f"page-{slot}.kv"

    def write(self, slot: int, page: np.ndarray) -> None:
        """Store one page (uint8, num_layers * slice_bytes) atomically: a reader sees the old file or the new."""
        slices = page.reshape(self.num_layers, self.slice_bytes)
        crcs = [zlib.crc32(s) for s in slices]
        tmp = self.path(slot).with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(self.header.pack(MAGIC, self.num_layers, self.slice_bytes, *crcs))
            f.write(memoryview(page))
        os.replace(tmp, self.path(slot))

    def read(self, slot: int, out: np.ndarray, layer: int | None = None) -> None:
        """Read the whole page (layer None) or one layer's slice into `out` (uint8) and verify its CRC32."""
        path = self.path(slot)
        try:
            with open(path, "rb") as f:
                head = f.read(self.header.size)
                if len(head) != self.header.size:
                    raise KVCorruptError(f"KV page file {path} is truncated")
                magic, layers, slice_bytes, *crcs = self.header.unpack(head)
                if magic != MAGIC or layers != self.num_layers or slice_bytes != self.slice_bytes:
                    raise KVCorruptError(f"KV page file {path} has a bad header (not written by this cache)")
                first = 0 if layer is None else layer
                if layer is not None:
                    f.seek(self.header.size + layer * self.slice_bytes)
                got = f.readinto(memoryview(out))
        except FileNotFoundError:
            raise KVCorruptError(f"KV page file {path} is missing") from None
        if got != out.nbytes:
            raise KVCorruptError(f"KV page file {path} is truncated")
        for i, s in enumerate(out.reshape(-1, self.slice_bytes)):
            if zlib.crc32(s) != crcs[first + i]:
                raise KVCorruptError(f"KV page file {path} is corrupt (layer {first + i} fails its checksum)")

    def remove(self, slot: int) -> None:
        self.path(slot).unlink(missing_ok=True)
