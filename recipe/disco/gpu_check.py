"""Checks that need a CUDA GPU, runnable where verl is not installed (torch and transformers suffice):

    python -m recipe.disco.gpu_check [--only memory loss gradient]

* memory: the actor update of a random-initialised Qwen2 of the 1.5B shape under FSDP2 on one GPU (bf16 compute,
  fp32 master weights, AdamW, gradient checkpointing), one forward and backward of 4 x 9216 tokens per step;
  ``torch.cuda.max_memory_allocated`` of the second step (AdamW moments exist by then) against the preflight's
  estimate of the update phase without its runtime term (CUDA contexts and NCCL buffers are outside the allocator).
* loss: forward + backward on CUDA of DisCO's per-mini-batch work (the step coefficients, ``loss.token_weights``,
  plus the registered loss on them; and the loss computing its own coefficients, kl_unit question) against the
  PPO-clip token loss of verl's ``vanilla`` (:func:`ppo_clip_loss`, equal to it: tests/test_gpu_check_on_cpu.py),
  on bf16 log-probs of 256 x 8192 and 1024 x 8192; ratio of medians.
* gradient: the gradient of L (through :mod:`recipe.disco.objective`) with respect to the parameters of a small
  random Qwen2 on CUDA in bf16 and in fp32, against the same gradient on the CPU in float64.

Without verl, DisCO's loss module is imported with verl's two registry decorators stood in (they only register).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import statistics
import sys
import time
import types
import uuid
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch

from recipe.disco import objective as obj
from recipe.disco.memory import GIB, PAPER_MODELS, Layout, estimate_memory

ROLLOUT_N = 8
CLIP_EPS, DUAL_CLIP = 0.2, 3.0  # verl's actor defaults: clip_ratio 0.2, clip_ratio_c 3.0
MEMORY_ROWS, MEMORY_SEQUENCE = 4, 9216  # the 1.5B recipe's micro-batch: 4 x (1024 prompt + 8192 response)
MEMORY_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


def disco_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """``recipe.disco.estimator`` and ``recipe.disco.loss``; where verl is missing, its decorators are stood in."""
    try:
        importlib.import_module("verl.trainer.ppo.core_algos")
    except ImportError:
        core_algos = types.ModuleType("verl.trainer.ppo.core_algos")
        core_algos.register_policy_loss = core_algos.register_adv_est = lambda name: lambda function: function
        for name in ("verl", "verl.trainer", "verl.trainer.ppo"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["verl.trainer.ppo.core_algos"] = core_algos
    return importlib.import_module("recipe.disco.estimator"), importlib.import_module("recipe.disco.loss")


def make_inputs(rows: int, length: int, device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """bf16-rounded log-probs, long-tailed lengths (a quarter truncated at ``length``), 0/1 rewards, n=8 uids."""
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
        "log_prob": log_prob.to(device, dtype),
        "old_log_prob": old_log_prob.to(device, dtype),
        "mask": mask.to(device),
        "rewards": rewards.to(device),
        "uids": uids,
    }


def median_times(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each run (each call returns its own elapsed time); one warm-up round, rotating order."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for i in range(repeats + 1):
        labels = list(runs)[i % len(runs) :] + list(runs)[: i % len(runs)]
        for label in labels:
            elapsed = runs[label]()
            if i:
                times[label].append(elapsed)
    return {label: statistics.median(values) for label, values in times.items()}


def ppo_clip_loss(log_prob, old_log_prob, advantages, response_mask) -> tuple[torch.Tensor, dict[str, float]]:
    """Dual-clip PPO token loss, token mean over the rows' masked tokens (verl's ``vanilla`` with one rank):

    l_t = max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)), and min(l_t, -A c) where A < 0;
    r_t = exp(clamp(log pi - log pi_old, -20, 20)). Metrics: k1 KL and the two clip fractions, as verl logs them.
    """
    mask = response_mask.to(log_prob.dtype)
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS)
    pessimistic = torch.maximum(unclipped, clipped)
    floor = -advantages * DUAL_CLIP
    per_token = torch.where(advantages < 0, torch.minimum(floor, pessimistic), pessimistic)
    tokens = mask.sum()
    metrics = {
        "ppo_kl": float((-log_ratio * mask).sum().detach() / tokens),
        "clipfrac": float(((clipped > unclipped) * mask).sum().detach() / tokens),
        "clipfrac_lower": float(((pessimistic > floor) * (advantages < 0) * mask).sum() / tokens),
    }
    return (per_token * mask).sum() / tokens, metrics


def disco_settings(kl_unit: str) -> SimpleNamespace:
    """The paper's log-L recipe (disco, tau 10, delta 1e-4, beta 1e3) with the given trust-region unit."""
    return SimpleNamespace(objective="disco", score_func="logL", tau=10.0, delta=1e-4, beta=1e3, kl_unit=kl_unit)


