"""Whole-question layout through verl 0.9.1's real reorder/dispatch/mini-batch/micro-batch code, and rank balance.

With ``kl_unit: step`` (or any layout where the loss cannot compute its own coefficients) the unit of whole
questions is a mini-batch; with ``kl_unit: question`` and whole-question global micro-batches it is a global
micro-batch, and the loss computes its coefficients in each call (the pipeline test below).

The pipeline test builds a step batch the way the v1 trainer does: agent-loop rows (``AgentLoopOutput.as_dict``,
uuid uids, keys ``{uid}_{session}_0``) put into a real TransferQueue in shuffled completion order, with failed
trajectories (unequal group sizes) and long-tailed response lengths. Then, with verl's own code where verl has
it: ``DisCOTrainer._balance_batch`` (verl's TransferQueue padding rows + the whole-group reorder), verl's
``PPOTrainer._compute_advantage`` (the registered ``disco`` estimator), dispatch ``BatchData(...).chunk``
(``KVBatchMeta`` -> ``BatchMeta`` contiguous chunks), ``tu.make_iterator`` mini-batches and
``prepare_micro_batches`` micro-batches, then verl's ``ppo_loss`` with the registered ``disco`` loss.

Several ranks are simulated in one process: the k-th micro-batches of all ranks of a mini-batch (one "global
micro-batch") are concatenated and passed to one loss call. That is the computation the distributed loss does: it
all-gathers the ranks' per-answer scalars, every rank returns the same value, the gather's backward sums the W
copies of each gradient to its owner and FSDP's mean over ranks divides by W. The summed gradient of all calls is
compared in float64 with one loss call on the whole step batch.
"""

from __future__ import annotations

import uuid
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose_disco, disco_actor_config
from tensordict import TensorDict
from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
from verl.protocol import BatchData
from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
from verl.utils import tensordict_utils as tu
from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils.losses import ppo_loss

from recipe.disco.grouping import (
    UpdateShape,
    pack_questions,
    padded_rows,
    question_rows,
    rank_partitions,
    whole_group_order,
)
from recipe.disco.trainer import DisCOTrainer, outcome_rates, question_metrics, step_metrics

N = 8  # rollout.n
PROMPTS = 16  # prompts per step
MINI_PROMPTS = 4  # ppo_mini_batch_size: 4 optimizer steps per step
EOS = 2
MAX_RESPONSE = 48  # data.max_response_length of the synthetic steps
# (data-parallel ranks, micro-batch rows per GPU): every W in {1, 2, 4, 8}, micro-batches smaller and larger than n
LAYOUTS = [(1, 8), (1, 32), (2, 4), (2, 16), (4, 2), (4, 8), (8, 1), (8, 4)]


# ------------------------------------------------------------------ step batch, as the v1 trainer builds it


OUTCOME_FLAGS = ("answer_missing", "answer_wrong", "answer_right", "answer_timeout")


def outcome_flag(reward: float, session: int) -> str:
    """The reward outcome recorded for an answer: right if rewarded, else missing, wrong or timeout by session."""
    return "answer_right" if reward == 1.0 else ("answer_missing", "answer_wrong", "answer_timeout")[session % 3]


