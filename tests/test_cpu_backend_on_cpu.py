"""The CPU backend (platform, hf rollout) and the tiny offline model and task, up to verl's stock trainer.

Checks that change process-wide state (the backend's activation) run in fresh processes through
``tests/cpu_backend_checks.py``; the end-to-end test runs ``python -m verl.trainer.main_ppo``.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from e2e_utils import cached_tiny_build, cpu_overrides, run_trainer

from recipe.disco.cpu import tiny
from recipe.disco.data import SCHEMA
from recipe.disco.reward import compute_score

CHECKS = Path(__file__).with_name("cpu_backend_checks.py")
QUESTION = re.compile(r"^What is (\d+)\+(\d+)\? (.*)$")


@pytest.fixture(scope="module")
def build() -> tiny.TinyBuild:
    return cached_tiny_build()


@pytest.fixture(scope="module")
def model_and_tokenizer(build):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build.model_dir)
    model = AutoModelForCausalLM.from_pretrained(build.model_dir, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval(), tokenizer


def run_check(name: str, *args: str, backend: bool, cwd: Path) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("DISCO_CPU_BACKEND", "VERL_PLATFORM")}
    if backend:
        env["DISCO_CPU_BACKEND"] = "1"
    result = subprocess.run(
        [sys.executable, str(CHECKS), name, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"check {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


# --- tiny model and task ---------------------------------------------------------------------------------------


def test_tiny_build_is_deterministic_and_reused(build, tmp_path):
    fresh = tiny.build_tiny(tmp_path, seed=0)
    files = ["model/model.safetensors", "model/tokenizer.json", "model/config.json", "train.parquet", "val.parquet"]
    root, fresh_root = build.model_dir.parent, fresh.model_dir.parent
    for name in files:
        assert (root / name).read_bytes() == (fresh_root / name).read_bytes(), name
    stamp = (fresh_root / "model/model.safetensors").stat().st_mtime_ns
    assert tiny.build_tiny(tmp_path, seed=0) == fresh
    assert (fresh_root / "model/model.safetensors").stat().st_mtime_ns == stamp, "a finished build was rebuilt"
    assert tiny.split_problems(1) != tiny.split_problems(0)


def _build_in_a_child(target: str, spec: dict) -> None:
    """A second builder of ``target``, whose own write must never run."""

    def write(staging: Path) -> None:
        raise AssertionError("built again: the build finished while this builder waited was not reused")

    tiny.build_once(Path(target), spec, write)


def _blocked_on_a_lock(pid: int) -> bool:
    """Whether process ``pid`` waits for a file lock (Linux's /proc/locks lists waiters after '->')."""
    return any("->" in line and line.split()[5] == str(pid) for line in Path("/proc/locks").read_text().splitlines())


def test_a_builder_waits_for_a_build_under_way_and_reuses_it(tmp_path):
    target, spec = tmp_path / "build", {"what": "a test build"}
    lock = open(tmp_path / ".build.lock", "w")  # the first builder, here, holds the target's lock
    fcntl.flock(lock, fcntl.LOCK_EX)
    child = multiprocessing.get_context("spawn").Process(target=_build_in_a_child, args=(str(target), spec))
    child.start()
    while not _blocked_on_a_lock(child.pid):  # until the second builder waits for the lock; ending first fails
        assert child.is_alive(), f"the second builder did not wait for the lock (exit code {child.exitcode})"
        time.sleep(0.05)
    target.mkdir()  # the first builder's finished build, then its lock released
    (target / "spec.json").write_text(json.dumps(spec))
    lock.close()
    child.join()
    assert child.exitcode == 0


def test_tiny_rows_use_the_real_data_format(build):
    from recipe.disco.data import PROMPT_SUFFIX

    seen = set()
    for split, path in (("train", build.train_file), ("val", build.val_file)):
        assert pq.read_schema(path).remove_metadata() == SCHEMA
        rows = pd.read_parquet(path).to_dict("records")
        for index, row in enumerate(rows):
            (message,) = row["prompt"]
            a, b, suffix = QUESTION.match(message["content"]).groups()
            assert message["role"] == "user" and suffix == PROMPT_SUFFIX
            assert list(row["reward_model"]["ground_truth"]) == [str(int(a) + int(b))]
            assert row["reward_model"]["style"] == "rule" and row["extra_info"] == {"split": split, "index": index}
            seen.add((int(a), int(b)))
        assert len(rows) == (tiny.NUM_VAL if split == "val" else 100 - tiny.NUM_VAL)
    assert seen == {(a, b) for a in range(10) for b in range(10)}


def test_tiny_tokenizer_survives_the_qwen2_reload(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"  # what transformers 5 builds for model_type qwen2
    messages = [{"role": "user", "content": "What is 3+5? Let's think.\nIn \\boxed{}."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    expected = f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids) == expected
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_project_reward_scores_the_tiny_task():
    assert compute_score("synthetic/addition", "\\boxed{8}", ["8"], require_think=False) == 1.0
    assert compute_score("synthetic/addition", "\\boxed{9}", ["8"], require_think=False) == 0.0
    assert compute_score("synthetic/addition", "8", ["8"], require_think=False) == 0.0  # unboxed: no answer


def sample(model, tokenizer, pairs, n: int):
    """n answers per question (a, b) at temperature 1: prompt ids, response ids and their rewards (len(pairs), n)
    scored by the project's reward function. All the questions' prompts have the same length: no padding."""
    prompts = torch.tensor([tiny.prompt_ids(tokenizer, a, b) for a, b in pairs]).repeat_interleave(n, 0)
    with torch.no_grad():
        output = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=16,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    responses = output[:, prompts.shape[1] :]
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    golds = [str(a + b) for a, b in pairs for _ in range(n)]
    scores = [compute_score("", text, [gold], require_think=False) for text, gold in zip(texts, golds, strict=True)]
    return prompts, responses, torch.tensor(scores).view(len(pairs), n)


def reward_bounds(model, tokenizer, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per question (a, b), exact bounds on the probability that a sampled answer (temperature 1) is rewarded, by
    teacher forcing instead of sampling: at least P(\\boxed{a+b} eos), an answer the reward scores 1, and at most
    1 - P(a+b eos), the bare sum it scores 0."""
    low, high = [], []
    for a, b in pairs:
        prompt, gold = tiny.prompt_ids(tokenizer, a, b), str(a + b)
        boxed, bare = (tokenizer.encode(text, add_special_tokens=False) for text in (tiny.answer(a, b), gold))
        for answer, score in ((boxed, 1.0), (bare, 0.0)):
            assert compute_score(tiny.DATA_SOURCE, tokenizer.decode(answer), [gold], require_think=False) == score
        low.append(_answer_probability(model, prompt, boxed + [tokenizer.eos_token_id]))
        high.append(1 - _answer_probability(model, prompt, bare + [tokenizer.eos_token_id]))
    return torch.tensor(low), torch.tensor(high)


def _answer_probability(model, prompt: list[int], response: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    log_probs = torch.log_softmax(logits.double(), dim=-1).gather(-1, torch.tensor(response)[:, None])
    return log_probs.sum().exp().item()


def test_warm_start_gives_mixed_groups(model_and_tokenizer):
    """Right on some samples, wrong on others: most questions have mixed groups of 8 answers (DisCO needs them).
    Exact probabilities (measured: expected reward between 0.25 and 0.40, mixed groups at least 0.87)."""
    model, tokenizer = model_and_tokenizer
    pairs = [(a, b) for a in range(10) for b in range(10)]
    low, high = reward_bounds(model, tokenizer, pairs)
    assert low.mean() >= 0.1 and high.mean() <= 0.5, (low.mean(), high.mean())
    mixed = 1 - high**8 - (1 - low) ** 8  # at most all 8 right or all 8 wrong
    assert mixed.mean() >= 0.5, mixed.mean()
    knows = (low + 1 - high > 0.5).float().mean()  # the right sum, boxed or bare, is the likelier answer
    assert knows >= 0.9, f"the warm-started model knows only {knows:.0%} of the sums"


def test_tiny_task_is_learnable_by_rl(build):
    """Plain-PyTorch GRPO within the demo's budget (30 steps of 8 questions x 8 answers, Adam at 3e-4) raises the
    reward on the training questions by at least 0.2, from exact bounds before and after. The training samples:
    over six seeds the bound after was 0.71-0.76, against at most 0.40 before."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build.model_dir)
    model = AutoModelForCausalLM.from_pretrained(build.model_dir, attn_implementation="sdpa", dtype=torch.float32)
    train = [QUESTION.match(p[0]["content"]).groups()[:2] for p in pd.read_parquet(build.train_file)["prompt"]]
    train = [(int(a), int(b)) for a, b in train]
    _, before = reward_bounds(model.eval(), tokenizer, train)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    questions = random.Random(0)
    for _ in range(30):
        _grpo_step(model, tokenizer, questions.sample(train, 8), n=8)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad()
    after, _ = reward_bounds(model.eval(), tokenizer, train)
    assert after.mean() >= before.mean() + 0.2, (before.mean(), after.mean())


def _grpo_step(model, tokenizer, pairs, n: int) -> None:
    """Accumulate the GRPO gradient (token-mean, group-normalised advantages, on-policy) of one batch."""
    prompts, responses, rewards = sample(model.eval(), tokenizer, pairs, n)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).view(-1)
    eos = responses == tokenizer.eos_token_id
    mask = ((eos.int().cumsum(1) - eos.int()) == 0).float()  # tokens up to and including the first eos
    logits = model.train()(input_ids=torch.cat([prompts, responses], dim=1)).logits[:, prompts.shape[1] - 1 : -1]
    log_probs = torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0]
    (-(log_probs * advantages[:, None] * mask).sum() / mask.sum()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


# --- activation ------------------------------------------------------------------------------------------------


def test_activation_selects_cpu_platform_gloo_and_hf_rollout(tmp_path):
    run_check("activated", backend=True, cwd=tmp_path)


def test_backend_stays_off_unless_asked(tmp_path):
    run_check("not_activated", backend=False, cwd=tmp_path)


def test_broken_activation_is_visible(tmp_path):
    output = run_check("broken_activation", backend=True, cwd=tmp_path)
    assert "ERROR" in output and "the DisCO CPU backend (DISCO_CPU_BACKEND=1) failed to activate" in output
    assert "device lookup refused: Unknown platform 'cpu'" in output


# --- hf rollout --------------------------------------------------------------------------------------------------


def test_hf_rollout_samples_batched_on_policy_and_takes_weight_updates(build, tmp_path):
    output = run_check("rollout", str(build.model_dir), backend=True, cwd=tmp_path)
    assert "rollout checks passed" in output


# --- verl's stock trainer ----------------------------------------------------------------------------------------


def test_grpo_runs_in_verl_trainer_with_two_ranks(build, tmp_path):
    """``python -m verl.trainer.main_ppo`` (v1 trainer, GRPO, 2 simulated DP ranks over gloo) for 2 steps.

    fp32 actor and temperature 0.7: the actor's old log-probs must equal the rollout's, which after step 1 holds
    only if the rollout received the updated weights (on-policy) and reports log-probs of the tempered policy. The
    entropy bonus gives step 1 a gradient whatever the rewards (GRPO's is zero when every group is all right or all
    wrong), so the weights do change and a rollout left with the old ones would be caught.
    """
    overrides = cpu_overrides(build, steps=2, n_gpus=2) + [
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.actor.entropy_coeff=0.001",
        "actor_rollout_ref.rollout.temperature=0.7",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
    ]
    records = run_trainer("verl.trainer.main_ppo", overrides, tmp_path / "run")
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        metrics = record["data"]
        assert metrics["training/rollout_probs_diff_max"] < 1e-5, metrics["training/rollout_probs_diff_max"]
        assert 0.0 <= metrics["critic/score/mean"] <= 1.0 and metrics["actor/grad_norm"] > 0
        assert metrics["response_length/max"] <= 16
