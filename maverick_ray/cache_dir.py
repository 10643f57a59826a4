"""Where maverick-ray keeps files it makes on first use (tiny checkpoint, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MAVERICK_RAY_CACHE, else $XDG_CACHE_HOME/maverick-ray, else ~/.cache/maverick-ray."""
    base = os.environ.get("MAVERICK_RAY_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maverick-ray"
