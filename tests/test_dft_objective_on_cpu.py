"""DFT's objective (``recipe/dft/objective.py``) against an independent float64 reference of Algorithm 36, and its
behaviour on an enumerable toy where every expectation is computed exactly.

The reference here shares no code with the module: python loops over examples and negatives, ``math.exp`` and
``math.log``, the literal update u = (1 - gamma) u + gamma * mean exp(a) and weight exp(a) / u, kept finite by
scaling every term of one example by the same exp(-M).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recipe.dft import objective
from recipe.dft.objective import DFT2_PRESET, DFT_PRESET, DFTSettings

# ---------------------------------------------------------------------------------------------------------------
# The reference: Algorithm 36 written out
# ---------------------------------------------------------------------------------------------------------------


def ref_sox(log_u_prev: float, a_row: list[float], gamma: float) -> tuple[float, list[float]]:
    """u_new = (1 - gamma) u_prev + gamma (1/B) sum_j exp(a_j) and the weights exp(a_j) / u_new, with every term
    multiplied by exp(-M) (M the largest exponent whose coefficient is not 0), so that nothing overflows.
    Returns (log u_new, weights)."""
    B = len(a_row)
    M = max(a_row) if gamma == 1 else max(max(a_row), log_u_prev)
    scaled_u = gamma * sum(math.exp(a - M) for a in a_row) / B
    if gamma < 1:
        scaled_u += (1 - gamma) * math.exp(log_u_prev - M)
    return M + math.log(scaled_u), [math.exp(a - M) / scaled_u for a in a_row]


V, D, L = 5, 3, 6  # the linear policy's vocabulary, feature size, longest response


def ref_token_probs(W, feat) -> tuple[list[float], float]:
    """Logits l_v = sum_k W[v][k] feat[k] of the tiny linear policy; returns the logits and their log-sum-exp."""
    logits = [sum(W[v][k] * feat[k] for k in range(D)) for v in range(V)]
    m = max(logits)
    return logits, m + math.log(sum(math.exp(x - m) for x in logits))


def ref_score(W, feats, tokens, score: str) -> float:
    total = 0.0
    for t, y in enumerate(tokens):
        logits, lse = ref_token_probs(W, feats[t])
        total += logits[y] - lse
    return total if score == "dft" else total / len(tokens)


def ref_score_grad(W, feats, tokens, score: str) -> list[list[float]]:
    """d s / d W: sum_t (onehot(y_t) - p_t) feat_t^T, divided by |y| for the token mean."""
    G = [[0.0] * D for _ in range(V)]
    for t, y in enumerate(tokens):
        logits, lse = ref_token_probs(W, feats[t])
        for v in range(V):
            coef = (1.0 if v == y else 0.0) - math.exp(logits[v] - lse)
            for k in range(D):
                G[v][k] += coef * feats[t][k]
    if score == "dft2":
        G = [[g / len(tokens) for g in row] for row in G]
    return G


def ref_direction(W, log_u: dict, batch, problem, step: int, settings: DFTSettings):
    """Algorithm 36's z_t for mini-batch ``batch``; updates ``log_u`` (example -> log u_i) in place."""
    n, B = len(batch), settings.num_negatives
    z = [[0.0] * D for _ in range(V)]

    def add(G, c):
        for v in range(V):
            for k in range(D):
                z[v][k] += c * G[v][k]

    for i in batch:
        feats = problem.feats[i]
        add(ref_score_grad(W, feats, problem.pos_tokens[i], settings.score), -1.0 / n)
        negs, ref_lp = problem.neg_tokens[step][i], problem.ref_log_prob[step][i]
        a = []
        for j in range(B):
            a_ij = ref_score(W, feats, negs[j], settings.score) / settings.tau
            if settings.score == "dft":
                a_ij -= ref_lp[j]
            a.append(a_ij)
        log_u[i], weights = ref_sox(log_u.get(i, 0.0), a, settings.gamma)
        for j in range(B):
            add(ref_score_grad(W, feats, negs[j], settings.score), weights[j] / (n * B))
    return z


