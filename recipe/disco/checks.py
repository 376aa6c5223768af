"""Startup checks: refuse settings under which DisCO's per-question objective would not be exact.

Run by ``recipe.disco.main_disco`` on the composed config before Ray or any model starts (also under
``DRY_RUN=1``). Every problem gives one message naming the key, its value and the fix; all are reported at once.
"""

from __future__ import annotations

import warnings

import verl
from omegaconf import DictConfig
from verl.trainer.distillation import is_distillation_enabled

from recipe.disco.grouping import MICRO_BATCH_KEY, UpdateShape
from recipe.disco.objective import DISCO

SUPPORTED_VERL = "0.9.1"
ACTOR = "actor_rollout_ref.actor"
FSDP_STRATEGIES = ("fsdp", "fsdp2")


class DisCOConfigError(ValueError):
    """The configuration cannot train DisCO exactly; the message lists every problem."""


def actor_dp_size(config: DictConfig) -> int:
    """Data-parallel size of the actor (all GPUs of the global pool, divided by Ulysses sequence parallelism)."""
    world = config.trainer.n_gpus_per_node * config.trainer.nnodes
    return world // max(_ulysses_size(config), 1)


def update_shape(config: DictConfig, dp_size: int) -> UpdateShape:
    """The actor update's layout in rows: W ranks, ppo_mini_batch_size * n rows per mini-batch, micro rows per GPU."""
    actor = config.actor_rollout_ref.actor
    return UpdateShape(
        dp_size=dp_size,
        mini_batch_rows=actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n,
        micro_rows_per_gpu=actor.ppo_micro_batch_size_per_gpu,
    )


def _ulysses_size(config: DictConfig) -> int:
    actor, key = config.actor_rollout_ref.actor, "ulysses_sequence_parallel_size"
    return max(actor.get(key, 1), actor.fsdp_config.get(key, 1))


def _setting_problems(config: DictConfig) -> list[str]:
    """Settings that route data, losses or models around the whole-group layout."""
    actor = config.actor_rollout_ref.actor
    fixed = [
        ("trainer.use_v1", config.trainer.use_v1, True, "main_disco extends verl's v1 trainer"),
        ("trainer.v1.trainer_mode", config.trainer.v1.trainer_mode, "sync", "the layout hook is the sync trainer's"),
        (f"{ACTOR}.use_dynamic_bsz", actor.use_dynamic_bsz, False, "token-budget micro-batches split groups"),
        (f"{ACTOR}.shuffle", actor.shuffle, False, "shuffled mini-batches split groups"),
        (f"{ACTOR}.policy_loss.loss_mode", actor.policy_loss.loss_mode, DISCO, "main_disco trains DisCO"),
        (
            f"{ACTOR}.use_kl_loss",
            actor.use_kl_loss,
            False,
            "DisCO has no reference model (its trust region is a KL hinge)",
        ),
        ("algorithm.use_kl_in_reward", config.algorithm.use_kl_in_reward, False, "DisCO needs the raw 0/1 rewards"),
        ("critic.enable", bool(config.critic.enable), False, "DisCO uses no critic"),
        ("distillation.enabled", is_distillation_enabled(config.get("distillation")), False, "it replaces the loss"),
    ]
    problems = [
        f"{key}={value}: {why}; set {key}={expected}" for key, value, expected, why in fixed if value != expected
    ]
    if actor.strategy not in FSDP_STRATEGIES:
        problems.append(
            f"{ACTOR}.strategy={actor.strategy}: the loss gathers over the default process group, which is the "
            f"data-parallel group only for FSDP; set {ACTOR}.strategy=fsdp2"
        )
    if _ulysses_size(config) != 1:
        problems.append(
            f"{ACTOR}.fsdp_config.ulysses_sequence_parallel_size={_ulysses_size(config)}: sequence parallelism makes "
            f"the default process group larger than the data-parallel group; set it (and {ACTOR}."
            "ulysses_sequence_parallel_size) to 1"
        )
    if config.actor_rollout_ref.rollout.n < 2:
        problems.append(
            f"actor_rollout_ref.rollout.n={config.actor_rollout_ref.rollout.n}: DisCO contrasts several answers "
            "per question; set actor_rollout_ref.rollout.n=8 (paper)"
        )
    return problems


