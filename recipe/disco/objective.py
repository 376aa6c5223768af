"""The DisCO objective in plain PyTorch (no verl import), in the paper's notation.

For a question x with answers y_1..y_n and binary rewards r_i, the answers split into positives
P_q = {i: r_i = 1} and negatives N_q = {i: r_i = 0}. A *score* s(y) of each answer is raised for
positives and lowered for negatives:

    logL   : s(y) = (1/|y|) sum_t log pi(y_t | x, y_<t)
    Lratio : s(y) = (1/|y|) sum_t pi(y_t | x, y_<t) / pi_old(y_t | x, y_<t)

    disco-b (L1): J_q = mean_{i in P_q} s_i - mean_{j in N_q} s_j
    disco   (L2): J_q = mean_{i in P_q} s_i - tau * log( mean_{j in N_q} exp(s_j / tau) )

Only *mixed* questions (|P_q| > 0 and |N_q| > 0) have a J_q. The trust region KL(pi_old || pi) <= delta
is enforced by a squared hinge on the k1 estimate, over one of two units (``kl_unit``):

    step     (textbook, default): KL = sum_{tokens of all answers of the step} (log pi_old - log pi) / #tokens
             L = -(1/M) sum_q J_q 1[q mixed] + (beta / 2) [KL - delta]_+^2
    question                    : KL_q = the same token mean over the answers of question q only
             L = (1/M) sum_q ( -J_q 1[q mixed] + (beta / 2) [KL_q - delta]_+^2 )

The gradient of the hinge is beta [KL - delta]_+ grad KL. M is the number of questions in the optimizer step,
counting all-correct and all-wrong ones, as the reference implementation does. L depends on the policy only
through the per-answer scalars (s_i, sum of the k1 terms of answer i, |y_i|), which is what makes it exact
under any layout: its derivatives with respect to them (``answer_coefficients``) turn each micro-batch's share
into a linear function of its own rows.

Answers are given per row: a question id (``group``, int64 in [0, G)) and a label ``positive``.
Rows must already be restricted to real answers (padding rows dropped by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Protocol

import torch

ScoreFunc = Literal["logL", "Lratio"]
Objective = Literal["disco", "disco-b"]
KLUnit = Literal["step", "question"]
DISCO = "disco"  # the name of the registered loss and estimator, and of the L2 objective
SCORE_FUNCS: tuple[str, ...] = ("logL", "Lratio")
OBJECTIVES: tuple[str, ...] = (DISCO, "disco-b")
KL_UNITS: tuple[str, ...] = ("step", "question")


def sequence_scores(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, response_mask: torch.Tensor, score_func: ScoreFunc
) -> torch.Tensor:
    """Per-answer score s, the token mean over the response mask (shape (B, L) -> (B,)).

    logL:   s = (1/|y|) sum_t log pi(y_t)
    Lratio: s = (1/|y|) sum_t exp(log pi(y_t) - log pi_old(y_t))

    An answer with an empty mask scores 0 (its tokens are never read, so padding values cannot leak).
    """
    mask = response_mask.bool()
    if score_func == "logL":
        per_token = log_prob
    elif score_func == "Lratio":
        # zero the exponent off the mask so garbage in padded positions can never overflow
        per_token = torch.exp(torch.where(mask, log_prob - old_log_prob, torch.zeros_like(log_prob)))
    else:
        raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    total = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1)
    return total / mask.sum(-1).clamp(min=1)


def kl_token_sums(log_prob: torch.Tensor, old_log_prob: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per-answer sum over response tokens of the k1 term log pi_old - log pi (shape (B, L) -> (B,))."""
    mask = response_mask.bool()
    return torch.where(mask, old_log_prob - log_prob, torch.zeros_like(log_prob)).sum(-1)


def group_sum(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, group, values)