def agent_loop_rows(rng: np.random.Generator) -> tuple[list[str], list[dict], list[dict], dict[str, float]]:
    """Keys, TransferQueue fields and tags of one step, in shuffled completion order, plus each row's reward.

    Question difficulty in {0, 0.3, 0.7, 1} gives all-wrong, mixed and all-correct groups; 3 questions lose 1-3
    answers (failed trajectories); response lengths are Pareto-tailed and truncated at MAX_RESPONSE tokens.
    """
    rows = []
    for q in range(PROMPTS):
        uid = str(uuid.uuid4())
        prompt = rng.integers(3, 200, size=int(rng.integers(3, 12))).tolist()
        p_correct = [0.0, 0.3, 0.7, 1.0][q % 4]
        failed = int(rng.integers(1, 4)) if q % 5 == 1 else 0
        for session in range(N - failed):
            length = int(min(MAX_RESPONSE, 1 + rng.pareto(1.2) * 4))
            reward = float(rng.random() < p_correct)
            reward_info = {flag: float(flag == outcome_flag(reward, session)) for flag in OUTCOME_FLAGS}
            output = AgentLoopOutput(
                prompt_ids=prompt,
                response_ids=rng.integers(3, 200, size=length).tolist(),
                response_mask=[1] * length,
                reward_score=reward,
                num_turns=2,
                metrics=AgentLoopMetrics(),
                extra_fields={"min_global_steps": 1, "max_global_steps": 1, "reward_extra_info": reward_info},
            )
            field = output.as_dict()
            field.update(uid=uid, session_id=session, global_steps=1, data_source="test")
            field["loss_mask"] = field["response_mask"]
            field["input_ids"] = torch.cat([field["prompts"], field["responses"]])
            field["position_ids"] = torch.arange(field["input_ids"].numel())
            tag = {"status": "success", "prompt_len": len(prompt), "response_len": length}
            tag.update(seq_len=len(prompt) + length, global_steps=1, min_global_steps=1, max_global_steps=1)
            rows.append((f"{uid}_{session}_0", field, tag))
    order = rng.permutation(len(rows))
    keys, fields, tags = zip(*[rows[i] for i in order], strict=True)
    rewards = {key: float(field["rm_scores"].sum()) for key, field in zip(keys, fields, strict=True)}
    return list(keys), list(fields), list(tags), rewards


@pytest.fixture(scope="module")
def transfer_queue():
    """A local Ray + TransferQueue (the v1 trainer's data plane), sized for a 2-core machine."""
    ray = pytest.importorskip("ray")
    import transfer_queue as tq
    from omegaconf import OmegaConf

    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


def put_step_batch(tq, partition: str, rng: np.random.Generator):
    """Put one step's rows into TransferQueue; returns verl's KVBatchMeta and the rewards by key."""
    from transfer_queue import KVBatchMeta

    keys, fields, tags, rewards = agent_loop_rows(rng)
    tq.kv_batch_put(keys=keys, partition_id=partition, fields=tu.list_of_dict_to_tensordict(fields), tags=tags)
    return KVBatchMeta(partition_id=partition, keys=keys, tags=tags), rewards


def trainer_for(dp_size: int, micro: int, kl_unit: str = "question") -> DisCOTrainer:
    """A DisCOTrainer with just what its data methods read: the composed recipe config and the EOS token."""
    trainer = object.__new__(DisCOTrainer)
    trainer.config = compose_disco(
        [
            f"trainer.n_gpus_per_node={dp_size}",
            f"data.train_batch_size={PROMPTS}",
            f"actor_rollout_ref.rollout.n={N}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={MINI_PROMPTS}",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
            f"actor_rollout_ref.actor.policy_loss.kl_unit={kl_unit}",
        ]
    )
    trainer.tokenizer = SimpleNamespace(eos_token_id=EOS)
    return trainer


def add_old_log_probs(tq, batch, rng: np.random.Generator) -> None:
    """What the old-log-prob pass writes: per-response-token log-probs (nested), for every row incl. padding."""
    mask = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["response_mask"])
    lengths = mask["response_mask"].offsets().diff().tolist()
    old = [torch.tensor(-rng.gamma(2.0, 0.5, size=length), dtype=torch.float32) for length in lengths]
    fields = TensorDict({"old_log_probs": torch.nested.as_nested_tensor(old, layout=torch.jagged)}, len(lengths))
    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)


# ------------------------------------------------------------------ the worker side, with verl's own split code


