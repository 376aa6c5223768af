"""End-to-end DisCO training on CPU: ``python -m recipe.disco.main_disco`` with verl's real trainer and workers.

Two launches. The shared run (``conftest.trained_run``, see ``e2e_utils``): 2 simulated data-parallel ranks, 6
prompts x 4 answers per step in 2 mini-batches (optimizer steps; the second is off-policy, so the KL and the ratios
pi/pi_old are not trivially 0 and 1), DisCO logL, ``kl_unit: step``, token-budget micro-batches smaller than any
question, checkpoint and validation after step 2. The resumed run continues it for steps 3-4 with the other
objective and score (disco-b, Lratio), ``kl_unit: question`` and fixed micro-batches of 3 answers (not a divisor of
n=4). The runs finishing means DisCO's actor worker found every question complete in every mini-batch (it raises
otherwise); exactness itself is shown on the same worker in ``test_actor_update_exact_on_cpu.py``.

Two more launches train with verl's async trainers: ``colocate_async`` (the next step's answers are generated
while the current step trains, on the same simulated GPUs; partial answers resume under newer weights) and
``separate_async`` (a standalone rollout pool, one mini-batch per update, the weights sent through the CPU
backend's checkpoint engine after every cycle of updates).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
from e2e_utils import (
    LAUNCH_TIMEOUT_S,
    MINI_BATCHES,
    N_GPUS,
    PROMPTS,
    ROLLOUT_N,
    TRAINED_STEPS,
    e2e_overrides,
    resumable,
    run_trainer,
)

from recipe.disco.cpu.tiny import DATA_SOURCE
from recipe.disco.grouping import uid_of_key
from recipe.disco.reward import compute_score_with_info

KINDS = ("mixed", "all_correct", "all_wrong")
OUTCOMES = ("missing", "wrong", "right", "timeout")
# the metrics docs/metrics.md documents: per mini-batch from DisCO's worker (actor/disco/*) and per step from the driver
LOSS_METRICS = [
    f"actor/disco/{name}"
    for name in (
        "kl",
        "constraint_active",
        "penalty",
        "objective_J",
        "pos_score",
        "neg_score",
        "score_margin",
        "pairwise_auc",
    )
]
STEP_METRICS = [
    *(f"disco/questions/{kind}" for kind in KINDS),
    "disco/accuracy",
    "disco/truncation_rate",
    *(f"disco/correct_per_question/{k}" for k in range(ROLLOUT_N + 1)),
    *(f"disco/answer_{outcome}" for outcome in OUTCOMES),
]
QUESTION = re.compile(r"What is (\d+)\+(\d+)\?")


def rollouts(rollout_dir: Path, step: int) -> list[dict]:
    """verl's dump of a training step's answers: input, output, gts, score, step, uid per line."""
    return [json.loads(line) for line in (rollout_dir / f"{step}.jsonl").read_text().splitlines()]


def questions_of(rows: list[dict]) -> set[tuple[int, int]]:
    return {tuple(int(x) for x in QUESTION.search(row["input"]).groups()) for row in rows}


def assert_metrics_finite(record: dict) -> None:
    metrics = record["data"]
    bad = {
        key: metrics.get(key) for key in LOSS_METRICS + STEP_METRICS if not math.isfinite(metrics.get(key, math.nan))
    }
    assert not bad, f"step {record['step']}: missing or not finite {bad}"
    assert sum(metrics[f"disco/questions/{kind}"] for kind in KINDS) == PROMPTS


def assert_trust_region(record: dict, kl_unit: str) -> None:
    """The hinge (beta/2) [KL - delta]_+^2 is positive exactly when a unit's KL estimate exceeds delta. The first
    mini-batch of a step runs at the parameters that sampled the answers, so its KL is exactly 0: with the step unit
    and 2 mini-batches, the logged (mean over mini-batches) share of active hinges is 0 or 1/2."""
    metrics = record["data"]
    active, penalty = metrics["actor/disco/constraint_active"], metrics["actor/disco/penalty"]
    assert 0 <= active <= 1 and penalty >= 0, (record["step"], active, penalty)
    assert (penalty > 0) == (active > 0), (record["step"], active, penalty)
    if kl_unit == "step":
        assert active in (0.0, 1 / MINI_BATCHES), (record["step"], active)


def assert_scores_are(record: dict, score_func: str) -> None:
    """Mean scores over mixed questions: a mean token log-prob (logL) is negative, a mean ratio (Lratio) positive."""
    metrics = record["data"]
    if metrics["disco/questions/mixed"] == 0:
        return
    for side in ("pos_score", "neg_score"):
        value = metrics[f"actor/disco/{side}"]
        assert value < 0 if score_func == "logL" else value > 0, (record["step"], side, value)


def assert_objective_is(record: dict, objective: str) -> None:
    """disco-b's J is the score margin (mean positive - mean negative score); disco's is at most the margin, as
    tau log-mean-exp of the negatives' scores is at least their mean."""
    metrics = record["data"]
    J, margin = metrics["actor/disco/objective_J"], metrics["actor/disco/score_margin"]
    if objective == "disco-b":
        assert J == pytest.approx(margin, rel=1e-6, abs=1e-9), (record["step"], J, margin)
    else:
        assert J <= margin + 1e-9, (record["step"], J, margin)


