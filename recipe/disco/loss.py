"""The registered ``disco`` policy loss (verl 0.9.1 contract) around :mod:`recipe.disco.objective`.

verl calls a policy loss once per micro-batch on each data-parallel rank, sums the micro-batch losses of an
optimizer step without rescaling, and FSDP averages gradients over ranks. The step objective L couples all
answers of a question (J_q) and, with ``kl_unit: step``, all answers of the optimizer step (one hinge on their
KL), so no single call sees what it needs. It does not have to: at the step's parameters w,

    grad L = sum_i c_i . grad (s_i, kl_sum_i),    c_i = dL/d(s_i, kl_sum_i)      (objective.answer_coefficients)

and once the coefficients c_i are known, each call's share of grad L is that of a linear function of its own
rows. The coefficients reach the loss in one of two ways, told apart by the dtype of ``advantages``:

* **float64 per-token weights** dL/dlog pi(y_t) (every layout): written by DisCO's actor worker
  (:mod:`recipe.disco.worker`) before each mini-batch, from the answers' scalars at w. The loss is then
  ``dp_size * sum_t weight_t * log pi(y_t)`` (as a zero-valued surrogate; the worker logs L itself).
* **float32 answer codes** from the ``disco`` estimator (``kl_unit: question`` with every global micro-batch
  holding whole questions, the layout ``main_disco`` uses then, so no extra forward pass is needed): the loss
  all-gathers the per-answer scalars of the same-index micro-batch of every rank, computes the coefficients of
  its questions itself, and returns its questions' share of L. Every question it sees must be complete,
  otherwise it raises instead of training on a split group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from verl.trainer.ppo.core_algos import register_policy_loss

from recipe.disco import objective as obj
from recipe.disco.estimator import decode_answers

METRIC_PREFIX = "actor/disco/"
CODE_DTYPE = torch.float32  # what the estimator writes; the worker's per-token weights are float64


def answer_scalars(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, response_mask: torch.Tensor, score_func: str
) -> torch.Tensor:
    """(B, 2) float64 = [s_i, kl_sum_i] per answer, differentiable in ``log_prob``.

    Per-token work runs in at least float32 (a bf16 actor's log-probs are upcast).
    """
    work_dtype = torch.promote_types(log_prob.dtype, torch.float32)
    log_prob, old_log_prob = log_prob.to(work_dtype), old_log_prob.to(work_dtype)
    return torch.stack(
        [
            obj.sequence_scores(log_prob, old_log_prob, response_mask, score_func),
            obj.kl_token_sums(log_prob, old_log_prob, response_mask),
        ],
        dim=1,
    ).double()


def _gather(rows: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """All-gather (B_r, k) rows of unequal B_r over ``group`` (no autograd); returns them and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return rows, 0
    sizes = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device), group=group)
    counts = [int(size.item()) for size in sizes]
    padded = torch.cat([rows, rows.new_zeros(max(counts) - rows.shape[0], rows.shape[1])])
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded, group=group)
    rank = dist.get_rank(group)
    return torch.cat([part[:count] for part, count in zip(gathered, counts)]), sum(counts[:rank])


def _answers(rows: torch.Tensor) -> tuple[obj.Answers, torch.Tensor]:
    """The real answers of gathered rows [s, kl_sum, num_tokens, code], and which rows they are.

    Raises if a question is incomplete (fewer of its rows than its code's group size).
    """
    question, positive, size, real = decode_answers(rows[:, 3])
    question, positive, size = question[real], positive[real], size[real]
    ids, group, counts = torch.unique(question, return_inverse=True, return_counts=True)
    expected = torch.zeros_like(counts).scatter_reduce(0, group, size, "amax", include_self=False)
    if not torch.equal(counts, expected):
        split = (counts != expected).nonzero().flatten()[:3].tolist()
        raise RuntimeError(
            f"DisCO received incomplete or duplicated answer groups (question ids {ids[split].tolist()}: "
            f"{counts[split].tolist()} answers where {expected[split].tolist()} were expected). Each question's "
            "answers must be scored together, once; launch with `python -m recipe.disco.main_disco`, which lays "
            "batches out in whole groups."
        )
    answers = obj.Answers(
        s=rows[real, 0],
        kl_sum=rows[real, 1],
        num_tokens=rows[real, 2],
        group=group,
        positive=positive,
        num_groups=len(ids),
    )
    return answers, real


def coefficients(
    scalars: torch.Tensor,
    num_tokens: torch.Tensor,
    codes: torch.Tensor,
    settings: obj.Settings,
    M: float,
    group=None,
) -> tuple[torch.Tensor, float, dict[str, float]]:
    """dL/d(s_i, kl_sum_i) of this rank's answers, L and the DisCO metrics, for the questions of all ranks.

    ``scalars`` (B, 2) from :func:`answer_scalars` (detached), ``num_tokens`` (B,) and ``codes`` (B,) describe this
    rank's rows; they are all-gathered over ``group`` (the data-parallel group), so L is that of every answer the
    group holds. Padding rows (code 0) get coefficient 0.
    """
    rows = torch.cat([scalars.detach(), num_tokens[:, None].double(), codes[:, None].double()], dim=1)
    everything, offset = _gather(rows, group)
    answers, real = _answers(everything)
    answer_coefficients, L, terms = obj.answer_coefficients(answers, settings, M)
    per_row = everything.new_zeros(everything.shape[0], 2)
    per_row[real] = answer_coefficients
    return per_row[offset : offset + rows.shape[0]], float(L), metrics(terms, answers, settings.delta)


