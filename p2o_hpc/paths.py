"""Where the project finds shared data and keeps its caches, overridable by environment for clusters."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """The read-only data copies (../shared/data beside the checkout unless P2O_SHARED_DATA says otherwise)."""
    path = Path(os.environ.get("P2O_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared data folder {path} does not exist; set P2O_SHARED_DATA to the folder holding MANIFEST.md"
        )
    return path


def cache_dir() -> Path:
    """Project-owned cache (tiny models, derived data); never inside shared/."""
    path = Path(os.environ.get("P2O_CACHE_DIR", REPO_ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path
