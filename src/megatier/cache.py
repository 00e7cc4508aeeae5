"""The one directory megatier writes its caches to: GGUF conversions, megakernel cubins, the compiled C
attention kernel. Set by $MEGATIER_CACHE_DIR, else $XDG_CACHE_HOME/megatier, else ~/.cache/megatier."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("MEGATIER_CACHE_DIR"):
        return Path(os.environ["MEGATIER_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "megatier"
