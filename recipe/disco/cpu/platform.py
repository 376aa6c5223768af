"""A CPU platform for verl's platform registry, and the fixes it needs (process groups, CPU copies).

verl 0.9.1 ships platforms for nvidia, huawei and amd only and falls back to nvidia, which fails on a machine
without a GPU. ``activate`` makes verl's process groups (Ray workers', torchrun's) plain ``gloo`` ones, makes
separate_async's CPU copies of pi_old copies (:func:`_copied_shards`), registers ``CPUPlatform`` under the name
``cpu`` and makes it the process-wide platform. It must run before ``verl.workers.engine_workers`` is imported,
because that module binds the process-group function by name.

How verl sees the CPU:
* ``device_name`` is ``cpu``, so tensors stay on the CPU;
* ``ray_resource_name`` is ``GPU``: verl's placement groups ask Ray for GPUs, which a CPU-only Ray cluster
  provides as logical resources when started with a fake count (``+ray_kwargs.ray_init.num_gpus=N``);
* the FSDP engines are registered only for cuda and npu, so ``VERL_ENGINE_DEVICE=cuda`` selects them (for the
  engine lookup only; tensors stay on the CPU).
"""

from __future__ import annotations

import functools
import os
import sys
import types
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry, set_platform

PLATFORM_NAME = "cpu"


class _CPUDeviceModule(types.ModuleType):
    """What ``get_torch_device()`` returns on CPU: verl calls it where it would call ``torch.cuda``.

    Attributes resolve in this order: the CPU answers below, then ``torch.cpu`` (``synchronize``,
    ``current_stream``, ``Stream``, ...), then a no-op returning 0 for the CUDA memory-management calls that have
    nothing to do on a CPU (``empty_cache``, ``reset_peak_memory_stats``, ``ipc_collect``, ...).
    """

    def __init__(self) -> None:
        super().__init__("disco_cpu_device")
        self.is_available = lambda: True
        self.current_device = lambda: "cpu"
        self.device_count = lambda: 1
        self.get_device_name = lambda device=None: "CPU"  # the FLOPs counter matches substrings of this name
        self.manual_seed = torch.manual_seed
        self.manual_seed_all = torch.manual_seed
        self.get_rng_state = lambda device=None: torch.get_rng_state()
        self.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
        self.mem_get_info = lambda device=None: (0, 0)
        for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
            setattr(self, name, lambda device=None: 0)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(torch.cpu, name, _no_op)


def _no_op(*args: Any, **kwargs: Any) -> int:
    return 0


class CPUPlatform(PlatformBase):
    """verl platform for CPU-only machines (tests and the demo)."""

    _device_module = _CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return self._device_module

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: int | None = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> None:
        return None


def activate() -> None:
    """Make verl's trainer process group plain gloo and its FSDP2 CPU copies of the weights real copies, then
    register ``CPUPlatform`` and make it this process's platform (last, so that a failure leaves ``cpu``
    unregistered)."""
    import verl.utils.distributed as distributed

    if "verl.workers.engine_workers" in sys.modules:
        raise RuntimeError(
            "the DisCO CPU backend was activated after verl.workers.engine_workers was imported, which has already "
            "bound verl's NCCL process-group setup; activate it at `import verl` (DISCO_CPU_BACKEND=1 in the "
            "environment of every process) instead"
        )
    import verl.utils.fsdp_utils as fsdp_utils

    initialize = distributed.initialize_global_process_group_ray
    distributed.initialize_global_process_group_ray = _gloo_process_group(initialize)
    distributed.initialize_global_process_group = _gloo_torchrun_process_group
    fsdp_utils.fsdp2_sharded_save_to_cpu = _copied_shards(fsdp_utils.fsdp2_sharded_save_to_cpu)
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    PlatformRegistry.register(platform=PLATFORM_NAME)(CPUPlatform)
    set_platform(CPUPlatform())


def _gloo_process_group(initialize):
    """Wrap verl's ``initialize_global_process_group_ray`` so that its default backend is plain ``gloo``.

    verl builds the default as ``"cpu:gloo,<device>:<backend>"``, which on this platform is
    ``"cpu:gloo,cpu:gloo"`` and rejected by torch. An explicit backend (the checkpoint engine passes
    ``"cpu:gloo"``) is forwarded unchanged.
    """

    def initialize_gloo(timeout_second: int | None = None, backend: str | None = None) -> None:
        initialize(timeout_second=timeout_second, backend=backend or "gloo")

    return initialize_gloo


def _gloo_torchrun_process_group(timeout_second: int = 36000) -> tuple[int, int, int]:
    """verl's ``initialize_global_process_group`` (the torchrun entry points: the SFT trainer) on plain ``gloo``,
    for the same reason as :func:`_gloo_process_group`; returns (local rank, rank, world size) as verl's does."""
    import torch.distributed

    torch.distributed.init_process_group(
        backend="gloo", timeout=timedelta(seconds=timeout_second), init_method=os.environ.get("DIST_INIT_METHOD")
    )
    return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _copied_shards(save):
    """Wrap verl's ``fsdp2_sharded_save_to_cpu`` so that its CPU copy of the weights is a copy.

    It takes ``.detach().cpu()`` of each local shard: on a GPU a new tensor, on the CPU the live parameter's own
    storage, which the next optimizer step overwrites in place. separate_async's restore of pi_old
    (``DetachActorWorker.restore_model_from_cpu``) would then restore the live weights, and its old log-probs
    would silently be the current policy's.
    """

    @functools.wraps(save)
    def save_copy(model: torch.nn.Module) -> tuple[dict[str, tuple[torch.Tensor, Any]], Any]:
        shards, spec = save(model)
        return {name: (shard.clone(), shard_spec) for name, (shard, shard_spec) in shards.items()}, spec

    return save_copy
