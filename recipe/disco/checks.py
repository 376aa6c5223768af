"""Startup checks: refuse settings under which DisCO's step objective would not be exact, and the update layout.

Run by ``recipe.disco.main_disco`` on the composed config before Ray or any model starts (also under
``DRY_RUN=1``). Every problem gives one message naming the key, its value and the fix; all are reported at once.
Micro-batching is free (fixed sizes, ``use_dynamic_bsz`` token budgets, Ulysses sequence parallelism): the step
coefficients make every layout exact (``recipe.disco.worker``). What remains refused routes questions, losses or
models around the step objective: shuffled mini-batches (a question split over optimizer steps), unbounded
staleness in verl's async trainers, Megatron, reference-model KL, rollout corrections, a critic, distillation.
"""

from __future__ import annotations

import warnings

import verl
from omegaconf import DictConfig, OmegaConf
from verl.trainer.distillation import is_distillation_enabled
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from recipe.disco.grouping import UpdateShape
from recipe.disco.objective import DISCO

SUPPORTED_VERL = "0.9.1"
ACTOR = "actor_rollout_ref.actor"
FSDP_STRATEGIES = ("fsdp", "fsdp2")
CPU_HF_ROLLOUT = "hf"  # the CPU backend's HF-generate stand-in rollout (recipe.disco.cpu.ROLLOUT_NAME)
DEFAULT_ATTENTION = "flash_attention_2"  # verl's default attn_implementation (verl/workers/config/model.py)


class DisCOConfigError(ValueError):
    """The configuration cannot train DisCO exactly; the message lists every problem."""


def actor_dp_size(config: DictConfig) -> int:
    """Data-parallel size of the actor (all GPUs of the global pool, divided by Ulysses sequence parallelism)."""
    world = config.trainer.n_gpus_per_node * config.trainer.nnodes
    return world // max(ulysses_size(config), 1)


def coefficients_in_loss(config: DictConfig) -> bool:
    """Whether each loss call can compute its own coefficients (no extra forward pass): ``kl_unit: question``
    with fixed micro-batches whose global micro-batch (all ranks' same-index micro-batches, gathered by the loss)
    holds whole questions. Otherwise DisCO's actor worker computes them once per mini-batch."""
    actor = config.actor_rollout_ref.actor
    n, m, dp = config.actor_rollout_ref.rollout.n, actor.ppo_micro_batch_size_per_gpu, actor_dp_size(config)
    return (
        actor.policy_loss.kl_unit == "question"
        and not actor.use_dynamic_bsz
        and ulysses_size(config) == 1
        and bool(m)
        and (dp * m) % n == 0
        and (actor.ppo_mini_batch_size * n) % (dp * m) == 0
    )


def update_shape(config: DictConfig) -> UpdateShape:
    """The actor update's layout in rows: W ranks, ppo_mini_batch_size * n rows per mini-batch, and the unit that
    must hold whole questions: a global micro-batch when the loss computes its coefficients, else a mini-batch."""
    actor, dp = config.actor_rollout_ref.actor, actor_dp_size(config)
    mini_batch_rows = actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    unit_rows = dp * actor.ppo_micro_batch_size_per_gpu if coefficients_in_loss(config) else mini_batch_rows
    return UpdateShape(dp_size=dp, mini_batch_rows=mini_batch_rows, unit_rows=unit_rows)


def ulysses_size(config: DictConfig) -> int:
    """The actor's Ulysses sequence-parallel size (verl reads fsdp_config's key; the actor-level one is deprecated)."""
    actor, key = config.actor_rollout_ref.actor, "ulysses_sequence_parallel_size"
    return max(actor.get(key, 1), actor.fsdp_config.get(key, 1))


def lora_adapter_rank(config: DictConfig) -> int:
    """The rank of the LoRA adapter that verl's FSDP engine trains and syncs to the rollout as an adapter
    (``model.lora_rank``; 0: none, or ``model.lora.merge``, under which it syncs full merged weights instead)."""
    model = config.actor_rollout_ref.model
    return 0 if (model.get("lora") or {}).get("merge", False) else model.get("lora_rank", 0) or 0