def token_weights(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    codes: torch.Tensor,
    settings: obj.Settings,
    M: float,
    group=None,
) -> tuple[torch.Tensor, float, dict[str, float]]:
    """Per-token weights dL/dlog pi(y_t) (B, L, float64) of this rank's rows at the current parameters, with L and
    the DisCO metrics of all answers of ``group``: :func:`coefficients` chained to the tokens by autograd through
    the score and KL functions. ``log_prob`` are the rows' current log-probs (no graph needed)."""
    log_prob = log_prob.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        scalars = answer_scalars(log_prob, old_log_prob, response_mask, settings.score_func)
        coeff, L, step_metrics = coefficients(scalars.detach(), response_mask.sum(-1), codes, settings, M, group)
        (weights,) = torch.autograd.grad(scalars, log_prob, grad_outputs=coeff)
    return torch.where(response_mask, weights, torch.zeros_like(weights)), L, step_metrics


def metrics(terms: obj.StepTerms, answers: obj.Answers, delta: float) -> dict[str, float]:
    """DisCO diagnostics (the same keys every time; 0 where a quantity has no support).

    kl, constraint_active and penalty are means over the trust-region units (the step, or each question);
    objective_J, pos_score, neg_score, score_margin and pairwise_auc are means over the mixed questions.
    """
    a = answers
    mixed = terms.mixed
    pos = obj.group_mean(a.s, a.positive, a.group, a.num_groups)
    neg = obj.group_mean(a.s, ~a.positive, a.group, a.num_groups)
    auc = obj.pairwise_auc(a.s, a.group, a.positive, a.num_groups)

    def mean(values: torch.Tensor) -> float:
        return float(values.mean()) if values.numel() else 0.0

    return {
        METRIC_PREFIX + "kl": mean(terms.kl),
        METRIC_PREFIX + "constraint_active": mean((terms.kl > delta).double()),
        METRIC_PREFIX + "penalty": mean(terms.penalty),
        METRIC_PREFIX + "objective_J": mean(terms.J[mixed]),
        METRIC_PREFIX + "pos_score": mean(pos[mixed]),
        METRIC_PREFIX + "neg_score": mean(neg[mixed]),
        METRIC_PREFIX + "score_margin": mean((pos - neg)[mixed]),
        METRIC_PREFIX + "pairwise_auc": mean(auc[mixed]),
    }


def questions_per_step(global_batch_size: int | None, rollout_n: int) -> float:
    """M: the questions of an optimizer step, ``global_batch_size / rollout_n`` (verl's global_batch_size counts
    answers, ``ppo_mini_batch_size * rollout.n``)."""
    if global_batch_size is None:
        raise ValueError("DisCO needs verl's global_batch_size (answers per optimizer step) to normalise the loss")
    return float(global_batch_size) / float(rollout_n)


def _weighted_log_probs(log_prob: torch.Tensor, weights: torch.Tensor, response_mask: torch.Tensor, dp_size: int):
    """dp_size * sum_t weight_t * log pi(y_t), valued 0: its gradient is this call's share of grad L (FSDP's mean
    over the data-parallel ranks divides by dp_size)."""
    weights = torch.where(response_mask, weights, torch.zeros_like(weights))
    return dp_size * (weights * (log_prob - log_prob.detach())).sum()


def _whole_question_call(log_prob, old_log_prob, advantages, response_mask, config) -> tuple[torch.Tensor, dict]:
    """The loss of a call whose questions are complete across the ranks' same-index micro-batches."""
    settings = config.policy_loss
    if settings.kl_unit != "question":
        raise RuntimeError(
            f"actor_rollout_ref.actor.policy_loss.kl_unit={settings.kl_unit!r} needs the KL of all answers of an "
            "optimizer step before the first micro-batch, which DisCO's actor worker computes; launch with "
            "`python -m recipe.disco.main_disco` (verl's stock entry point can only train kl_unit=question, and "
            "only when every global micro-batch holds whole questions)"
        )
    scalars = answer_scalars(log_prob, old_log_prob, response_mask, settings.score_func)
    coeff, L, call_metrics = coefficients(
        scalars.detach(),
        response_mask.sum(-1),
        advantages[:, 0],
        settings,
        questions_per_step(config.global_batch_info.get("global_batch_size"), config.rollout_n),
    )
    dp_size = config.global_batch_info.get("dp_size") or 1
    surrogate = dp_size * (coeff * (scalars - scalars.detach())).sum()
    return surrogate + L, call_metrics


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
    if advantages.dtype == torch.float64:
        dp_size = config.global_batch_info.get("dp_size") or 1
        return _weighted_log_probs(log_prob, advantages, response_mask, dp_size), {}
    return _whole_question_call(log_prob, old_log_prob, advantages, response_mask, config)