# ---------------------------------------------------------------------------------------------------------------
# A multi-step problem: a tiny linear policy, examples revisited, fresh negatives every step
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    feats: np.ndarray  # (examples, L, D): the feature of each response position of each example's prompt
    pos_tokens: list[list[int]]  # the data output y_i of each example
    batches: list[list[int]]  # B_t
    neg_tokens: list[dict[int, list[list[int]]]]  # per step, example -> B negatives
    ref_log_prob: list[dict[int, list[float]]]  # per step, example -> log pi_ref of each negative (token sum)
    W0: np.ndarray  # (V, D)


BATCHES = [[0, 1], [2, 3], [1, 2], [0, 3], [0, 1, 2], [3, 1]]


def make_problem(seed: int, B: int, ref_range: tuple[float, float]) -> Problem:
    rng = np.random.default_rng(seed)
    num = 4

    def answer():
        return [int(y) for y in rng.integers(0, V, size=int(rng.integers(1, L + 1)))]

    lo, hi = ref_range
    return Problem(
        feats=rng.standard_normal((num, L, D)),
        pos_tokens=[answer() for _ in range(num)],
        batches=BATCHES,
        neg_tokens=[{i: [answer() for _ in range(B)] for i in batch} for batch in BATCHES],
        # each negative's log pi_ref is either near the top or near the bottom of the range: a_ij of both signs
        ref_log_prob=[
            {i: [float(rng.choice([lo, hi]) + rng.uniform(-1, 1)) for _ in range(B)] for i in b} for b in BATCHES
        ],
        W0=rng.standard_normal((V, D)),
    )


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(len(seqs), L, dtype=torch.long)
    for r, seq in enumerate(seqs):
        tokens[r, : len(seq)] = torch.tensor(seq)
    lengths = torch.tensor([len(seq) for seq in seqs])
    return tokens, torch.arange(L)[None, :] < lengths[:, None]


def module_direction(W, log_u: torch.Tensor, batch, problem, step: int, settings: DFTSettings, step_fn):
    """z_t as autograd's gradient of the module's surrogate w.r.t. W; updates ``log_u`` (all examples) in place."""
    n, B = len(batch), settings.num_negatives
    feats = torch.from_numpy(problem.feats[batch])  # (n, L, D)
    token_log_prob = torch.log_softmax(feats @ W.T, dim=-1)  # (n, L, V)
    pos_tokens, pos_mask = padded([problem.pos_tokens[i] for i in batch])
    neg_tokens, neg_mask = padded([seq for i in batch for seq in problem.neg_tokens[step][i]])
    lp_pos = token_log_prob.gather(-1, pos_tokens[..., None]).squeeze(-1)
    lp_neg = token_log_prob.repeat_interleave(B, dim=0).gather(-1, neg_tokens[..., None]).squeeze(-1)
    s_pos = objective.sequence_scores(lp_pos, pos_mask, settings.score)
    s_neg = objective.sequence_scores(lp_neg, neg_mask, settings.score).reshape(n, B)
    ref = torch.tensor([problem.ref_log_prob[step][i] for i in batch], dtype=torch.float64)
    loss, new_log_u, _ = step_fn(s_pos, s_neg, log_u[batch], settings, ref if settings.uses_ref else None)
    log_u[batch] = new_log_u
    (z,) = torch.autograd.grad(loss, W)
    return z