def global_micro_batches(rank_data: list[TensorDict], shape: UpdateShape) -> list[TensorDict]:
    """Split each rank's data like TrainingWorker.train_mini_batch + FSDPEngine; concatenate same-index micros."""
    per_rank = []
    for rank, data in enumerate(rank_data):
        minis = tu.make_iterator(
            data,
            mini_batch_size=shape.mini_batch_rows // shape.dp_size,
            epochs=1,
            seed=42 + rank,
            dataloader_kwargs={"shuffle": False},
        )
        micros = []
        for mini in minis:
            tu.assign_non_tensor(mini, use_dynamic_bsz=False, micro_batch_size_per_gpu=shape.rank_rows)
            micros.append(prepare_micro_batches(mini, dp_group=None, same_micro_num_in_dp=True)[0])
        per_rank.append(micros)
    assert len({len(m) for m in per_rank}) == 1, "ranks must run the same number of mini-batches"
    return [
        tu.concat_tensordict([per_rank[rank][j][k] for rank in range(shape.dp_size)])
        for j in range(len(per_rank[0]))
        for k in range(len(per_rank[0][j]))
    ]


def uids_of(data: TensorDict) -> list[str]:
    return [str(uid) for uid in data["uid"]]


def assert_whole_groups(calls: list[TensorDict], batch_uids: list[str]) -> None:
    """Every loss call holds all answers of each question it touches, and every answer is seen exactly once."""
    sizes = Counter(uid for uid in batch_uids if not uid.startswith("pad"))
    seen: Counter[str] = Counter()
    for call in calls:
        here = Counter(uid for uid in uids_of(call) if not uid.startswith("pad"))
        split = {uid: f"{count}/{sizes[uid]}" for uid, count in here.items() if count != sizes[uid]}
        assert not split, f"loss call with split groups: {split}"
        seen.update(here)
    assert seen == sizes


class LogProbs:
    """A float64 leaf of per-token log-probs per real answer (keyed by uid, session); the 'model' under test."""

    def __init__(self, rows: list[tuple[str, int]], max_len: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.index = {row: i for i, row in enumerate(rows)}
        self.theta = (-torch.rand(len(rows), max_len, generator=generator, dtype=torch.float64) * 2).requires_grad_()

    def model_output(self, data: TensorDict) -> dict[str, torch.Tensor]:
        """The engine's output for ``data``: log-probs over prompt + response tokens, flattened (no padding)."""
        lengths = (data["prompts"].offsets().diff() + data["responses"].offsets().diff()).tolist()
        sessions = [int(session) for session in data["session_id"]]
        pieces = [
            torch.zeros(length, dtype=torch.float64)  # verl's padding rows: fully masked
            if uid.startswith("pad")
            else self.theta[self.index[uid, int(session)], :length]
            for uid, session, length in zip(uids_of(data), sessions, lengths, strict=True)
        ]
        return {"log_probs": torch.cat(pieces)}


def loss_gradient(calls: list[TensorDict], log_probs: LogProbs, actor_cfg, shape: UpdateShape) -> torch.Tensor:
    """Sum of the gradients of verl's ppo_loss (policy loss 'disco') over the given calls."""
    log_probs.theta.grad = None
    for data in calls:
        tu.assign_non_tensor(
            data,
            dp_size=shape.dp_size,
            batch_num_tokens=int(data["loss_mask"].values().sum()),
            global_batch_size=shape.mini_batch_rows,
        )
        loss, _ = ppo_loss(actor_cfg, log_probs.model_output(data), data)
        loss.backward()
    return log_probs.theta.grad.clone()


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize(("dp_size", "micro"), LAYOUTS)
def test_every_loss_call_gets_whole_groups_and_the_exact_gradient(transfer_queue, dp_size, micro):
    tq, rng = transfer_queue, np.random.default_rng(1000 * dp_size + micro)
    trainer = trainer_for(dp_size, micro)
    shape = UpdateShape(dp_size, MINI_PROMPTS * N, dp_size * micro)
    batch, _ = put_step_batch(tq, f"train_w{dp_size}_m{micro}", rng)
    real_rows = [(key.split("_")[0], int(key.split("_")[1])) for key in batch.keys]

    metrics: dict = {}
    batch = trainer._balance_batch(batch, metrics)
    assert len(batch) % (MINI_PROMPTS * N) == 0 and sum(tag.get("is_padding", False) for tag in batch.tags) > 0
    assert metrics["global_seqlen/balanced_max"] >= metrics["global_seqlen/balanced_min"]
    add_old_log_probs(tq, batch, rng)
    batch = trainer._compute_advantage(batch, metrics)

    batch.extra_info.update(global_batch_size=shape.mini_batch_rows, mini_batch_size=shape.mini_batch_rows)
    rank_data = [tq.get_client().get_data(meta) for meta in BatchData(batch).chunk(dp_size)]
    calls = global_micro_batches(rank_data, shape)
    whole = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id)
    assert_whole_groups(calls, uids_of(whole))

    actor_cfg, _ = disco_actor_config(["actor_rollout_ref.actor.policy_loss.kl_unit=question"], rollout_n=N)
    log_probs = LogProbs(real_rows, max_len=64, seed=dp_size)
    split_grad = loss_gradient(calls, log_probs, actor_cfg, shape)
    single_grad = loss_gradient([whole], log_probs, actor_cfg, shape)
    assert single_grad.abs().sum() > 0
    torch.testing.assert_close(split_grad, single_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("dp_size", "micro"), [(1, 3), (2, 3), (4, 1), (8, 2)])
