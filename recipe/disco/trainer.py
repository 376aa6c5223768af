"""verl's v1 trainers with DisCO's actor worker, whole-question batch layout and per-step question metrics.

:class:`DisCOHooks` overrides five hooks of verl's v1 ``PPOTrainer``, and is mixed into each of its three registered
trainers (``trainer.v1.trainer_mode``): :class:`DisCOTrainer` (``sync``), :class:`DisCOTrainerColocateAsync` and
:class:`DisCOTrainerSeparateAsync` (:data:`TRAINERS`). The hooks:

* ``_init_resource_pool_mgr``: the actor role runs DisCO's worker,
  :class:`recipe.disco.worker.DisCOActorRolloutRefWorker` (verl's hybrid worker whose training worker writes
  DisCO's step coefficients before each mini-batch), or for ``separate_async``
  :class:`recipe.disco.worker.DisCODetachActorWorker` (verl's worker for that trainer, which keeps pi_old's weights
  in CPU copies, with the same training worker).
* ``_balance_batch``, which verl calls on every step batch before the old-log-prob pass, the advantage and the
  actor update. verl's version pads the batch and Karmarkar-Karp-partitions rows over ranks, which scatters a
  question's answers over mini-batches. Here the batch is padded with verl's own padding rows
  (``upsample_batch_to_divisible_size``) and reordered by :func:`recipe.disco.grouping.whole_group_order`, so
  that every mini-batch (or, when the loss computes its own coefficients, every global micro-batch) holds whole
  questions while tokens stay balanced over ranks. It logs verl's usual ``global_seqlen/*`` balance metrics.
* ``_update_actor``: tells the workers whether the loss computes its own coefficients
  (:data:`recipe.disco.worker.COEFFICIENTS_IN_LOSS`) and whether the old log-probs were computed at the actor's live
  parameters (:data:`recipe.disco.worker.OLD_LOG_PROBS_AT_LIVE_PARAMETERS`): always in ``sync`` and
  ``colocate_async``; in ``separate_async`` only at the first update of a parameter-sync cycle
  (``local_trigger_step`` 0), the later ones taking them at pi_old restored from its CPU copy.
* ``_compute_metrics``, which adds ``disco/*`` question counts, reward outcome rates and the truncation rate to
  verl's metrics (:func:`step_metrics`).

The hooks also print where a validation pass stands (``_validate``, ``_val_metrics_update``): verl prints nothing
while it generates the validation answers and then bootstraps their metrics on the driver, which with the launch
scripts' six sets x 16 answers takes minutes before the first training step and looks like a hang.

:class:`DisCOTaskRunner` is the Ray task runner that builds the trainer of the configured mode (verl's
``TaskRunnerV1`` picks its trainer from a registry whose entries cannot be replaced).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import torch
import transfer_queue as tq
from omegaconf import DictConfig, OmegaConf
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1 import (
    AgentLoopManagerTQ,
    PPOTrainerColocateAsync,
    PPOTrainerSeparateAsync,
    PPOTrainerSync,
)
from verl.utils.import_utils import load_class_from_fqn
from verl.utils.logging_utils import configure_verl_logging
from verl.utils.seqlen_balancing import log_seqlen_unbalance

from recipe.disco.checks import coefficients_in_loss, update_shape
from recipe.disco.grouping import UpdateShape, padded_rows, rank_partitions, uid_of_key, whole_group_order
from recipe.disco.reward import Outcome
from recipe.disco.worker import (
    COEFFICIENTS_IN_LOSS,
    OLD_LOG_PROBS_AT_LIVE_PARAMETERS,
    DisCOActorRolloutRefWorker,
    DisCODetachActorWorker,
)

METRIC_PREFIX = "disco/"
# verl's process_validation_metrics with DisCO's reward info (6 numeric keys and the answers for majority votes) at
# 16 answers per question, measured on a 2-core CPU (docs/metrics.md#validation)
BOOTSTRAP_S_PER_QUESTION = 0.31


def _rows_of(batch: KVBatchMeta) -> tuple[list[str], list[bool]]:
    """uid and padding flag of each row of a TransferQueue batch."""
    return [uid_of_key(key) for key in batch.keys], [bool(tag.get("is_padding", False)) for tag in batch.tags]


def lay_out_whole_groups(
    batch: KVBatchMeta, shape: UpdateShape, eos_token_id: int, logging_prefix: str = "global_seqlen"
) -> tuple[KVBatchMeta, dict[str, float]]:
    """Pad ``batch`` with verl's padding rows and reorder it into whole questions per unit of ``shape``.

    Returns the (possibly new) batch and verl's sequence-length balance metrics for the resulting rank split.
    """
    uids, padding = _rows_of(batch)
    needed = padded_rows(uids, padding, shape)
    if needed > len(batch):
        # verl pads up to the next multiple; a multiple larger than the batch pads to exactly `needed` rows
        batch = upsample_batch_to_divisible_size(batch, needed, eos_token_id)
        uids, padding = _rows_of(batch)
    seq_lens = [int(tag["seq_len"]) for tag in batch.tags]
    order = whole_group_order(uids, seq_lens, padding, shape)
    batch.reorder(order)
    return batch, log_seqlen_unbalance(seq_lens, rank_partitions(order, shape.dp_size), prefix=logging_prefix)


def question_metrics(uids: Sequence[str], rewards: Sequence[float], rollout_n: int) -> dict[str, float]:
    """Per-step question statistics from the real answers' uids and 0/1 sequence rewards.

    ``disco/questions/{mixed,all_correct,all_wrong}``: questions with both kinds of answers (the only ones with a
    DisCO term), only correct, only wrong; ``disco/accuracy``: fraction of correct answers;
    ``disco/correct_per_question/<k>``: number of questions with k correct answers, k = 0..rollout_n (a histogram
    that every logger can plot as scalars).
    """
    answers: Counter[str] = Counter(uids)
    correct: Counter[str] = Counter(uid for uid, reward in zip(uids, rewards, strict=True) if reward == 1)
    histogram = Counter(correct[uid] for uid in answers)
    num_correct = sum(correct.values())
    metrics = {
        METRIC_PREFIX + "questions/mixed": sum(0 < correct[uid] < size for uid, size in answers.items()),
        METRIC_PREFIX + "questions/all_correct": sum(correct[uid] == size for uid, size in answers.items()),
        METRIC_PREFIX + "questions/all_wrong": sum(correct[uid] == 0 for uid in answers),
        METRIC_PREFIX + "accuracy": num_correct / max(len(uids), 1),
    }
    for k in range(max(rollout_n, *histogram.keys(), 0) + 1):
        metrics[f"{METRIC_PREFIX}correct_per_question/{k}"] = histogram[k]
    return {key: float(value) for key, value in metrics.items()}


def _as_list(non_tensor: Any) -> list:
    """A non-tensor TransferQueue field as a list: a ``NonTensorStack`` (``tolist``) or a plain sequence."""
    return non_tensor.tolist() if hasattr(non_tensor, "tolist") else list(non_tensor)


def outcome_rates(reward_infos: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``disco/answer_{missing,wrong,right,timeout}``: the fraction of answers with each reward outcome, from the flags
    :func:`recipe.disco.reward.compute_score_with_info` records. Empty when the reward function records none."""
    flags = [outcome.flag for outcome in Outcome]
    if not reward_infos or any(flag not in info for info in reward_infos for flag in flags):
        return {}
    return {METRIC_PREFIX + flag: sum(float(info[flag]) for info in reward_infos) / len(reward_infos) for flag in flags}