def _setting_problems(config: DictConfig) -> list[str]:
    """Settings that route questions, losses or models around DisCO's step objective."""
    actor = config.actor_rollout_ref.actor
    correction = config.algorithm.get("rollout_correction") or {}
    fixed = [
        ("trainer.use_v1", config.trainer.use_v1, True, "main_disco extends verl's v1 trainer"),
        (f"{ACTOR}.shuffle", actor.shuffle, False, "shuffled mini-batches split questions over optimizer steps"),
        (f"{ACTOR}.policy_loss.loss_mode", actor.policy_loss.loss_mode, DISCO, "main_disco trains DisCO"),
        (
            f"{ACTOR}.use_kl_loss",
            actor.use_kl_loss,
            False,
            "DisCO has no reference model (its trust region is a KL hinge)",
        ),
        ("algorithm.use_kl_in_reward", config.algorithm.use_kl_in_reward, False, "DisCO needs the raw 0/1 rewards"),
        (
            "algorithm.rollout_correction.bypass_mode",
            correction.get("bypass_mode", False),
            False,
            "DisCO's trust region and first-mini-batch coefficients need old log-probs recomputed by the actor",
        ),
        (
            "algorithm.rollout_correction.rollout_is",
            correction.get("rollout_is"),
            None,
            "DisCO's loss takes no importance weights",
        ),
        (
            "algorithm.rollout_correction.rollout_rs",
            correction.get("rollout_rs"),
            None,
            "rejection sampling would drop answers from their question's group",
        ),
        (
            "actor_rollout_ref.rollout.full_determinism",
            config.actor_rollout_ref.rollout.get("full_determinism", False),
            False,
            "verl then seeds every request of a rollout replica alike, so all n answers to a question are the same "
            "and no question has both right and wrong answers (nothing to contrast)",
        ),
        ("critic.enable", bool(config.critic.enable), False, "DisCO uses no critic"),
        ("distillation.enabled", is_distillation_enabled(config.get("distillation")), False, "it replaces the loss"),
    ]
    problems = [
        f"{key}={value}: {why}; set {key}={expected}" for key, value, expected, why in fixed if value != expected
    ]
    if actor.strategy not in FSDP_STRATEGIES:
        problems.append(
            f"{ACTOR}.strategy={actor.strategy}: DisCO's actor worker extends verl's FSDP training worker; "
            f"set {ACTOR}.strategy=fsdp2"
        )
    attention = (config.actor_rollout_ref.model.get("override_config") or {}).get(
        "attn_implementation", DEFAULT_ATTENTION
    )
    if ulysses_size(config) > 1 and "flash" not in attention:
        problems.append(
            f"{ACTOR}.fsdp_config.ulysses_sequence_parallel_size={ulysses_size(config)} with "
            f"attn_implementation={attention}: verl inserts Ulysses' all-to-all only into transformers' "
            "flash-attention path, so each rank would attend within its own slice of the sequence and the log-probs "
            "would be wrong; install flash-attn (docs/install.md) or set ulysses_sequence_parallel_size=1"
        )
    lora_rank = lora_adapter_rank(config)
    rollout = config.actor_rollout_ref.rollout
    rollout_name = OmegaConf.select(config, "actor_rollout_ref.rollout.name")  # None while unset (???)
    if lora_rank and rollout_name == CPU_HF_ROLLOUT:
        problems.append(
            f"actor_rollout_ref.model.lora_rank={lora_rank} with actor_rollout_ref.rollout.name={CPU_HF_ROLLOUT}: "
            "the CPU backend's HF-generate stand-in rollout loads full weights only, not LoRA adapters (it would fail "
            "at the first weight sync); set actor_rollout_ref.rollout.name=vllm (on the CPU: "
            "recipe/disco/cpu/vllm_env.sh), or actor_rollout_ref.model.lora.merge=True (verl then syncs the merged "
            "weights, rounded to bf16)"
        )
    sharded = (config.actor_rollout_ref.model.get("lora") or {}).get("fully_sharded_loras", False)
    tp = rollout.tensor_model_parallel_size
    if lora_rank and config.trainer.device == "cpu" and rollout_name == "vllm" and tp > 1 and not sharded:
        problems.append(
            f"actor_rollout_ref.model.lora.fully_sharded_loras={sharded} with LoRA (lora_rank={lora_rank}) and "
            f"rollout.tensor_model_parallel_size={tp} on vLLM's CPU build: its unsharded LoRA layers gather {tp} "
            "times the LoRA rank over the tensor-parallel workers, which the CPU LoRA ops refuse (the engine dies at "
            "the first generate); set +actor_rollout_ref.model.lora.fully_sharded_loras=True or "
            "actor_rollout_ref.rollout.tensor_model_parallel_size=1"
        )
    if config.actor_rollout_ref.rollout.n < 2:
        problems.append(
            f"actor_rollout_ref.rollout.n={config.actor_rollout_ref.rollout.n}: DisCO contrasts several answers "
            "per question; set actor_rollout_ref.rollout.n=8 (paper)"
        )
    return problems


TRAINER_MODES = ("sync", "colocate_async", "separate_async")  # verl 0.9.1's v1 trainers, each with DisCO's hooks
SEPARATE_ASYNC = "trainer.v1.separate_async"


