"""The registered ``disco`` policy loss (verl 0.9.1 contract) around :mod:`recipe.disco.objective`.

verl calls it once per micro-batch on each data-parallel rank, sums the micro-batch losses of an optimizer
step without rescaling, and FSDP averages gradients over ranks. The loss therefore returns the share of the
step objective

    L = (1/M) * sum_q ( -J_q * 1[q mixed] + penalty_q ),    M = global_batch_size / rollout_n

held by the questions in this call. With several ranks, the per-answer scalars (score, KL token sum, token
count, code) of the k-th micro-batch of every rank are all-gathered with autograd, so a question may be spread
over the ranks' same-index micro-batches; every rank then returns the same value S/M, the gather's backward
sums the W copies of each gradient and FSDP's mean divides by W, which leaves exactly grad(S/M). Every
question seen must be complete (all n_g answers present), otherwise the call raises instead of training on a
split group. The value returned is the true objective (it is what verl logs as ``actor/pg_loss``).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from verl.trainer.ppo.core_algos import register_policy_loss

from recipe.disco import objective as obj
from recipe.disco.estimator import decode_answers

METRIC_PREFIX = "actor/disco/"


def _gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """All-gather (B_r, k) tensors of unequal B_r over the default group, differentiably."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device))
    longest = int(max(size.item() for size in sizes))
    padded = torch.cat([rows, rows.new_zeros(longest - rows.shape[0], rows.shape[1])])  # code 0: ignored rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.distributed.nn's gather is deprecated, not removed
        gathered = torch.distributed.nn.functional.all_gather(padded)
    return torch.cat(gathered)


def _answers_of_call(log_prob, old_log_prob, response_mask, advantages, score_func) -> torch.Tensor:
    """(rows, 4) = [s, KL token sum, token count, code] for this call, gathered over ranks when distributed.

    Per-token work runs in at least float32 (a bf16 actor's log-probs are upcast); the per-answer rows are float64,
    which keeps the integer codes (< 2**24) and token counts exact.
    """
    work_dtype = torch.promote_types(log_prob.dtype, torch.float32)
    log_prob, old_log_prob = log_prob.to(work_dtype), old_log_prob.to(work_dtype)
    rows = torch.stack(
        [
            obj.sequence_scores(log_prob, old_log_prob, response_mask, score_func).double(),
            obj.kl_token_sums(log_prob, old_log_prob, response_mask).double(),
            response_mask.sum(-1).double(),
            advantages[:, 0].double(),
        ],
        dim=1,
    )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rows = _gather_rows(rows)
    return rows


def _complete_groups(code: torch.Tensor):
    """Compact question ids of the real rows, and a check that every question seen is complete."""
    question, positive, size, real = decode_answers(code)
    question, positive, size = question[real], positive[real], size[real]
    ids, group, counts = torch.unique(question, return_inverse=True, return_counts=True)
    expected = torch.zeros_like(counts).scatter_reduce(0, group, size, "amax", include_self=False)
    if not torch.equal(counts, expected):
        split = (counts != expected).nonzero().flatten()[:3].tolist()
        raise RuntimeError(
            f"DisCO loss received incomplete answer groups (question ids {ids[split].tolist()}: "
            f"{counts[split].tolist()} of {expected[split].tolist()} answers). Each question's answers must be scored "
            "together; launch with `python -m recipe.disco.main_disco`, which lays batches out in whole groups."
        )
    return real, group, positive, len(ids)


def _normaliser(config, num_questions: int) -> float:
    """M: the questions in the optimizer step (global_batch_size / rollout_n), or this call's when verl gives none."""
    global_batch_size = config.global_batch_info.get("global_batch_size")
    if global_batch_size is None:
        return float(max(num_questions, 1))
    return float(global_batch_size) / float(config.rollout_n)


def _metrics(terms: obj.QuestionTerms, s, group, positive, num_groups: int, delta: float) -> dict[str, float]:
    """Per-call DisCO diagnostics (the same keys on every call, 0 where a quantity has no support)."""
    with torch.no_grad():
        mixed = terms.mixed
        n_mixed = int(mixed.sum())
        n_questions = max(num_groups, 1)
        pos = obj.group_mean(s, positive, group, num_groups)
        neg = obj.group_mean(s, ~positive, group, num_groups)
        auc = obj.pairwise_auc(s, group, positive, num_groups)

        def over_mixed(values: torch.Tensor) -> float:
            return float(values[mixed].mean()) if n_mixed else 0.0

        return {
            METRIC_PREFIX + "kl": float(terms.kl.sum() / n_questions),
            METRIC_PREFIX + "constraint_active": float((terms.kl > delta).sum() / n_questions),
            METRIC_PREFIX + "penalty": float(terms.penalty.sum() / n_questions),
            METRIC_PREFIX + "objective_J": over_mixed(terms.J),
            METRIC_PREFIX + "pos_score": over_mixed(pos),
            METRIC_PREFIX + "neg_score": over_mixed(neg),
            METRIC_PREFIX + "score_margin": over_mixed(pos - neg),
            METRIC_PREFIX + "pairwise_auc": over_mixed(auc),
            METRIC_PREFIX + "num_mixed": float(n_mixed),
            METRIC_PREFIX + "num_all_correct": float((terms.num_neg == 0).sum()),
            METRIC_PREFIX + "num_all_wrong": float((terms.num_pos == 0).sum()),
        }


@register_policy_loss(obj.DISCO)
def compute_policy_loss_disco(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DisCO loss of one micro-batch. ``loss_agg_mode`` and ``rollout_is_weights`` do not apply to DisCO."""
    hp = config.policy_loss
    rows = _answers_of_call(log_prob, old_log_prob, response_mask, advantages, hp.score_func)
    real, group, positive, num_groups = _complete_groups(rows[:, 3])
    s, kl_sum, num_tokens = rows[real, 0], rows[real, 1], rows[real, 2]
    terms = obj.question_terms(
        s, kl_sum, num_tokens, group, positive, num_groups, hp.objective, hp.tau, hp.delta, hp.beta
    )
    loss = obj.step_objective_sum(terms) / _normaliser(config, num_groups)
    return loss, _metrics(terms, s, group, positive, num_groups, hp.delta)