def step_metrics(batch: KVBatchMeta, rollout_n: int, max_response_length: int) -> dict[str, float]:
    """:func:`question_metrics` and :func:`outcome_rates` of a step batch held in TransferQueue, plus
    ``disco/truncation_rate``.

    The truncation rate is the fraction of answers that reached ``data.max_response_length`` tokens (verl's
    ``response_length/clip_ratio`` compares with the longest answer of the step instead, so in the v1 trainer it is
    not a truncation rate when no answer was cut). Padding rows are left out.
    """
    real = [(key, tag) for key, tag in zip(batch.keys, batch.tags, strict=True) if not tag.get("is_padding", False)]
    keys = [key for key, _ in real]
    data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["rm_scores", "extra_fields"])
    rewards = torch.stack([row.sum() for row in data["rm_scores"].unbind()]).tolist()
    metrics = question_metrics([uid_of_key(key) for key in keys], rewards, rollout_n)
    metrics.update(outcome_rates([fields.get("reward_extra_info", {}) for fields in _as_list(data["extra_fields"])]))
    truncated = sum(tag["response_len"] >= max_response_length for _, tag in real)
    metrics[METRIC_PREFIX + "truncation_rate"] = truncated / max(len(real), 1)
    return metrics


ACTOR_ROLES = (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef)


