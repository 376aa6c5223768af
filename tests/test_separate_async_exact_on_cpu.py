"""verl's ``separate_async`` trainer: DisCO's gradient through its real worker is the float64 gradient of L, with
pi_old the weights verl restores from its CPU copy.

separate_async trains one mini-batch per update and sends the weights to its rollout pool every
``parameter_sync_step`` updates (a cycle). Its ``_compute_old_log_prob`` (verl 0.9.1,
``trainer_separate_async.py``): at a cycle's first update (trigger 0) the live weights are pi_old, saved to CPU, and
the old log-probs come from them; at later updates (trigger >= 1) the live weights, which have moved on, are saved,
pi_old is restored for the old-log-prob pass, then the live weights are restored. Here DisCO's version of that
worker (``recipe.disco.worker.DisCODetachActorWorker``, its ``save_model_to_cpu`` / ``restore_model_from_cpu`` /
``clear_cpu_model`` as verl calls them) runs 3 cycles of 2 updates on 2 gloo ranks with the engine in float64,
told what ``DisCOTrainerSeparateAsync`` tells it, and every optimizer step's gradient must equal the float64
gradient of L(w; pi_old = the cycle's starting weights) (``tests/disco_reference.py``). At trigger 1 the KL from
pi_old is measured, not assumed 0, and with delta = 1e-4 the trust-region hinge is active where it is positive.
The KL is the sample mean of log pi_old - log pi over the step's answers, random tokens rather than samples of
pi_old, so its sign at a given update depends on the build's weights: the test asks for the hinge at one later
update of the three at least. The learning rate keeps the move of one update moderate on any build (at 3e-3 an
Intel Xeon's build moved log-probs by 18 in one update, and the literal reference's exp(exp(18)/tau) overflowed).

Mutations that must fail it: the trainer's flag dropped (the worker takes the old log-probs as the current ones at
trigger 1: KL 0, the wrong gradient), and the CPU backend's copy of the saved shards removed (on a CPU verl's
``.cpu()`` aliases the live weights, so the restore of pi_old restores the live weights).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
WORLD = 2
GROUP_SIZES = [4, 3, 4]  # one mini-batch of 3 questions per update, padded by verl-style rows
N = 4
SYNC_STEP = 2
CYCLES = 3
MAX_RESPONSE = 12
TEMPERATURE = 0.5
DELTA = 1e-4
TOLERANCE = 1e-9
DEADLINE_S = 1800
OVERRIDES = [
    "trainer.v1.trainer_mode=separate_async",
    f"trainer.v1.separate_async.parameter_sync_step={SYNC_STEP}",
    f"data.train_batch_size={SYNC_STEP * len(GROUP_SIZES)}",
    f"actor_rollout_ref.actor.ppo_mini_batch_size={len(GROUP_SIZES)}",
    f"actor_rollout_ref.rollout.n={N}",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.actor.optim.lr=1e-4",
    "actor_rollout_ref.actor.optim.weight_decay=0",
    "actor_rollout_ref.actor.policy_loss.kl_unit=step",  # the worker's coefficients, not the loss's own
    "actor_rollout_ref.actor.policy_loss.objective=disco",
    "actor_rollout_ref.actor.policy_loss.score_func=Lratio",  # pi_old in the score too, not only in the KL
    "actor_rollout_ref.actor.policy_loss.tau=0.5",
    f"actor_rollout_ref.actor.policy_loss.delta={DELTA}",
    "actor_rollout_ref.actor.policy_loss.beta=1e3",
]
MUTATIONS = (None, "flag_dropped", "copy_removed")


def _old_log_probs_as_verl_computes_them(worker, rows, trigger: int):
    """``PPOTrainerSeparateAsync._compute_old_log_prob``'s worker calls around the old-log-prob pass."""
    from recipe.disco.cpu import actor

    if trigger == 0:
        worker.save_model_to_cpu(0)
        return actor.old_log_probs(worker, rows, TEMPERATURE)
    worker.save_model_to_cpu(trigger)
    worker.restore_model_from_cpu(0)
    old = actor.old_log_probs(worker, rows, TEMPERATURE)
    worker.restore_model_from_cpu(trigger)
    worker.clear_cpu_model(trigger)
    return old


def _cycles(worker, trainer, config, prompts, vocab: int, eos: int, rank: int, mutation: str | None):
    """``CYCLES`` cycles of ``SYNC_STEP`` updates (one cycle for a mutation); the recorder and each update's step
    batch."""
    import actor_update_harness as harness
    import numpy as np

    from recipe.disco.cpu import actor

    rng = np.random.default_rng(11)
    recorder, steps = harness.Recorder(), []
    for _ in range(1 if mutation else CYCLES):
        for trainer.local_trigger_step in range(SYNC_STEP):
            step = actor.random_step(rng, prompts, vocab, GROUP_SIZES, MAX_RESPONSE)
            step = actor.pad_and_lay_out(step, config, eos)
            mine = step.rows(actor.group_rows(step, config, rank, WORLD))
            old = _old_log_probs_as_verl_computes_them(worker, mine, trainer.local_trigger_step)
            live = trainer._old_log_probs_at_live_parameters() or mutation == "flag_dropped"
            harness.update_one_step(
                worker, config, step, rank, WORLD, TEMPERATURE, recorder, old=old, old_at_live_parameters=live
            )
            steps.append(step)
    return recorder, steps