def trajectories_agree(problem: Problem, settings: DFTSettings, step_fn=objective.dft_loss, lr: float = 0.3) -> bool:
    """Runs SGD on z_t from both sides (each side its own parameters and u) and checks z_t and every log u_i after
    every step; True when all agree to float64 precision."""
    W_ref = problem.W0.tolist()
    W = torch.tensor(problem.W0, dtype=torch.float64, requires_grad=True)
    log_u_ref: dict[int, float] = {}
    log_u = torch.zeros(problem.feats.shape[0], dtype=torch.float64)
    for step, batch in enumerate(problem.batches):
        z_ref = np.array(ref_direction(W_ref, log_u_ref, batch, problem, step, settings))
        z = module_direction(W, log_u, batch, problem, step, settings, step_fn).numpy()
        visited = sorted(log_u_ref)
        if not (
            np.allclose(z, z_ref, rtol=1e-9, atol=1e-12)
            and np.allclose(log_u[visited].numpy(), [log_u_ref[i] for i in visited], rtol=1e-12, atol=1e-12)
        ):
            return False
        W_ref = (np.array(W_ref) - lr * z_ref).tolist()
        with torch.no_grad():
            W -= lr * torch.from_numpy(z)
    return True


TRAJECTORY_CASES = {
    # dft with tau != 1 and pi_ref log-probs of -800 or -2: a_ij from about -10 to +800 (exp overflows float64)
    "dft-extreme": (replace(DFT_PRESET, tau=0.5), (-800.0, -2.0)),
    "dft-preset": (DFT_PRESET, (-30.0, -3.0)),
    "dft2-preset": (DFT2_PRESET, (0.0, 0.0)),
    "dft2-3-negatives-gamma-1": (replace(DFT2_PRESET, num_negatives=3, gamma=1.0, tau=0.05), (0.0, 0.0)),
}


@pytest.mark.parametrize("case", sorted(TRAJECTORY_CASES))
def test_surrogate_gradient_equals_algorithm_36_direction_at_every_step_of_a_trajectory(case):
    settings, ref_range = TRAJECTORY_CASES[case]
    assert trajectories_agree(make_problem(7, settings.num_negatives, ref_range), settings)


# ---- mutations: each deliberately broken variant must be told apart from the reference by the same comparison ----


def _pieces(s_neg, settings, ref):
    return objective.exponents(s_neg.detach(), settings.tau, ref)


def mutant_u_not_updated(s_pos, s_neg, log_u_prev, settings, ref):
    a = _pieces(s_neg, settings, ref)
    return objective.surrogate_loss(s_pos, s_neg, objective.negative_weights(a, log_u_prev)), log_u_prev, {}


def mutant_weights_without_1_over_u(s_pos, s_neg, log_u_prev, settings, ref):
    a = _pieces(s_neg, settings, ref)
    log_u = objective.update_log_u(log_u_prev, a, settings.gamma)
    return objective.surrogate_loss(s_pos, s_neg, torch.exp(a)), log_u, {}


def mutant_weights_with_stale_u(s_pos, s_neg, log_u_prev, settings, ref):  # u_{i,t-1} instead of u_{i,t}
    a = _pieces(s_neg, settings, ref)
    log_u = objective.update_log_u(log_u_prev, a, settings.gamma)
    return objective.surrogate_loss(s_pos, s_neg, objective.negative_weights(a, log_u_prev)), log_u, {}


def mutant_u_not_carried_across_steps(s_pos, s_neg, log_u_prev, settings, ref):
    return objective.dft_loss(s_pos, s_neg, torch.zeros_like(log_u_prev), settings, ref)


def mutant_negative_term_sign_flipped(s_pos, s_neg, log_u_prev, settings, ref):
    a = _pieces(s_neg, settings, ref)
    log_u = objective.update_log_u(log_u_prev, a, settings.gamma)
    return objective.surrogate_loss(s_pos, s_neg, -objective.negative_weights(a, log_u)), log_u, {}


def mutant_tau_on_the_surrogate(s_pos, s_neg, log_u_prev, settings, ref):  # the gradient of tau*log g without tau
    a = _pieces(s_neg, settings, ref)
    log_u = objective.update_log_u(log_u_prev, a, settings.gamma)
    return objective.surrogate_loss(s_pos, s_neg / settings.tau, objective.negative_weights(a, log_u)), log_u, {}


def mutant_pi_ref_dropped(s_pos, s_neg, log_u_prev, settings, ref):
    return objective.dft_loss(s_pos, s_neg, log_u_prev, replace(settings, score="dft2"), None)