def _micro_fix(dp: int, mini_rows: int, n: int, micro: int) -> str:
    """Fix text: the nearest valid micro-batch size per GPU (the largest not above ``micro``, else the smallest)."""
    fits = [m for m in range(1, mini_rows // dp + 1) if (dp * m) % n == 0 and mini_rows % (dp * m) == 0]
    if fits:
        return f"set {MICRO_BATCH_KEY}={max((m for m in fits if m <= micro), default=fits[0])}"
    return f"make {ACTOR}.ppo_mini_batch_size x rollout.n a multiple of rollout.n x the number of GPUs"


def _batch_problems(config: DictConfig) -> list[str]:
    """Batch arithmetic: whole groups per global micro-batch, whole global micro-batches per mini-batch."""
    actor = config.actor_rollout_ref.actor
    n = config.actor_rollout_ref.rollout.n
    problems = []
    if config.data.train_batch_size % actor.ppo_mini_batch_size:
        problems.append(
            f"data.train_batch_size={config.data.train_batch_size}: not a multiple of {ACTOR}.ppo_mini_batch_size="
            f"{actor.ppo_mini_batch_size}, so an optimizer step would see fewer questions; set "
            f"data.train_batch_size to a multiple of {actor.ppo_mini_batch_size}"
        )
    m = actor.ppo_micro_batch_size_per_gpu
    if m is None or m < 1:
        problems.append(f"{MICRO_BATCH_KEY}={m}: DisCO needs fixed micro-batches; set {MICRO_BATCH_KEY}=4")
        return problems
    dp, mini_rows = actor_dp_size(config), actor.ppo_mini_batch_size * n
    if dp >= 1 and ((dp * m) % n or mini_rows % (dp * m)):
        problems.append(
            f"{MICRO_BATCH_KEY}={m}: with {dp} data-parallel ranks a global micro-batch holds {dp * m} answers, which "
            f"must be a multiple of rollout.n={n} and divide a mini-batch of {ACTOR}.ppo_mini_batch_size x n = "
            f"{mini_rows} answers; {_micro_fix(dp, mini_rows, n, m)}"
        )
    log_prob_key = "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu"
    log_prob_micro = config.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu
    if dp >= 1 and mini_rows % dp == 0 and log_prob_micro and (mini_rows // dp) % log_prob_micro:
        problems.append(
            f"{log_prob_key}={log_prob_micro}: each rank gets a multiple of {mini_rows // dp} answers per step, which "
            f"the old-log-prob pass must cut into whole micro-batches; set {log_prob_key} to a divisor of "
            f"{mini_rows // dp}"
        )
    return problems


def config_problems(config: DictConfig) -> list[str]:
    """Every reason this config cannot train DisCO exactly, one message each (empty when it can)."""
    problems = []
    if verl.__version__ != SUPPORTED_VERL:
        problems.append(
            f"verl=={verl.__version__}: the whole-group layout follows verl {SUPPORTED_VERL}'s dispatch and "
            f"mini/micro-batch split; install verl[verl-core]=={SUPPORTED_VERL}"
        )
    return problems + _setting_problems(config) + _batch_problems(config)


def check_config(config: DictConfig) -> None:
    """Raise :class:`DisCOConfigError` listing every problem; warn about settings that change the objective."""
    problems = config_problems(config)
    if problems:
        raise DisCOConfigError("DisCO cannot train exactly with this configuration:\n  - " + "\n  - ".join(problems))
    coeff = config.actor_rollout_ref.actor.entropy_coeff
    if coeff:
        warnings.warn(
            f"{ACTOR}.entropy_coeff={coeff} adds an entropy bonus, which is not part of DisCO (paper: 0)", stacklevel=2
        )
