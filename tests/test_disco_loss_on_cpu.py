"""The registered ``disco`` loss, the step coefficients and the estimator against an independent float64
computation of the formulas (``tests/disco_reference.py``).

Two ways reach the same gradient (``recipe/disco/loss.py``): the per-token weights dL/dlog pi that DisCO's actor
worker writes before each mini-batch (``loss.token_weights``: every layout, both KL units), and the loss computing
its own coefficients in a call that holds whole questions (``kl_unit: question``). Their arithmetic is checked here
in one process; ``tests/test_disco_multirank_on_cpu.py`` checks it over ranks and
``tests/test_actor_update_exact_on_cpu.py`` through verl's real actor update."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import disco_actor_config
from disco_reference import Batch, num_real_questions, random_batch, reference_auc, reference_objective
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn

from recipe.disco.loss import token_weights

VARIANTS = [(objective, score) for objective in ("disco", "disco-b") for score in ("logL", "Lratio")]
KL_UNITS = ("step", "question")
N = 8  # rollout.n used for the normaliser M = global_batch_size / n


@pytest.fixture(scope="module")
def configs():
    """One verl actor config per (objective, score_func, kl_unit), from the recipe YAML; tight delta so the hinge is
    active. Keyed also by (objective, score_func) for the question unit, which the in-call path needs."""
    out = {}
    for objective, score in VARIANTS:
        for kl_unit in KL_UNITS:
            overrides = [
                f"actor_rollout_ref.actor.policy_loss.objective={objective}",
                f"actor_rollout_ref.actor.policy_loss.score_func={score}",
                "actor_rollout_ref.actor.policy_loss.tau=0.7",
                "actor_rollout_ref.actor.policy_loss.delta=1e-3",
                "actor_rollout_ref.actor.policy_loss.beta=50.0",
                f"actor_rollout_ref.actor.policy_loss.kl_unit={kl_unit}",
            ]
            out[objective, score, kl_unit] = disco_actor_config(overrides, rollout_n=N)
        out[objective, score] = out[objective, score, "question"]
    return out


def estimator_codes(batch: Batch, algorithm_cfg) -> torch.Tensor:
    """Advantages from the registered estimator, stored as verl v1 stores them (truncated, then zero-padded)."""
    advantages, _ = get_adv_estimator_fn("disco")(
        token_level_rewards=batch.token_level_rewards,
        response_mask=batch.response_mask,
        index=batch.uids,
        config=algorithm_cfg,
    )
    return advantages * batch.response_mask.cumsum(-1).clamp(max=1).logical_or(torch.arange(advantages.shape[1]) == 0)


def call_loss(actor_cfg, batch: Batch, advantages: torch.Tensor, global_batch_size: int | None, dp_size: int = 1):
    actor_cfg.global_batch_info.clear()
    actor_cfg.global_batch_info.update(
        dp_size=dp_size,
        batch_num_tokens=int(batch.response_mask.sum()),
        global_batch_size=global_batch_size,
        loss_scale_factor=None,
    )
    return get_policy_loss_fn("disco")(
        old_log_prob=batch.old_log_prob,
        log_prob=batch.log_prob,
        advantages=advantages,
        response_mask=batch.response_mask,
        loss_agg_mode=actor_cfg.loss_agg_mode,
        config=actor_cfg,
        rollout_is_weights=None,
    )


def reference(batch: Batch, actor_cfg, M: float) -> torch.Tensor:
    hp = actor_cfg.policy_loss
    return reference_objective(batch, hp.objective, hp.score_func, hp.tau, hp.delta, hp.beta, M, hp.kl_unit)


def weights_of(batch: Batch, advantages: torch.Tensor, actor_cfg, M: float):
    """loss.token_weights on the batch (the worker's computation at the batch's current log-probs)."""
    return token_weights(
        batch.log_prob, batch.old_log_prob, batch.response_mask, advantages[:, 0], actor_cfg.policy_loss, M
    )


def grad_of(value: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(value, leaf)
    return grad


@pytest.mark.parametrize("objective,score", VARIANTS)
@pytest.mark.parametrize("seed", range(4))
def test_loss_value_and_gradient_equal_direct_formula(configs, objective, score, seed):
    actor_cfg, cfg = configs[objective, score]
    batch = random_batch(np.random.default_rng(seed))
    M = num_real_questions(batch) + 3  # the step holds 3 more questions than this call
    loss, _ = call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=M * N)
    expected = reference(batch, actor_cfg, M)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(grad_of(loss, batch.log_prob), grad_of(expected, batch.log_prob), rtol=1e-6, atol=1e-10)
    assert expected.abs() > 1e-6, "degenerate batch: the check would not see a sign error"


@pytest.mark.parametrize("kl_unit", KL_UNITS)
@pytest.mark.parametrize("objective,score", VARIANTS)
@pytest.mark.parametrize("seed", range(3))
def test_token_weights_are_the_gradient_of_L_with_respect_to_each_log_prob(configs, objective, score, kl_unit, seed):
    """The worker's per-token weights dL/dlog pi(y_t) and L, for both trust-region units."""
    actor_cfg, cfg = configs[objective, score, kl_unit]
    batch = random_batch(np.random.default_rng(seed), num_questions=8)
    M = num_real_questions(batch) + 2
    weights, L, _ = weights_of(batch, estimator_codes(batch, cfg.algorithm), actor_cfg, M)
    expected = reference(batch, actor_cfg, M)
    torch.testing.assert_close(weights, grad_of(expected, batch.log_prob), rtol=1e-9, atol=1e-13)
    assert L == pytest.approx(float(expected.detach()), rel=1e-9, abs=1e-13)
    assert expected.abs() > 1e-6 and weights.abs().max() > 1e-6, "degenerate batch"