def assert_disco_step(record: dict, objective: str, score_func: str, kl_unit: str) -> None:
    metrics = record["data"]
    assert_metrics_finite(record)
    assert_trust_region(record, kl_unit)
    assert_scores_are(record, score_func)
    assert_objective_is(record, objective)
    assert math.isfinite(metrics["actor/pg_loss"])
    if metrics["disco/questions/mixed"] > 0:  # a mixed question has a DisCO term, hence a gradient
        assert metrics["actor/grad_norm"] > 0, record["step"]


def test_main_disco_trains_with_token_budgets_smaller_than_a_question(trained_run):
    records = trained_run["records"]
    assert [record["step"] for record in records] == list(range(1, TRAINED_STEPS + 1))
    for record in records:
        assert_disco_step(record, "disco", "logL", "step")


def test_reward_loop_uses_the_project_reward(trained_run):
    """Training: every dumped answer's score is the project's reward of its text, and the step's logged outcome
    rates are those of the answers. Validation (same reward loop): the outcome flags that only
    ``compute_score_with_info`` returns are logged, one outcome per answer."""
    records, rollout_dir = trained_run["records"], trained_run["rollout_dir"]
    for record in records:
        rows = rollouts(rollout_dir, record["step"])
        assert len(rows) == PROMPTS * ROLLOUT_N
        infos = [compute_score_with_info(DATA_SOURCE, row["output"], row["gts"], require_think=False) for row in rows]
        for row, info in zip(rows, infos):
            assert row["score"] == info["score"], row
        mean_score = sum(row["score"] for row in rows) / len(rows)
        assert record["data"]["critic/score/mean"] == pytest.approx(mean_score)
        assert record["data"]["disco/accuracy"] == pytest.approx(mean_score)
        for outcome in OUTCOMES:
            expected = sum(info[f"answer_{outcome}"] for info in infos) / len(infos)
            assert record["data"][f"disco/answer_{outcome}"] == pytest.approx(expected), outcome
    validation = records[-1]["data"]
    rates = {outcome: validation[f"val-aux/{DATA_SOURCE}/answer_{outcome}/mean@1"] for outcome in OUTCOMES}
    assert sum(rates.values()) == pytest.approx(1.0), rates
    assert rates["right"] == pytest.approx(validation[f"val-core/{DATA_SOURCE}/acc/mean@1"]), rates