def _trainer_mode_problems(config: DictConfig) -> list[str]:
    """The async trainers' settings that DisCO needs, and those verl would assert only after Ray has started."""
    v1 = config.trainer.v1
    mode = v1.trainer_mode
    if mode not in TRAINER_MODES:
        return [f"trainer.v1.trainer_mode={mode}: not one of verl's v1 trainers; set it to one of {TRAINER_MODES}"]
    if mode == "sync":
        return []
    problems = []
    if v1.sampler.max_off_policy_threshold is None:
        problems.append(
            f"trainer.v1.sampler.max_off_policy_threshold=None with trainer_mode={mode}: answers could come from "
            "arbitrarily old policies, and DisCO's objective is an expectation over answers from the policy being "
            "trained; set trainer.v1.sampler.max_off_policy_threshold=8 (verl's default bound on the weight "
            "versions an answer may span)"
        )
    if mode != "separate_async":
        return problems
    sync_step = v1.separate_async.parameter_sync_step
    mini = config.actor_rollout_ref.actor.ppo_mini_batch_size
    if config.data.train_batch_size != sync_step * mini:
        problems.append(
            f"data.train_batch_size={config.data.train_batch_size}: separate_async trains one mini-batch per "
            f"update and syncs the rollout every {SEPARATE_ASYNC}.parameter_sync_step={sync_step} updates; set "
            f"data.train_batch_size={sync_step * mini} ({sync_step} x {ACTOR}.ppo_mini_batch_size={mini})"
        )
    rollout = config.actor_rollout_ref.rollout
    for key in ("nnodes", "n_gpus_per_node"):
        if rollout[key] <= 0:
            problems.append(
                f"actor_rollout_ref.rollout.{key}={rollout[key]}: separate_async generates on a standalone rollout "
                f"pool of its own GPUs; set actor_rollout_ref.rollout.{key} to at least 1"
            )
    if rollout.checkpoint_engine.backend == "naive":
        problems.append(
            "actor_rollout_ref.rollout.checkpoint_engine.backend=naive: separate_async sends the weights to another "
            "pool of GPUs, which the naive (same-process) engine cannot; set it to nccl (on the CPU backend: cpu, "
            "with checkpoint_engine.custom_backend_module=recipe.disco.cpu.checkpoint_engine)"
        )
    return problems


def _batch_problems(config: DictConfig) -> list[str]:
    """Batch arithmetic that verl would otherwise assert late, inside the workers."""
    actor, rollout = config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout
    problems = []
    if config.data.train_batch_size % actor.ppo_mini_batch_size:
        problems.append(
            f"data.train_batch_size={config.data.train_batch_size}: not a multiple of {ACTOR}.ppo_mini_batch_size="
            f"{actor.ppo_mini_batch_size}, so an optimizer step would see fewer questions; set "
            f"data.train_batch_size to a multiple of {actor.ppo_mini_batch_size}"
        )
    dp, mini_rows = actor_dp_size(config), actor.ppo_mini_batch_size * rollout.n
    if mini_rows % dp:
        problems.append(
            f"{ACTOR}.ppo_mini_batch_size={actor.ppo_mini_batch_size}: a mini-batch of {mini_rows} answers does not "
            f"split evenly over {dp} data-parallel ranks; make ppo_mini_batch_size x rollout.n a multiple of {dp}"
        )
        return problems
    share = mini_rows // dp  # answers per rank per mini-batch; a rank's step share is a multiple of it
    micro_batches = [
        (f"{ACTOR}.ppo_micro_batch_size_per_gpu", f"{ACTOR}.use_dynamic_bsz", actor),
        (
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
            "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz",
            rollout,
        ),
    ]
    for key, dynamic_key, section in micro_batches:
        size = section[key.rsplit(".", 1)[1]]
        if not section[dynamic_key.rsplit(".", 1)[1]] and (not size or share % size):
            problems.append(
                f"{key}={size}: each rank gets {share} answers per mini-batch, which verl cuts into micro-batches of "
                f"this size; set {key} to a divisor of {share} ({_divisors(share)}), or {dynamic_key}=True with a "
                "token budget"
            )
    longest = config.data.max_prompt_length + config.data.max_response_length
    budgets = [
        (f"{ACTOR}.ppo_max_token_len_per_gpu", actor.use_dynamic_bsz, actor.ppo_max_token_len_per_gpu),
        (
            "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
            rollout.log_prob_use_dynamic_bsz,
            rollout.log_prob_max_token_len_per_gpu,
        ),
    ]
    sp = ulysses_size(config)
    for key, dynamic, budget in budgets:
        if dynamic and budget * sp < longest:
            problems.append(
                f"{key}={budget}: with Ulysses size {sp} a micro-batch holds {budget * sp} tokens, fewer than the "
                f"longest sequence (data.max_prompt_length + data.max_response_length = {longest}); set {key} to at "
                f"least {-(-longest // sp)}"
            )
    return problems


def _divisors(number: int) -> str:
    return ", ".join(str(d) for d in range(1, number + 1) if number % d == 0)


def config_problems(config: DictConfig) -> list[str]:
    """Every reason this config cannot train DisCO exactly, one message each (empty when it can)."""
    problems = []
    if verl.__version__ != SUPPORTED_VERL:
        problems.append(
            f"verl=={verl.__version__}: DisCO's layout and actor worker follow verl {SUPPORTED_VERL}'s dispatch, "
            f"mini-batch split and worker classes; install verl[verl-core]=={SUPPORTED_VERL}"
        )
    return problems + _setting_problems(config) + _trainer_mode_problems(config) + _batch_problems(config)


def validate(config: DictConfig) -> None:
    """DisCO's checks, then verl's own ``validate_config`` (both before Ray): what ``main_disco`` and the preflight
    run on a composed config."""
    check_config(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


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
