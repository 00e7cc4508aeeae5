"""Programmatic dependent launch (PDL, Hopper and newer).

A kernel launched with PDL may be scheduled while the previous kernel on the stream is still draining,
so its launch latency hides behind that kernel's tail. Every kernel here that can be launched this way
calls `gdc_wait()` first, before it reads or writes anything, so it never sees a half-finished
predecessor; a kernel that is not launched with PDL passes through that wait at once.
"""

from __future__ import annotations

import os

import torch

# MEGATIER_PDL=0 turns PDL off (to measure what it buys, or to rule it out); so does setting this False.
enabled = os.environ.get("MEGATIER_PDL", "1") != "0"


def use_pdl(device: torch.device) -> bool:
    """True when kernels on `device` should be launched with PDL."""
    if not enabled or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9