def _rank(rank: int, world: int, port: int, model_dir: str, results_file: str) -> None:
    sys.path.insert(0, str(TESTS))
    import actor_update_harness as harness

    from recipe.disco.cpu import actor

    actor.init_distributed(rank, world, port)
    import verl.utils.fsdp_utils as fsdp_utils
    from transformers import AutoTokenizer

    from recipe.disco.cpu import tiny
    from recipe.disco.trainer import DisCOTrainerSeparateAsync
    from recipe.disco.worker import DisCODetachActorWorker

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tiny.prompt_ids(tokenizer, a, b) for a, b in [(1, 2), (3, 4), (5, 6)]]
    config = harness.compose_config(model_dir, world, OVERRIDES)
    worker = harness.build_worker(config, DisCODetachActorWorker)
    trainer = object.__new__(DisCOTrainerSeparateAsync)  # for its flag only
    copying_save = fsdp_utils.fsdp2_sharded_save_to_cpu
    worker.save_model_to_cpu("start")
    results = []
    for mutation in MUTATIONS:  # each from the same weights with a fresh optimizer: the same first update
        worker.restore_model_from_cpu("start")
        worker.actor.engine.optimizer.state.clear()
        if mutation == "copy_removed":  # verl's own save; the worker caches its handlers on first use
            fsdp_utils.fsdp2_sharded_save_to_cpu = copying_save.__wrapped__
            worker._strategy_handlers = None
        started = time.monotonic()
        recorder, steps = _cycles(
            worker, trainer, config, prompts, len(tokenizer), tokenizer.eos_token_id, rank, mutation
        )
        if rank == 0:
            updated = time.monotonic()
            errors = {}
            for j, (params, step) in enumerate(zip(recorder.params, steps)):
                if mutation and j % SYNC_STEP == 0:
                    continue  # a mutation changes only the later updates of a cycle
                pi_old = recorder.params[j - j % SYNC_STEP]  # the cycle's first optimizer step ran at pi_old
                reference = harness.reference_gradient(model_dir, params, pi_old, step, config, TEMPERATURE)
                errors[j] = harness.relative_error(recorder.grads[j], reference)
            metrics = [output["metrics"] for output in recorder.outputs]
            results.append(
                {
                    "mutation": mutation,
                    "errors": errors,
                    "kl": [float(m["actor/disco/kl"][0]) for m in metrics],
                    "constraint_active": [float(m["actor/disco/constraint_active"][0]) for m in metrics],
                    "extra_forward_passes": recorder.extra_forward_passes,
                    "seconds": {"update": updated - started, "reference": time.monotonic() - updated},
                }
            )
    if rank == 0:
        Path(results_file).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str | None, dict]:
    import actor_update_harness as harness
    from e2e_utils import cached_tiny_build

    results_file = tmp_path_factory.mktemp("separate_async") / "results.json"
    harness.run_ranks(_rank, WORLD, (str(cached_tiny_build().model_dir), str(results_file)), DEADLINE_S)
    return {result["mutation"]: result for result in json.loads(results_file.read_text())}


def test_every_update_of_a_cycle_has_the_gradient_of_L_with_pi_old_the_restored_weights(results):
    run = results[None]
    print(f"separate_async, {CYCLES} cycles x {SYNC_STEP} updates: {run}")
    assert len(run["errors"]) == CYCLES * SYNC_STEP and max(run["errors"].values()) < TOLERANCE, run
    # one forward pass at the live weights per later update, none at a cycle's first
    assert run["extra_forward_passes"] == CYCLES * (SYNC_STEP - 1), run


def test_the_kl_from_pi_old_is_measured_at_the_later_updates_of_a_cycle_and_activates_the_hinge(results):
    run = results[None]
    later = [j for j in range(CYCLES * SYNC_STEP) if j % SYNC_STEP]
    assert all(abs(run["kl"][j]) > DELTA for j in later), run  # measured from pi_old, not the live weights' 0
    assert all(run["constraint_active"][j] == float(run["kl"][j] > DELTA) for j in later), run
    assert any(run["constraint_active"][j] == 1.0 for j in later), run
    assert all(run["kl"][j] == 0.0 for j in range(0, CYCLES * SYNC_STEP, SYNC_STEP)), run  # at pi_old itself


@pytest.mark.parametrize("mutation", MUTATIONS[1:])
def test_dropping_the_flag_or_the_copy_of_pi_old_is_detected(results, mutation):
    run = results[mutation]
    assert min(run["errors"].values()) > 1e-3, run
    assert run["kl"] == [0.0] * SYNC_STEP, run  # the KL from pi_old was never seen
