"""Where fastvit keeps per-user files: the JIT-built extension and the tuning table.

``$FASTVIT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fastvit``, else ``~/.cache/fastvit``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The user's fastvit cache folder (not created here).

    Example:
        >>> fastvit.cache.cache_dir()
        PosixPath('/home/me/.cache/fastvit')
    """
    explicit = os.environ.get("FASTVIT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fastvit"