MUTANTS = [
    mutant_u_not_updated,
    mutant_weights_without_1_over_u,
    mutant_weights_with_stale_u,
    mutant_u_not_carried_across_steps,
    mutant_negative_term_sign_flipped,
    mutant_tau_on_the_surrogate,
    mutant_pi_ref_dropped,
]


def test_the_trajectory_comparison_accepts_the_module_on_the_mutation_problem():
    assert trajectories_agree(make_problem(11, 2, (-6.0, -1.0)), replace(DFT_PRESET, tau=0.5))


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda f: f.__name__.removeprefix("mutant_"))
def test_a_broken_variant_of_the_step_is_caught_by_the_trajectory_comparison(mutant):
    # moderate a (pi_ref log-probs in [-7, 0]) so that each mutant differs by its math, not by an overflow
    assert not trajectories_agree(make_problem(11, 2, (-6.0, -1.0)), replace(DFT_PRESET, tau=0.5), step_fn=mutant)


# ---------------------------------------------------------------------------------------------------------------
# The u update and the weights at extreme exponents
# ---------------------------------------------------------------------------------------------------------------

EXTREME_A = [[700.0, -700.0], [700.0, 700.0], [-700.0, -700.0], [750.0, -750.0], [0.0, 0.0], [-1000.0, 1000.0]]
EXTREME_LOG_U_PREV = [0.0, 300.0, -5.0, 800.0, 0.0, -900.0]