def test_the_step_unit_binds_all_questions_through_one_hinge(configs):
    """With kl_unit step, one question's KL moves every answer's weight (the shared hinge); per question it does
    not touch the other questions' penalty weights."""
    rng = np.random.default_rng(4)
    batch = random_batch(rng, num_questions=6, group_sizes=(3,), num_padding=0, kl_scale=0.2)
    first = batch.uids[0]
    shifted = Batch(
        batch.log_prob.detach().clone().requires_grad_(True),
        batch.old_log_prob + 0.5 * torch.from_numpy(batch.uids == first)[:, None].double(),
        batch.response_mask,
        batch.token_level_rewards,
        batch.uids,
    )
    others = torch.from_numpy(batch.uids != first)
    for kl_unit, moves in (("step", True), ("question", False)):
        actor_cfg, cfg = configs["disco-b", "logL", kl_unit]
        codes = estimator_codes(batch, cfg.algorithm)
        before, _, _ = weights_of(batch, codes, actor_cfg, 6)
        after, _, _ = weights_of(shifted, codes, actor_cfg, 6)
        changed = not torch.allclose(before[others], after[others], rtol=0, atol=1e-12)
        assert changed == moves, kl_unit


def test_the_loss_with_token_weights_has_them_as_gradient_and_value_zero(configs):
    """What verl's micro-batch calls compute from the worker's float64 weights: dp_size * sum weight * log pi."""
    actor_cfg, _ = configs["disco", "Lratio", "step"]
    batch = random_batch(np.random.default_rng(1))
    weights = torch.from_numpy(np.random.default_rng(2).standard_normal(batch.log_prob.shape))
    loss, metrics = call_loss(actor_cfg, batch, weights, global_batch_size=16, dp_size=3)
    assert float(loss) == 0.0 and metrics == {}
    torch.testing.assert_close(grad_of(loss, batch.log_prob), 3 * weights * batch.response_mask)


