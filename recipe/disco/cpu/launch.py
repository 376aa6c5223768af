"""Launch verl's trainer on a CPU-only machine with the DisCO CPU backend and the tiny build (demo and tests).

``cpu_overrides`` gives the Hydra overrides that make ``python -m verl.trainer.main_ppo`` (or
``recipe.disco.main_disco``) run here with the tiny model and task; ``run_trainer`` runs such a command with
``DISCO_CPU_BACKEND=1`` and returns the file logger's records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from recipe.disco.cpu.tiny import TinyBuild


def cpu_overrides(
    build: TinyBuild,
    *,
    steps: int,
    n_gpus: int = 2,
    prompts_per_step: int = 4,
    rollout_n: int = 4,
    lr: float = 3e-4,
) -> list[str]:
    """Overrides for verl's trainer on CPU with the tiny build; the caller adds the algorithm's own.

    ``n_gpus`` simulated data-parallel ranks (logical Ray GPUs, gloo), all ranks sharing one ``hf`` rollout
    server; one mini-batch (one optimizer step) per training step, one micro-batch per rank; the v1 trainer's
    replay buffer polls every 0.05 s instead of 2 s (``recipe.disco.cpu.sampler``).
    """
    answers_per_rank = prompts_per_step * rollout_n // n_gpus
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
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts_per_step}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={answers_per_rank}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        "actor_rollout_ref.rollout.name=hf",
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
        "trainer.v1.sampler.custom_sampler.name=FastPollReplayBuffer",
        "ray_kwargs.ray_init.num_cpus=16",
        f"+ray_kwargs.ray_init.num_gpus={n_gpus}",
    ]


def run_trainer(module: str, overrides: list[str], workdir: Path, timeout_s: float = 600) -> list[dict]:
    """Run ``python -m module overrides`` from ``workdir`` with the CPU backend on; return the metric records.

    ``workdir`` must not hold modules named like the plugin's (Ray puts the driver's directory on the workers'
    path). Each record is ``{"step": int, "data": {metric: value}}``, one per training step. The output goes to
    ``workdir/trainer.log``; a failure or timeout raises with its tail.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_file, log_file = workdir / "metrics.jsonl", workdir / "trainer.log"
    env = {**os.environ, "DISCO_CPU_BACKEND": "1", "VERL_FILE_LOGGER_PATH": str(metrics_file)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *overrides],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so that a timeout can end Ray's processes with the driver
        )
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"{module} ran past {timeout_s} s; log tail:\n{_tail(log_file)}") from None
    if returncode != 0:
        raise AssertionError(f"{module} exited with {returncode}; log tail:\n{_tail(log_file)}")
    return [json.loads(line) for line in metrics_file.read_text().splitlines()]


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
