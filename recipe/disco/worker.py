"""DisCO's actor worker: verl's ``TrainingWorker`` with the step coefficients computed before each mini-batch.

Within one optimizer step (one mini-batch) the parameters w are fixed, and the step objective L depends on them
only through each answer's score s_i and KL token sum. Before verl's update of a mini-batch,
:class:`DisCOTrainingWorker` therefore

1. takes every answer's per-token log-probs at w: for the first mini-batch of an update whose old log-probs the
   actor computed at its live parameters (the trainer's :data:`OLD_LOG_PROBS_AT_LIVE_PARAMETERS`) they are the
   ``old_log_probs`` (no extra pass); for the others one no-grad forward pass over the mini-batch (verl's own
   inference path, with the log-prob pass's micro-batch settings). verl's ``separate_async`` trainer computes the
   old log-probs of a cycle's later updates at pi_old, weights restored from a CPU copy while the live ones have
   moved on: there the first mini-batch takes the pass too, and the KL is measured from pi_old;
2. all-gathers the per-answer scalars (s_i, kl_sum_i, |y_i|, answer code) over the data-parallel group, so that
   every question of the mini-batch is complete, and computes c_i = dL/d(s_i, kl_sum_i) by autograd through
   :mod:`recipe.disco.objective`;
3. chains c_i back to per-token weights dL/dlog pi(y_t) by autograd through the same score and KL functions, and
   writes them (float64) as the rows' ``advantages``; the registered ``disco`` loss is then linear in each
   micro-batch's rows, so verl may cut the mini-batch into any micro-batches (fixed size, token budget, Ulysses)
   on any number of ranks and the accumulated gradient is exactly grad L;
4. reports L as ``actor/pg_loss`` and ``actor/loss`` and the DisCO metrics (``actor/disco/*``) of the whole
   mini-batch.

When ``main_disco`` lays out whole questions per global micro-batch for ``kl_unit: question``
(:data:`COEFFICIENTS_IN_LOSS` in the update batch), the loss computes its coefficients itself and the worker
changes nothing. :class:`DisCOActorRolloutRefWorker` is verl's hybrid worker with this actor;
:class:`DisCODetachActorWorker` is verl's ``separate_async`` worker (the hybrid worker plus the CPU copies of
pi_old) with it.
"""

from __future__ import annotations

import torch
from verl.experimental.separation.engine_workers import DetachActorWorker
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
from verl.workers.utils.padding import no_padding_2_padding, response_to_nested

from recipe.disco.loss import questions_per_step, token_weights

# update-batch flags set by recipe.disco.trainer
COEFFICIENTS_IN_LOSS = "disco_coefficients_in_loss"
OLD_LOG_PROBS_AT_LIVE_PARAMETERS = "disco_old_log_probs_at_live_parameters"


class DisCOTrainingWorker(TrainingWorker):
    """verl's training worker, writing DisCO's per-token weights into each mini-batch before its update."""

    _at_old_parameters = False  # whether the next mini-batch runs at the parameters that computed old_log_probs

    def train_mini_batch(self, data):
        # without the trainer's word the first mini-batch takes a forward pass too: exact either way
        self._at_old_parameters = tu.get(data, OLD_LOG_PROBS_AT_LIVE_PARAMETERS, default=False)
        return super().train_mini_batch(data)

    def train_batch(self, data):
        step_metrics = {} if tu.get(data, COEFFICIENTS_IN_LOSS, default=False) else self._write_token_weights(data)
        self._at_old_parameters = False
        output = super().train_batch(data)
        if output is not None and step_metrics:
            tu.get(output, "metrics").update(step_metrics)
        return output

    def _write_token_weights(self, data) -> dict[str, float]:
        """Replace the mini-batch's answer codes by the per-token weights dL/dlog pi; return L and the metrics."""
        config = self.loss_fn.keywords["config"]  # the ActorConfig verl binds to its ppo_loss
        device = get_device_id()
        mask = data["response_mask"].to_padded_tensor(0).to(device).bool()
        old_log_prob = data["old_log_probs"].to_padded_tensor(0.0).to(device)
        codes = data["advantages"].to_padded_tensor(0.0)[:, 0].to(device)
        current = old_log_prob if self._at_old_parameters else self._log_probs_at_current_parameters(data)
        weights, L, metrics = token_weights(
            current.to(device),
            old_log_prob,
            mask,
            codes,
            config.policy_loss,
            questions_per_step(tu.get(data, "global_batch_size"), config.rollout_n),
            group=self.engine.get_data_parallel_group(),
        )
        data["advantages"] = response_to_nested(weights.cpu(), data["response_mask"])
        return {"actor/pg_loss": L, "loss": L, **metrics}

    def _log_probs_at_current_parameters(self, data) -> torch.Tensor:
        """Padded (B, L) log-probs of the mini-batch's responses at the current parameters: one no-grad forward
        through verl's engine, with the old-log-prob pass's micro-batch settings, on a shallow copy of the batch
        (so that its settings do not leak into the update)."""
        probe = data.copy()
        tu.assign_non_tensor(
            probe,
            calculate_entropy=False,
            use_remove_padding=self.model_config.get("use_remove_padding", False),
            use_dynamic_bsz=self.engine_config.use_dynamic_bsz,
            max_token_len_per_gpu=self.engine_config.infer_max_token_len_per_gpu,
            micro_batch_size_per_gpu=self.engine_config.infer_micro_batch_size_per_gpu,
            use_fused_kernels=self.engine_config.use_fused_kernels,
        )
        with self.engine.eval_mode(disable_auto_offload=True):
            output = self.engine.infer_batch(probe, loss_function=None)
        return no_padding_2_padding(output["model_output"]["log_probs"], data)


class DisCOActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout worker with :class:`DisCOTrainingWorker` as its actor."""

    actor_worker_cls = DisCOTrainingWorker


class DisCODetachActorWorker(DetachActorWorker):
    """verl's ``separate_async`` actor worker (``save_model_to_cpu`` / ``restore_model_from_cpu`` of pi_old) with
    :class:`DisCOTrainingWorker` as its actor."""

    actor_worker_cls = DisCOTrainingWorker