@pytest.mark.parametrize("objective,score", VARIANTS)
def test_micro_batches_of_whole_groups_sum_to_the_single_call_gradient(configs, objective, score):
    actor_cfg, cfg = configs[objective, score]
    rng = np.random.default_rng(11)
    batch = random_batch(rng, num_questions=10)
    advantages = estimator_codes(batch, cfg.algorithm)
    M = num_real_questions(batch)
    single, _ = call_loss(actor_cfg, batch, advantages, global_batch_size=M * N)
    single_grad = grad_of(single, batch.log_prob)

    # whole groups in random order, cut into micro-batches of random size
    groups = [np.flatnonzero(batch.uids == u) for u in rng.permutation(np.unique(batch.uids.astype(str)))]
    cuts = np.sort(rng.choice(np.arange(1, len(groups)), size=3, replace=False))
    total, grad = 0.0, torch.zeros_like(batch.log_prob)
    for chunk in np.split(np.arange(len(groups)), cuts):
        rows = np.concatenate([groups[g] for g in chunk])
        micro = batch.rows(rows)
        loss, _ = call_loss(actor_cfg, micro, advantages[rows], global_batch_size=M * N)
        grad[rows] += grad_of(loss, micro.log_prob)
        total += float(loss.detach())
    torch.testing.assert_close(grad, single_grad, rtol=1e-6, atol=1e-12)
    assert total == pytest.approx(float(single.detach()), rel=1e-9)


def test_without_global_batch_info_the_call_says_what_is_missing(configs):
    actor_cfg, cfg = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(3))
    with pytest.raises(ValueError, match="global_batch_size"):
        call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=None)


def test_the_step_unit_is_refused_in_a_call_without_the_worker(configs):
    """verl's stock entry point passes the estimator's codes straight to the loss: with kl_unit step one call cannot
    know the KL of the whole optimizer step, so it stops and names main_disco."""
    actor_cfg, cfg = configs["disco", "logL", "step"]
    batch = random_batch(np.random.default_rng(3))
    with pytest.raises(RuntimeError, match="kl_unit='step'.*recipe.disco.main_disco"):
        call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=64)


def test_lratio_and_logl_gradients_agree_on_policy(configs):
    """At theta = theta_old the likelihood ratio is 1 and grad s_Lratio = grad s_logL (paper, section 3)."""
    batch = random_batch(np.random.default_rng(5), kl_scale=0.0)
    batch.old_log_prob = batch.log_prob.detach().clone()
    grads = []
    for score in ("logL", "Lratio"):
        actor_cfg, cfg = configs["disco-b", score]
        loss, _ = call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=64)
        grads.append(grad_of(loss, batch.log_prob))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_a_split_group_is_refused(configs):
    actor_cfg, cfg = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(0), group_sizes=(4,), num_padding=0)
    advantages = estimator_codes(batch, cfg.algorithm)
    keep = np.flatnonzero(batch.uids != batch.uids[0])
    keep = np.concatenate([keep, np.flatnonzero(batch.uids == batch.uids[0])[:2]])
    with pytest.raises(RuntimeError, match="incomplete or duplicated answer groups.*main_disco"):
        call_loss(actor_cfg, batch.rows(keep), advantages[keep], global_batch_size=64)
    with pytest.raises(RuntimeError, match="incomplete or duplicated answer groups"):
        weights_of(batch.rows(keep), advantages[keep], configs["disco", "logL", "step"][0], 8)


def test_loss_refuses_advantages_that_are_not_disco_codes(configs):
    actor_cfg, _ = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(0))
    with pytest.raises(ValueError, match="adv_estimator=disco"):
        call_loss(actor_cfg, batch, torch.randn_like(batch.log_prob).float(), global_batch_size=64)


def test_estimator_refuses_non_binary_rewards(configs):
    _, cfg = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(0), num_padding=0)
    batch.token_level_rewards = batch.token_level_rewards * 2 - batch.response_mask.double() * 0  # 1 -> 2
    with pytest.raises(ValueError, match=r"binary sequence rewards.*math_dapo"):
        estimator_codes(batch, cfg.algorithm)


