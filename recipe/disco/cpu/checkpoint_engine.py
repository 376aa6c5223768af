"""A checkpoint engine for the CPU backend: the actor's weights reach a standalone rollout pool through Ray's object
store (for verl's ``separate_async`` trainer, which refuses the in-process ``naive`` engine; NCCL needs GPUs).

Selected with ``actor_rollout_ref.rollout.checkpoint_engine.backend=cpu`` and
``actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module=recipe.disco.cpu.checkpoint_engine``: verl
imports the module in every process that builds an engine, which registers :class:`CPUCheckpointEngine`.

One sync (verl's ``CheckpointEngineManager.update_weights``): ``prepare`` on every actor rank and rollout worker
(actor rank 0 makes a mailbox actor once and opens a session), ``build_topology`` in the trainer (rank 0 sends,
everyone learns the mailbox and session), ``init_process_group`` (stores them), then, concurrently, the actor ranks'
``send_weights`` (every rank walks the weights: each full tensor is a collective over the FSDP ranks; rank 0 puts a
copy of them into the object store and posts its reference) and the rollout workers' ``receive_weights`` (wait for
the reference, yield the tensors), and ``finalize``. The tiny CPU models fit in one object.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import ray
import torch
from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry
from verl.workers.rollout.utils import ensure_async_iterator

BACKEND = "cpu"
SYNC_TIMEOUT_S = 600  # a receiver whose sender failed stops waiting (the sync fails instead of hanging)


class _Mailbox:
    """A Ray actor holding, per session, the object reference of the weights once the sender has posted it."""

    def __init__(self) -> None:
        self._posted: dict[str, asyncio.Future] = {}

    def _slot(self, session: str) -> asyncio.Future:
        return self._posted.setdefault(session, asyncio.get_running_loop().create_future())

    async def post(self, session: str, weights: list[ray.ObjectRef]) -> None:
        self._slot(session).set_result(weights)  # in a list: Ray passes the reference, not the weights

    async def fetch(self, session: str) -> list[ray.ObjectRef]:
        return await self._slot(session)

    async def close(self, session: str) -> None:
        self._posted.pop(session, None)


@CheckpointEngineRegistry.register(BACKEND)
class CPUCheckpointEngine(CheckpointEngine):
    """Actor rank 0 -> Ray object store -> every rollout worker; see the module docstring."""

    def __init__(self, bucket_size: int, is_master: bool = False) -> None:
        self.is_master = is_master  # actor rank 0 (verl passes False on the rollout side)
        self.mailbox: Any = None
        self.session: str | None = None
        self.sender = False
        self._weights: list[ray.ObjectRef] = []  # kept alive until finalize

    def prepare(self) -> dict[str, Any]:
        if not self.is_master:
            return {}
        if self.mailbox is None:
            self.mailbox = ray.remote(num_cpus=0)(_Mailbox).remote()
        return {"mailbox": self.mailbox, "session": uuid.uuid4().hex}

    @classmethod
    def build_topology(
        cls, trainer_world_size: int, rollout_world_size: int, metadata: list[dict]
    ) -> tuple[dict[str, list], dict[str, list]]:
        """``metadata``: the actor ranks' ``prepare`` results, then the rollout workers'."""
        (master,) = [meta for meta in metadata[:trainer_world_size] if meta]
        shared = {key: [master[key]] * trainer_world_size for key in ("mailbox", "session")}
        actor = {**shared, "sender": [bool(meta) for meta in metadata[:trainer_world_size]]}
        rollout = {key: [master[key]] * rollout_world_size for key in ("mailbox", "session")}
        return actor, {**rollout, "sender": [False] * rollout_world_size}

    def init_process_group(self, mailbox: Any, session: str, sender: bool) -> None:
        self.mailbox, self.session, self.sender = mailbox, session, sender

    def finalize(self) -> None:
        if self.sender:
            self.mailbox.close.remote(self.session)
        self._weights = []
        self.session, self.sender = None, False

    async def send_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], global_steps: int | None = None
    ) -> dict[str, float]:
        named = {}
        async for name, tensor in ensure_async_iterator(weights):
            if self.sender:
                named[name] = tensor.detach().cpu().clone()
        if self.sender:
            self._weights = [ray.put(named)]
            await self.mailbox.post.remote(self.session, self._weights)
        return {}

    async def receive_weights(self, global_steps: int | None = None) -> AsyncIterator[tuple[str, torch.Tensor]]:
        (reference,) = await asyncio.wait_for(self.mailbox.fetch.remote(self.session), SYNC_TIMEOUT_S)
        for name, tensor in (await reference).items():
            yield name, tensor
