"""Property-based check (hypothesis): thousands of random batches, no NaN/Inf, no mismatch with the reference."""

from __future__ import annotations

import numpy as np
import torch
from conftest import disco_actor_config
from disco_reference import num_real_questions, random_batch, reference_objective
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_disco_loss_on_cpu import call_loss, estimator_codes

CONFIGS = {
    (objective, score, tau): disco_actor_config(
        [
            f"actor_rollout_ref.actor.policy_loss.objective={objective}",
            f"actor_rollout_ref.actor.policy_loss.score_func={score}",
            f"actor_rollout_ref.actor.policy_loss.tau={tau}",
            "actor_rollout_ref.actor.policy_loss.delta=1e-3",
            "actor_rollout_ref.actor.policy_loss.beta=1000.0",
        ],
        rollout_n=4,
    )
    for objective in ("disco", "disco-b")
    for score in ("logL", "Lratio")
    for tau in (0.01, 1.0, 10.0)
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
def test_random_batches_are_finite_and_match_the_reference(
    seed, variant, num_questions, group_sizes, max_len, num_padding, kl_scale, log_prob_scale
):
    actor_cfg, cfg = CONFIGS[variant]
    batch = random_batch(np.random.default_rng(seed), num_questions, group_sizes, max_len, num_padding, kl_scale)
    batch.log_prob = (batch.log_prob.detach() * log_prob_scale).requires_grad_(True)
    batch.old_log_prob = batch.old_log_prob * log_prob_scale
    M = max(num_real_questions(batch), 1)
    loss, metrics = call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=M * 4)
    (grad,) = torch.autograd.grad(loss, batch.log_prob)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(np.isfinite(v) for v in metrics.values())

    hp = actor_cfg.policy_loss
    expected = reference_objective(batch, hp.objective, hp.score_func, hp.tau, hp.delta, hp.beta, M)
    if not torch.isfinite(expected):  # the literal formula overflows (exp(s/tau) with tiny tau); ours must not
        return
    expected_grad = torch.zeros_like(grad)
    if expected.requires_grad:  # an empty batch gives a constant 0
        (expected_grad,) = torch.autograd.grad(expected, batch.log_prob)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
