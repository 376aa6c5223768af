"""The registered ``disco`` loss and estimator against an independent float64 computation of the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import disco_actor_config
from disco_reference import Batch, num_real_questions, random_batch, reference_auc, reference_objective
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn

VARIANTS = [(objective, score) for objective in ("disco", "disco-b") for score in ("logL", "Lratio")]
N = 8  # rollout.n used for the normaliser M = global_batch_size / n


@pytest.fixture(scope="module")
def configs():
    """One verl actor config per (objective, score_func), from the recipe YAML; tight delta so the hinge is active."""
    out = {}
    for objective, score in VARIANTS:
        overrides = [
            f"actor_rollout_ref.actor.policy_loss.objective={objective}",
            f"actor_rollout_ref.actor.policy_loss.score_func={score}",
            "actor_rollout_ref.actor.policy_loss.tau=0.7",
            "actor_rollout_ref.actor.policy_loss.delta=1e-3",
            "actor_rollout_ref.actor.policy_loss.beta=50.0",
        ]
        out[objective, score] = disco_actor_config(overrides, rollout_n=N)
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
    return reference_objective(batch, hp.objective, hp.score_func, hp.tau, hp.delta, hp.beta, M)


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


def test_without_global_batch_info_the_call_normalises_by_its_own_questions(configs):
    actor_cfg, cfg = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(3))
    loss, _ = call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=None)
    torch.testing.assert_close(loss, reference(batch, actor_cfg, num_real_questions(batch)), rtol=1e-6, atol=1e-10)


def test_lratio_and_logl_gradients_agree_on_policy(configs):
    """At theta = theta_old the likelihood ratio is 1 and grad s_Lratio = grad s_logL (paper, section 3)."""
    batch = random_batch(np.random.default_rng(5), kl_scale=0.0)
    batch.old_log_prob = batch.log_prob.detach().clone()
    grads = []
    for score in ("logL", "Lratio"):
        actor_cfg, cfg = configs["disco-b", score]
        loss, _ = call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=None)
        grads.append(grad_of(loss, batch.log_prob))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_a_split_group_is_refused(configs):
    actor_cfg, cfg = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(0), group_sizes=(4,), num_padding=0)
    advantages = estimator_codes(batch, cfg.algorithm)
    keep = np.flatnonzero(batch.uids != batch.uids[0])
    keep = np.concatenate([keep, np.flatnonzero(batch.uids == batch.uids[0])[:2]])
    with pytest.raises(RuntimeError, match="incomplete answer groups.*main_disco"):
        call_loss(actor_cfg, batch.rows(keep), advantages[keep], global_batch_size=None)


def test_loss_refuses_advantages_that_are_not_disco_codes(configs):
    actor_cfg, _ = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(0))
    with pytest.raises(ValueError, match="adv_estimator=disco"):
        call_loss(actor_cfg, batch, torch.randn_like(batch.log_prob), global_batch_size=None)


def test_estimator_refuses_non_binary_rewards(configs):
    _, cfg = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(0), num_padding=0)
    batch.token_level_rewards = batch.token_level_rewards * 2 - batch.response_mask.double() * 0  # 1 -> 2
    with pytest.raises(ValueError, match=r"binary sequence rewards.*math_dapo"):
        estimator_codes(batch, cfg.algorithm)


def test_metrics_report_auc_scores_and_question_counts(configs):
    actor_cfg, cfg = configs["disco", "logL"]
    batch = random_batch(np.random.default_rng(2), num_questions=12)
    _, metrics = call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=None)

    scores, labels = {}, {}
    for i, uid in enumerate(batch.uids):
        if batch.response_mask[i].any() and not uid.startswith("pad"):
            scores.setdefault(uid, []).append(float(batch.log_prob[i][batch.response_mask[i]].mean()))
            labels.setdefault(uid, []).append(float(batch.rewards[i]) == 1.0)
    mixed = [u for u in scores if 0 < sum(labels[u]) < len(labels[u])]
    pos = {u: [s for s, y in zip(scores[u], labels[u]) if y] for u in mixed}
    neg = {u: [s for s, y in zip(scores[u], labels[u]) if not y] for u in mixed}
    assert metrics["actor/disco/num_mixed"] == len(mixed) > 0
    assert metrics["actor/disco/num_all_correct"] == sum(all(labels[u]) for u in scores)
    assert metrics["actor/disco/num_all_wrong"] == sum(not any(labels[u]) for u in scores)
    assert metrics["actor/disco/pairwise_auc"] == pytest.approx(np.mean([reference_auc(pos[u], neg[u]) for u in mixed]))
    pos_mean = np.mean([np.mean(pos[u]) for u in mixed])
    neg_mean = np.mean([np.mean(neg[u]) for u in mixed])
    assert metrics["actor/disco/pos_score"] == pytest.approx(pos_mean)
    assert metrics["actor/disco/score_margin"] == pytest.approx(pos_mean - neg_mean)


def test_metric_keys_are_identical_on_every_call(configs):
    """verl's Metric.aggregate_dp needs the same keys in every micro-batch on every rank."""
    actor_cfg, cfg = configs["disco", "Lratio"]
    keys = set()
    for seed, kwargs in enumerate([{}, {"num_questions": 1, "group_sizes": (1,)}, {"num_questions": 0}]):
        batch = random_batch(np.random.default_rng(seed), **kwargs)
        loss, metrics = call_loss(actor_cfg, batch, estimator_codes(batch, cfg.algorithm), global_batch_size=None)
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
