"""Where HiRE keeps what it builds once: converted models, native kernels, fitted proxies, the corpus.

The bottom floor: imports nothing from hire, so every room may read it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$HIRE_CACHE`` or ``~/.cache/hire``."""
    return Path(os.environ.get("HIRE_CACHE", Path.home() / ".cache" / "hire"))


def cache_dir(*parts: str) -> Path:
    """``cache_root()/parts...``, created if missing."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