def test_checkpoint_resumes_with_another_variant_and_micro_batches_of_3(trained_run):
    """A second launch in the same checkpoint folder resumes after step 2: its first step is 3, with the next
    prompts of the data order (none of steps 1-2's), restored weights on both ranks. It trains disco-b with Lratio
    and the question unit, with fixed micro-batches of 3 answers (6 per rank and mini-batch; 3 does not divide n)."""
    checkpoint_dir = trained_run["checkpoint_dir"]
    assert (checkpoint_dir / f"global_step_{TRAINED_STEPS}" / "actor").is_dir()
    assert (checkpoint_dir / "latest_checkpointed_iteration.txt").read_text().strip() == str(TRAINED_STEPS)
    root = trained_run["root"]
    rollout_dir = root / "rollouts_2"
    records = run_trainer(
        "recipe.disco.main_disco",
        e2e_overrides(TRAINED_STEPS + 2, "disco-b", "Lratio", kl_unit="question")
        + resumable(checkpoint_dir, rollout_dir)
        + ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"],
        root / "run_2",
        timeout_s=LAUNCH_TIMEOUT_S,
    )
    assert [record["step"] for record in records] == [TRAINED_STEPS + 1, TRAINED_STEPS + 2]
    seen = set().union(*(questions_of(rollouts(trained_run["rollout_dir"], s)) for s in range(1, TRAINED_STEPS + 1)))
    resumed = questions_of(rollouts(rollout_dir, TRAINED_STEPS + 1))
    assert len(resumed) == PROMPTS and not resumed & seen, "the data loader restarted instead of resuming"
    log = (root / "run_2" / "trainer.log").read_text(errors="replace")
    actor_dir = checkpoint_dir / f"global_step_{TRAINED_STEPS}" / "actor"
    for rank in range(N_GPUS):  # verl's workers log what they restore
        assert f"Loaded model from {actor_dir}/model_world_size_{N_GPUS}_rank_{rank}.pt" in log, f"rank {rank}"
    for record in records:
        assert_disco_step(record, "disco-b", "Lratio", "question")


ASYNC_STEPS = 3
MAX_OFF_POLICY = 8  # verl's default trainer.v1.sampler.max_off_policy_threshold


def test_colocate_async_trains_disco_on_whole_questions_and_logs_their_staleness(tmp_path):
    """Every step: whole questions (n answers to each of the step's prompts), DisCO's relations (the first
    mini-batch's KL exactly 0: the actor recomputed the old log-probs at its live weights), and verl's staleness of
    the answers (steps behind the trained weights; how far each step's answers lag depends on timing)."""
    rollout_dir = tmp_path / "rollouts"
    records = run_trainer(
        "recipe.disco.main_disco",
        e2e_overrides(ASYNC_STEPS, "disco", "logL", trainer_mode="colocate_async")
        + [f"trainer.rollout_data_dir={rollout_dir}"],
        tmp_path / "run",
        timeout_s=LAUNCH_TIMEOUT_S,
    )
    assert [record["step"] for record in records] == list(range(1, ASYNC_STEPS + 1))
    for record in records:
        assert_disco_step(record, "disco", "logL", "step")
        staleness = record["data"]["training/off_policy/trajectory_staleness/max"]
        assert 0 <= staleness < MAX_OFF_POLICY, record["step"]
        groups = Counter(uid_of_key(row["uid"]) for row in rollouts(rollout_dir, record["step"]))  # TQ keys
        assert len(groups) == PROMPTS and set(groups.values()) == {ROLLOUT_N}, groups


SEPARATE_STEPS = 4


def test_separate_async_trains_disco_with_the_trust_region_measured_from_the_restored_pi_old(tmp_path):
    """Every step is one cycle of 2 updates of one mini-batch: the first at pi_old (KL exactly 0), the second with
    the old log-probs taken at pi_old restored from its CPU copy while the live weights have moved (a KL the
    worker measures; it would be exactly 0 if it took the old log-probs for the current ones); whole questions
    (DisCO's worker raises otherwise). The standalone pool gets the weights: the last step's prompts were queued
    after the first sync, so some of its answers come from weights newer than the initial ones (a pool that never
    got them would leave every answer 3 versions behind at step 4). Exactness: test_separate_async_exact_on_cpu."""
    records = run_trainer(
        "recipe.disco.main_disco",
        e2e_overrides(SEPARATE_STEPS, "disco", "logL", trainer_mode="separate_async"),
        tmp_path / "run",
        timeout_s=LAUNCH_TIMEOUT_S,
    )
    assert [record["step"] for record in records] == list(range(1, SEPARATE_STEPS + 1))
    for record in records:
        assert_disco_step(record, "disco", "logL", "step")
    assert any(record["data"]["actor/disco/kl"] != 0 for record in records)
    last = records[-1]["data"]
    assert last["training/off_policy/trajectory_staleness/min"] < SEPARATE_STEPS - 1, last
