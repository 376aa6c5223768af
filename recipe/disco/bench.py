"""Benchmarks of DisCO against verl's GRPO (``grpo`` estimator, ``vanilla`` PPO-clip loss).

    python -m recipe.disco.bench [--rows 256 1024] [--length 8192] [--repeats 7] [--device cpu|cuda]
    python -m recipe.disco.bench --update [--repeats 5]
    python -m recipe.disco.bench --trainer-modes [--steps 8]

The loss benchmark times, on the same (rows, length) log-probs (bf16-rounded like a bf16 actor's, long-tailed
response lengths, n=8 answers per question), verl's ``vanilla`` loss against DisCO's per-mini-batch work: the
step coefficients (``loss.token_weights``, kl_unit step) plus the registered loss on them, and the loss computing
its own coefficients (kl_unit question); forward + backward, runs alternating in one process, ratio of medians.

The update benchmark (``--update``) runs verl's real actor update (DisCO's worker, and verl's stock worker for
GRPO) in one CPU process on the tiny offline model, on the same step and layout, and prints per training step the
actor forward and backward passes per answer (the old-log-prob pass included) and the wall time of the update
phase, for 4 mini-batches per step (the paper's) and 1, with both KL units.

The trainer-mode benchmark (``--trainer-modes``) trains DisCO with ``main_disco`` on the CPU backend (the tiny task,
2 simulated ranks, 2 mini-batches per step) in verl's ``sync`` and ``colocate_async`` trainers, one after the other,
and prints each one's training steps per minute (from verl's ``timing_s/step``, median over the steps after the
first) and their ratio. On 2 CPU cores generation and training compete for the same cores, so the CPU cannot show
what overlapping them gains on GPUs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
from verl.utils.config import omega_conf_to_dataclass

from recipe.disco.gpu_check import ROLLOUT_N, make_inputs, median_times
from recipe.disco.loss import token_weights


def actor_config(rows: int, kl_unit: str = "step"):
    """verl's actor config from the recipe YAML; global batch = this batch."""
    with initialize_config_dir(config_dir=str(Path(__file__).parent / "config"), version_base=None):
        cfg = compose(
            "disco_trainer",
            overrides=[
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
                f"actor_rollout_ref.actor.policy_loss.kl_unit={kl_unit}",
            ],
        )
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    actor.global_batch_info.update(dp_size=1, global_batch_size=rows, batch_num_tokens=None, loss_scale_factor=None)
    return actor, cfg.algorithm


