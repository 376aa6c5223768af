"""DisCO's gradient through verl's real actor update under Ulysses sequence parallelism equals the float64 gradient.

4 ranks as 2 data-parallel groups x Ulysses size 2, the step, model, float64 reference and tolerance of
``test_actor_update_exact_on_cpu.py``, verl's paper layout for long answers (``use_dynamic_bsz`` with a token
budget below one question's tokens), one case per KL unit. Each Ulysses rank holds half of every packed
micro-batch; verl swaps sequence for attention heads around attention (all-to-all over gloo), gathers the
log-probs back to whole sequences before the loss, and averages gradients over all 4 ranks, while DisCO gathers
its answers over the data-parallel group only. Attention runs transformers' flash-attention path with plain-torch
kernels (``actor_update_harness.install_cpu_varlen_attention``): it is the only path verl's Ulysses patch reaches.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
import test_actor_update_exact_on_cpu as exact
import torch.multiprocessing as mp

TESTS = Path(__file__).resolve().parent
WORLD, ULYSSES = 4, 2
LAYOUT = "token_budget"
CASES = [("step", "disco", "logL"), ("question", "disco-b", "Lratio")]
DEADLINE_S = 1800  # nothing may hang: the ranks are killed past this (a run takes a few minutes)


def _rank(rank: int, port: int, model_dir: str, results_file: str) -> None:
    """One rank: one worker, one training step per case; rank 0 compares with the reference and writes results."""
    sys.path.insert(0, str(TESTS))
    import actor_update_harness as harness

    from recipe.disco.cpu import actor

    actor.init_distributed(rank, WORLD, port)
    import numpy as np
    from transformers import AutoTokenizer

    from recipe.disco.checks import actor_dp_size
    from recipe.disco.cpu import tiny

    harness.install_cpu_varlen_attention()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tiny.prompt_ids(tokenizer, a, b) for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (9, 9)]]
    ulysses = [
        f"actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size={ULYSSES}",
        f"actor_rollout_ref.model.override_config.attn_implementation={harness.CPU_VARLEN_ATTENTION}",
    ]
    worker, results = None, []
    for kl_unit, objective, score in CASES:
        config = harness.compose_config(model_dir, WORLD, exact._overrides(LAYOUT, kl_unit, objective, score) + ulysses)
        worker = worker or harness.build_worker(config)
        actor.install_loss_config(worker, config)
        step = actor.random_step(
            np.random.default_rng(7), prompts, len(tokenizer), exact.GROUP_SIZES, exact.MAX_RESPONSE
        )
        step = actor.pad_and_lay_out(step, config, tokenizer.eos_token_id)
        started = time.monotonic()
        recorder = harness.update_one_step(worker, config, step, rank, WORLD, exact.TEMPERATURE)
        if rank == 0:
            updated = time.monotonic()
            dp = actor_dp_size(config)
            reference = harness.reference_gradients(model_dir, recorder, step, config, dp, exact.TEMPERATURE)
            results.append(
                {
                    "kl_unit": kl_unit,
                    "objective": objective,
                    "score": score,
                    "dp": dp,
                    "errors": [harness.relative_error(got, want) for got, want in zip(recorder.grads, reference)],
                    "extra_forward_passes": recorder.extra_forward_passes,
                    "seconds": {"update": updated - started, "reference": time.monotonic() - updated},
                }
            )
    if rank == 0:
        Path(results_file).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """Both cases, run once in spawned processes."""
    from e2e_utils import cached_tiny_build

    results_file = tmp_path_factory.mktemp("ulysses") / "results.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model_dir = str(cached_tiny_build().model_dir)
    context = mp.spawn(_rank, args=(port, model_dir, str(results_file)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"{WORLD} ranks ran past {DEADLINE_S} s")
    return json.loads(results_file.read_text())


def test_each_optimizer_step_gradient_under_ulysses_equals_the_float64_gradient_of_L(results):
    assert [(c["kl_unit"], c["objective"], c["score"]) for c in results] == CASES
    for case in results:
        assert case["dp"] == WORLD // ULYSSES, case
        assert len(case["errors"]) == 2 and max(case["errors"]) < exact.TOLERANCE, case


def test_under_ulysses_the_worker_computes_the_coefficients_with_one_pass_for_the_second_mini_batch(results):
    """The loss never gathers answers itself under Ulysses (its default group would see each row twice)."""
    for case in results:
        assert case["extra_forward_passes"] == 1, case
