"""Where the package keeps its files: the ground floor that any module may import for a path, without torch."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the on-disk cache: ``$RETENTION_CACHE`` or ``~/.cache/retention``."""
    return Path(os.environ.get("RETENTION_CACHE", Path.home() / ".cache" / "retention"))