@pytest.mark.parametrize("gamma", [0.85, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_u_update_and_weights_match_the_reference_at_a_of_plus_minus_700(gamma, dtype):
    a = torch.tensor(EXTREME_A, dtype=dtype)
    log_u = objective.update_log_u(torch.tensor(EXTREME_LOG_U_PREV, dtype=dtype), a, gamma)
    weights = objective.negative_weights(a, log_u)
    expected = [ref_sox(lu, row, gamma) for lu, row in zip(EXTREME_LOG_U_PREV, EXTREME_A)]
    assert log_u.dtype == dtype and torch.isfinite(log_u).all() and torch.isfinite(weights).all()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(log_u.double().numpy(), [e[0] for e in expected], **tol)
    np.testing.assert_allclose(weights.double().numpy(), [e[1] for e in expected], **tol)


@given(
    rows=st.lists(
        st.tuples(st.floats(-2000, 2000), st.lists(st.floats(-2000, 2000), min_size=3, max_size=3), st.integers(1, 3)),
        min_size=1,
        max_size=4,
    ),
    gamma=st.one_of(st.just(1.0), st.floats(1e-3, 1.0)),
)
def test_log_u_and_weights_match_the_reference_and_weights_never_exceed_B_over_gamma(rows, gamma):
    B = rows[0][2]
    log_u_prev = [r[0] for r in rows]
    a_rows = [r[1][:B] for r in rows]
    log_u = objective.update_log_u(
        torch.tensor(log_u_prev, dtype=torch.float64), torch.tensor(a_rows, dtype=torch.float64), gamma
    )
    weights = objective.negative_weights(torch.tensor(a_rows, dtype=torch.float64), log_u)
    expected = [ref_sox(lu, row, gamma) for lu, row in zip(log_u_prev, a_rows)]
    np.testing.assert_allclose(log_u.numpy(), [e[0] for e in expected], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(weights.numpy(), [e[1] for e in expected], rtol=1e-9, atol=1e-300)
    assert (weights <= B / gamma * (1 + 1e-12)).all()


def test_the_references_scaling_equals_the_unscaled_formula_where_exp_cannot_overflow():
    rng = np.random.default_rng(3)
    for _ in range(50):
        gamma, log_u_prev = float(rng.uniform(0.01, 1.0)), float(rng.uniform(-20, 20))
        a = rng.uniform(-30, 30, size=int(rng.integers(1, 5))).tolist()
        u = (1 - gamma) * math.exp(log_u_prev) + gamma * sum(math.exp(x) for x in a) / len(a)
        log_u, weights = ref_sox(log_u_prev, a, gamma)
        assert math.isclose(log_u, math.log(u), rel_tol=1e-13, abs_tol=1e-13)
        assert all(math.isclose(w, math.exp(x) / u, rel_tol=1e-12) for w, x in zip(weights, a))


def test_first_visit_with_gamma_1_gives_log_u_equal_to_the_log_mean_exp_of_a():
    a = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    log_u = objective.update_log_u(torch.zeros(1, dtype=torch.float64), a, 1.0)
    assert torch.allclose(log_u, torch.log(torch.exp(a).mean(-1)))


def test_u_is_state_without_gradient_and_the_surrogate_gradient_per_answer_is_minus_1_or_weight_over_nB():
    s_pos = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    s_neg = torch.tensor([[-2.0, -4.0], [-0.5, -9.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -6.0], [-2.5, -3.0]], dtype=torch.float64)
    log_u_prev = torch.tensor([0.2, -0.7], dtype=torch.float64)
    loss, log_u, weights = objective.dft_loss(s_pos, s_neg, log_u_prev, replace(DFT_PRESET, tau=0.7), ref)
    assert not log_u.requires_grad and not weights.requires_grad
    g_pos, g_neg = torch.autograd.grad(loss, (s_pos, s_neg))
    expected = [ref_sox(lu, (row_s / 0.7 - row_r).tolist(), 0.85) for lu, row_s, row_r in zip([0.2, -0.7], s_neg, ref)]
    assert torch.allclose(g_pos, torch.full((2,), -0.5, dtype=torch.float64))
    np.testing.assert_allclose(g_neg.numpy(), [[w / 4 for w in e[1]] for e in expected], rtol=1e-13)
    np.testing.assert_allclose(log_u.numpy(), [e[0] for e in expected], rtol=1e-13)
    metrics = objective.step_metrics(s_pos, s_neg, weights, log_u, 0.7)
    assert metrics["dft/score_pos"] == pytest.approx(-2.0)
    assert metrics["dft/weight_mean"] == pytest.approx(np.mean([e[1] for e in expected]))
    assert metrics["dft/objective_estimate"] == pytest.approx(np.mean([0.7 * e[0] for e in expected]) + 2.0)


def test_passing_the_global_batch_size_splits_the_step_into_micro_batch_shares_that_add_up():
    torch.manual_seed(0)
    s_pos = torch.randn(4, dtype=torch.float64, requires_grad=True)
    s_neg = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    ref, log_u_prev = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    whole, log_u, _ = objective.dft_loss(s_pos, s_neg, log_u_prev, DFT_PRESET, ref)
    parts = [
        objective.dft_loss(s_pos[k], s_neg[k], log_u_prev[k], DFT_PRESET, ref[k], batch_size=4)
        for k in (slice(0, 1), slice(1, 4))
    ]
    assert torch.allclose(whole, parts[0][0] + parts[1][0])
    assert torch.allclose(log_u, torch.cat([parts[0][1], parts[1][1]]))


# ---------------------------------------------------------------------------------------------------------------
# An enumerable toy: a two-step autoregressive policy over all outputs of length 1 or 2 of a 3-token vocabulary
# ---------------------------------------------------------------------------------------------------------------
#
# First token from softmax(w1) over {0, 1, 2}; second from softmax(w2[first]) over {0, 1, 2, EOS}. Output (a,) has
# the tokens [a, EOS]; output (a, b) has [a, b, EOS] with the last EOS forced (log-prob 0) at the length limit.
# The 12 outputs' probabilities sum to 1 for every (w1, w2).

EOS = 3
OUTPUTS = [(a,) for a in range(3)] + [(a, b) for a in range(3) for b in range(3)]


def toy_params(seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        (scale * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_(True),
        (scale * torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_(True),
    )


def toy_token_log_probs(params) -> tuple[torch.Tensor, torch.Tensor]:
    """(12, 3) token log-probs of every output and the response mask."""
    w1, w2 = params
    first, second = torch.log_softmax(w1, -1), torch.log_softmax(w2, -1)
    head = torch.tensor([y[0] for y in OUTPUTS])
    nxt = torch.tensor([y[1] if len(y) == 2 else EOS for y in OUTPUTS])
    log_prob = torch.stack([first[head], second[head, nxt], torch.zeros(len(OUTPUTS), dtype=torch.float64)], -1)
    mask = torch.tensor([[True, True, len(y) == 2] for y in OUTPUTS])
    return log_prob, mask


def toy_scores(params, score: str) -> torch.Tensor:
    return objective.sequence_scores(*toy_token_log_probs(params), score)


def toy_log_prob(params) -> torch.Tensor:
    """log of the policy's probability of each output (a token sum, whatever the score)."""
    return objective.sequence_scores(*toy_token_log_probs(params), "dft")


def test_toy_policy_is_a_distribution_over_the_12_outputs():
    assert torch.exp(toy_log_prob(toy_params(0))).sum().item() == pytest.approx(1.0, abs=1e-14)


def test_dft2_score_of_the_toy_is_the_token_mean_and_dft_the_token_sum():
    params = toy_params(1)
    lengths = torch.tensor([2.0 if len(y) == 1 else 3.0 for y in OUTPUTS], dtype=torch.float64)
    assert torch.allclose(toy_scores(params, "dft2"), toy_log_prob(params) / lengths)


TUPLES = list(itertools.product(range(len(OUTPUTS)), repeat=2))  # every draw of B = 2 negatives


@pytest.mark.parametrize("score,tau", [("dft", 1.0), ("dft", 0.3), ("dft2", 0.3), ("dft2", 2.0)])
@pytest.mark.parametrize("gamma", [1.0, 0.85])
def test_inner_estimator_is_unbiased_exactly_by_enumeration_of_negative_draws(score, tau, gamma):
    """E_{y'_1, y'_2 ~ P}[u_new] = (1 - gamma) u_prev + gamma g, g = sum_y exp(s(y)/tau), when a includes -log P."""
    with torch.no_grad():
        s, log_P = toy_scores(toy_params(2), score), toy_log_prob(toy_params(3, scale=2.0))
        a_all = objective.exponents(s, tau, log_P)
        idx = torch.tensor(TUPLES)
        log_u_prev = 0.4
        log_u = objective.update_log_u(torch.full((len(TUPLES),), log_u_prev, dtype=torch.float64), a_all[idx], gamma)
        draw_prob = torch.exp(log_P[idx].sum(-1))
        g = torch.exp(s / tau).sum()
        assert draw_prob.sum().item() == pytest.approx(1.0, abs=1e-14)
        expected = (1 - gamma) * math.exp(log_u_prev) + gamma * g
        assert (draw_prob * torch.exp(log_u)).sum().item() == pytest.approx(expected.item(), rel=1e-13)


def expected_negative_gradient(params, log_P: torch.Tensor, log_ref, settings: DFTSettings, log_u_prev=0.0, log_u=None):
    """E over all draws (y'_1, y'_2) ~ P x P, exactly, of the gradient w.r.t. the policy's parameters of the
    surrogate's negative term: with u updated by the step (``log_u`` None) or held at a given value.

    Every draw is one example of one call (|B_t| = 1 each, so each example's term is that draw's surrogate); the
    surrogate is linear in the scores with constant weights, so the expectation of its gradient is the gradient of
    sum_draws P(draw) * sum_j (d L / d s'_j) s'_j."""
    idx = torch.tensor(TUPLES)
    s_all = toy_scores(params, settings.score)
    s_neg = s_all.detach()[idx].requires_grad_(True)  # (draws, 2)
    ref = None if log_ref is None else log_ref[idx]
    s_pos = torch.zeros(len(TUPLES), dtype=torch.float64)
    if log_u is None:
        prev = torch.full((len(TUPLES),), log_u_prev, dtype=torch.float64)
        loss, _, _ = objective.dft_loss(s_pos, s_neg, prev, settings, ref, batch_size=1)
    else:
        a = objective.exponents(s_neg.detach(), settings.tau, ref)
        weights = objective.negative_weights(a, torch.full((len(TUPLES),), log_u, dtype=torch.float64))
        loss = objective.surrogate_loss(s_pos, s_neg, weights, batch_size=1)
    (coef,) = torch.autograd.grad(loss, s_neg)
    draw_prob = torch.exp(log_P.detach()[idx].sum(-1))
    return torch.autograd.grad((draw_prob[:, None] * coef * s_all[idx]).sum(), params)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_with_tau_1_sum_score_and_exact_importance_weights_dft_expected_gradient_equals_sfts():
    """s = log pi_w, tau = 1, negatives from P = pi_w and a = s - log pi_w: g = 1 for every w, so grad log g = 0; every
    exp(a) is 1, u does not depend on the draw, and the expected negative-term gradient E_{pi_w}[grad log pi_w] = 0."""
    params = toy_params(4)
    settings = DFT_PRESET
    log_pi = toy_log_prob(params)
    assert flat(torch.autograd.grad(torch.logsumexp(log_pi, 0), params)).abs().max() < 1e-14
    log_pi_const = log_pi.detach()
    neg = flat(expected_negative_gradient(params, log_pi_const, log_pi_const, settings, log_u_prev=0.7))
    assert neg.abs().max() < 1e-14
    data = 5  # the data output y_i
    sft = flat(torch.autograd.grad(-toy_log_prob(params)[data], params))
    dft_positive = flat(torch.autograd.grad(-toy_scores(params, "dft")[data], params))
    assert torch.allclose(dft_positive + neg, sft, rtol=0, atol=1e-14) and sft.abs().max() > 0.1


def test_with_plain_prompt_weights_but_augmented_prompt_negatives_the_expected_negative_gradient_is_not_zero():
    """The official code's choice: negatives from pi_ref(. | x_bar), a = s - log pi_ref(. | x). At the start of
    fine-tuning (pi_w = pi_ref(. | x)) every exp(a) is 1, u = 1, and the expected negative-term gradient is
    E_{x_bar}[grad log pi_w] = grad sum_y pi_ref(y | x_bar) log pi_w(y), not 0 (though grad log g = 0)."""
    params, bar = toy_params(5), toy_params(6, scale=2.0)
    settings = DFT_PRESET
    log_pi, log_bar = toy_log_prob(params).detach(), toy_log_prob(bar).detach()
    neg = flat(expected_negative_gradient(params, log_bar, log_pi, settings))
    closed_form = flat(torch.autograd.grad((torch.exp(log_bar) * toy_log_prob(params)).sum(), params))
    assert torch.allclose(neg, closed_form, rtol=0, atol=1e-14)
    assert neg.norm() > 0.1
    # and away from the start (pi_w != pi_ref(. | x), u depending on the draw): still not zero
    far = toy_params(7)
    assert flat(expected_negative_gradient(far, log_bar, log_pi, settings)).norm() > 0.1


@pytest.mark.parametrize("score,tau", [("dft", 1.0), ("dft", 0.3), ("dft2", 0.3)])
def test_with_augmented_prompt_weights_and_u_at_g_the_expected_negative_gradient_is_grad_of_tau_log_g(score, tau):
    """Exact importance weights (a = s/tau - log P, P the sampling distribution) and u held at g: the expected
    negative-term gradient is (1/g) sum_y exp(s(y)/tau) grad s(y) = grad (tau log g), with no extra factor of tau.
    For the sum score at tau = 1 this is 0 whatever P is."""
    params, bar = toy_params(8), toy_params(9, scale=2.0)
    settings = DFTSettings(tau=tau, gamma=0.85, num_negatives=2, score=score, ref_prompt="augmented")
    log_bar = toy_log_prob(bar).detach()
    s = toy_scores(params, score)
    log_g = torch.logsumexp(s / tau, 0)
    exact = flat(torch.autograd.grad(tau * log_g, params))
    neg = flat(expected_negative_gradient(params, log_bar, log_bar, settings, log_u=log_g.item()))
    assert torch.allclose(neg, exact, rtol=1e-12, atol=1e-14)
    if score == "dft" and tau == 1.0:
        assert exact.abs().max() < 1e-14
    else:
        assert exact.norm() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


def test_presets_are_the_official_codes_defaults():
    assert (DFT_PRESET.tau, DFT_PRESET.gamma, DFT_PRESET.num_negatives, DFT_PRESET.score) == (1.0, 0.85, 2, "dft")
    assert DFT_PRESET.uses_ref and DFT_PRESET.ref_prompt == "plain"
    assert (DFT2_PRESET.tau, DFT2_PRESET.gamma, DFT2_PRESET.num_negatives, DFT2_PRESET.score) == (0.3, 0.9, 2, "dft2")
    assert not DFT2_PRESET.uses_ref
    assert objective.PRESETS == {"dft": DFT_PRESET, "dft2": DFT2_PRESET}


BAD_SETTINGS = [
    ("tau", 0.0, r"dft\.tau must be > 0"),
    ("tau", -1.0, r"dft\.tau must be > 0"),
    ("tau", float("nan"), r"dft\.tau must be a finite number"),
    ("tau", float("inf"), r"dft\.tau must be a finite number"),
    ("tau", "1", r"dft\.tau must be a finite number"),
    ("tau", True, r"dft\.tau must be a finite number"),
    ("gamma", 0.0, r"dft\.gamma must be in \(0, 1\]"),
    ("gamma", -0.5, r"dft\.gamma must be in \(0, 1\]"),
    ("gamma", 1.01, r"dft\.gamma must be in \(0, 1\]"),
    ("gamma", float("nan"), r"dft\.gamma must be a finite number"),
    ("num_negatives", 0, r"dft\.num_negatives must be an integer >= 1"),
    ("num_negatives", 2.0, r"dft\.num_negatives must be an integer >= 1"),
    ("num_negatives", True, r"dft\.num_negatives must be an integer >= 1"),
    ("score", "sum", r"dft\.score must be one of \('dft', 'dft2'\)"),
    ("score", "DFT", r"dft\.score must be one of \('dft', 'dft2'\)"),
    ("ref_prompt", "x_bar", r"dft\.ref_prompt must be one of \('plain', 'augmented'\)"),
    ("ref_prompt", None, r"dft\.ref_prompt must be one of \('plain', 'augmented'\)"),
]


@pytest.mark.parametrize("key,value,message", BAD_SETTINGS, ids=[f"{k}={v!r}" for k, v, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_with_a_message_naming_the_key_and_the_allowed_values(key, value, message):
    with pytest.raises(ValueError, match=message):
        replace(DFT_PRESET, **{key: value})


def test_gamma_1_and_integer_tau_are_accepted():
    assert replace(DFT_PRESET, gamma=1, tau=2).gamma == 1


def test_step_refuses_a_missing_or_superfluous_pi_ref_and_a_wrong_number_of_negatives():
    s_pos, s_neg, log_u = torch.zeros(2), torch.zeros(2, 2), torch.zeros(2)
    with pytest.raises(ValueError, match="dft.score=dft needs ref_log_prob"):
        objective.dft_loss(s_pos, s_neg, log_u, DFT_PRESET)
    with pytest.raises(ValueError, match="dft.score=dft2 drops pi_ref"):
        objective.dft_loss(s_pos, s_neg, log_u, DFT2_PRESET, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="dft.num_negatives=3"):
        objective.dft_loss(s_pos, s_neg, log_u, replace(DFT2_PRESET, num_negatives=3))
    with pytest.raises(ValueError, match="score must be one of"):
        objective.sequence_scores(torch.zeros(1, 2), torch.ones(1, 2), "mean")