def loss_times(rows: int, length: int, repeats: int, device: str, dtype: torch.dtype) -> dict[str, float]:
    """Median forward + backward seconds of PPO-clip, DisCO kl_unit step (coefficients + loss) and DisCO kl_unit
    question (the loss on answer codes) on one shape."""
    estimator, loss = disco_modules()
    inputs = make_inputs(rows, length, device, dtype)
    codes, _ = estimator.compute_disco_advantage(inputs["rewards"], inputs["mask"], index=inputs["uids"])
    ppo_advantages = (torch.randn(rows, 1, device=device).expand(rows, length) * inputs["mask"]).to(dtype)
    M = rows / ROLLOUT_N

    def config(kl_unit: str) -> SimpleNamespace:
        return SimpleNamespace(
            policy_loss=disco_settings(kl_unit),
            global_batch_info={"dp_size": 1, "global_batch_size": rows},
            rollout_n=ROLLOUT_N,
        )

    def timed(compute: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], float]:
        def run() -> float:
            leaf = inputs["log_prob"].clone().requires_grad_(True)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            compute(leaf).backward()
            sync()
            return time.perf_counter() - start

        return run

    def disco_step(leaf: torch.Tensor) -> torch.Tensor:
        weights, _, _ = loss.token_weights(
            leaf.detach(), inputs["old_log_prob"], inputs["mask"], codes[:, 0], disco_settings("step"), M
        )
        return loss.compute_policy_loss_disco(
            inputs["old_log_prob"], leaf, weights, inputs["mask"], config=config("step")
        )[0]

    runs = {
        "ppo_clip": timed(lambda leaf: ppo_clip_loss(leaf, inputs["old_log_prob"], ppo_advantages, inputs["mask"])[0]),
        "disco_step": timed(disco_step),
        "disco_question": timed(
            lambda leaf: loss.compute_policy_loss_disco(
                inputs["old_log_prob"], leaf, codes, inputs["mask"], config=config("question")
            )[0]
        ),
    }
    return median_times(runs, repeats)


# ------------------------------------------------------------------ gradient through the objective


def small_qwen2(dtype: torch.dtype, device: str, seed: int = 0):
    """A random Qwen2 (2 layers, hidden 128, vocabulary 512), eager attention, in ``dtype`` on ``device``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


def response_log_probs(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of the response tokens ids[:, prompt:], in float32 at least."""
    logits = model(input_ids=ids, use_cache=False).logits[:, prompt - 1 : -1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits, -1).gather(-1, ids[:, prompt:, None]).squeeze(-1)


def objective_gradient(model, batch: dict, settings) -> tuple[torch.Tensor, float]:
    """The flattened gradient of L (kl_unit step or question) at the model's parameters, and the trust-region KL."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    log_prob = response_log_probs(model, batch["ids"].to(device), batch["prompt"]).double()
    old, mask = batch["old_log_prob"].to(device), batch["mask"].to(device)
    answers = obj.Answers(
        s=obj.sequence_scores(log_prob, old, mask, settings.score_func),
        kl_sum=obj.kl_token_sums(log_prob, old, mask),
        num_tokens=mask.sum(-1),
        group=batch["group"].to(device),
        positive=batch["positive"].to(device),
        num_groups=batch["num_groups"],
    )
    terms = obj.step_terms(answers, settings)
    obj.step_objective(terms, batch["num_groups"], settings.kl_unit).backward()
    gradient = torch.cat([p.grad.flatten().double().cpu() for p in model.parameters() if p.grad is not None])
    return gradient, float(terms.kl.detach().max())


def gradient_batch(reference, questions: int = 4, prompt: int = 16, response: int = 48, seed: int = 0) -> dict:
    """Random prompts x 8 answers of varied lengths sampled from pi_old, the reference model perturbed (so the
    k1 estimate of KL(pi_old || pi) is positive in expectation and above delta: the hinge is active)."""
    g = torch.Generator().manual_seed(seed)
    rows = questions * ROLLOUT_N
    ids = torch.randint(0, reference.config.vocab_size, (questions, prompt), generator=g).repeat_interleave(
        ROLLOUT_N, 0
    )
    old_model = copy.deepcopy(reference)
    with torch.no_grad():
        for parameter in old_model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=g, dtype=parameter.dtype))
        for _ in range(response):
            logits = old_model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=g)], 1)
        old_log_prob = response_log_probs(old_model, ids, prompt)
    lengths = torch.randint(response // 4, response + 1, (rows,), generator=g)
    return {
        "ids": ids,
        "prompt": prompt,
        "old_log_prob": old_log_prob.double(),
        "mask": torch.arange(response)[None, :] < lengths[:, None],
        "group": torch.arange(questions).repeat_interleave(ROLLOUT_N),
        "positive": torch.rand(rows, generator=g) < 0.5,
        "num_groups": questions,
    }


GRADIENT_CASES = {
    "disco logL tau 10, kl_unit step": SimpleNamespace(
        objective="disco", score_func="logL", tau=10.0, delta=1e-4, beta=1e3, kl_unit="step"
    ),
    "disco-b Lratio, kl_unit question": SimpleNamespace(
        objective="disco-b", score_func="Lratio", tau=1.0, delta=1e-4, beta=1e3, kl_unit="question"
    ),
}


def gradient_errors(device: str, dtypes: tuple[torch.dtype, ...]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per case and dtype on ``device``: (relative L2 error, cosine) of the gradient against CPU float64."""
    reference = small_qwen2(torch.float64, "cpu")
    batch = gradient_batch(reference)
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for case, settings in GRADIENT_CASES.items():
        exact, kl = objective_gradient(reference, batch, settings)
        results[case] = {"kl": (kl, kl)}
        for dtype in dtypes:
            model = copy.deepcopy(reference).to(device=device, dtype=dtype)
            gradient, _ = objective_gradient(model, batch, settings)
            error = float((gradient - exact).norm() / exact.norm())
            cosine = float(torch.nn.functional.cosine_similarity(gradient, exact, dim=0))
            results[case][str(dtype).removeprefix("torch.")] = (error, cosine)
    return results


