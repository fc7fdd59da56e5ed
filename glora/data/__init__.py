"""Data (VTAB-1k layout, offline tasks) and backbones (timm models, checkpoints, offline DINOv2 weights)."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """Folder for converted weights and downloaded offline assets (``$GLORA_CACHE`` or ~/.cache/glora-search)."""
    env = os.environ.get("GLORA_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "glora-search"
