"""CPU backend for verl (tests and the demo only): a CPU platform and a ``generate``-based rollout."""

import os


def maybe_activate() -> None:
    """Activate the CPU backend in this process when ``DISCO_CPU_BACKEND=1``."""
    if os.environ.get("DISCO_CPU_BACKEND") != "1":
        return