def time_loss(name: str, advantages: torch.Tensor, inputs: dict, config, device: str) -> float:
    """Forward + backward of the registered loss ``name``; with ``advantages=None`` DisCO's step coefficients are
    computed first (what DisCO's worker does once per mini-batch) and the loss takes them."""
    leaf = inputs["log_prob"].clone().requires_grad_(True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if advantages is None:
        advantages, _, _ = token_weights(
            leaf.detach(), inputs["old_log_prob"], inputs["mask"], inputs["codes"], config.policy_loss, len(leaf) / 8
        )
    loss, _ = get_policy_loss_fn(name)(
        old_log_prob=inputs["old_log_prob"],
        log_prob=leaf,
        advantages=advantages,
        response_mask=inputs["mask"],
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        rollout_is_weights=None,
    )
    loss.backward()
    sync()
    return time.perf_counter() - start


def bench_shape(rows: int, length: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of ``vanilla``, DisCO's coefficients + loss (kl_unit step) and DisCO's in-call loss
    (kl_unit question) on one shape."""
    inputs = make_inputs(rows, length, device)
    step_config, algorithm = actor_config(rows, "step")
    question_config, _ = actor_config(rows, "question")
    codes, _ = get_adv_estimator_fn("disco")(
        token_level_rewards=inputs["rewards"], response_mask=inputs["mask"], index=inputs["uids"], config=algorithm
    )
    inputs["codes"] = codes[:, 0]
    vanilla_adv = torch.randn(rows, 1, device=device).expand(rows, length) * inputs["mask"]
    runs = {
        "vanilla": ("vanilla", vanilla_adv, step_config),
        "disco_step": ("disco", None, step_config),
        "disco_question": ("disco", codes, question_config),
    }
    return median_times(
        {label: (lambda run=run: time_loss(run[0], run[1], inputs, run[2], device)) for label, run in runs.items()},
        repeats,
    )


UPDATE_QUESTIONS, UPDATE_MAX_RESPONSE, UPDATE_TEMPERATURE = 8, 48, 1.0
UPDATE_METHODS = {  # label: (overrides, DisCO's worker?)
    "GRPO (grpo + vanilla)": (
        ["algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"],
        False,
    ),
    "DisCO kl_unit=step": (["actor_rollout_ref.actor.policy_loss.kl_unit=step"], True),
    "DisCO kl_unit=question": (["actor_rollout_ref.actor.policy_loss.kl_unit=question"], True),
}


class PassCounter:
    """Answers (rows) through the engine per step: forward-only passes, and forward + backward passes."""

    def __init__(self, engine) -> None:
        self.forward_only = self.with_backward = 0
        run = engine.forward_backward_batch

        def counting(data, loss_function, forward_only=False):
            if forward_only:
                self.forward_only += len(data)
            else:
                self.with_backward += len(data)
            return run(data, loss_function, forward_only=forward_only)

        engine.forward_backward_batch = counting


def _timed_update(config, worker, counter: PassCounter, laid_out) -> float:
    """Seconds of one ``update_actor`` (the old-log-prob pass before it counts passes, not time)."""
    from recipe.disco.cpu import actor

    counter.forward_only = counter.with_backward = 0
    old = actor.old_log_probs(worker, laid_out, UPDATE_TEMPERATURE)
    start = time.perf_counter()
    actor.update(worker, config, laid_out, 0, 1, UPDATE_TEMPERATURE, old=old)
    return time.perf_counter() - start


def _update_bench(repeats: int, port: int) -> None:
    """The update benchmark, in a process of its own (the CPU backend is process-wide)."""
    from recipe.disco.cpu import actor, tiny

    actor.init_distributed(0, 1, port)
    from transformers import AutoTokenizer
    from verl.workers.engine_workers import ActorRolloutRefWorker

    build = tiny.build_tiny(Path.home() / ".cache" / "disco-tiny", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(build.model_dir)
    prompts = [tiny.prompt_ids(tokenizer, a, b) for a, b in tiny.split_problems(0)["train"][:UPDATE_QUESTIONS]]
    step = actor.random_step(
        np.random.default_rng(0), prompts, len(tokenizer), [ROLLOUT_N] * UPDATE_QUESTIONS, UPDATE_MAX_RESPONSE
    )
    print(
        f"actor update per training step: tiny Qwen2 ({build.model_dir}), 1 CPU rank, {UPDATE_QUESTIONS} questions x "
        f"{ROLLOUT_N} answers of 1-{UPDATE_MAX_RESPONSE} tokens, micro-batches of {ROLLOUT_N} answers; passes per "
        "answer include the old-log-prob pass; update time = median of update_actor over "
        f"{repeats} alternating runs (ratio: against GRPO)"
    )
    print(f"{'mini-batches':>12}  {'method':<24} {'forward':>8} {'backward':>8} {'update s':>9} {'ratio':>6}")
    for mini_batches in (4, 1):
        layout = [
            f"actor_rollout_ref.rollout.n={ROLLOUT_N}",
            f"data.train_batch_size={UPDATE_QUESTIONS}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={UPDATE_QUESTIONS // mini_batches}",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={ROLLOUT_N}",
            f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={ROLLOUT_N}",
            "actor_rollout_ref.actor.optim.lr=1e-5",
        ]
        runs = {}
        for label, (overrides, disco) in UPDATE_METHODS.items():
            config = actor.compose_config(build.model_dir, 1, layout + overrides)
            worker = actor.build_worker(config, None if disco else ActorRolloutRefWorker)
            runs[label] = (config, worker, PassCounter(worker.actor.engine))
        laid_out = actor.pad_and_lay_out(step, runs["DisCO kl_unit=step"][0], tokenizer.eos_token_id)
        timed = {label: (lambda run=run, batch=laid_out: _timed_update(*run, batch)) for label, run in runs.items()}
        times = median_times(timed, repeats)
        grpo = times["GRPO (grpo + vanilla)"]
        for label, (_, _, counter) in runs.items():
            answers = len(laid_out)
            seconds = times[label]
            print(
                f"{mini_batches:>12}  {label:<24} {(counter.forward_only + counter.with_backward) / answers:8.2f} "
                f"{counter.with_backward / answers:8.2f} {seconds:9.3f} {seconds / grpo:6.2f}"
            )


TRAINER_MODES = ("sync", "colocate_async")


def _trainer_mode_bench(steps: int) -> None:
    import tempfile

    from recipe.disco.cpu import tiny
    from recipe.disco.cpu.launch import cpu_overrides, run_trainer

    build = tiny.build_tiny(Path.home() / ".cache" / "disco-tiny", seed=0)
    print(f"DisCO on the tiny CPU task, {steps} steps per trainer mode, 2 simulated ranks, 2 mini-batches per step")
    rates = {}
    for mode in TRAINER_MODES:
        with tempfile.TemporaryDirectory() as workdir:
            overrides = cpu_overrides(build, steps=steps, mini_batches=2, trainer_mode=mode)
            records = run_trainer("recipe.disco.main_disco", overrides, Path(workdir))
        # the first step also waits for the rollout servers' first answers
        rates[mode] = 60 / float(np.median([record["data"]["timing_s/step"] for record in records[1:]]))
        print(f"{mode:>15}: {rates[mode]:6.1f} steps/min", flush=True)
    print(f"ratio colocate_async / sync: {rates['colocate_async'] / rates['sync']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--update", action="store_true", help="benchmark verl's actor update instead (CPU)")
    parser.add_argument("--trainer-modes", action="store_true", help="benchmark verl's sync and colocate_async")
    parser.add_argument("--steps", type=int, default=8, help="training steps per trainer mode (--trainer-modes)")
    args = parser.parse_args()
    if args.trainer_modes:
        _trainer_mode_bench(args.steps)
        return
    if args.update:
        os.environ["DISCO_CPU_BACKEND"] = "1"  # the child imports verl (through this module) with the CPU backend on
        process = multiprocessing.get_context("spawn").Process(target=_update_bench, args=(args.repeats, _free_port()))
        process.start()
        process.join()
        raise SystemExit(process.exitcode)
    print(f"device={args.device} threads={torch.get_num_threads()} repeats={args.repeats} (median, fwd+bwd)")
    for rows in args.rows:
        t = bench_shape(rows, args.length, args.repeats, args.device)
        print(
            f"{rows}x{args.length}: vanilla {t['vanilla'] * 1e3:8.1f} ms  "
            f"disco step (coefficients + loss) {t['disco_step'] * 1e3:8.1f} ms  "
            f"disco question (in-call) {t['disco_question'] * 1e3:8.1f} ms  "
            f"ratio disco/vanilla {t['disco_step'] / t['vanilla']:.2f} (step) "
            f"{t['disco_question'] / t['vanilla']:.2f} (question)"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
