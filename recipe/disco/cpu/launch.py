"""Launch verl's trainer on a CPU-only machine with the DisCO CPU backend and the tiny build (demo and tests).

``cpu_overrides`` gives the Hydra overrides that make ``python -m verl.trainer.main_ppo`` (or
``recipe.disco.main_disco``) run here with the tiny model and task; ``run_trainer`` runs such a command with
``DISCO_CPU_BACKEND=1`` and returns the file logger's records.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from recipe.disco.cpu import vllm
from recipe.disco.cpu.tiny import TinyBuild

ECHO_POLL_S = 0.2  # how often run_trainer(echo=...) reads new log lines


# recipe.disco.cpu.sampler's fast-polling replay buffer for each of verl's v1 trainer modes
SAMPLERS = {
    "sync": "FastPollReplayBuffer",
    "colocate_async": "FastPollReplayBufferAsync",
    "separate_async": "FastPollReplayBufferAsync",
}


def cpu_overrides(
    build: TinyBuild,
    *,
    steps: int,
    n_gpus: int = 2,
    prompts_per_step: int = 4,
    rollout_n: int = 4,
    lr: float = 3e-4,
    mini_batches: int = 1,
    rollout: str = "hf",
    trainer_mode: str = "sync",
) -> list[str]:
    """Overrides for verl's trainer on CPU with the tiny build; the caller adds the algorithm's own.

    ``n_gpus`` simulated data-parallel ranks (logical Ray GPUs, gloo), all ranks sharing one ``hf`` rollout
    server; ``mini_batches`` mini-batches (optimizer steps) per training step, one micro-batch per rank and
    mini-batch; the v1 trainer's replay buffer polls every 0.05 s instead of 2 s (``recipe.disco.cpu.sampler``).
    ``rollout="vllm"``: verl's vLLM rollout instead (``recipe.disco.cpu.vllm``; needs the environment of
    ``vllm_env.sh`` and a build of ``tiny.VLLM_MODEL_SHAPE``), one replica of ``n_gpus`` tensor-parallel workers.
    ``trainer_mode``: verl's v1 trainer (``trainer.v1.trainer_mode``), with its fast-polling replay buffer; for
    ``separate_async`` a standalone rollout pool of another ``n_gpus`` logical GPUs (one replica), sent the weights
    through ``recipe.disco.cpu.checkpoint_engine`` every ``mini_batches`` updates of one mini-batch.
    """
    if rollout not in ("hf", "vllm"):
        raise ValueError(f"unknown CPU rollout {rollout!r}")
    rollout_overrides = ["actor_rollout_ref.rollout.name=hf"] if rollout == "hf" else list(vllm.OVERRIDES)
    prompts_per_mini_batch = prompts_per_step // mini_batches
    answers_per_rank = prompts_per_mini_batch * rollout_n // n_gpus
    rollout_pool = n_gpus if trainer_mode == "separate_async" else 0
    separate = [
        f"trainer.v1.separate_async.parameter_sync_step={mini_batches}",
        "actor_rollout_ref.rollout.nnodes=1",
        f"actor_rollout_ref.rollout.n_gpus_per_node={rollout_pool}",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=cpu",
        "actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module=recipe.disco.cpu.checkpoint_engine",
    ]
    return [
        f"data.train_files={build.train_file}",
        f"data.val_files={build.val_file}",
        f"data.train_batch_size={prompts_per_step}",
        "data.max_prompt_length=64",
        "data.max_response_length=16",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={build.model_dir}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.actor.strategy=fsdp2",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts_per_mini_batch}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={answers_per_rank}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        *rollout_overrides,
        f"actor_rollout_ref.rollout.n={rollout_n}",
        f"actor_rollout_ref.rollout.tensor_model_parallel_size={n_gpus}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={answers_per_rank}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={answers_per_rank}",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "reward.custom_reward_function.path=pkg://recipe.disco.reward",
        "reward.custom_reward_function.name=compute_score_with_info",
        "+reward.custom_reward_function.reward_kwargs.require_think=False",
        "reward.num_workers=1",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "trainer.logger=[console,file]",
        "trainer.val_before_train=False",
        f"trainer.n_gpus_per_node={n_gpus}",
        "trainer.nnodes=1",
        "trainer.device=cpu",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        "trainer.v1.sampler.custom_sampler.path=pkg://recipe.disco.cpu.sampler",
        f"trainer.v1.trainer_mode={trainer_mode}",
        f"trainer.v1.sampler.custom_sampler.name={SAMPLERS[trainer_mode]}",
        "ray_kwargs.ray_init.num_cpus=16",
        f"+ray_kwargs.ray_init.num_gpus={n_gpus + rollout_pool}",
        *(separate if rollout_pool else []),
    ]


def run_trainer(
    module: str,
    overrides: list[str],
    workdir: Path,
    timeout_s: float = 600,
    echo: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run ``python -m module overrides`` from ``workdir`` with the CPU backend on; return the metric records.

    ``workdir`` must not hold modules named like the plugin's (Ray puts the driver's directory on the workers'
    path). Each record is ``{"step": int, "data": {metric: value}}``, one per training step. The output goes to
    ``workdir/trainer.log``, and while the run lasts each of its lines to ``echo`` if given; a failure or timeout
    raises with its tail. With ``actor_rollout_ref.rollout.name=vllm`` the run also gets vLLM's CPU environment
    (``vllm.ENV``; variables already set win), and the shared-memory files its engines leave in ``/dev/shm`` are
    removed afterwards (one such run at a time: the files that appear meanwhile are taken for its own).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_file, log_file = workdir / "metrics.jsonl", workdir / "trainer.log"
    env = {**os.environ, "DISCO_CPU_BACKEND": "1", "VERL_FILE_LOGGER_PATH": str(metrics_file)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    vllm_run = vllm.OVERRIDES[0] in overrides  # rollout.name=vllm
    if vllm_run:
        env = {**vllm.ENV, **env}
    with _removing_new_shm_files() if vllm_run else contextlib.nullcontext(), open(log_file, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *overrides],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so that a timeout can end Ray's processes with the driver
        )
        try:
            returncode = _wait(process, log_file, timeout_s, echo)
        except BaseException as error:  # a timeout, or an interrupt or error in echo: end Ray with the driver
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if isinstance(error, subprocess.TimeoutExpired):
                raise AssertionError(f"{module} ran past {timeout_s} s; log tail:\n{_tail(log_file)}") from None
            raise
    if returncode != 0:
        raise AssertionError(f"{module} exited with {returncode}; log tail:\n{_tail(log_file)}")
    return [json.loads(line) for line in metrics_file.read_text().splitlines()]


@contextlib.contextmanager
def _removing_new_shm_files():
    """Remove the files matching ``vllm.SHM_PATTERNS`` that appear in /dev/shm meanwhile: vLLM CPU engines ended at
    Ray's shutdown leave them (about 700 MB each run)."""

    def present() -> set[Path]:
        shm = Path("/dev/shm")
        return {path for pattern in vllm.SHM_PATTERNS for path in shm.glob(pattern)} if shm.is_dir() else set()

    before = present()
    try:
        yield
    finally:
        for path in present() - before:
            path.unlink(missing_ok=True)


def _wait(process: subprocess.Popen, log_file: Path, timeout_s: float, echo: Callable[[str], None] | None) -> int:
    """The process's exit status; meanwhile every complete line it writes to ``log_file`` goes to ``echo``."""
    if echo is None:
        return process.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    pending = ""
    with open(log_file, errors="replace") as reader:
        while True:
            returncode = process.poll()  # before reading, so that the last read gets everything
            *lines, pending = (pending + reader.read()).split("\n")
            for line in lines:
                echo(line)
            if returncode is not None:
                if pending:
                    echo(pending)
                return returncode
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(process.args, timeout_s)
            time.sleep(ECHO_POLL_S)


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
