"""A rollout backend for verl built on Hugging Face ``generate``: ``actor_rollout_ref.rollout.name=hf``.

verl 0.9.1 ships only the vllm, sglang and trtllm rollouts, none of which runs on a CPU. This backend plugs into
verl's asynchronous server path (the one both trainers use); ``recipe.disco.cpu`` registers it in verl's two
rollout registries:

* ``HFRolloutServer``, a Ray actor per replica that holds a copy of the policy and answers the token-in,
  token-out ``generate`` requests of verl's agent loop. It samples with the request's temperature, top_p, top_k
  and repetition penalty and returns, for every sampled token, its log-probability under the distribution it was
  sampled from (the processed logits, like vLLM's ``processed_logprobs``): with top_p 1 and top_k -1 that is
  ``log_softmax(logits / temperature)``, the quantity verl's actor computes as ``old_log_probs``. It also returns
  ``extra_fields["global_steps"]``, the version of the weights it sampled with. Concurrent requests (verl sends
  one per trajectory, ``n`` per prompt) are batched into one ``generate`` call per distinct sampling setting.
* ``HFReplica``, the ``RolloutReplica`` that starts the server, on the trainer's workers (hybrid) or on a
  standalone pool (verl's ``separate_async`` trainer).
* ``HFServerAdapter``, the ``BaseRollout`` inside each trainer worker (or standalone rollout worker):
  ``update_weights`` receives the actor's weights through verl's default ``naive`` checkpoint engine (or, in a
  standalone pool, ``recipe.disco.cpu.checkpoint_engine``), and the first rank of each replica sends them to the
  server. The synchronous trainer does this after every actor update, so rollouts are on-policy.

Limits: for tests and the demo only, never for real training. CPU only, float32, one server process per replica
and no parallelism inside it (``tensor_model_parallel_size`` only decides how many trainer ranks share a server;
the model is not sharded). Hybrid and standalone replicas only (not for reward or teacher models), text only, no
LoRA, no partial rollout: ``abort_all_requests`` does not interrupt a running ``generate``.
Generation is plain Hugging Face ``generate`` with left padding and no KV-cache sharing, so it is slow beyond
tiny models.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig, RolloutConfig
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput
from verl.workers.rollout.utils import ensure_async_iterator

BATCH_WINDOW_S = 0.01  # how long the server waits for concurrent requests before it starts a batch
_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "repetition_penalty", "logprobs", "max_tokens", "max_new_tokens"}


def server_name(replica_rank: int) -> str:
    """Ray actor name of the server of replica ``replica_rank`` (also used as its address)."""
    return f"disco_hf_rollout_{replica_rank}"


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one request; requests with equal settings share a ``generate`` call."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_new_tokens: int

    @classmethod
    def from_request(cls, params: dict[str, Any], response_length: int) -> Sampling:
        """Read verl's ``sampling_params`` dict; ``max_tokens`` (or ``max_new_tokens``) can only shorten."""
        unknown = set(params) - _SAMPLING_KEYS
        if unknown:
            raise ValueError(
                f"the hf rollout does not support the sampling parameters {sorted(unknown)} (it handles "
                f"{sorted(_SAMPLING_KEYS)}); use a vllm or sglang rollout for them"
            )
        limit = params.get("max_tokens", params.get("max_new_tokens", response_length))
        return cls(
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(params.get("top_k", -1)),
            repetition_penalty=float(params.get("repetition_penalty", 1.0)),
            max_new_tokens=max(1, min(int(limit), response_length)),
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``generate``: greedy at temperature 0, else sampling (top_k <= 0 means off)."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature <= 0:
            return {**kwargs, "do_sample": False}
        top_k = max(self.top_k, 0)
        return {**kwargs, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": top_k}


@dataclass
class _Request:
    prompt_ids: list[int]
    sampling: Sampling
    future: asyncio.Future


class HFRolloutServer:
    """The replica's policy copy (a Ray actor): batched ``generate`` plus verl's server control methods."""

    def __init__(self, config: RolloutConfig, model_config: Any, replica_rank: int) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.config: RolloutConfig = omega_conf_to_dataclass(config)
        model_path = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig).local_path
        torch.set_num_threads(1)
        torch.manual_seed(self.config.seed + replica_rank)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa", dtype=torch.float32)
        self.model.eval()
        saved = self.model.generation_config
        eos = saved.eos_token_id if saved.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = saved.pad_token_id if saved.pad_token_id is not None else min(self.eos_ids)
        # Drop the checkpoint's sampling defaults (top_k, temperature, ...): every request sets its own.
        self.model.generation_config = GenerationConfig(eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id)
        self.global_steps = 0  # version of the weights, set with each weight update
        self._pending: list[_Request] = []
        self._drainer: asyncio.Task | None = None
        self._model_lock = asyncio.Lock()

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str | None = None,
        image_data: Any = None,
        video_data: Any = None,
        **kwargs: Any,
    ) -> TokenOutput:
        """Sample one response to ``prompt_ids``; batched with the other requests that arrive meanwhile."""
        if image_data is not None or video_data is not None or kwargs.get("audio_data") is not None:
            raise NotImplementedError("the hf rollout serves text prompts only")
        sampling = Sampling.from_request(sampling_params, self.config.response_length)
        request = _Request(list(prompt_ids), sampling, asyncio.get_running_loop().create_future())
        self._pending.append(request)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        token_ids, log_probs, version = await request.future
        return TokenOutput(
            token_ids=token_ids, log_probs=log_probs, stop_reason="completed", extra_fields={"global_steps": version}
        )

    async def _drain(self) -> None:
        while self._pending:
            await asyncio.sleep(BATCH_WINDOW_S)
            batch, self._pending = self._pending, []
            groups: dict[Sampling, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.sampling, []).append(request)
            async with self._model_lock:
                for sampling, requests in groups.items():
                    await self._run(sampling, requests)

    async def _run(self, sampling: Sampling, requests: list[_Request]) -> None:
        try:
            outputs = await asyncio.to_thread(self.sample, [r.prompt_ids for r in requests], sampling)
        except Exception as error:  # hand the failure to every waiting request
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        for request, (token_ids, log_probs) in zip(requests, outputs, strict=True):
            if not request.future.done():  # a cancelled caller has stopped waiting
                request.future.set_result((token_ids, log_probs, self.global_steps))

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], sampling: Sampling) -> list[tuple[list[int], list[float]]]:
        """One ``generate`` call over left-padded ``prompts``: per prompt, the response ids up to and including
        the first end-of-sequence token, and the log-probability of each under the sampling distribution."""
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_scores=True,
            return_dict_in_generate=True,
            **sampling.generate_kwargs(),
        )
        responses = output.sequences[:, width:]
        scores = torch.stack(output.scores, dim=1).float()  # processed logits, (batch, steps, vocab)
        log_probs = torch.log_softmax(scores, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        results = []
        for token_ids, token_log_probs in zip(responses.tolist(), log_probs.tolist(), strict=True):
            length = next((i + 1 for i, token in enumerate(token_ids) if token in self.eos_ids), len(token_ids))
            results.append((token_ids[:length], token_log_probs[:length]))
        return results

    async def load_weights(self, named_tensors: dict[str, torch.Tensor], global_steps: int | None) -> None:
        """Load the actor's weights (between batches) and record their version."""
        async with self._model_lock:
            missing, unexpected = self.model.load_state_dict(named_tensors, strict=False)
            loaded = {tensor.data_ptr() for name, tensor in self.model.state_dict().items() if name in named_tensors}
            untied_missing = [name for name in missing if self.model.state_dict()[name].data_ptr() not in loaded]
            if unexpected or untied_missing:
                raise ValueError(
                    f"the actor's weights do not match the rollout model: unexpected {unexpected}, "
                    f"missing {untied_missing}"
                )
            if global_steps is not None:
                self.global_steps = global_steps

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Nothing to abort: a running ``generate`` finishes (no partial rollout)."""
        return {}

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """No-op: the model stays in memory (also ``sleep`` and the KV-cache, resume and profiling calls)."""

    async def sleep(self) -> None:
        pass

    async def clear_kv_cache(self) -> None:
        pass

    async def release_kv_cache(self) -> None:
        pass

    async def resume_kv_cache(self) -> None:
        pass

    async def resume_generation(self) -> None:
        pass

    async def start_profile(self, **kwargs: Any) -> None:
        pass

    async def stop_profile(self) -> None:
        pass


class HFReplica(RolloutReplica):
    """Starts one ``HFRolloutServer`` per replica: on the trainer's workers (hybrid) or on a standalone pool of its
    own (separate_async's rollout, its weights sent by ``recipe.disco.cpu.checkpoint_engine``)."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self) -> None:
        if self.rollout_mode not in (RolloutMode.HYBRID, RolloutMode.STANDALONE):
            raise NotImplementedError(
                f"the hf rollout runs on the trainer's workers or on a standalone pool, not {self.rollout_mode}; "
                "do not use it for reward or teacher models"
            )
        name = server_name(self.replica_rank)
        server = (
            ray.remote(HFRolloutServer)
            .options(name=name, num_cpus=0, max_concurrency=self.max_concurrency)
            .remote(self.config, self.model_config, self.replica_rank)
        )
        await server.__ray_ready__.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = name


class HFServerAdapter(BaseRollout):
    """The rollout's handle inside each trainer worker: it forwards the actor's weights to the server."""

    def __init__(self, config: RolloutConfig, model_config: HFModelConfig, device_mesh: Any, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        ranks_per_replica = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        rank = int(os.environ["RANK"])
        self.replica_rank = rank // ranks_per_replica if replica_rank == -1 else replica_rank
        self.sends_weights = rank % ranks_per_replica == 0

    async def resume(self, tags: list[str]) -> None:
        pass

    async def release(self) -> None:
        pass

    async def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        wire_format: str = "named_tensors",
        peft_config: Any = None,
        global_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Send the actor's weights (version ``global_steps``) to this replica's server.

        Every rank iterates ``weights``: producing each full tensor is a collective over the FSDP ranks. In a
        standalone pool ``weights`` is the checkpoint engine's stream (an async iterator).
        """
        if wire_format != "named_tensors" or peft_config is not None:
            raise NotImplementedError(
                f"the hf rollout takes full named tensors only (got wire_format={wire_format!r}, "
                f"LoRA adapter: {peft_config is not None}); use actor_rollout_ref.rollout.checkpoint_engine."
                "backend=naive and no LoRA"
            )
        named_tensors = {name: tensor.detach().cpu() async for name, tensor in ensure_async_iterator(weights)}
        if self.sends_weights:
            server = ray.get_actor(server_name(self.replica_rank))
            await server.load_weights.remote(named_tensors, global_steps)
