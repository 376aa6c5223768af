"""The DFT objective in plain PyTorch (no verl import), in the textbook's notation (Algorithm 36).

DFT models the discriminative probability of an output y for an input x with a score s_w(y, x) and a temperature tau,

    P_w(y | x) = exp(s_w(y, x) / tau) / g(w),    g(w) = sum over all outputs y' of exp(s_w(y', x) / tau)

and fits it by maximum likelihood on the data (x_i, y_i), i = 1..n:

    F(w) = -(1/n) sum_i s_w(y_i, x_i) + (1/n) sum_i tau * log g_i(w)

Scores (``score``):

    dft  : s(y) = sum_t log pi_w(y_t | x, y_<t)            (with tau = 1 the first term is SFT's loss)
    dft2 : s(y) = (1/|y|) sum_t log pi_w(y_t | x, y_<t)

g_i is estimated from B negatives y'_ij drawn from a sampling distribution P_i (in practice pi_ref(. | x_bar_i),
the base model on an augmented prompt) by importance sampling, with exponents

    dft  : a_ij = s(y'_ij) / tau - log pi_ref(y'_ij | prompt)     (log pi_ref is always the token *sum*)
    dft2 : a_ij = s(y'_ij) / tau                                    (pi_ref dropped: P_i taken as constant)

and tracked per training example across steps and epochs by SOX's moving average (u_i = 1, log u_i = 0, at first):

    u_{i,t} = (1 - gamma) u_{i,t-1} + gamma * (1/B) sum_j exp(a_ij)

Algorithm 36's direction for a mini-batch B_t is

    z_t = -(1/|B_t|) sum_i grad s(y_i) + (1/|B_t|) sum_i (1/(u_{i,t} B)) sum_j exp(a_ij) grad s(y'_ij)

and :func:`surrogate_loss` is the scalar whose autograd gradient is z_t. Everything that touches exp(a) is done in
log space: a_ij is a sum of hundreds of token log-probs divided by tau, so |a_ij| of 700 and more is ordinary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Literal

import torch

from recipe.disco.objective import sequence_scores as disco_sequence_scores

Score = Literal["dft", "dft2"]
RefPrompt = Literal["plain", "augmented"]
SCORES: tuple[str, ...] = ("dft", "dft2")
REF_PROMPTS: tuple[str, ...] = ("plain", "augmented")


@dataclass(frozen=True)
class DFTSettings:
    """DFT's hyperparameters; in Hydra YAML they live under ``dft.`` (``dft.tau``, ``dft.gamma``, ...).

    ``tau``: temperature of P_w (> 0). ``gamma``: SOX's moving-average rate for u (0 < gamma <= 1; 1 keeps no
    memory). ``num_negatives``: B, negatives per example per step (>= 1). ``score``: ``dft`` (token sum, uses
    pi_ref in a) or ``dft2`` (token mean, no pi_ref). ``ref_prompt``: the prompt log pi_ref(y' | .) is evaluated on
    for ``dft``: ``plain`` (the training prompt x, as the official code does) or ``augmented`` (x_bar, the prompt the
    negatives were sampled with, which makes the importance weights exact); unused by ``dft2``.
    """

    tau: float
    gamma: float
    num_negatives: int
    score: Score
    ref_prompt: RefPrompt

    def __post_init__(self):
        def real(key: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ValueError(f"dft.{key} must be a finite number, got {value!r}")
            return float(value)

        if not real("tau", self.tau) > 0:
            raise ValueError(f"dft.tau must be > 0, got {self.tau!r}")
        if not 0 < real("gamma", self.gamma) <= 1:
            raise ValueError(f"dft.gamma must be in (0, 1], got {self.gamma!r}")
        if isinstance(self.num_negatives, bool) or not isinstance(self.num_negatives, Integral):
            raise ValueError(f"dft.num_negatives must be an integer >= 1, got {self.num_negatives!r}")
        if self.num_negatives < 1:
            raise ValueError(f"dft.num_negatives must be an integer >= 1, got {self.num_negatives!r}")
        if self.score not in SCORES:
            raise ValueError(f"dft.score must be one of {SCORES}, got {self.score!r}")
        if self.ref_prompt not in REF_PROMPTS:
            raise ValueError(f"dft.ref_prompt must be one of {REF_PROMPTS}, got {self.ref_prompt!r}")

    @property
    def uses_ref(self) -> bool:
        """Whether a_ij includes -log pi_ref(y'_ij | .) (``dft``) or not (``dft2``)."""
        return self.score == "dft"


# the official code's defaults (Optimization-AI/DFT, as read; see the package's reference notes)
DFT_PRESET = DFTSettings(tau=1.0, gamma=0.85, num_negatives=2, score="dft", ref_prompt="plain")
DFT2_PRESET = DFTSettings(tau=0.3, gamma=0.9, num_negatives=2, score="dft2", ref_prompt="plain")
PRESETS: dict[str, DFTSettings] = {"dft": DFT_PRESET, "dft2": DFT2_PRESET}


def sequence_scores(log_prob: torch.Tensor, response_mask: torch.Tensor, score: Score) -> torch.Tensor:
    """Per-output score s(y) over the response mask (shape (N, L) -> (N,)).

    dft : s = sum_t log pi(y_t)            (also log pi_ref(y) of a whole output, from pi_ref's token log-probs)
    dft2: s = (1/|y|) sum_t log pi(y_t)    (DisCO's ``logL`` score)

    Values off the mask are never read; an empty mask scores 0.
    """
    if score == "dft2":
        return disco_sequence_scores(log_prob, log_prob, response_mask, "logL")  # logL never reads old_log_prob
    if score == "dft":
        return torch.where(response_mask.bool(), log_prob, torch.zeros_like(log_prob)).sum(-1)
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def exponents(s_neg: torch.Tensor, tau: float, ref_log_prob: torch.Tensor | None = None) -> torch.Tensor:
    """a_ij = s(y'_ij) / tau - log pi_ref(y'_ij | prompt), or s(y'_ij) / tau without pi_ref (shape (n, B)).

    exp(a_ij) is the importance-sampling term of g_i: exp(s/tau) / P_i(y'), with P_i = pi_ref(. | prompt).
    """
    a = s_neg / tau
    return a if ref_log_prob is None else a - ref_log_prob


@torch.no_grad()
def update_log_u(log_u_prev: torch.Tensor, a: torch.Tensor, gamma: float) -> torch.Tensor:
    """SOX's moving average of g_i, in log space, for the examples of the step (no gradient: u is state).

        log u_{i,t} = log( (1 - gamma) exp(log u_{i,t-1}) + gamma * (1/B) sum_j exp(a_ij) )
                    = logaddexp( log(1 - gamma) + log u_{i,t-1},  log gamma + logsumexp_j a_ij - log B )

    ``log_u_prev`` has shape (n,), ``a`` shape (n, B); returns shape (n,) in a's dtype. gamma = 1 keeps no memory.
    """
    a = a.detach()
    fresh = torch.logsumexp(a, dim=-1) + (math.log(gamma) - math.log(a.shape[-1]))
    keep = math.log1p(-gamma) if gamma < 1 else -math.inf
    return torch.logaddexp(log_u_prev.detach().to(a.dtype) + keep, fresh)


@torch.no_grad()
def negative_weights(a: torch.Tensor, log_u: torch.Tensor) -> torch.Tensor:
    """The (detached) weight of each negative's score gradient, exp(a_ij) / u_{i,t} = exp(a_ij - log u_{i,t}).

    With log u_{i,t} from :func:`update_log_u` each weight is at most B / gamma, whatever the size of a.
    """
    return torch.exp(a.detach() - log_u.detach()[:, None])


def surrogate_loss(
    s_pos: torch.Tensor, s_neg: torch.Tensor, weights: torch.Tensor, batch_size: float | None = None
) -> torch.Tensor:
    """The scalar whose gradient is Algorithm 36's z_t (weights = :func:`negative_weights`, a constant):

        L = (1/|B_t|) sum_i [ -s(y_i) + (1/B) sum_j sg(exp(a_ij) / u_{i,t}) s(y'_ij) ]

    How tau enters: the objective's term is tau * log g_i, and
        grad (tau log g_i) = tau * (1/g_i) sum_y exp(s(y)/tau) (1/tau) grad s(y)
                           = (1/g_i) sum_y exp(s(y)/tau) grad s(y),
    so the tau in front of log g cancels the 1/tau of the chain rule: tau appears only inside a_ij (s/tau), and the
    weight multiplies s(y'), not s(y')/tau. Replacing 1/g_i by 1/u_{i,t} and the sum over outputs by the
    importance-sampled mean over the B negatives gives z_t. L's value is not F (only its gradient is meaningful).

    ``s_pos`` (n,), ``s_neg`` and ``weights`` (n, B). ``batch_size`` is |B_t| (default n); pass the global count
    when the examples of one step are split over micro-batches or ranks, so that the shares add up to z_t.
    """
    size = s_pos.shape[0] if batch_size is None else batch_size
    per_example = -s_pos + (weights.detach() * s_neg).mean(-1)
    return per_example.sum() / size


def dft_loss(
    s_pos: torch.Tensor,
    s_neg: torch.Tensor,
    log_u_prev: torch.Tensor,
    settings: DFTSettings,
    ref_log_prob: torch.Tensor | None = None,
    batch_size: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of Algorithm 36 for the examples of B_t: (L, log u_{i,t}, the weights exp(a_ij) / u_{i,t}).

    ``s_pos`` (n,): s(y_i) of the data outputs; ``s_neg`` (n, B): s(y'_ij) of the negatives (B =
    ``settings.num_negatives``); ``log_u_prev`` (n,): log u_{i,t-1} of these examples (0 on first visit);
    ``ref_log_prob`` (n, B): log pi_ref(y'_ij | prompt), token sums, required for ``dft`` and refused for ``dft2``.
    The caller stores the returned log u_{i,t} (detached) for the next visit of each example. u_{i,t} includes this
    step's negatives and is used in this step's weights, as in the algorithm.
    """
    n = s_pos.shape[0]
    if s_pos.dim() != 1 or s_neg.shape != (n, settings.num_negatives) or log_u_prev.shape != (n,):
        raise ValueError(
            f"expected s_pos (n,), s_neg (n, dft.num_negatives={settings.num_negatives}), log_u_prev (n,); got "
            f"{tuple(s_pos.shape)}, {tuple(s_neg.shape)}, {tuple(log_u_prev.shape)}"
        )
    if settings.uses_ref and (ref_log_prob is None or ref_log_prob.shape != s_neg.shape):
        raise ValueError(f"dft.score=dft needs ref_log_prob of shape {tuple(s_neg.shape)}")
    if not settings.uses_ref and ref_log_prob is not None:
        raise ValueError("dft.score=dft2 drops pi_ref: pass ref_log_prob=None")
    a = exponents(s_neg.detach(), settings.tau, ref_log_prob)
    log_u = update_log_u(log_u_prev, a, settings.gamma)
    weights = negative_weights(a, log_u)
    return surrogate_loss(s_pos, s_neg, weights, batch_size), log_u, weights


@torch.no_grad()
def step_metrics(
    s_pos: torch.Tensor, s_neg: torch.Tensor, weights: torch.Tensor, log_u: torch.Tensor, tau: float
) -> dict[str, float]:
    """DFT's diagnostics over a step's examples: mean s of data outputs and of negatives, mean and max weight,
    mean log u_{i,t}, and ``objective_estimate`` = (1/n) sum_i (-s(y_i) + tau log u_{i,t}), the running estimate
    of F on the step's examples."""
    return {
        "dft/score_pos": float(s_pos.mean()),
        "dft/score_neg": float(s_neg.mean()),
        "dft/weight_mean": float(weights.mean()),
        "dft/weight_max": float(weights.max()),
        "dft/log_u_mean": float(log_u.mean()),
        "dft/objective_estimate": float((tau * log_u - s_pos).mean()),
    }