def test_metrics_report_auc_scores_and_question_counts(configs):
    actor_cfg, cfg = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(2), num_questions=12)
    _, metrics = call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=12 * N)

    scores, labels = {}, {}
    for i, uid in enumerate(batch.uids):
        if batch.response_mask[i].any() and not uid.startswith("pad"):
            scores.setdefault(uid, []).append(float(batch.log_prob[i][batch.response_mask[i]].mean()))
            labels.setdefault(uid, []).append(float(batch.rewards[i]) == 1.0)
    mixed = [u for u in scores if 0 < sum(labels[u]) < len(labels[u])]
    pos = {u: [s for s, y in zip(scores[u], labels[u]) if y] for u in mixed}
    neg = {u: [s for s, y in zip(scores[u], labels[u]) if not y] for u in mixed}
    assert mixed
    assert metrics["actor/disco/pairwise_auc"] == pytest.approx(np.mean([reference_auc(pos[u], neg[u]) for u in mixed]))
    pos_mean = np.mean([np.mean(pos[u]) for u in mixed])
    neg_mean = np.mean([np.mean(neg[u]) for u in mixed])
    assert metrics["actor/disco/pos_score"] == pytest.approx(pos_mean)
    assert metrics["actor/disco/score_margin"] == pytest.approx(pos_mean - neg_mean)


def test_step_unit_metrics_are_the_token_mean_kl_of_all_answers_and_its_hinge(configs):
    actor_cfg, cfg = configs["disco", "logL", "step"]
    batch = random_batch(np.random.default_rng(6), num_questions=10, kl_scale=0.2)
    _, L, metrics = weights_of(batch, estimator_codes(batch, cfg.algorithm), actor_cfg, 10)
    real = batch.response_mask & torch.from_numpy(np.array([not u.startswith("pad") for u in batch.uids]))[:, None]
    kl = float((batch.old_log_prob - batch.log_prob.detach())[real].mean())
    delta, beta = actor_cfg.policy_loss.delta, actor_cfg.policy_loss.beta
    assert metrics["actor/disco/kl"] == pytest.approx(kl, rel=1e-12)
    assert metrics["actor/disco/constraint_active"] == float(kl > delta)
    assert metrics["actor/disco/penalty"] == pytest.approx(beta / 2 * max(kl - delta, 0) ** 2, rel=1e-12)


def test_metric_keys_are_identical_on_every_call(configs):
    """verl's Metric.aggregate_dp needs the same keys in every micro-batch on every rank."""
    actor_cfg, cfg = configs["disco", "Lratio"]
    keys = set()
    for seed, kwargs in enumerate([{}, {"num_questions": 1, "group_sizes": (1,)}, {"num_questions": 0}]):
        batch = random_batch(np.random.default_rng(seed), **kwargs)
        loss, metrics = call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=16)
        assert torch.isfinite(loss) and all(np.isfinite(list(metrics.values())))
        keys.add(tuple(sorted(metrics)))
    assert len(keys) == 1


def test_bf16_log_probs_keep_codes_exact_and_match_the_reference(configs):
    """A bf16 actor: codes such as 5*1024+3 are not representable in bf16, so they must not pass through it."""
    actor_cfg, cfg = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(8), num_questions=12, group_sizes=(3, 5, 7))
    advantages = estimator_codes(batch, cfg.algorithm)
    bf16 = Batch(
        batch.log_prob.detach().to(torch.bfloat16).requires_grad_(True),
        batch.old_log_prob.to(torch.bfloat16),
        batch.response_mask,
        batch.token_level_rewards,
        batch.uids,
    )
    M = num_real_questions(batch)
    loss, _ = call_loss(actor_cfg, bf16, advantages.float(), global_batch_size=M * N)
    upcast = Batch(
        bf16.log_prob.detach().double().requires_grad_(True),
        bf16.old_log_prob.double(),
        batch.response_mask,
        batch.token_level_rewards,
        batch.uids,
    )
    expected = reference(upcast, actor_cfg, M)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        grad_of(loss, bf16.log_prob).double(), grad_of(expected, upcast.log_prob).to(torch.bfloat16).double()
    )
