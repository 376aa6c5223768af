"""The disco loss over 2 and 4 data-parallel ranks (torch.distributed, gloo, separate processes).

Gradients of a shared parameter are accumulated over micro-batches without rescaling and averaged over ranks (what
verl's engine and FSDP do); the result must equal the gradient of the single-process float64 reference on the
whole batch, in both ways the coefficients reach the loss:

* the worker's per-token weights (``loss.token_weights``, both KL units): each rank holds an arbitrary share of the
  mini-batch (questions split over ranks), cut into micro-batches of random sizes;
* the loss's own coefficients (``kl_unit: question``): each rank holds a slice of every global micro-batch, so most
  questions are split across ranks, as in the 1.5B recipe (4 answers per GPU, n=8).
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from disco_reference import Batch, num_real_questions, random_batch, reference_objective

N = 4  # answers per question
D = 3  # parameter size of the toy policy


def toy_log_prob(theta: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """A differentiable stand-in for the policy: log pi(y_t) = -softplus(x_t . theta) <= 0."""
    return -torch.nn.functional.softplus(features @ theta)


def make_problem(seed: int):
    rng = np.random.default_rng(seed)
    batch = random_batch(rng, num_questions=8, group_sizes=(N,), num_padding=0, max_len=6, kl_scale=0.2)
    # lay the questions out contiguously: global micro-batch k holds whole questions
    order = np.argsort(batch.uids.astype(str), kind="stable")
    batch = batch.rows(order)
    features = torch.from_numpy(rng.standard_normal((len(batch.uids), batch.log_prob.shape[1], D)))
    theta = torch.from_numpy(rng.standard_normal(D))
    return batch, features, theta


def _reference_grad(actor_cfg, batch: Batch, features, theta0, M: int) -> torch.Tensor:
    hp = actor_cfg.policy_loss
    theta = theta0.clone().requires_grad_(True)
    whole = Batch(
        toy_log_prob(theta, features), batch.old_log_prob, batch.response_mask, batch.token_level_rewards, batch.uids
    )
    reference = reference_objective(whole, hp.objective, hp.score_func, hp.tau, hp.delta, hp.beta, M, hp.kl_unit)
    (grad,) = torch.autograd.grad(reference, theta)
    assert grad.abs().max() > 1e-4
    return grad


def _token_weights_case(rank: int, world: int, objective: str, score: str, kl_unit: str, seed: int):
    """Arbitrary rows per rank; per-token weights from the gathered answers; random micro-batches."""
    from conftest import disco_actor_config
    from test_disco_loss_on_cpu import estimator_codes
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from recipe.disco.loss import token_weights

    overrides = [
        f"actor_rollout_ref.actor.policy_loss.objective={objective}",
        f"actor_rollout_ref.actor.policy_loss.score_func={score}",
        f"actor_rollout_ref.actor.policy_loss.kl_unit={kl_unit}",
        "actor_rollout_ref.actor.policy_loss.tau=0.5",
        "actor_rollout_ref.actor.policy_loss.delta=1e-3",
        "actor_rollout_ref.actor.policy_loss.beta=20.0",
    ]
    actor_cfg, cfg = disco_actor_config(overrides, rollout_n=N)
    rng = np.random.default_rng(seed)
    batch = random_batch(rng, num_questions=8, group_sizes=(N, 3), num_padding=2, max_len=6, kl_scale=0.2)
    features = torch.from_numpy(rng.standard_normal((len(batch.uids), batch.log_prob.shape[1], D)))
    theta0 = torch.from_numpy(rng.standard_normal(D))
    advantages = estimator_codes(batch, cfg.algorithm)
    M = num_real_questions(batch)
    mine = np.flatnonzero(rng.integers(world, size=len(batch.uids)) == rank)  # any split of the mini-batch

    theta = theta0.clone().requires_grad_(True)
    with torch.no_grad():
        current = toy_log_prob(theta, features[mine])
    weights, _, _ = token_weights(
        current, batch.old_log_prob[mine], batch.response_mask[mine], advantages[mine, 0], actor_cfg.policy_loss, M
    )
    for rows in np.array_split(np.arange(len(mine)), np.sort(rng.choice(len(mine), size=2))):
        actor_cfg.global_batch_info.update(dp_size=world, global_batch_size=M * N, batch_num_tokens=None)
        loss, _ = get_policy_loss_fn("disco")(
            old_log_prob=batch.old_log_prob[mine[rows]],
            log_prob=toy_log_prob(theta, features[mine[rows]]),
            advantages=weights[rows],
            response_mask=batch.response_mask[mine[rows]],
            loss_agg_mode="token-mean",
            config=actor_cfg,
            rollout_is_weights=None,
        )
        loss.backward()
    dist.all_reduce(theta.grad)
    torch.testing.assert_close(
        theta.grad / world, _reference_grad(actor_cfg, batch, features, theta0, M), rtol=1e-9, atol=1e-12
    )


def _in_call_case(rank: int, world: int, micro_per_rank: int, objective: str, score: str, seed: int):
    """Slices of whole-question global micro-batches per rank; the loss computes its own coefficients."""
    from conftest import disco_actor_config
    from test_disco_loss_on_cpu import estimator_codes
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    overrides = [
        f"actor_rollout_ref.actor.policy_loss.objective={objective}",
        f"actor_rollout_ref.actor.policy_loss.score_func={score}",
        "actor_rollout_ref.actor.policy_loss.kl_unit=question",
        "actor_rollout_ref.actor.policy_loss.tau=0.5",
        "actor_rollout_ref.actor.policy_loss.delta=1e-3",
        "actor_rollout_ref.actor.policy_loss.beta=20.0",
    ]
    actor_cfg, cfg = disco_actor_config(overrides, rollout_n=N)
    batch, features, theta0 = make_problem(seed)
    advantages = estimator_codes(batch, cfg.algorithm)
    M = num_real_questions(batch)

    theta = theta0.clone().requires_grad_(True)
    global_micro = world * micro_per_rank
    for start in range(0, len(batch.uids), global_micro):
        rows = np.arange(start + rank * micro_per_rank, start + (rank + 1) * micro_per_rank)
        actor_cfg.global_batch_info.update(dp_size=world, global_batch_size=M * N, batch_num_tokens=None)
        loss, _ = get_policy_loss_fn("disco")(
            old_log_prob=batch.old_log_prob[rows],
            log_prob=toy_log_prob(theta, features[rows]),
            advantages=advantages[rows],
            response_mask=batch.response_mask[rows],
            loss_agg_mode="token-mean",
            config=actor_cfg,
            rollout_is_weights=None,
        )
        loss.backward()  # gradients add up over micro-batches, as in verl's engine
    dist.all_reduce(theta.grad)
    distributed_grad = theta.grad / world  # FSDP's mean over ranks
    reference_grad = _reference_grad(actor_cfg, batch, features, theta0, M)
    torch.testing.assert_close(distributed_grad, reference_grad, rtol=1e-6, atol=1e-10)


CASES = {  # one process group per rank count runs all its cases
    2: [(_token_weights_case, ("disco", "logL", "step", 5)), (_in_call_case, (2, "disco", "logL", 7))],
    4: [
        (_token_weights_case, ("disco-b", "Lratio", "step", 5)),
        (_token_weights_case, ("disco", "Lratio", "question", 6)),
        (_in_call_case, (1, "disco-b", "Lratio", 7)),
        (_in_call_case, (2, "disco", "Lratio", 7)),
    ],
}


def _rank(rank: int, world: int, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for case, args in CASES[world]:
        case(rank, world, *args)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", sorted(CASES))
def test_both_coefficient_paths_over_ranks_and_micro_batches_give_the_single_process_gradient(world):
    mp.spawn(_rank, args=(world, _free_port()), nprocs=world, join=True)
