"""verl's actor worker driven in-process on the CPU backend, one process per rank, as verl's v1 trainer drives it.

For the update benchmark (``python -m recipe.disco.bench --update``) and the exactness tests: build DisCO's worker
(``recipe.disco.worker.DisCOActorRolloutRefWorker``) or verl's stock ``ActorRolloutRefWorker`` from the recipe's
Hydra config on the tiny offline model, and feed it one training step in TransferQueue's row format (jagged
prompts/responses, verl's padding rows), laid out by DisCO's trainer layout: old log-probs from the worker's own
``compute_log_prob``, advantages from the configured estimator (``disco`` answer codes, or e.g. verl's ``grpo``),
then ``update_actor`` with the v1 trainer's meta-information.

Call :func:`init_distributed` first in each process (it also turns the CPU backend on for the process).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SYNTHETIC_PADDING_LEN = 128  # the length of verl's padding rows (verl.trainer.ppo.padding_utils)


@dataclass
class StepBatch:
    """One training step's answers in dispatch order, the same on every rank."""

    prompts: list[list[int]]
    responses: list[list[int]]
    rewards: list[float]
    uids: list[str]
    is_padding: list[bool]

    def __len__(self) -> int:
        return len(self.uids)

    def rows(self, index: Sequence[int]) -> StepBatch:
        pick = list(index)
        return StepBatch(*([getattr(self, name)[i] for i in pick] for name in vars(self)))


def init_distributed(rank: int, world: int, port: int) -> None:
    """torch.distributed's environment for this rank, the CPU backend on (before verl is imported)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DISCO_CPU_BACKEND="1",
        TOKENIZERS_PARALLELISM="false",
    )


def random_step(
    rng: np.random.Generator, prompts: list[list[int]], vocab: int, group_sizes: list[int], max_response: int
) -> StepBatch:
    """Questions with the given group sizes, random responses of 1..max_response tokens and 0/1 rewards that give
    mixed, all-correct and all-wrong questions, in interleaved (completion-like) order."""
    rows = []
    for q, size in enumerate(group_sizes):
        uid = str(uuid.UUID(int=int(rng.integers(2**63))))
        p_correct = [0.5, 0.0, 1.0, 0.3][q % 4] if q < 4 else float(rng.uniform())
        rewards = (rng.uniform(size=size) < p_correct).astype(float)
        if 0 < p_correct < 1 and size > 1:  # keep it mixed
            rewards[0], rewards[1] = 1.0, 0.0
        for i in range(size):
            response = rng.integers(3, vocab, size=int(rng.integers(1, max_response + 1))).tolist()  # no specials
            rows.append((prompts[q % len(prompts)], response, float(rewards[i]), uid))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return StepBatch(*(list(column) for column in zip(*rows)), is_padding=[False] * len(rows))


def pad_and_lay_out(step: StepBatch, config, eos_id: int) -> StepBatch:
    """DisCO's trainer layout: verl-style padding rows up to :func:`recipe.disco.grouping.padded_rows`, then the
    whole-question order of ``recipe.disco.trainer.lay_out_whole_groups``."""
    from recipe.disco.checks import update_shape
    from recipe.disco.grouping import padded_rows, whole_group_order

    shape = update_shape(config)
    extra = padded_rows(step.uids, step.is_padding, shape) - len(step)
    padded = StepBatch(
        prompts=step.prompts + [[eos_id] * (SYNTHETIC_PADDING_LEN - 1)] * extra,
        responses=step.responses + [[eos_id]] * extra,
        rewards=step.rewards + [0.0] * extra,
        uids=step.uids + ["pad" + uuid.uuid4().hex] * extra,
        is_padding=step.is_padding + [True] * extra,
    )
    seq_lens = [len(p) + len(r) for p, r in zip(padded.prompts, padded.responses)]
    return padded.rows(whole_group_order(padded.uids, seq_lens, padded.is_padding, shape))


def to_tensordict(step: StepBatch):
    """TransferQueue's row format (``verl.trainer.ppo.v1.agent_loop_tq``): jagged fields per answer."""
    from tensordict import TensorDict

    def jagged(rows: list[list[int]]) -> torch.Tensor:
        return torch.nested.as_nested_tensor([torch.tensor(row) for row in rows], layout=torch.jagged)

    sequences = [p + r for p, r in zip(step.prompts, step.responses)]
    response_mask = jagged([[0 if padding else 1] * len(r) for r, padding in zip(step.responses, step.is_padding)])
    fields = {
        "prompts": jagged(step.prompts),
        "responses": jagged(step.responses),
        "input_ids": jagged(sequences),
        "attention_mask": jagged([[1] * len(s) for s in sequences]),
        "position_ids": jagged([list(range(len(s))) for s in sequences]),
        "response_mask": response_mask,
        "loss_mask": response_mask,
    }
    return TensorDict(fields, batch_size=[len(step)])


