"""The CPU backend's checkpoint engine (``recipe.disco.cpu.checkpoint_engine``), driven the way verl's
``CheckpointEngineManager`` drives it: two actor ranks (rank 0 the master) and two rollout workers, the same weights
through two syncs. End to end it runs in ``test_e2e_disco_on_cpu.py`` (separate_async)."""

from __future__ import annotations

import asyncio

import pytest
import ray
import torch
from verl.checkpoint_engine.base import CheckpointEngineRegistry

from recipe.disco.cpu import checkpoint_engine

BUCKET = 1 << 20


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def weights(version: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(version)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=generator),
        "model.norm.weight": torch.randn(8, generator=generator).to(torch.bfloat16),
        "lm_head.bias": torch.zeros(0),
    }


async def sync(actors, rollouts, sent: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One sync: prepare everywhere, the topology in the trainer, then send and receive concurrently, finalize."""
    engines = actors + rollouts
    metadata = [engine.prepare() for engine in engines]
    actor_kwargs, rollout_kwargs = checkpoint_engine.CPUCheckpointEngine.build_topology(
        len(actors), len(rollouts), metadata
    )
    for group, kwargs in ((actors, actor_kwargs), (rollouts, rollout_kwargs)):
        for i, engine in enumerate(group):
            engine.init_process_group(**{key: values[i] for key, values in kwargs.items()})

    async def receive(engine) -> dict[str, torch.Tensor]:
        return {name: tensor async for name, tensor in engine.receive_weights()}

    # every actor rank walks the weights (a collective on FSDP); only the master's reach the rollout
    sending = [engine.send_weights(iter(sent.items())) for engine in actors]
    *_, received = await asyncio.gather(*sending, asyncio.gather(*map(receive, rollouts)))
    for engine in engines:
        engine.finalize()
    return received


def test_every_rollout_worker_receives_the_masters_weights_as_copies_in_every_sync(local_ray):
    assert CheckpointEngineRegistry.get(checkpoint_engine.BACKEND) is checkpoint_engine.CPUCheckpointEngine
    actors = [checkpoint_engine.CPUCheckpointEngine(BUCKET, is_master=rank == 0) for rank in range(2)]
    rollouts = [checkpoint_engine.CPUCheckpointEngine(BUCKET) for _ in range(2)]
    for version in (1, 2):
        sent = weights(version)
        for received in asyncio.run(sync(actors, rollouts, sent)):
            assert list(received) == list(sent)
            for name, tensor in sent.items():
                assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
                assert received[name].data_ptr() != tensor.data_ptr() or not tensor.numel()