def test_with_the_step_kl_unit_every_mini_batch_holds_whole_questions(transfer_queue, dp_size, micro):
    """kl_unit step: the unit of whole questions is the mini-batch (over all ranks), whatever the micro-batches."""
    tq, rng = transfer_queue, np.random.default_rng(100 * dp_size + micro)
    trainer = trainer_for(dp_size, micro, kl_unit="step")
    batch, _ = put_step_batch(tq, f"train_step_w{dp_size}_m{micro}", rng)
    batch = trainer._balance_batch(batch, {})
    rows_per_rank_per_mini_batch = MINI_PROMPTS * N // dp_size
    rank_data = [tq.get_client().get_data(meta) for meta in BatchData(batch).chunk(dp_size)]
    per_rank = [
        list(tu.make_iterator(data, rows_per_rank_per_mini_batch, epochs=1, dataloader_kwargs={"shuffle": False}))
        for data in rank_data
    ]
    mini_batches = [tu.concat_tensordict([minis[j] for minis in per_rank]) for j in range(len(per_rank[0]))]
    assert len(mini_batches) * MINI_PROMPTS * N == len(batch)
    assert_whole_groups(mini_batches, uids_of(tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id)))


def test_without_the_layout_verl_splits_groups_and_the_loss_refuses(transfer_queue):
    """Negative control: verl's padding and dispatch on the completion order (no whole-group reorder)."""
    tq, rng = transfer_queue, np.random.default_rng(7)
    dp_size, micro = 2, 4
    trainer = trainer_for(dp_size, micro)
    shape = UpdateShape(dp_size, MINI_PROMPTS * N, dp_size * micro)
    batch, _ = put_step_batch(tq, "train_unordered", rng)
    batch = upsample_batch_to_divisible_size(batch, shape.mini_batch_rows, EOS)
    add_old_log_probs(tq, batch, rng)
    batch = trainer._compute_advantage(batch, {})
    calls = global_micro_batches([tq.get_client().get_data(m) for m in BatchData(batch).chunk(dp_size)], shape)
    with pytest.raises(AssertionError, match="split groups"):
        assert_whole_groups(calls, [key.split("_")[0] for key in batch.keys])
    actor_cfg, _ = disco_actor_config(["actor_rollout_ref.actor.policy_loss.kl_unit=question"], rollout_n=N)
    real_rows = [(key.split("_")[0], int(key.split("_")[1])) for key in batch.keys]
    with pytest.raises(RuntimeError, match="incomplete or duplicated answer groups"):
        loss_gradient(calls, LogProbs(real_rows, 64, 0), actor_cfg, shape)


