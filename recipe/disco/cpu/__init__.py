"""CPU backend for verl, for tests and the demo only: a CPU platform and a ``generate``-based rollout (``hf``).

Opt-in: nothing happens unless ``DISCO_CPU_BACKEND=1`` is set in the environment, so it is never selected on a GPU
cluster unless asked. ``recipe.disco.plugin`` (the ``verl.plugins`` entry point, imported by ``import verl`` in
every process) calls ``maybe_activate``. Set the variable before Ray starts: the processes of a local Ray cluster
inherit the driver's environment; for an existing cluster pass it in ``ray_kwargs.ray_init.runtime_env.env_vars``.

Running verl's trainer on CPU also needs these overrides (``recipe.disco.cpu.launch.cpu_overrides`` builds the
full list):
``actor_rollout_ref.rollout.name=hf``, ``actor_rollout_ref.actor.strategy=fsdp2``,
``+actor_rollout_ref.model.override_config.attn_implementation=sdpa``, ``trainer.device=cpu``,
``+ray_kwargs.ray_init.num_gpus=<n_gpus_per_node>`` (logical GPUs) and ``ray_kwargs.ray_init.num_cpus=16``
(logical CPUs, enough for verl's helper actors). verl's real vLLM rollout (``rollout.name=vllm``) runs too, in the
environment of ``recipe/disco/cpu/vllm_env.sh``: see ``recipe.disco.cpu.vllm``.
"""

import logging
import os

ENV_FLAG = "DISCO_CPU_BACKEND"
ROLLOUT_NAME = "hf"
logger = logging.getLogger(__name__)
_active = False


def maybe_activate() -> None:
    """Activate the CPU backend in this process when ``DISCO_CPU_BACKEND=1``; a no-op otherwise or if active.

    verl swallows exceptions from plugins (logged at DEBUG), so a failure is logged at ERROR here, and
    ``VERL_PLATFORM=cpu`` is set first while the platform is registered last: a process where activation failed
    stops at verl's first device lookup with "Unknown platform 'cpu'" instead of running as if it had a GPU.
    """
    global _active
    if os.environ.get(ENV_FLAG) != "1" or _active:
        return
    os.environ["VERL_PLATFORM"] = "cpu"
    try:
        from recipe.disco.cpu import platform, vllm

        _register_rollout()
        vllm.install()  # vLLM CPU patches, for rollout.name=vllm: inert without vLLM or on vLLM's CUDA platform
        platform.activate()
    except Exception:
        logger.exception("the DisCO CPU backend (%s=1) failed to activate in process %d", ENV_FLAG, os.getpid())
        raise
    _active = True


def _register_rollout() -> None:
    """Register the ``hf`` rollout in verl's two rollout registries, by name: ``recipe.disco.cpu.rollout`` (which
    imports verl) is loaded only when verl builds the rollout, so importing it first in a process is no cycle."""
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    _ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "recipe.disco.cpu.rollout.HFServerAdapter"
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)


def _load_replica() -> type:
    from recipe.disco.cpu.rollout import HFReplica

    return HFReplica
