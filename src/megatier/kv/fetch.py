"""Fetch one layer of many DRAM pages to the GPU, one strided DMA per run of consecutive slots.

In the page layout a layer's K|V slice of a page is contiguous (2 * kv_heads * page_size * head_dim
elements) and the next page's slice sits one page further on, so a run of consecutive DRAM slots is a
2D copy: `height` rows of one slice each, source pitch one page. cudaMemcpy2DAsync moves it in one DMA,
as fast as a flat copy of the same bytes, where per-slice copies (64 KiB each for an 8B model) would be
bound by launch overhead. Two staging buffers alternate by layer, so the copy of layer l+1 overlaps the
attention of layer l. Used by the offload-and-fetch baseline (every DRAM page) and by dense tiered
attention (the share of DRAM pages that PCIe reads faster than the CPU would).
"""

from __future__ import annotations

import numpy as np
import torch

from megatier.kv.tiers import TieredKV


def slot_runs(slots: np.ndarray) -> list[tuple[int, int, int]]:
    """(first source slot, first staging index, length) of each run of consecutive `slots`."""
    if len(slots) == 0:
        return []
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(slots)]))
    return [(int(slots[s]), int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class LayerFetcher:
    def __init__(self, tiers: TieredKV, max_pages: int):
        from cuda.bindings import runtime as cudart

        self.cudart = cudart
        self.tiers = tiers
        self.staging = torch.empty(
            (2, max(max_pages, 1), 1, *tiers.page_shape[1:]), dtype=tiers.dtype, device=tiers.device
        )
        self.stream = torch.cuda.Stream(tiers.device)
        self.began = [torch.cuda.Event(enable_timing=True) for _ in range(2)]  # the buffer's copy started
        self.ready = [torch.cuda.Event(enable_timing=True) for _ in range(2)]  # the buffer's copy is done
        self.released = [torch.cuda.Event() for _ in range(2)]  # the buffer's last reader is done
        for e in self.released:
            e.record()
        self.runs: list[tuple[int, int, int]] = []
        self.last_layer = -1

    def set_pages(self, dram_slots: np.ndarray) -> None:
        """The DRAM slots fetched every layer of this step (staging index i holds dram_slots[i])."""
        if len(dram_slots) > self.staging.shape[1]:
            raise ValueError(f"{len(dram_slots)} pages to fetch; the staging buffer holds {self.staging.shape[1]}")
        self.runs = slot_runs(np.asarray(dram_slots))

    def start(self, layer: int) -> None:
        """Enqueue the copy of `layer` into its buffer once that buffer's previous reader is done."""
        buf = layer % 2
        self.stream.wait_event(self.released[buf])
        self.began[buf].record(self.stream)
        self.last_layer = layer
        src_base, dst_base = self.tiers.dram.data_ptr(), self.staging[buf].data_ptr()
        page, piece = self.tiers.page_bytes, self.tiers.slice_bytes
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        stream = self.stream.cuda_stream
        for src, dst, n in self.runs:
            (err,) = self.cudart.cudaMemcpy2DAsync(
                dst_base + dst * piece, piece, src_base + src * page + layer * piece, page, piece, n, kind, stream
            )
            if err != self.cudart.cudaError_t.cudaSuccess:
                raise RuntimeError(f"cudaMemcpy2DAsync failed: {err}")
        self.ready[buf].record(self.stream)

    def buffer(self, layer: int) -> torch.Tensor:
        """Make the current stream wait for `layer`'s copy; the staging buffer as a 1-layer KV pool."""
        buf = layer % 2
        torch.cuda.current_stream(self.tiers.device).wait_event(self.ready[buf])
        return self.staging[buf]

    def release(self, layer: int) -> None:
        """Mark `layer`'s buffer free once the work queued so far on the current stream is done."""
        self.released[layer % 2].record(torch.cuda.current_stream(self.tiers.device))

    def measured_bandwidth(self) -> float | None:
        """Bytes/s of the last layer's copy (call after it finished), None if nothing was copied."""
        if self.last_layer < 0 or not self.runs:
            return None
        buf = self.last_layer % 2
        seconds = self.began[buf].elapsed_time(self.ready[buf]) / 1e3
        pages = sum(n for _, _, n in self.runs)
        return pages * self.tiers.slice_bytes / seconds if seconds > 0 else None