def test_step_metrics_count_from_transfer_queue(transfer_queue):
    tq, rng = transfer_queue, np.random.default_rng(3)
    batch, rewards = put_step_batch(tq, "train_metrics", rng)
    lengths = [tag["response_len"] for tag in batch.tags]
    batch = upsample_batch_to_divisible_size(batch, 1000, EOS)  # padding rows must not count
    metrics = step_metrics(batch, N, max_response_length=MAX_RESPONSE)

    by_question: dict[str, list[float]] = {}
    for key, reward in rewards.items():
        by_question.setdefault(key.split("_")[0], []).append(reward)
    correct = {uid: sum(r == 1.0 for r in rs) for uid, rs in by_question.items()}
    assert metrics["disco/questions/mixed"] == sum(0 < c < len(by_question[u]) for u, c in correct.items())
    assert metrics["disco/questions/all_correct"] == sum(c == len(by_question[u]) for u, c in correct.items())
    assert metrics["disco/questions/all_wrong"] == sum(c == 0 for c in correct.values())
    assert metrics["disco/accuracy"] == pytest.approx(np.mean(list(rewards.values())))
    for k in range(N + 1):
        assert metrics[f"disco/correct_per_question/{k}"] == sum(c == k for c in correct.values())
    assert 0 < metrics["disco/truncation_rate"] == np.mean(np.array(lengths) == MAX_RESPONSE)
    recorded = [outcome_flag(reward, int(key.split("_")[1])) for key, reward in rewards.items()]
    for flag in OUTCOME_FLAGS:
        assert 0 < metrics[f"disco/{flag}"] == pytest.approx(recorded.count(flag) / len(recorded)), flag


def test_outcome_rates_need_the_project_rewards_flags():
    right, timeout = ({flag: float(flag == chosen) for flag in OUTCOME_FLAGS} for chosen in OUTCOME_FLAGS[2:])
    assert outcome_rates([right, right, right, timeout]) == {
        "disco/answer_missing": 0.0,
        "disco/answer_wrong": 0.0,
        "disco/answer_right": 0.75,
        "disco/answer_timeout": 0.25,
    }
    assert outcome_rates([right, {"acc": 1.0}]) == {}  # another reward function: no rates rather than wrong ones
    assert outcome_rates([]) == {}


def test_question_metrics_by_hand():
    uids = ["a"] * 3 + ["b"] * 2 + ["c"] * 3
    rewards = [1, 0, 1, 0, 0, 1, 1, 1]
    metrics = question_metrics(uids, rewards, rollout_n=3)
    assert metrics == {
        "disco/questions/mixed": 1.0,
        "disco/questions/all_correct": 1.0,
        "disco/questions/all_wrong": 1.0,
        "disco/accuracy": 5 / 8,
        "disco/correct_per_question/0": 1.0,
        "disco/correct_per_question/1": 0.0,
        "disco/correct_per_question/2": 1.0,
        "disco/correct_per_question/3": 1.0,
    }


# ------------------------------------------------------------------ pure layout: packing, padding, balance


def realistic_lengths(rng: np.random.Generator, prompts: int = 128) -> tuple[list[str], list[int]]:
    """DeepScaleR-like step: prompts of 60-400 tokens, per-question length scale, answers lognormal, cut at 8192."""
    uids, lengths = [], []
    for _ in range(prompts):
        uid, prompt, scale = str(uuid.uuid4()), int(rng.integers(60, 400)), rng.lognormal(np.log(2500), 0.6)
        for _ in range(N):
            uids.append(uid)
            lengths.append(prompt + int(min(8192, max(20, rng.lognormal(np.log(scale), 0.5)))))
    order = rng.permutation(len(uids))
    return [uids[i] for i in order], [lengths[i] for i in order]