class DisCOHooks:
    """DisCO's hooks, mixed in before one of verl's v1 trainers: DisCO's actor worker and whole-question batches."""

    actor_worker_cls: type = DisCOActorRolloutRefWorker

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        for role in ACTOR_ROLES:
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(self.actor_worker_cls)

    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        shape = update_shape(self.config)
        batch, balance = lay_out_whole_groups(batch, shape, self.tokenizer.eos_token_id, logging_prefix)
        metrics.update(balance)
        return batch

    def _update_actor(self, batch, metrics):
        batch.extra_info[COEFFICIENTS_IN_LOSS] = coefficients_in_loss(self.config)
        batch.extra_info[OLD_LOG_PROBS_AT_LIVE_PARAMETERS] = self._old_log_probs_at_live_parameters()
        return super()._update_actor(batch, metrics)

    def _old_log_probs_at_live_parameters(self) -> bool:
        """Whether this update's old log-probs came from the actor's current weights (verl's base
        ``_compute_old_log_prob``)."""
        return True

    def _validate(self):
        questions, n = len(self.val_dataset), self.config.actor_rollout_ref.rollout.val_kwargs.n
        print(
            f"DisCO validation at step {self.global_steps}: {questions} questions x {n} answers (up to "
            f"{self.config.data.max_response_length} tokens each) generated without progress output, then verl "
            f"bootstraps their metrics on the driver (~{BOOTSTRAP_S_PER_QUESTION * questions / 60:.0f} min on a "
            "2-core CPU at 16 answers per question)",
            flush=True,
        )
        start = time.monotonic()
        metrics = super()._validate()
        print(f"DisCO validation at step {self.global_steps}: done in {time.monotonic() - start:.0f} s", flush=True)
        return metrics

    def _val_metrics_update(self, *args, **kwargs):
        start = time.monotonic()
        print("DisCO validation: answers generated and scored; verl's bootstrap of the metrics starts", flush=True)
        metrics = super()._val_metrics_update(*args, **kwargs)
        print(f"DisCO validation: bootstrap done in {time.monotonic() - start:.0f} s", flush=True)
        return metrics

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        super()._compute_metrics(batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)
        config = self.config
        metrics.update(step_metrics(batch, config.actor_rollout_ref.rollout.n, config.data.max_response_length))


class DisCOTrainer(DisCOHooks, PPOTrainerSync):
    """verl's v1 ``sync`` trainer with DisCO's hooks."""


class DisCOTrainerColocateAsync(DisCOHooks, PPOTrainerColocateAsync):
    """verl's ``colocate_async`` trainer (partial rollout on the training GPUs) with DisCO's hooks."""


class DisCOTrainerSeparateAsync(DisCOHooks, PPOTrainerSeparateAsync):
    """verl's ``separate_async`` trainer (a standalone rollout pool, weights synced every ``parameter_sync_step``
    updates) with DisCO's hooks and verl's CPU copies of pi_old."""

    actor_worker_cls = DisCODetachActorWorker

    def _old_log_probs_at_live_parameters(self) -> bool:
        # verl's _compute_old_log_prob: at trigger 0 the live weights are pi_old (saved to CPU); later triggers
        # restore pi_old for the pass and the live weights afterwards
        return self.local_trigger_step == 0


TRAINERS: dict[str, type[DisCOHooks]] = {
    "sync": DisCOTrainer,
    "colocate_async": DisCOTrainerColocateAsync,
    "separate_async": DisCOTrainerSeparateAsync,
}


class DisCOTaskRunner:
    """Ray task runner (run as ``ray.remote(DisCOTaskRunner)``): verl's v1 flow with the DisCO trainer of
    ``trainer.v1.trainer_mode`` (:data:`TRAINERS`)."""

    def run(self, config: DictConfig) -> None:
        configure_verl_logging()
        config.transfer_queue.enable = True
        OmegaConf.resolve(config)
        print(OmegaConf.to_yaml(config))
        tq.init(config.transfer_queue)
        trainer = TRAINERS[config.trainer.v1.trainer_mode](config=config)
        succeeded = False
        try:
            trainer.init()
            trainer.fit(self._agent_loop_manager(config, trainer))
            succeeded = True
        finally:
            try:
                if getattr(trainer, "logger", None) is not None:
                    trainer.logger.finish(exit_code=0 if succeeded else 1)
            finally:
                tq.close()

    @staticmethod
    def _agent_loop_manager(config: DictConfig, trainer: DisCOHooks):
        """verl's TransferQueue agent-loop manager, or the class named by ``rollout.agent.agent_loop_manager_class``."""
        fqn = config.actor_rollout_ref.rollout.get("agent", {}).get("agent_loop_manager_class")
        manager_cls = load_class_from_fqn(fqn, "AgentLoopManager") if fqn else AgentLoopManagerTQ
        return manager_cls.create(
            config=config,
            llm_client=trainer.get_llm_client(),
            teacher_client=trainer.get_teacher_client(),
            reward_loop_worker_handles=trainer.get_reward_handles(),
        )