# ------------------------------------------------------------------ memory of the actor update


def measured_update_peak(steps: int = 2) -> int:
    """Peak allocated bytes of the last of ``steps`` actor-update steps of the 1.5B shape (see the module doc)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    config = Qwen2Config(
        **PAPER_MODELS[MEMORY_MODEL].hf_config(), max_position_embeddings=131072, attn_implementation="sdpa"
    )
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)  # fp32 master weights
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in [model.model.embed_tokens, *model.model.layers, model.lm_head]:  # verl's FSDP units
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, config.vocab_size, (MEMORY_ROWS, MEMORY_SEQUENCE), device="cuda")
    for _ in range(steps):
        torch.cuda.reset_peak_memory_stats()
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        scaled = logits / 1.0  # verl keeps the logits and their temperature-scaled copy
        del logits
        # log-probs row by row (what verl does without flash-attn's fused cross-entropy)
        log_prob = torch.stack(
            [row.gather(-1, t[:, None]).squeeze(-1) - row.logsumexp(-1) for row, t in zip(scaled, ids[:, 1:])]
        )
        del scaled
        (-log_prob.float().mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"  step: peak allocated {torch.cuda.max_memory_allocated() / GIB:.1f} GiB", flush=True)
    dist.destroy_process_group()
    return torch.cuda.max_memory_allocated()


def estimated_update_bytes() -> int:
    """The preflight's update-phase estimate for the same model and layout, less its runtime term (CUDA contexts
    and NCCL buffers are outside the allocator)."""
    layout = Layout(
        shard_gpus=1,
        update_tokens=MEMORY_ROWS * MEMORY_SEQUENCE,
        log_prob_tokens=MEMORY_ROWS * MEMORY_SEQUENCE,
        rollout_fraction=0.0,
        rollout_sleeps=True,
        param_offload=False,
        optimizer_offload=False,
        cpu_offload_policy=False,
        trains=True,
        optimizer_state=True,
    )
    terms = estimate_memory(PAPER_MODELS[MEMORY_MODEL], layout, card_bytes=0).phases["update"]
    for term, value in terms.items():
        print(f"  estimate {term}: {value / GIB:.1f} GiB")
    return sum(terms.values()) - terms["runtime"]


# ------------------------------------------------------------------ command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", nargs="+", choices=["memory", "loss", "gradient"], default=["memory", "loss", "gradient"]
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}", flush=True
    )
    if "gradient" in args.only:
        print("gradient of L through recipe.disco.objective, small random Qwen2, against CPU float64:")
        for case, by_dtype in gradient_errors(device, (torch.bfloat16, torch.float32)).items():
            kl = by_dtype.pop("kl")[0]
            parts = "  ".join(f"{dtype}: rel. error {e:.2e}, cosine {c:.6f}" for dtype, (e, c) in by_dtype.items())
            print(f"  {case} (max KL {kl:.1e}): {parts}", flush=True)
    if "loss" in args.only:
        print(f"loss forward + backward, bf16 log-probs, median of {args.repeats}:")
        for rows in (256, 1024):
            t = loss_times(rows, 8192, args.repeats, device, torch.bfloat16)
            print(
                f"  {rows}x8192: ppo-clip (vanilla) {t['ppo_clip'] * 1e3:.2f} ms, disco step (coefficients + loss) "
                f"{t['disco_step'] * 1e3:.2f} ms ({t['disco_step'] / t['ppo_clip']:.2f}x), disco question "
                f"{t['disco_question'] * 1e3:.2f} ms ({t['disco_question'] / t['ppo_clip']:.2f}x)",
                flush=True,
            )
    if "memory" in args.only:
        if device != "cuda":
            print("memory: not checked (no CUDA GPU)")
            return
        print(f"memory of the actor update, 1.5B shape, FSDP2 on 1 GPU, {MEMORY_ROWS} x {MEMORY_SEQUENCE} tokens:")
        measured = measured_update_peak()
        estimate = estimated_update_bytes()
        print(f"  measured peak {measured / GIB:.1f} GiB; estimate without runtime {estimate / GIB:.1f} GiB")


if __name__ == "__main__":
    main()
