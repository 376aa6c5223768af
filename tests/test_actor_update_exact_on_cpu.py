"""DisCO's gradient through verl's real actor update equals the float64 gradient of L, under any layout.

One process per data-parallel rank (gloo, FSDP2), DisCO's actor worker on the tiny offline model, one training
step of 6 questions (group sizes 4, 4, 3, 4, 4, 2, so verl's padding rows fill the layout) in two mini-batches
(two optimizer steps; the second is off-policy, so KL and the ratios pi/pi_old are not trivially 0 and 1, and
the hinge is active). For every optimizer step the accumulated gradient recorded in the engine equals the float64
gradient of L over that mini-batch's questions from ``tests/disco_reference.py`` (relative error below 1e-9: the
engine runs in float64, see ``actor_update_harness.allow_float64_engine``), for both objectives, both scores and
both KL units, under a token budget below one question's tokens (``use_dynamic_bsz``) and micro-batch sizes 1 and
3 (3 does not divide n=4), on 2 and 4 ranks, and under Ulysses sequence parallelism (4 ranks as 2 data-parallel
groups x Ulysses size 2, the token budget): there each Ulysses rank holds half of every packed micro-batch, verl
swaps sequence for attention heads around attention (all-to-all over gloo), gathers the log-probs back to whole
sequences before the loss and averages gradients over all 4 ranks, while DisCO gathers its answers over the
data-parallel group only. Attention runs transformers' flash-attention path with plain-torch kernels
(``actor_update_harness.install_cpu_varlen_attention``): it is the only path verl's Ulysses patch reaches. With
``kl_unit: question`` and fixed micro-batches whose global micro-batch holds whole questions (here on 4 ranks) the
loss computes its coefficients itself: no extra forward pass; every other case makes one, for the second
mini-batch only.

Breaking the method must break the test: coefficients taken at the previous mini-batch's parameters (stale), a
negated coefficient, and a question split over the two mini-batches are each detected.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
GROUP_SIZES = [4, 4, 3, 4, 4, 2]
N = 4
MINI_BATCH_QUESTIONS = 3
MAX_RESPONSE = 12
TEMPERATURE = 0.5  # exact in float32 (verl casts the temperature to float32)
TOLERANCE = 1e-9  # relative error of each optimizer step's gradient; float64 round-off is ~1e-15
BUDGET_TOKENS = 128  # >= verl's 128-token padding rows and any answer; < any question's answers
DEADLINE_S = 1800  # nothing may hang: the ranks are killed past this (a run takes a few minutes)

LAYOUTS = {
    "token_budget": [
        "actor_rollout_ref.actor.use_dynamic_bsz=True",
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={BUDGET_TOKENS}",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
        f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={BUDGET_TOKENS}",
    ],
    "micro_1": ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"],
    "micro_3": ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"],
}
ULYSSES = 2
LAYOUTS["ulysses"] = LAYOUTS["token_budget"] + [
    f"actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size={ULYSSES}",
    "actor_rollout_ref.model.override_config.attn_implementation=varlen_sdpa",  # actor_update_harness
]
# (kl_unit, objective, score) per layout: every combination on each rank count, both KL units in every layout
CASES = {
    2: {
        "token_budget": [("step", "disco", "logL"), ("question", "disco-b", "Lratio")],
        "micro_1": [("step", "disco", "Lratio"), ("question", "disco-b", "logL")],
        "micro_3": [
            ("step", "disco-b", "logL"),
            ("question", "disco", "Lratio"),
            ("step", "disco-b", "Lratio"),
            ("question", "disco", "logL"),
        ],
    },
    4: {
        "token_budget": [("question", "disco", "logL"), ("step", "disco-b", "Lratio")],
        "micro_1": [("question", "disco", "Lratio"), ("step", "disco-b", "logL")],
        "micro_3": [("step", "disco", "Lratio"), ("question", "disco-b", "logL")],
        "ulysses": [("step", "disco", "logL"), ("question", "disco-b", "Lratio")],
    },
}
SABOTAGES = ("stale_coefficients", "negated_coefficients", "split_question")
SABOTAGED_CASE = ("micro_3", ("step", "disco", "Lratio"))


def _overrides(layout: str, kl_unit: str, objective: str, score: str) -> list[str]:
    loss = "actor_rollout_ref.actor.policy_loss"
    return [
        f"actor_rollout_ref.rollout.n={N}",
        f"data.train_batch_size={len(GROUP_SIZES)}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={MINI_BATCH_QUESTIONS}",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.actor.optim.lr=3e-3",
        "actor_rollout_ref.actor.optim.weight_decay=0",
        f"{loss}.kl_unit={kl_unit}",
        f"{loss}.objective={objective}",
        f"{loss}.score_func={score}",
        f"{loss}.tau=0.5",
        f"{loss}.delta=1e-4",
        f"{loss}.beta=1e3",
        *LAYOUTS[layout],
    ]


def _rank(rank: int, world: int, port: int, model_dir: str, results_file: str) -> None:
    """One rank: a worker per layout, one training step per case (then, on 2 ranks, per sabotage); rank 0 compares
    with the reference and writes the results."""
    sys.path.insert(0, str(TESTS))
    import actor_update_harness as harness

    from recipe.disco.cpu import actor

    actor.init_distributed(rank, world, port)
    import numpy as np
    from transformers import AutoTokenizer

    from recipe.disco.checks import actor_dp_size
    from recipe.disco.cpu import tiny

    harness.install_cpu_varlen_attention()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tiny.prompt_ids(tokenizer, a, b) for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (9, 9)]]
    runs = [(layout, case, None) for layout, cases in CASES[world].items() for case in cases]
    if world == 2:
        runs += [(*SABOTAGED_CASE, sabotage) for sabotage in SABOTAGES]
    worker, built_for, results = None, None, []
    for layout, (kl_unit, objective, score), sabotage in runs:
        config = harness.compose_config(model_dir, world, _overrides(layout, kl_unit, objective, score))
        if built_for != layout:
            worker, built_for = harness.build_worker(config), layout
        actor.install_loss_config(worker, config)
        step = actor.random_step(np.random.default_rng(7), prompts, len(tokenizer), GROUP_SIZES, MAX_RESPONSE)
        step = actor.pad_and_lay_out(step, config, tokenizer.eos_token_id)
        result = {"layout": layout, "kl_unit": kl_unit, "objective": objective, "score": score, "sabotage": sabotage}
        started = time.monotonic()
        with harness.sabotaged(sabotage, worker) as break_layout:
            step = break_layout(step, config, world)
            try:
                recorder = harness.update_one_step(worker, config, step, rank, world, TEMPERATURE)
            except RuntimeError as error:  # raised on every rank alike (they all see the same gathered answers)
                results.append({**result, "error": str(error)})
                continue
        if rank == 0:
            updated = time.monotonic()
            dp = actor_dp_size(config)
            reference = harness.reference_gradients(model_dir, recorder, step, config, dp, TEMPERATURE)
            errors = [harness.relative_error(got, want) for got, want in zip(recorder.grads, reference)]
            seconds = {"update": updated - started, "reference": time.monotonic() - updated}
            passes = recorder.extra_forward_passes
            results.append({**result, "errors": errors, "extra_forward_passes": passes, "dp": dp, "seconds": seconds})
    if rank == 0:
        Path(results_file).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module", params=[2, 4], ids=["2_ranks", "4_ranks"])
def results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """Every case of one rank count, run once in spawned processes."""
    import actor_update_harness as harness
    from e2e_utils import cached_tiny_build

    world = request.param
    results_file = tmp_path_factory.mktemp("exact") / "results.json"
    harness.run_ranks(_rank, world, (str(cached_tiny_build().model_dir), str(results_file)), DEADLINE_S)
    return world, json.loads(results_file.read_text())


def _cases(results: tuple[int, list[dict]]) -> list[dict]:
    return [result for result in results[1] if result["sabotage"] is None]


def test_each_optimizer_step_gradient_equals_the_float64_gradient_of_L(results):
    cases = _cases(results)
    assert len(cases) == sum(map(len, CASES[results[0]].values()))
    for case in cases:
        assert "error" not in case, case
        assert len(case["errors"]) == 2 and max(case["errors"]) < TOLERANCE, case


def test_every_objective_score_and_kl_unit_is_covered_in_every_layout_and_rank_count(results):
    cases = _cases(results)
    assert {(c["kl_unit"], c["objective"], c["score"]) for c in cases} == {
        (k, o, s) for k in ("step", "question") for o in ("disco", "disco-b") for s in ("logL", "Lratio")
    }
    for layout in CASES[results[0]]:
        assert {c["kl_unit"] for c in cases if c["layout"] == layout} == {"step", "question"}
    if results[0] == 4:
        assert {c["dp"] for c in cases if c["layout"] == "ulysses"} == {4 // ULYSSES}


def test_only_mini_batches_after_the_first_cost_a_forward_pass(results):
    """No extra pass where each global micro-batch can hold whole questions (kl_unit question, fixed micro-batches
    of ranks x size a multiple of n dividing the mini-batch: here on 4 ranks); one no-grad pass, for the second of the
    two mini-batches, everywhere else."""
    world = results[0]
    for case in _cases(results):
        micro = {"micro_1": 1, "micro_3": 3}.get(case["layout"])
        global_micro = world * micro if micro else None
        in_loss = (
            case["kl_unit"] == "question"
            and global_micro is not None
            and global_micro % N == 0
            and (MINI_BATCH_QUESTIONS * N) % global_micro == 0
        )
        assert case["extra_forward_passes"] == (0 if in_loss else 1), case


@pytest.mark.parametrize("sabotage", SABOTAGES)
def test_breaking_the_coefficients_or_the_layout_is_detected(results, sabotage):
    if results[0] != 2:
        pytest.skip("the sabotaged runs use 2 ranks")
    (run,) = [result for result in results[1] if result["sabotage"] == sabotage]
    if sabotage == "split_question":
        assert "incomplete or duplicated answer groups" in run.get("error", ""), run
    else:
        assert max(run["errors"]) > 1e-3, run
