"""``python -m recipe.dft.bench`` (recipe/dft/bench.py) on the tiny model with a tiny budget: it times both methods,
counts the tokens the data implies, finds DFT's saved activations larger, and reports how verl's SFT rows differ
from DFT's positives. The expected tokens and rows are computed here from the inputs the bench wrote (its
``--workdir``); nothing is asserted on times but that they are finite and positive (machines and their load
differ)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import verl
from e2e_utils import cached_tiny_build
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from recipe.dft import bench
from recipe.dft.data import negative_choice, prompt_ids, response_ids

B, EXAMPLES, MICRO_BATCH, WARMUP, STEPS = 2, 4, 2, 1, 2
ROUNDS = WARMUP + STEPS  # steps per method with their tokens recorded (the memory step after them is not)
VERL_SFT_CONFIG = Path(verl.__file__).parent / "trainer" / "config" / "sft_trainer_engine.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One bench run with every example in every step (batch = pool), so that step t is epoch t."""
    tmp = tmp_path_factory.mktemp("dft_bench")
    model_dir = str(cached_tiny_build().model_dir)
    argv = ["--model", model_dir, "--examples", str(EXAMPLES), "--batch-size", str(EXAMPLES)]
    argv += ["--micro-batch-size", str(MICRO_BATCH), "--num-negatives", str(B)]
    argv += ["--warmup", str(WARMUP), "--steps", str(STEPS), "--max-new-tokens", "8"]
    argv += ["--workdir", str(tmp / "work"), "--json", str(tmp / "result.json")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        returned = bench.main(argv)
    result = json.loads((tmp / "result.json").read_text())
    return {"result": result, "returned": returned, "printed": printed.getvalue(), "work": tmp / "work",
            "tokenizer": AutoTokenizer.from_pretrained(model_dir)}  # fmt: skip


@pytest.fixture(scope="module")
def expected(run) -> dict:
    """From the bench's inputs: verl's SFT row of each example (the whole conversation's chat template), DFT's data
    output row (prompt + response + EOS), and per step (epoch t) the tokens of each method, DFT's with the epoch's
    negatives from the pool."""
    tokenizer, work = run["tokenizer"], run["work"]
    pool = pd.read_parquet(work / "pool.parquet")
    messages = pd.read_parquet(work / "sft.parquet")["messages"]
    seed = OmegaConf.load(VERL_SFT_CONFIG).trainer.seed  # DFT's negative choice is seeded by trainer.seed
    sft_rows = [tokenizer.apply_chat_template(list(m), tokenize=True, return_dict=False) for m in messages]
    prompts = [prompt_ids(tokenizer, list(prompt)) for prompt in pool["prompt"]]
    positives = [p + response_ids(tokenizer, response) for p, response in zip(prompts, pool["response"])]

    def dft_tokens(epoch: int) -> int:
        total = 0
        for i, (prompt, pool_negatives) in enumerate(zip(prompts, pool["negative_ids"])):
            picks = negative_choice(seed, i, epoch, len(pool_negatives), B)
            total += len(positives[i]) + sum(len(prompt) + len(pool_negatives[k]) for k in picks)
        return total

    return {
        "sft_rows": sft_rows,
        "positives": positives,
        "tokens": {"SFT": [sum(map(len, sft_rows))] * ROUNDS, "DFT": [dft_tokens(epoch) for epoch in range(ROUNDS)]},
    }


def test_times_are_finite_and_positive_and_the_table_is_printed(run):
    result = run["result"]
    for method in bench.METHODS:
        assert math.isfinite(result["step_seconds"][method]) and result["step_seconds"][method] > 0
    assert math.isclose(result["ratio"]["time"], result["step_seconds"]["DFT"] / result["step_seconds"]["SFT"])
    assert run["returned"]["ratio"] == result["ratio"]
    assert "DFT/SFT" in run["printed"]


def test_tokens_per_step_are_what_the_pool_implies(run, expected):
    result = run["result"]
    assert result["tokens_each_step"] == expected["tokens"]
    sft, dft = (sum(expected["tokens"][method]) for method in bench.METHODS)
    assert math.isclose(result["ratio"]["tokens"], dft / sft)
    assert B + 0.5 <= result["ratio"]["tokens"] <= B + 1.5


def test_dft_saves_more_activations_per_micro_batch(run):
    result = run["result"]
    saved = result["saved_bytes_per_micro_batch"]
    assert [len(saved[method]) for method in bench.METHODS] == [EXAMPLES // MICRO_BATCH] * 2
    assert min(saved["SFT"]) > 0 and result["ratio"]["saved_activations"] > 1
    assert result["cuda_peak_bytes"] is None


def test_the_positives_check_reports_how_verls_rows_differ(run, expected):
    result, tokenizer = run["result"], run["tokenizer"]
    sft_rows, positives = expected["sft_rows"], expected["positives"]
    assert result["positives_identical"] == (sft_rows == positives)
    if sft_rows != positives:  # the tiny template ends each turn with "\n", which verl's row keeps (and trains on)
        extra = {tuple(row[len(positive) :]) for row, positive in zip(sft_rows, positives)}
        assert all(row[: len(positive)] == positive for row, positive in zip(sft_rows, positives))
        assert len(extra) == 1 and len(result["positive_differences"]) == 1
        shown = ", ".join(f"{token} {tokenizer.decode([token])!r} (mask 1)" for token in extra.pop())
        assert f"{EXAMPLES} of {EXAMPLES} examples: " in result["positive_differences"][0]
        assert f"verl's SFT row has [{shown}] where DFT's has [nothing]" in result["positive_differences"][0]
        assert "differ" in run["printed"]
