"""The disco loss over 2 and 4 data-parallel ranks (torch.distributed, gloo, separate processes).

Each rank holds a slice of every global micro-batch, so most questions are split across ranks, as in the
1.5B recipe (4 answers per GPU, n=8). Gradients of a shared parameter are accumulated over micro-batches
without rescaling and averaged over ranks (what verl's engine and FSDP do); the result must equal the
gradient of the single-process float64 reference on the whole batch.
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


def _worker(rank: int, world: int, port: int, micro_per_rank: int, objective: str, score: str, seed: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from conftest import disco_actor_config
    from test_disco_loss_on_cpu import estimator_codes
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    overrides = [
        f"actor_rollout_ref.actor.policy_loss.objective={objective}",
        f"actor_rollout_ref.actor.policy_loss.score_func={score}",
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

    hp = actor_cfg.policy_loss
    theta_ref = theta0.clone().requires_grad_(True)
    whole = Batch(
        toy_log_prob(theta_ref, features),
        batch.old_log_prob,
        batch.response_mask,
        batch.token_level_rewards,
        batch.uids,
    )
    reference = reference_objective(whole, hp.objective, hp.score_func, hp.tau, hp.delta, hp.beta, M)
    (reference_grad,) = torch.autograd.grad(reference, theta_ref)
    torch.testing.assert_close(distributed_grad, reference_grad, rtol=1e-6, atol=1e-10)
    assert reference_grad.abs().max() > 1e-4
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "world,micro_per_rank,objective,score",
    [(2, 2, "disco", "logL"), (4, 1, "disco-b", "Lratio"), (4, 2, "disco", "Lratio")],
)
def test_gradient_over_ranks_and_micro_batches_equals_single_process_gradient(world, micro_per_rank, objective, score):
    mp.spawn(_worker, args=(world, _free_port(), micro_per_rank, objective, score, 7), nprocs=world, join=True)
