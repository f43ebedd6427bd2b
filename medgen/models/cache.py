"""Where MedGen keeps files it derives once and reuses (converted weights)."""

from __future__ import annotations

import os
from pathlib import Path


def medgen_cache_dir() -> Path:
    """``$MEDGEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/medgen``, else ``~/.cache/medgen`` (not created here)."""
    if os.environ.get("MEDGEN_CACHE_DIR"):
        return Path(os.environ["MEDGEN_CACHE_DIR"]).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg_cache).expanduser() if xdg_cache else Path.home() / ".cache") / "medgen"
