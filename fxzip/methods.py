"""The merge methods by name: one place that defines which methods fxzip offers."""
from __future__ import annotations

METHOD_NAMES: tuple[str, ...] = ("average", "permute", "zipit")
