"""Benchmark: the registered ``disco`` loss against verl's ``vanilla`` (PPO-clip) loss, forward + backward.

    python -m recipe.disco.bench [--rows 256 1024] [--length 8192] [--repeats 7] [--device cpu|cuda]

Both losses run on the same (rows, length) log-probs, bf16-rounded like a bf16 actor's, with long-tailed
response lengths and n=8 answers per question; runs alternate in one process and the ratio of medians
(disco / vanilla) is printed per shape.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
from verl.utils.config import omega_conf_to_dataclass

ROLLOUT_N = 8


def actor_config(rows: int):
    """verl's actor config from the recipe YAML; global batch = this batch."""
    with initialize_config_dir(config_dir=str(Path(__file__).parent / "config"), version_base=None):
        cfg = compose("disco_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8"])
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    actor.global_batch_info.update(dp_size=1, global_batch_size=rows, batch_num_tokens=None, loss_scale_factor=None)
    return actor, cfg.algorithm


def make_inputs(rows: int, length: int, device: str, seed: int = 0) -> dict[str, torch.Tensor | np.ndarray]:
    """bf16-rounded log-probs, long-tailed lengths (a quarter truncated at ``length``), 0/1 rewards."""
    g = torch.Generator().manual_seed(seed)
    log_prob = -torch.empty(rows, length).exponential_(3.0, generator=g)
    log_prob = log_prob.to(torch.bfloat16).float()
    old_log_prob = (log_prob + 0.02 * torch.randn(rows, length, generator=g)).clamp(max=0).to(torch.bfloat16).float()
    lengths = torch.empty(rows).log_normal_(np.log(length / 4), 0.8, generator=g).long().clamp(1, length)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = torch.zeros(rows, length)
    rewards[torch.arange(rows), lengths - 1] = (torch.rand(rows, generator=g) < 0.5).float()
    uids = np.repeat([str(uuid.uuid4()) for _ in range(rows // ROLLOUT_N)], ROLLOUT_N).astype(object)
    return {
        "log_prob": log_prob.to(device),
        "old_log_prob": old_log_prob.to(device),
        "mask": mask.to(device),
        "rewards": rewards.to(device),
        "uids": uids,
    }


def time_loss(name: str, advantages: torch.Tensor, inputs: dict, config, device: str) -> float:
    leaf = inputs["log_prob"].clone().requires_grad_(True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
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


def bench_shape(rows: int, length: int, repeats: int, device: str) -> tuple[float, float]:
    inputs = make_inputs(rows, length, device)
    config, algorithm = actor_config(rows)
    disco_adv, _ = get_adv_estimator_fn("disco")(
        token_level_rewards=inputs["rewards"], response_mask=inputs["mask"], index=inputs["uids"], config=algorithm
    )
    vanilla_adv = torch.randn(rows, 1, device=device).expand(rows, length) * inputs["mask"]
    times = {"vanilla": [], "disco": []}
    for i in range(repeats + 1):  # the first round warms up
        for name, adv in (
            (("vanilla", vanilla_adv), ("disco", disco_adv))
            if i % 2
            else (
                ("disco", disco_adv),
                ("vanilla", vanilla_adv),
            )
        ):
            elapsed = time_loss(name, adv, inputs, config, device)
            if i:
                times[name].append(elapsed)
    return statistics.median(times["vanilla"]), statistics.median(times["disco"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"device={args.device} threads={torch.get_num_threads()} repeats={args.repeats} (median, fwd+bwd)")
    for rows in args.rows:
        vanilla, disco = bench_shape(rows, args.length, args.repeats, args.device)
        print(
            f"{rows}x{args.length}: vanilla {vanilla * 1e3:8.1f} ms  disco {disco * 1e3:8.1f} ms  "
            f"ratio disco/vanilla {disco / vanilla:.2f}"
        )


if __name__ == "__main__":
    main()
