"""Property-based check (hypothesis): thousands of random batches, no NaN/Inf, no mismatch with the reference, for
the worker's per-token weights (both KL units) and for the loss computing its own coefficients (question unit)."""

from __future__ import annotations

import numpy as np
import torch
from conftest import disco_actor_config
from disco_reference import num_real_questions, random_batch, reference_objective
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_disco_loss_on_cpu import call_loss, estimator_codes

from recipe.disco.loss import token_weights

CONFIGS = {
    (objective, score, tau, kl_unit): disco_actor_config(
        [
            f"actor_rollout_ref.actor.policy_loss.objective={objective}",
            f"actor_rollout_ref.actor.policy_loss.score_func={score}",
            f"actor_rollout_ref.actor.policy_loss.tau={tau}",
            "actor_rollout_ref.actor.policy_loss.delta=1e-3",
            "actor_rollout_ref.actor.policy_loss.beta=1000.0",
            f"actor_rollout_ref.actor.policy_loss.kl_unit={kl_unit}",
        ],
        rollout_n=4,
    )
    for objective in ("disco", "disco-b")
    for score in ("logL", "Lratio")
    for tau in (0.01, 1.0, 10.0)
    for kl_unit in ("step", "question")
}


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    variant=st.sampled_from(sorted(CONFIGS)),
    num_questions=st.integers(0, 5),
    group_sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    max_len=st.integers(1, 7),
    num_padding=st.integers(0, 3),
    kl_scale=st.sampled_from([0.0, 1e-3, 0.3, 5.0]),
    log_prob_scale=st.sampled_from([1.0, 30.0]),
)
# found by a random draw in CI: every negative's exp(s / tau) denormal, the literal formula's gradient 0/0
@example(
    seed=1536,
    variant=("disco", "logL", 0.01, "question"),
    num_questions=1,
    group_sizes=(4,),
    max_len=1,
    num_padding=3,
    kl_scale=0.0,
    log_prob_scale=30.0,
)
def test_random_batches_are_finite_and_match_the_reference(
    seed, variant, num_questions, group_sizes, max_len, num_padding, kl_scale, log_prob_scale
):
    actor_cfg, cfg = CONFIGS[variant]
    batch = random_batch(np.random.default_rng(seed), num_questions, group_sizes, max_len, num_padding, kl_scale)
    batch.log_prob = (batch.log_prob.detach() * log_prob_scale).requires_grad_(True)
    batch.old_log_prob = batch.old_log_prob * log_prob_scale
    M = max(num_real_questions(batch), 1)
    hp = actor_cfg.policy_loss
    codes = estimator_codes(batch, cfg.algorithm)
    weights, L, metrics = token_weights(batch.log_prob, batch.old_log_prob, batch.response_mask, codes[:, 0], hp, M)
    assert np.isfinite(L) and torch.isfinite(weights).all() and all(np.isfinite(v) for v in metrics.values())
    values_and_grads = [(torch.tensor(L, dtype=torch.float64), weights)]
    if hp.kl_unit == "question":  # the loss's own coefficients: a call holding every question
        loss, call_metrics = call_loss(actor_cfg, batch, codes, global_batch_size=M * 4)
        (grad,) = torch.autograd.grad(loss, batch.log_prob)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(np.isfinite(v) for v in call_metrics.values())
        values_and_grads.append((loss.detach(), grad))

    expected = reference_objective(batch, hp.objective, hp.score_func, hp.tau, hp.delta, hp.beta, M, hp.kl_unit)
    if not torch.isfinite(expected):  # the literal formula overflows (exp(s/tau) with tiny tau); ours must not
        return
    expected_grad = torch.zeros_like(weights)
    if expected.requires_grad:  # an empty batch gives a constant 0
        (expected_grad,) = torch.autograd.grad(expected, batch.log_prob)
    for value, _ in values_and_grads:
        torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=1e-9)
    # the literal formula's gradient can be 0/0 where exp(s / tau) of every negative is denormal (tiny tau); ours
    # is finite (asserted above), and compared wherever the literal one is
    if torch.isfinite(expected_grad).all():
        for _, grad in values_and_grads:
            torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