def group_mean(values: torch.Tensor, where: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """mean over rows with ``where`` of each group (0 for groups with no such row)."""
    total = group_sum(torch.where(where, values, torch.zeros_like(values)), group, num_groups)
    count = group_sum(where.to(values.dtype), group, num_groups)
    return total / count.clamp(min=1)


def neg_log_mean_exp(s: torch.Tensor, negative: torch.Tensor, group: torch.Tensor, num_groups: int, tau: float):
    """tau * log( mean_{j in N_q} exp(s_j / tau) ) per question, computed stably (0 where N_q is empty).

    The per-question maximum of s_j / tau over negatives is subtracted before exponentiating (a
    detached shift, so value and gradient are exact).
    """
    z = s / tau
    shift = torch.full((num_groups,), float("-inf"), dtype=s.dtype, device=s.device)
    shift = shift.scatter_reduce(0, group, torch.where(negative, z, torch.full_like(z, float("-inf"))), "amax")
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift)).detach()
    exp_terms = torch.exp(torch.where(negative, z - shift[group], torch.full_like(z, float("-inf"))))
    total = group_sum(exp_terms, group, num_groups)
    count = group_sum(negative.to(s.dtype), group, num_groups)
    has_neg = count > 0
    # log of 1 where there are no negatives keeps the unused branch finite (no NaN gradients)
    log_mean = torch.log(torch.where(has_neg, total, torch.ones_like(total))) - torch.log(count.clamp(min=1)) + shift
    return torch.where(has_neg, tau * log_mean, torch.zeros_like(log_mean))


class Settings(Protocol):
    """DisCO's hyperparameters (``recipe.disco.config.DisCOPolicyLossConfig`` is one)."""

    objective: str
    score_func: str
    tau: float
    delta: float
    beta: float
    kl_unit: str


@dataclass
class Answers:
    """Per-answer scalars of the real answers of one optimizer step (or of one loss call), each of shape (A,).

    ``s``: score s_i; ``kl_sum``: sum over the answer's tokens of log pi_old - log pi; ``num_tokens``: |y_i|;
    ``group``: question index in [0, num_groups); ``positive``: r_i = 1.
    """

    s: torch.Tensor
    kl_sum: torch.Tensor
    num_tokens: torch.Tensor
    group: torch.Tensor
    positive: torch.Tensor
    num_groups: int


@dataclass
class StepTerms:
    """The terms of L for a set of answers: per question (G,) and per trust-region unit (G,) or (1,)."""

    J: torch.Tensor  # J_q, 0 where the question is not mixed
    kl: torch.Tensor  # the k1 estimate of each trust-region unit: KL_q per question, or one KL for the step
    penalty: torch.Tensor  # (beta/2) [KL - delta]_+^2 per unit
    num_pos: torch.Tensor  # |P_q|
    num_neg: torch.Tensor  # |N_q|

    @property
    def mixed(self) -> torch.Tensor:
        return (self.num_pos > 0) & (self.num_neg > 0)


