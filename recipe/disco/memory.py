"""The per-GPU memory estimate of a colocated verl run (FSDP actor and vLLM/SGLang rollout), in plain Python.

No verl import, so that the GPU check (:mod:`recipe.disco.gpu_check`) can compare it with a real allocation on a
machine without verl; :mod:`recipe.disco.preflight` reads the layout from the composed config and checks it against
the card.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
# Not in the estimate's terms and not released by sleep mode: the CUDA contexts of the training and the rollout
# processes, NCCL buffers and vLLM's captured CUDA graphs (verl's rollout.yaml:54-55: they cannot be offloaded).
# Taken as 4 GiB (typically 0.5 GiB per CUDA context, up to 1-2 GiB of NCCL buffers and graphs); not measured here.
RUNTIME_OVERHEAD_BYTES = 4 * GIB


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Qwen2/Llama layout: GQA attention with q/k/v biases, SwiGLU MLP, RMSNorm)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool
    head_dim: int | None = None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        """q and o (h x h), k and v (h x kv), q/k/v biases, gate/up/down (3 h I), two norms."""
        h, kv = self.hidden, self.kv_dim
        return 2 * h * h + 2 * h * kv + h + 2 * kv + 3 * h * self.intermediate + 2 * h

    @property
    def vocab_params(self) -> int:
        """Input embedding and output head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def hf_config(self) -> dict:
        """The shape as Hugging Face config fields (what ``preflight.model_shape`` reads from ``config.json``)."""
        return {
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "tie_word_embeddings": self.tied,
            **({"head_dim": self.head_dim} if self.head_dim else {}),
        }

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab_params + self.hidden  # + final norm


# The paper's models, so that the estimate works before the download (their config.json, Qwen2ForCausalLM;
# parameter counts 1,777,088,000 and 7,615,616,512: the 1.78B and 7.62B the Hub lists).
PAPER_MODELS = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": ModelShape(1536, 28, 8960, 151936, 12, 2, tied=False),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": ModelShape(3584, 28, 18944, 152064, 28, 4, tied=False),
}


