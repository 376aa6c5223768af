"""End-to-end test support: the shared tiny build, and the package's CPU launcher (``recipe.disco.cpu.launch``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from recipe.disco.cpu.launch import cpu_overrides, run_trainer
from recipe.disco.cpu.tiny import VLLM_MODEL_SHAPE, TinyBuild, build_tiny

TINY_CACHE = Path(tempfile.gettempdir()) / "disco-tiny-cache"


def cached_tiny_build(seed: int = 0) -> TinyBuild:
    """The tiny model and task, built once per machine (``build_tiny`` reuses a build of the same specification)."""
    return build_tiny(TINY_CACHE, seed)


# The shared training run (tests/conftest.py ``trained_run``): main_disco on 2 simulated ranks, 6 prompts x 4
# answers per step in 2 mini-batches (optimizer steps; the second is off-policy), kl_unit step, token-budget
# micro-batches (use_dynamic_bsz) of 80 tokens: the longest possible sequence (64 prompt + 16 response tokens), and
# less than any question's 4 answers, so every question is spread over micro-batches and the worker's coefficients
# make it exact. A checkpoint and a validation after step 2; each step's answers dumped.
N_GPUS, PROMPTS, MINI_BATCHES, ROLLOUT_N = 2, 6, 2, 4
MINI_BATCH_PROMPTS = PROMPTS // MINI_BATCHES
TOKEN_BUDGET = 80
TRAINED_STEPS = 2
LAUNCH_TIMEOUT_S = 900  # per launch; about 60-100 s each here: the limit only catches hangs, on any machine
PAPER_TAU = {"logL": 10.0, "Lratio": 1.0}


def e2e_overrides(
    steps: int, objective: str, score_func: str, kl_unit: str = "step", trainer_mode: str = "sync"
) -> list[str]:
    """The CPU launch overrides of the end-to-end runs with the given DisCO variant (and the paper's tau)."""
    loss = "actor_rollout_ref.actor.policy_loss"
    return cpu_overrides(
        cached_tiny_build(),
        steps=steps,
        n_gpus=N_GPUS,
        prompts_per_step=PROMPTS,
        rollout_n=ROLLOUT_N,
        mini_batches=MINI_BATCHES,
        trainer_mode=trainer_mode,
    ) + [
        f"{loss}.objective={objective}",
        f"{loss}.score_func={score_func}",
        f"{loss}.tau={PAPER_TAU[score_func]}",
        f"{loss}.kl_unit={kl_unit}",
    ]


def token_budget(tokens: int) -> list[str]:
    """Token-budget micro-batches of ``tokens`` tokens per GPU, in the update and the log-prob passes."""
    return [
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={tokens}",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
        f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={tokens}",
    ]


def resumable(checkpoint_dir: Path, rollout_dir: Path) -> list[str]:
    """Checkpoints in (and automatic resume from) ``checkpoint_dir``; each step's answers dumped to ``rollout_dir``."""
    return [
        f"trainer.default_local_dir={checkpoint_dir}",
        "trainer.resume_mode=auto",
        f"trainer.rollout_data_dir={rollout_dir}",
    ]


def train_shared_run(root: Path) -> dict:
    """Run the shared training run under ``root``; return its records and folders."""
    checkpoint_dir, rollout_dir = root / "checkpoints", root / "rollouts_1"
    records = run_trainer(
        "recipe.disco.main_disco",
        e2e_overrides(TRAINED_STEPS, "disco", "logL")
        + token_budget(TOKEN_BUDGET)
        + resumable(checkpoint_dir, rollout_dir)
        + [f"trainer.save_freq={TRAINED_STEPS}", f"trainer.test_freq={TRAINED_STEPS}"],
        root / "run_1",
        timeout_s=LAUNCH_TIMEOUT_S,
    )
    return {"root": root, "records": records, "checkpoint_dir": checkpoint_dir, "rollout_dir": rollout_dir}


def cached_vllm_build(seed: int = 0) -> TinyBuild:
    """The tiny task with the head-dim-32 model vLLM's CPU attention needs (``tiny.VLLM_MODEL_SHAPE``), built once."""
    return build_tiny(TINY_CACHE, seed, VLLM_MODEL_SHAPE)
