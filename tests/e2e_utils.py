"""End-to-end test support: the shared tiny build, and the package's CPU launcher (``recipe.disco.cpu.launch``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from recipe.disco.cpu.launch import cpu_overrides, run_trainer
from recipe.disco.cpu.tiny import TinyBuild, build_tiny

TINY_CACHE = Path(tempfile.gettempdir()) / "disco-tiny-cache"


def cached_tiny_build(seed: int = 0) -> TinyBuild:
    """The tiny model and task, built once per machine (``build_tiny`` reuses a build of the same specification)."""
    return build_tiny(TINY_CACHE, seed)


__all__ = ["cached_tiny_build", "cpu_overrides", "run_trainer", "TINY_CACHE"]