def answer_counts(
    positive: torch.Tensor, group: torch.Tensor, num_groups: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """|P_q| and |N_q|: the numbers of positive and negative answers of every question."""
    return group_sum(positive.to(dtype), group, num_groups), group_sum((~positive).to(dtype), group, num_groups)


def question_objective(
    s: torch.Tensor, group: torch.Tensor, positive: torch.Tensor, num_groups: int, objective: Objective, tau: float
) -> torch.Tensor:
    """J_q for every question (0 unless mixed).

    disco-b: J_q = mean_{P_q} s - mean_{N_q} s
    disco:   J_q = mean_{P_q} s - tau * log mean_{N_q} exp(s / tau)
    """
    negative = ~positive
    pos_mean = group_mean(s, positive, group, num_groups)
    if objective == "disco-b":
        neg_term = group_mean(s, negative, group, num_groups)
    elif objective == "disco":
        neg_term = neg_log_mean_exp(s, negative, group, num_groups, tau)
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    num_pos, num_neg = answer_counts(positive, group, num_groups, s.dtype)
    mixed = (num_pos > 0) & (num_neg > 0)
    return torch.where(mixed, pos_mean - neg_term, torch.zeros_like(pos_mean))


def squared_hinge_penalty(kl: torch.Tensor, delta: float, beta: float) -> torch.Tensor:
    """(beta/2) [KL - delta]_+^2, whose gradient is beta [KL - delta]_+ grad KL."""
    return 0.5 * beta * torch.clamp(kl - delta, min=0) ** 2


def trust_region_kl(answers: Answers, kl_unit: KLUnit) -> torch.Tensor:
    """The k1 estimate of KL(pi_old || pi) per unit: token mean over each question's answers (G,), or over all
    answers (1,) for the step."""
    if kl_unit == "question":
        tokens = group_sum(answers.num_tokens.to(answers.kl_sum.dtype), answers.group, answers.num_groups)
        return group_sum(answers.kl_sum, answers.group, answers.num_groups) / tokens.clamp(min=1)
    if kl_unit == "step":
        return (answers.kl_sum.sum() / answers.num_tokens.to(answers.kl_sum.dtype).sum().clamp(min=1)).reshape(1)
    raise ValueError(f"kl_unit must be one of {KL_UNITS}, got {kl_unit!r}")


def step_terms(answers: Answers, settings: Settings) -> StepTerms:
    """J_q per question and the trust-region KL and penalty per unit, from per-answer scalars."""
    a = answers
    J = question_objective(a.s, a.group, a.positive, a.num_groups, settings.objective, settings.tau)
    kl = trust_region_kl(a, settings.kl_unit)
    num_pos, num_neg = answer_counts(a.positive, a.group, a.num_groups, a.s.dtype)
    penalty = squared_hinge_penalty(kl, settings.delta, settings.beta)
    return StepTerms(J=J, kl=kl, penalty=penalty, num_pos=num_pos, num_neg=num_neg)


def step_objective(terms: StepTerms, M: float, kl_unit: KLUnit) -> torch.Tensor:
    """L = -(1/M) sum_q J_q + (1/M) sum_q penalty_q (question unit) or + penalty of the step (step unit)."""
    penalty = terms.penalty.sum() / M if kl_unit == "question" else terms.penalty.sum()
    return penalty - terms.J.sum() / M


def answer_coefficients(answers: Answers, settings: Settings, M: float) -> tuple[torch.Tensor, torch.Tensor, StepTerms]:
    """(dL/ds_i, dL/dkl_sum_i) of every answer, by autograd through :func:`step_objective`, with L and its terms.

    L depends on the policy only through (s_i, kl_sum_i), so at given parameters
    grad L = sum_i dL/ds_i grad s_i + dL/dkl_sum_i grad kl_sum_i: each answer's share of the gradient is a linear
    function of its own scalars with these coefficients. Returns coefficients of shape (A, 2) and L (0-dim).
    """
    s = answers.s.detach().requires_grad_(True)
    kl_sum = answers.kl_sum.detach().requires_grad_(True)
    with torch.enable_grad():
        terms = step_terms(replace(answers, s=s, kl_sum=kl_sum), settings)
        L = step_objective(terms, M, settings.kl_unit)
        grads = torch.autograd.grad(L, (s, kl_sum))
    return torch.stack(grads, dim=1), L.detach(), StepTerms(**{k: v.detach() for k, v in vars(terms).items()})


def pairwise_auc(s: torch.Tensor, group: torch.Tensor, positive: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per question, the share of (positive, negative) pairs with s_pos > s_neg (ties count 1/2).

    0 for questions that are not mixed. This is the empirical AUC that DisCO's objective raises.
    """
    with torch.no_grad():
        same = group[:, None] == group[None, :]
        pair = same & positive[:, None] & ~positive[None, :]
        diff = s[:, None] - s[None, :]
        won = torch.where(diff > 0, 1.0, torch.where(diff == 0, 0.5, 0.0)).to(s.dtype)
        wins = group_sum(torch.where(pair, won, torch.zeros_like(won)).sum(1), group, num_groups)
        pairs = group_sum(pair.to(s.dtype).sum(1), group, num_groups)
        return wins / pairs.clamp(min=1)