@dataclass(frozen=True)
class Layout:
    """What the memory estimate needs from the configuration (see :func:`layout_from_config`)."""

    shard_gpus: int  # GPUs the FSDP states are sharded over
    update_tokens: int  # tokens per GPU in one micro-batch of the actor update
    log_prob_tokens: int  # tokens per GPU in one micro-batch of the old-log-prob pass
    rollout_fraction: float  # gpu_memory_utilization of vLLM/SGLang (0 for another rollout)
    rollout_sleeps: bool  # the engine frees its weights and KV cache for the actor passes
    param_offload: bool
    optimizer_offload: bool
    cpu_offload_policy: bool  # FSDP2 offload_policy: the sharded states stay in host memory in the update too
    trains: bool  # False with trainer.val_only
    optimizer_state: bool  # AdamW moments exist: in training, or loaded from a checkpoint with val_only
    packed_dense_mask: bool = False  # packed micro-batches (use_remove_padding) with sdpa/eager attention


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of each phase, term by term (``phases[phase][term]``)."""

    phases: dict[str, dict[str, int]]

    def total(self, phase: str) -> int:
        return sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)


def rollout_engine_memory(shape: ModelShape, tensor_parallel: int, dtype_bytes: int, max_model_len: int) -> dict:
    """The least a vLLM/SGLang engine holds on each of its GPUs within ``gpu_memory_utilization x card``, term by
    term: its weights, b P / tp, and the KV cache of one ``max_model_len`` sequence, 2 L ceil(kv_heads / tp) d b per
    token (a key and a value per layer; tensor parallelism splits the key/value heads, and replicates them when there
    are fewer heads than GPUs). b = bytes of the rollout dtype, d = head dimension. The engine refuses to start when
    one sequence's cache does not fit beside its weights.
    """
    heads = -(-shape.kv_heads // tensor_parallel)
    head_dim = shape.kv_dim // shape.kv_heads
    return {
        "weights": dtype_bytes * shape.params // tensor_parallel,
        "KV cache of one sequence": 2 * shape.layers * heads * head_dim * dtype_bytes * max_model_len,
    }


def estimate_memory(shape: ModelShape, layout: Layout, card_bytes: int) -> MemoryEstimate:
    """Conservative per-GPU memory of the colocated actor (FSDP) and rollout engine, per phase of a training step.

    P = parameters, S = GPUs the FSDP states are sharded over, V = vocabulary, h = hidden size, L = layers,
    I = MLP size, kv = key/value width, U = P_vocab + 2 P_layer (the FSDP units unsharded at once: verl wraps the
    embedding and the head as their own units, or keeps them in the root unit (FSDP1), for the whole pass, plus the
    layer at work and the prefetched one), T = tokens per GPU in one micro-batch
    (``micro_batch_size_per_gpu x (max_prompt + max_response) / ulysses``, or the per-GPU token budget with
    dynamic batch size), f = ``gpu_memory_utilization``, C = the card's memory, R = :data:`RUNTIME_OVERHEAD_BYTES`.

    * generation: f C (vLLM/SGLang) + 4P/S (fp32 weights, unless param_offload) + 8P/S (AdamW moments, unless
      optimizer_offload; with val_only only if a checkpoint loads them) + R. The only phase with val_only.
      The actor keeps its state on the GPU while the engine generates: verl offloads
      weights only with param_offload (engine_workers.py:811-812) and the optimizer only with optimizer_offload
      (engine/base.py:314-327 on leaving train mode).
    * old_log_prob (no grad): 4P/S + 8P/S (unless optimizer_offload; eval mode loads the weights back even with
      param_offload) + 2U (bf16 gathered units) + T_lp (2(10h + 2kv + 7I) + 4V) + R.
    * update: 16P/S (fp32 weights, gradients, two AdamW moments; train mode loads offloaded ones back, so offload
      does not lower this; only FSDP2 offload_policy keeps them on the host) + 8U (bf16 weights, bf16 gradients and
      their fp32 copy for the reduce-scatter) + T (2Lh + 2(10h + 2kv + 7I) + 4V) + R.
    * Activations per token (bf16): 2Lh for the layer inputs gradient checkpointing keeps, 2(10h + 2kv + 7I) for
      the one layer recomputed in backward (its saved tensors: fp32 norm inputs, norm outputs, q/k/v, attention
      output, gate/up/SiLU/product of the MLP; and the gradients in flight). Logits 4V per token: verl keeps the
      bf16 logits and their temperature-scaled copy (fsdp/transformer_impl.py:98-103, 1382-1390), whose storage
      the flash-attn cross-entropy backward reuses for the gradient.
    * Packed micro-batches without flash-attention (``use_remove_padding`` with sdpa or eager): transformers
      builds one token-by-token boolean mask over the packed sequences (T^2 bytes, kept for the forward and the
      recomputation), and SDPA turns it into an additive mask of the compute dtype at each call (2 T^2 in bf16):
      3 T^2 per micro-batch, 3.8 GiB at T = 36864. Flash-attention takes the sequence boundaries instead.
    * The rollout engine's f C is not held in the actor passes when it sleeps: with ``free_cache_engine`` (default
      True, rollout.yaml:61) and ``enable_sleep_mode`` (default True, workers/config/rollout.py:268) verl's sync
      trainer puts it to sleep after sampling (trainer_sync.py:40-42 -> checkpoint_engine/base.py:467-469 ->
      vllm_async_server.py:853-860: hybrid mode, sleep level 2 for vLLM >= 0.18, third_party/vllm/__init__.py:46-48,
      vllm_async_server.py:1289-1317, weights and KV cache discarded; SGLang: async_sglang_server.py:504-518) and
      wakes it only to sync weights at the end of the step (trainer_sync.py:35-38, engine_workers.py:768-825).
      Otherwise f C is added to both actor phases.
    """
    per_gpu = shape.params / layout.shard_gpus
    held = 0 if layout.rollout_sleeps else layout.rollout_fraction * card_bytes
    moments = 8 * per_gpu if layout.optimizer_state and not layout.optimizer_offload else 0
    gathered = shape.vocab_params + 2 * shape.layer_params
    layer = 2 * (10 * shape.hidden + 2 * shape.kv_dim + 7 * shape.intermediate)
    logits = 4 * shape.vocab
    mask_per_pair = 3 if layout.packed_dense_mask else 0
    phases = {
        "generation": {
            "rollout engine (gpu_memory_utilization x card)": layout.rollout_fraction * card_bytes,
            "fp32 weights": 0 if layout.param_offload else 4 * per_gpu,
            "AdamW moments": moments,
            "runtime": RUNTIME_OVERHEAD_BYTES,
        }
    }
    if layout.trains:
        phases["old_log_prob"] = {
            "rollout engine": held,
            "fp32 weights": 4 * per_gpu,
            "AdamW moments": moments,
            "gathered FSDP units": 2 * gathered,
            "activations": layout.log_prob_tokens * layer,
            "logits": layout.log_prob_tokens * logits,
            "attention mask": mask_per_pair * layout.log_prob_tokens**2,
            "runtime": RUNTIME_OVERHEAD_BYTES,
        }
        phases["update"] = {
            "rollout engine": held,
            "fp32 weights, gradients, AdamW moments": 0 if layout.cpu_offload_policy else 16 * per_gpu,
            "gathered FSDP units": 8 * gathered,
            "activations": layout.update_tokens * (2 * shape.layers * shape.hidden + layer),
            "logits": layout.update_tokens * logits,
            "attention mask": mask_per_pair * layout.update_tokens**2,
            "runtime": RUNTIME_OVERHEAD_BYTES,
        }
    return MemoryEstimate(
        {phase: {term: int(value) for term, value in terms.items()} for phase, terms in phases.items()}
    )
