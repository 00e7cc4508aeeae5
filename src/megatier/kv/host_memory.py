"""Host memory for the DRAM tier: backed by 2 MiB pages where the kernel allows, and pinned for the GPU.

The host attention kernel reads a step's DRAM slices scattered over the pool, a few KiB at a time. On
the H100 host it read `cudaHostAlloc`'s pinned 4 KiB pages at ~60 GB/s inside the step, while over
pageable memory (where THP could back it) the micro-benchmark reached 103-114 GB/s (docs/PERF.md); TLB
misses are the suspected cause, not yet confirmed by a measurement on this pool. So the pool is an
anonymous mapping advised for transparent huge pages (`MADV_HUGEPAGE`, honoured when
/sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`), touched so the pages are real,
then registered with CUDA (`cudaHostRegister`, mapped), which pins it for DMA copies and the GPU's
zero-copy reads as `cudaHostAlloc` memory would be. If the registration fails the pool falls back to
torch's pinned allocation; without THP it is simply on 4 KiB pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import weakref

import torch

HUGE_PAGE = 2 << 20
_REGISTER_FLAGS = 0x1 | 0x2  # cudaHostRegisterPortable | cudaHostRegisterMapped


def host_pool(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """An uninitialized tensor of `shape` in host memory on huge pages where the OS allows; pinned (and
    mapped into the GPU's address space) if `pinned`."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, pin_memory=pinned)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to start on a huge-page boundary
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    offset = -base % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # THP off: 4 KiB pages, as torch's allocation would give
            region.madvise(mmap.MADV_HUGEPAGE, offset, size - offset)
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)
    flat[:: mmap.PAGESIZE].zero_()  # fault every page in now (on huge pages where advised), not in a step
    if pinned:
        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(flat.data_ptr(), nbytes, _REGISTER_FLAGS)) != 0:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        weakref.finalize(region, cudart.cudaHostUnregister, flat.data_ptr())
    return flat.view(dtype).view(shape)


def huge_page_fraction(tensor: torch.Tensor) -> float | None:
    """The share of `tensor`'s bytes on transparent huge pages, from /proc/self/smaps (None where that
    cannot be read): what the benchmarks report beside the host kernel's bandwidth."""
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    huge = total = 0
    try:
        with open("/proc/self/smaps") as smaps:
            inside = False
            for line in smaps:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo < end and hi > start
                    span = min(hi, end) - max(lo, start) if inside else 0
                    total += span
                elif inside and head == "AnonHugePages:":
                    huge += min(int(line.split()[1]) * 1024, span)
    except OSError:
        return None
    return huge / total if total else None
