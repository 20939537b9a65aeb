"""Where infercache keeps what it prepares: converted models, head profiles, stores, runs."""

from __future__ import annotations

import os
from pathlib import Path


def infercache_home() -> Path:
    """``$INFERCACHE_HOME``, else ``$XDG_CACHE_HOME/infercache``, else ``~/.cache/infercache``."""
    explicit = os.environ.get("INFERCACHE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "infercache"