def advantages(step: StepBatch, algorithm_config) -> torch.Tensor:
    """The configured estimator's advantages (``algorithm.adv_estimator``) for the whole step, padded (N, L)."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    width = max(len(r) for r in step.responses)
    mask = torch.zeros(len(step), width)
    rewards = torch.zeros(len(step), width)
    for i, (response, reward, padding) in enumerate(zip(step.responses, step.rewards, step.is_padding)):
        if not padding:
            mask[i, : len(response)] = 1
            rewards[i, len(response) - 1] = reward
    estimated, _ = get_adv_estimator_fn(algorithm_config.adv_estimator)(
        token_level_rewards=rewards,
        response_mask=mask,
        index=np.array(step.uids, dtype=object),
        config=algorithm_config,
    )
    return estimated


def compose_config(model_dir: str | Path, world: int, overrides: Sequence[str], dtype: str = "fp32"):
    """The recipe's config for the actor worker on CPU (FSDP2 over gloo, sdpa, the engine in ``dtype``) plus
    ``overrides``; sdpa is exact with packed sequences (verl calls the model with use_cache=False)."""
    from hydra import compose, initialize_config_dir

    precision = f"{{param_dtype:{dtype},reduce_dtype:{dtype},buffer_dtype:{dtype}}}"
    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "config"), version_base=None):
        return compose(
            "disco_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={model_dir}",
                "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
                f"actor_rollout_ref.actor.fsdp_config.model_dtype={dtype}",
                f"+actor_rollout_ref.actor.fsdp_config.mixed_precision={precision}",
                "actor_rollout_ref.actor.use_torch_compile=False",
                "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
                f"trainer.n_gpus_per_node={world}",
                *overrides,
            ],
        )


def build_worker(config, worker_cls: type | None = None):
    """``worker_cls`` (DisCO's hybrid worker if None) in the actor role, initialised (FSDP engine, optimizer)."""
    from recipe.disco.worker import DisCOActorRolloutRefWorker

    worker = (worker_cls or DisCOActorRolloutRefWorker)(config=config.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def install_loss_config(worker, config) -> None:
    """Bind the worker's loss to ``config``'s actor section, as verl's ``init_model`` does
    (``functools.partial(ppo_loss, config=ActorConfig)``); DisCO's worker reads its settings from there."""
    from functools import partial

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.utils.losses import ppo_loss

    actor_config = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    actor_config.model_config = worker.loss_fn.keywords["config"].model_config
    worker.loss_fn = partial(ppo_loss, config=actor_config)
    worker.actor.set_loss_fn(worker.loss_fn)


def group_rows(step: StepBatch, config, rank: int, world: int) -> range:
    """The rows verl's dispatch gives ``rank``: its data-parallel group's contiguous share of the step (under
    Ulysses a group is ``world / dp`` consecutive ranks, verl's ("dp", "sp") mesh, all holding the same rows)."""
    from recipe.disco.checks import actor_dp_size

    dp = actor_dp_size(config)
    share = len(step) // dp
    first = rank // (world // dp) * share
    return range(first, first + share)


def old_log_probs(worker, rows: StepBatch, temperature: float) -> torch.Tensor:
    """The worker's ``compute_log_prob`` of its rows (jagged response log-probs), as the trainer's old-log-prob pass.

    Only the first rank of a Ulysses group returns outputs; the trainer dispatches them back to every rank of the
    group, here a broadcast within the group."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import response_from_nested

    probe = to_tensordict(rows)
    tu.assign_non_tensor(probe, calculate_entropy=False, compute_loss=False, temperature=temperature)
    output = [worker.compute_log_prob(probe)]
    group = worker.actor.engine.ulysses_parallel_group
    if group is not None:
        torch.distributed.broadcast_object_list(output, group=group, group_src=0)
    return response_from_nested(output[0]["log_probs"], probe["response_mask"])


def update(
    worker,
    config,
    step: StepBatch,
    rank: int,
    world: int,
    temperature: float,
    old=None,
    old_at_live_parameters: bool = True,
):
    """One ``update_actor`` call on this rank's share of ``step`` with the v1 trainer's meta-information; returns
    the worker's output. ``old`` are the rows' old log-probs (computed with :func:`old_log_probs` if None), and
    ``old_at_live_parameters`` says whether they came from the worker's current weights."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import response_to_nested

    from recipe.disco.checks import coefficients_in_loss
    from recipe.disco.worker import COEFFICIENTS_IN_LOSS, OLD_LOG_PROBS_AT_LIVE_PARAMETERS

    rows = group_rows(step, config, rank, world)
    mine = step.rows(rows)
    batch = to_tensordict(mine)
    batch["old_log_probs"] = old_log_probs(worker, mine, temperature) if old is None else old
    batch["advantages"] = response_to_nested(
        advantages(step, config.algorithm)[rows.start : rows.stop], batch["response_mask"]
    )
    mini_batch_rows = config.actor_rollout_ref.actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    tu.assign_non_tensor(
        batch,
        calculate_entropy=False,
        global_batch_size=mini_batch_rows,
        mini_batch_size=mini_batch_rows,
        epochs=1,
        seed=0,
        dataloader_kwargs={"shuffle": False},
        temperature=temperature,
        **{
            COEFFICIENTS_IN_LOSS: coefficients_in_loss(config),
            OLD_LOG_PROBS_AT_LIVE_PARAMETERS: old_at_live_parameters,
        },
    )
    return worker.update_actor(batch)
