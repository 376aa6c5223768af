"""Test-only verl external module: verl's vLLM rollout never receives the actor's weights.

Loaded in every process of a run by ``VERL_USE_EXTERNAL_MODULES=vllm_sync_dropped`` (with this directory on
``PYTHONPATH``). It activates the real plugin first (the CPU backend must be up before verl's workers are imported),
then replaces the trainer-side ``ServerAdapter.update_weights`` by one that produces every tensor (each is a
collective over the FSDP ranks) and drops it: the engine keeps the dummy weights it started from, as after a broken
sync on a GPU.
"""

import recipe.disco.plugin  # noqa: F401, I001  (the real plugin and CPU backend, first: the order matters)
from verl.workers.rollout.vllm_rollout import vllm_rollout


async def update_weights(self, weights, global_steps=None, **kwargs) -> None:
    for _ in weights:
        pass
    if global_steps is not None and self._ensure_server_handle():
        await self.server_handle.set_global_steps.remote(global_steps)


vllm_rollout.ServerAdapter.update_weights = update_weights
