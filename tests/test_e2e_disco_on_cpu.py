"""End-to-end DisCO training on CPU: ``python -m recipe.disco.main_disco`` with verl's real trainer, and verl's stock
``python -m verl.trainer.main_ppo`` on the same configuration.

Layout of every run: 2 simulated data-parallel ranks, 4 prompts x rollout.n=4 answers per step in 2 mini-batches
(optimizer steps; the second is off-policy, so the KL and the ratios pi/pi_old are not trivially 0 and 1), and
``ppo_micro_batch_size_per_gpu=2`` < n. A global micro-batch (the same-index micro-batch of both ranks, over which
the loss gathers) then holds 4 answers: exactly one question, split 2 + 2 over the ranks, and a step makes 4 loss
calls per rank. verl logs each loss metric as its mean over those calls (and over the ranks, which see the same
gathered values), so per step ``actor/disco/num_mixed + num_all_correct + num_all_wrong`` is the mean number of
questions per call, and 4 x ``actor/disco/num_<kind>`` counts the questions of each kind, which the trainer counts
again on the driver from the rewards (``disco/questions/<kind>``).

Runs: the first run (objective ``disco``, score ``logL``, 2 steps, checkpoint after step 2, validation at step 2,
rollouts dumped) is shared by the first three tests; the resume test continues it with objective ``disco-b`` and
score ``Lratio`` (steps 3-4); two more runs train the other two pairs. Each launch costs about a minute (Ray and
the workers start), a further step about 2 s, so the five launches of this file take 4-5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from e2e_utils import cached_tiny_build, cpu_overrides, run_trainer

from recipe.disco.cpu.tiny import DATA_SOURCE
from recipe.disco.reward import compute_score_with_info

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipe" / "disco" / "config"
N_GPUS, PROMPTS, MINI_BATCH_PROMPTS, ROLLOUT_N, MICRO_PER_GPU = 2, 4, 2, 4, 2
ANSWERS_PER_CALL = N_GPUS * MICRO_PER_GPU  # one global micro-batch
QUESTIONS_PER_CALL = ANSWERS_PER_CALL // ROLLOUT_N
CALLS_PER_STEP = PROMPTS * ROLLOUT_N // ANSWERS_PER_CALL
CALLS_PER_MINI_BATCH = MINI_BATCH_PROMPTS * ROLLOUT_N // ANSWERS_PER_CALL
FIRST_RUN_STEPS = 2
TIMEOUT_S = 300  # per launch; about 45-85 s each on a 2-core machine
POLICY_LOSS = "actor_rollout_ref.actor.policy_loss"
PAPER_TAU = {"logL": 10.0, "Lratio": 1.0}
KINDS = ("mixed", "all_correct", "all_wrong")
OUTCOMES = ("missing", "wrong", "right", "timeout")
# the metrics README.md documents: per loss call (actor/disco/*) and per step from the driver (disco/*)
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
        *(f"num_{kind}" for kind in KINDS),
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


def overrides(steps: int, objective: str, score_func: str) -> list[str]:
    """The CPU launch overrides with two mini-batches (optimizer steps) per step, micro-batches smaller than
    rollout.n, and the DisCO variant (with the paper's tau)."""
    return cpu_overrides(
        cached_tiny_build(), steps=steps, n_gpus=N_GPUS, prompts_per_step=PROMPTS, rollout_n=ROLLOUT_N
    ) + [
        f"actor_rollout_ref.actor.ppo_mini_batch_size={MINI_BATCH_PROMPTS}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO_PER_GPU}",
        # a rank's share of a mini-batch, in one old-log-prob micro-batch
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={MINI_BATCH_PROMPTS * ROLLOUT_N // N_GPUS}",
        f"{POLICY_LOSS}.objective={objective}",
        f"{POLICY_LOSS}.score_func={score_func}",
        f"{POLICY_LOSS}.tau={PAPER_TAU[score_func]}",
    ]


def resumable(checkpoint_dir: Path, rollout_dir: Path) -> list[str]:
    """Checkpoints in (and automatic resume from) ``checkpoint_dir``; each step's answers dumped to ``rollout_dir``."""
    return [
        f"trainer.default_local_dir={checkpoint_dir}",
        "trainer.resume_mode=auto",
        f"trainer.rollout_data_dir={rollout_dir}",
    ]


def rollouts(rollout_dir: Path, step: int) -> list[dict]:
    """verl's dump of a training step's answers: input, output, gts, score, step, uid per line."""
    return [json.loads(line) for line in (rollout_dir / f"{step}.jsonl").read_text().splitlines()]


def questions_of(rows: list[dict]) -> set[tuple[int, int]]:
    return {tuple(int(x) for x in QUESTION.search(row["input"]).groups()) for row in rows}


def assert_disco_metrics_finite(record: dict) -> None:
    metrics = record["data"]
    missing = [key for key in LOSS_METRICS if key not in metrics]
    assert not missing, f"step {record['step']}: no {missing}"
    bad = {key: metrics[key] for key in LOSS_METRICS + ["actor/pg_loss"] if not math.isfinite(metrics[key])}
    assert not bad, f"step {record['step']}: not finite {bad}"


def assert_whole_groups(record: dict) -> None:
    """Every loss call saw exactly QUESTIONS_PER_CALL questions over ANSWERS_PER_CALL answers, so whole groups.

    The run finishing already means the loss's completeness check passed on every call; this is the evidence from
    the metrics: the mean over calls of the questions seen equals the number of questions a global micro-batch of
    ANSWERS_PER_CALL answers holds when it holds whole groups (every call sees at least one question).
    """
    metrics = record["data"]
    per_call = sum(metrics[f"actor/disco/num_{kind}"] for kind in KINDS)
    assert per_call == pytest.approx(QUESTIONS_PER_CALL, abs=1e-9), f"step {record['step']}: {per_call}"


def assert_loss_counts_match_driver(record: dict) -> None:
    """The loss calls' question counts add up to the driver's count of the step (from the rewards, by uid)."""
    metrics = record["data"]
    for kind in KINDS:
        from_loss = CALLS_PER_STEP * metrics[f"actor/disco/num_{kind}"]
        assert from_loss == pytest.approx(metrics[f"disco/questions/{kind}"], abs=1e-9), (record["step"], kind)
    assert sum(metrics[f"disco/questions/{kind}"] for kind in KINDS) == PROMPTS


def assert_step_objective_value(record: dict) -> None:
    """Each call returns its questions' share of L = (1/M) sum_q (-J_q 1[mixed] + penalty_q), M = MINI_BATCH_PROMPTS
    questions; verl logs the mean over mini-batches of the sum over their calls. With one question per call and M
    calls per mini-batch, that is the mean over calls of penalty_q - J_q 1[mixed]: the logged ``penalty -
    objective_J`` (per-call means, J counted 0 in calls without a mixed question)."""
    metrics = record["data"]
    assert CALLS_PER_MINI_BATCH == MINI_BATCH_PROMPTS and QUESTIONS_PER_CALL == 1
    expected = metrics["actor/disco/penalty"] - metrics["actor/disco/objective_J"]
    assert metrics["actor/pg_loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7), record["step"]


def assert_trust_region(record: dict) -> None:
    """The squared hinge (beta/2) [KL_q - delta]_+^2 is positive exactly when some question's KL estimate exceeds
    delta (the estimate itself, a sample mean of log pi_old - log pi, may be negative)."""
    metrics = record["data"]
    active, penalty = metrics["actor/disco/constraint_active"], metrics["actor/disco/penalty"]
    assert 0 <= active <= 1 and penalty >= 0, (record["step"], active, penalty)
    assert penalty > 0 if active else penalty == 0, (record["step"], active, penalty)


def assert_scores_are(record: dict, score_func: str) -> None:
    """The mean scores of the chosen kind, logged as per-call means over the call's mixed question (0 without
    one): a mean token log-prob (logL) is negative, a mean token ratio pi/pi_old (Lratio) positive."""
    metrics = record["data"]
    mixed = metrics["actor/disco/num_mixed"] > 0
    for side in ("pos_score", "neg_score"):
        value = metrics[f"actor/disco/{side}"]
        if not mixed:
            assert value == 0, (record["step"], side, value)
        else:
            assert value < 0 if score_func == "logL" else value > 0, (record["step"], side, value)


def assert_objective_is(record: dict, objective: str) -> None:
    """disco-b's J is the score margin (mean positive - mean negative score); disco's is at most the margin, as
    tau log-mean-exp of the negatives' scores is at least their mean. Both logged as means over calls."""
    metrics = record["data"]
    J, margin = metrics["actor/disco/objective_J"], metrics["actor/disco/score_margin"]
    if objective == "disco-b":
        assert J == pytest.approx(margin, rel=1e-6, abs=1e-9), (record["step"], J, margin)
    else:
        assert J <= margin + 1e-9, (record["step"], J, margin)


def assert_disco_step(record: dict, objective: str, score_func: str) -> None:
    """All checks of one training step of main_disco."""
    metrics = record["data"]
    assert_disco_metrics_finite(record)
    bad = {key: metrics.get(key) for key in STEP_METRICS if not math.isfinite(metrics.get(key, math.nan))}
    assert not bad, f"step {record['step']}: missing or not finite {bad}"
    assert_whole_groups(record)
    assert_loss_counts_match_driver(record)
    assert_step_objective_value(record)
    assert_trust_region(record)
    assert_scores_are(record, score_func)
    assert_objective_is(record, objective)
    if metrics["actor/disco/num_mixed"] > 0:  # a mixed question has a DisCO term, hence a gradient
        assert metrics["actor/grad_norm"] > 0, record["step"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> dict:
    """main_disco, objective disco, score logL, steps 1-2; checkpoint after step 2; validation at step 2."""
    root = tmp_path_factory.mktemp("disco_e2e")
    checkpoint_dir, rollout_dir = root / "checkpoints", root / "rollouts_1"
    records = run_trainer(
        "recipe.disco.main_disco",
        overrides(FIRST_RUN_STEPS, "disco", "logL")
        + resumable(checkpoint_dir, rollout_dir)
        + [f"trainer.save_freq={FIRST_RUN_STEPS}", f"trainer.test_freq={FIRST_RUN_STEPS}"],
        root / "run_1",
        timeout_s=TIMEOUT_S,
    )
    return {"root": root, "records": records, "checkpoint_dir": checkpoint_dir, "rollout_dir": rollout_dir}


def test_main_disco_sees_whole_groups_with_micro_batches_smaller_than_n(first_run):
    records = first_run["records"]
    assert [record["step"] for record in records] == list(range(1, FIRST_RUN_STEPS + 1))
    for record in records:
        assert_disco_step(record, "disco", "logL")


def test_reward_loop_uses_the_project_reward(first_run):
    """Training: every dumped answer's score is the project's reward of its text, and the step's logged outcome
    rates are those of the answers. Validation (same reward loop):
    the outcome flags that only ``compute_score_with_info`` returns are logged, one outcome per answer."""
    records, rollout_dir = first_run["records"], first_run["rollout_dir"]
    for record in records:
        rows = rollouts(rollout_dir, record["step"])
        assert len(rows) == PROMPTS * ROLLOUT_N
        infos = [compute_score_with_info(DATA_SOURCE, row["output"], row["gts"], require_think=False) for row in rows]
        for row, info in zip(rows, infos):
            assert row["score"] == info["score"], row
        mean_score = sum(row["score"] for row in rows) / len(rows)
        assert record["data"]["critic/score/mean"] == pytest.approx(mean_score)
        assert record["data"]["disco/accuracy"] == pytest.approx(mean_score)
        for outcome in OUTCOMES:  # the outcome rates of the step's answers, logged by the trainer
            expected = sum(info[f"answer_{outcome}"] for info in infos) / len(infos)
            assert record["data"][f"disco/answer_{outcome}"] == pytest.approx(expected), outcome
    validation = records[-1]["data"]
    rates = {outcome: validation[f"val-aux/{DATA_SOURCE}/answer_{outcome}/mean@1"] for outcome in OUTCOMES}
    assert sum(rates.values()) == pytest.approx(1.0), rates
    assert rates["right"] == pytest.approx(validation[f"val-core/{DATA_SOURCE}/acc/mean@1"]), rates


def test_checkpoint_after_step_k_resumes_at_step_k_plus_1(first_run):
    """A second launch in the same checkpoint folder resumes after step 2: its first step is 3, with the next
    prompts of the data order (none of steps 1-2's). It trains the other objective and score (disco-b, Lratio)."""
    checkpoint_dir = first_run["checkpoint_dir"]
    assert (checkpoint_dir / f"global_step_{FIRST_RUN_STEPS}" / "actor").is_dir()
    assert (checkpoint_dir / "latest_checkpointed_iteration.txt").read_text().strip() == str(FIRST_RUN_STEPS)
    rollout_dir = first_run["root"] / "rollouts_2"
    records = run_trainer(
        "recipe.disco.main_disco",
        overrides(FIRST_RUN_STEPS + 2, "disco-b", "Lratio") + resumable(checkpoint_dir, rollout_dir),
        first_run["root"] / "run_2",
        timeout_s=TIMEOUT_S,
    )
    assert [record["step"] for record in records] == [FIRST_RUN_STEPS + 1, FIRST_RUN_STEPS + 2]
    seen = set().union(
        *(questions_of(rollouts(first_run["rollout_dir"], step)) for step in range(1, FIRST_RUN_STEPS + 1))
    )
    resumed = questions_of(rollouts(rollout_dir, FIRST_RUN_STEPS + 1))
    assert len(resumed) == PROMPTS and not resumed & seen, "the data loader restarted instead of resuming"
    log = (first_run["root"] / "run_2" / "trainer.log").read_text(errors="replace")
    actor_dir = checkpoint_dir / f"global_step_{FIRST_RUN_STEPS}" / "actor"
    for rank in range(N_GPUS):  # verl's workers log what they restore
        assert f"Loaded model from {actor_dir}/model_world_size_{N_GPUS}_rank_{rank}.pt" in log, f"rank {rank}"
    for record in records:
        assert_disco_step(record, "disco-b", "Lratio")


@pytest.mark.parametrize(("objective", "score_func"), [("disco", "Lratio"), ("disco-b", "logL")])
def test_other_variants_see_whole_groups(objective, score_func, tmp_path):
    """The two objective x score pairs the shared runs leave out (disco with Lratio is the paper's 7B recipe)."""
    records = run_trainer(
        "recipe.disco.main_disco", overrides(2, objective, score_func), tmp_path / "run", timeout_s=TIMEOUT_S
    )
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        assert_disco_step(record, objective, score_func)


def test_stock_main_ppo_is_exact_or_refuses_split_groups(tmp_path):
    """verl's own entry point with the DisCO config and the same layout: verl's length balancing deals answers to
    ranks and micro-batches regardless of their question, so the loss must stop the run with its message (the usual
    outcome); a step that completes (the deal happened to keep every global micro-batch whole) must show whole
    groups in every loss call."""
    workdir = tmp_path / "stock"
    config = ["--config-path", str(CONFIG_DIR), "--config-name", "disco_trainer"]
    try:
        run_trainer(
            "verl.trainer.main_ppo", config + overrides(FIRST_RUN_STEPS, "disco", "logL"), workdir, timeout_s=TIMEOUT_S
        )
        refused = False
    except AssertionError as error:
        log = (workdir / "trainer.log").read_text(errors="replace")
        assert "RuntimeError: DisCO loss received incomplete answer groups" in log, str(error)
        assert "launch with `python -m recipe.disco.main_disco`" in log
        refused = True
    metrics_file = workdir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    assert refused or len(records) == FIRST_RUN_STEPS
    for record in records:
        assert_disco_metrics_finite(record)
        assert_whole_groups(record)