def max_deviation(lengths: list[int], partitions: list[list[int]]) -> float:
    totals = np.array([sum(lengths[i] for i in part) for part in partitions], dtype=float)
    return float(np.abs(totals - totals.mean()).max() / totals.mean())


@pytest.mark.parametrize(("dp_size", "micro"), [(2, 4), (2, 16), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4)])
def test_group_aware_balance_keeps_rank_tokens_within_5_percent(dp_size, micro, capsys):
    rng = np.random.default_rng(dp_size * 10 + micro)
    uids, lengths = realistic_lengths(rng)
    padding = [False] * len(uids)
    shape = UpdateShape(dp_size, 32 * N, dp_size * micro)
    order = whole_group_order(uids, lengths, padding, shape)
    assert sorted(order) == list(range(len(uids)))
    ours = max_deviation(lengths, rank_partitions(order, dp_size))
    contiguous_groups = [row for rows in question_rows(uids, padding) for row in rows]  # whole groups, no balancing
    unbalanced = max_deviation(lengths, rank_partitions(contiguous_groups, dp_size))
    verl_kk = get_seqlen_balanced_partitions(calculate_workload(torch.tensor(lengths)).tolist(), dp_size, True)
    with capsys.disabled():
        print(
            f"\n[balance] W={dp_size} m={micro}: max |rank tokens - mean| / mean = {ours:.2%} (group-aware), "
            f"{unbalanced:.2%} (whole groups, no balancing), {max_deviation(lengths, verl_kk):.2%} (verl KK, splits "
            "groups)"
        )
    assert ours <= 0.05
    assert ours < unbalanced


def test_layout_positions_follow_verl_dispatch_arithmetic():
    """Global micro-batch b of rank w starts at w*N/W + b*m; each one holds whole groups."""
    rng = np.random.default_rng(5)
    uids, lengths = realistic_lengths(rng, prompts=8)
    shape = UpdateShape(dp_size=4, mini_batch_rows=16, unit_rows=8)
    order = whole_group_order(uids, lengths, [False] * len(uids), shape)
    per_rank = len(order) // shape.dp_size
    for b in range(len(order) // shape.unit_rows):
        rows = [order[w * per_rank + b * 2 + i] for w in range(4) for i in range(2)]
        assert len({uids[r] for r in rows}) == 1  # C = 8 = n: one question per global micro-batch


def test_unequal_groups_add_a_padding_mini_batch_and_spread_it():
    shape = UpdateShape(dp_size=2, mini_batch_rows=16, unit_rows=8)  # units of 8, 2 per mini-batch
    uids = ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    assert padded_rows(uids, [False] * 15, shape) == 32  # 3 bins do not fit one mini-batch (verl would pad to 16)
    uids += ["pad"] * 17
    padding = [False] * 15 + [True] * 17
    order = whole_group_order(uids, [10] * 32, padding, shape)
    bins = [[order[w * 16 + b * 4 + i] for w in range(2) for i in range(4)] for b in range(4)]
    for rows in bins:
        assert len({uids[r] for r in rows if not padding[r]}) <= 1
    questions_per_mini_batch = [
        len({uids[r] for b in (0, 1) for r in bins[j * 2 + b] if not padding[r]}) for j in (0, 1)
    ]
    assert sorted(questions_per_mini_batch) == [1, 2]
    with pytest.raises(ValueError, match="pad it to 32 rows"):
        whole_group_order(uids[:16], [10] * 16, padding[:16], shape)


def test_a_question_larger_than_a_unit_is_refused():
    with pytest.raises(ValueError, match="actor_rollout_ref.actor.ppo_mini_batch_size"):
        pack_questions([8, 9], capacity=8)
    assert pack_questions([3, 8, 5, 4, 4], capacity=8) == [[1], [2, 0], [3, 4]]
