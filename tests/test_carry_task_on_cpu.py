"""The carry task (``recipe.disco.cpu.carry``): a deterministic build in the real data format whose warm-started
model has a wide spread of starting success rates p(x), from a skill (carrying), not from the answer format.

The spread is checked without sampling, so that it does not depend on which tokens a CPU samples: from the
teacher-forced probability of every answer ``\\boxed{k}<eos>``, k = 0..MAX_ANSWER, the probability of the right
one is a lower bound of p(x) (it scores 1, malformed answers might too) and one minus the probabilities of the
wrong ones an upper bound (they score 0). The bounds are tight when the model boxes a number, which it does with
probability above 0.95 here.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from e2e_utils import TINY_CACHE

from recipe.disco.cpu import carry, tiny
from recipe.disco.data import SCHEMA
from recipe.disco.reward import compute_score

MAX_ANSWER = 39  # sums are at most 28
# measured on the seed-0 build (version 2, Intel Xeon): 43 % of the 70 training questions certainly at p <= 0.2, 29 %
# certainly at p >= 0.8, 29 % certainly between (the build's 32 samples per question: 29, 20 and 21 questions)
MIN_HARD_SHARE, MIN_EASY_SHARE, MIN_MID_SHARE = 0.35, 0.1, 0.15


@pytest.fixture(scope="module")
def build() -> tiny.TinyBuild:
    return carry.build_carry(TINY_CACHE, 0)


@pytest.fixture(scope="module")
def questions(build) -> list[carry.Question]:
    return carry.read_questions(build)


@dataclass(frozen=True)
class Answered:
    """Teacher-forced probabilities of one question's boxed-number answers."""

    right: float  # P(\\boxed{a+b}<eos>), a lower bound of p(x)
    dropped: float  # P(the carry-dropped answer), 0 for no-carry questions
    boxed: float  # P(any \\boxed{k}<eos>, k <= MAX_ANSWER)

    @property
    def upper(self) -> float:
        """1 - P(a wrong boxed number): an upper bound of p(x)."""
        return 1 - (self.boxed - self.right)


@pytest.fixture(scope="module")
def answered(build, questions) -> dict[tuple[int, int], Answered]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build.model_dir)
    model = AutoModelForCausalLM.from_pretrained(build.model_dir, attn_implementation="sdpa", dtype=torch.float32)
    responses = [tiny.response_ids(tokenizer, f"\\boxed{{{k}}}") for k in range(MAX_ANSWER + 1)]
    result = {}
    for q in questions:
        probs = answer_probabilities(model.eval(), tiny.prompt_ids(tokenizer, q.a, q.b), responses)
        dropped = probs[carry.carry_dropped(q.a, q.b)] if q.level != "no-carry" else 0.0
        result[q.a, q.b] = Answered(right=probs[q.a + q.b], dropped=dropped, boxed=float(probs.sum()))
    return result


def answer_probabilities(model, prompt: list[int], responses: list[list[int]]) -> np.ndarray:
    """For each response, the probability that sampling at temperature 1 produces exactly it after ``prompt``."""
    width = len(prompt) + max(map(len, responses))
    input_ids = torch.zeros((len(responses), width), dtype=torch.long)  # right padding, never read
    for row, response in enumerate(responses):
        input_ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=input_ids).logits.double(), -1)
    return np.array(
        [
            float(log_probs[row, len(prompt) - 1 + torch.arange(len(r)), torch.tensor(r)].sum().exp())
            for row, r in enumerate(responses)
        ]
    )


def test_levels_and_forgotten_carries():
    assert [carry.level(*pair) for pair in [(3, 4), (12, 7), (7, 8), (9, 1), (17, 8), (19, 9)]] == [
        "no-carry",
        "no-carry",
        "carry",
        "carry",
        "carry-tens",
        "carry-tens",
    ]
    assert [carry.carry_dropped(*pair) for pair in [(3, 4), (7, 8), (9, 1), (17, 8), (19, 9)]] == [7, 5, 0, 15, 18]
    assert Counter(carry.level(*pair) for pair in carry.all_pairs()) == {"no-carry": 110, "carry": 45, "carry-tens": 45}


def test_question_split_by_seed():
    splits = carry.split_questions(0)
    assert splits == carry.split_questions(0) and splits != carry.split_questions(1)
    assert not set(splits["train"]) & set(splits["val"])
    for split, column in (("train", 0), ("val", 1)):
        counts = Counter(carry.level(*pair) for pair in splits[split])
        assert counts == {level: carry.SPLITS[level][column] for level in carry.LEVELS}


def test_build_is_deterministic_and_reused(tmp_path, monkeypatch):
    """Two builds of one seed are byte-identical whatever the caller's random state, and a finished build is
    reused. Checked on reduced builds (3 warm-start steps, 2 answers per question for p(x)): the full build runs the
    same code for longer, and building it again would cost about 3 min (its 600 warm-start steps)."""
    monkeypatch.setitem(carry.WARM_START, "steps", 3)
    monkeypatch.setattr(carry, "START_SAMPLES", 2)
    with pytest.raises(RuntimeError, match="warm start did not converge for seed 0: questions without a carry"):
        carry.build_carry(tmp_path / "first", 0)  # 3 steps teach nothing: such a build is refused, and not kept
    assert not (tmp_path / "first" / "carry-seed0").exists()
    monkeypatch.setattr(carry, "_check_converged", lambda start_p, seed: None)
    first = carry.build_carry(tmp_path / "first", 0)
    torch.manual_seed(1234)
    random.seed(1234)
    second = carry.build_carry(tmp_path / "second", 0)
    names = ["model/model.safetensors", "model/tokenizer.json", "train.parquet", "val.parquet", "questions.json"]
    for name in names:
        assert (first.model_dir.parent / name).read_bytes() == (second.model_dir.parent / name).read_bytes(), name
    stamp = (second.model_dir / "model.safetensors").stat().st_mtime_ns
    assert carry.build_carry(tmp_path / "second", 0) == second
    assert (second.model_dir / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_rows_are_in_the_real_schema_and_scored_by_the_project_reward(build, questions):
    for split, path in (("train", build.train_file), ("val", build.val_file)):
        table = pq.read_table(path)
        assert table.schema.remove_metadata() == SCHEMA
        mine = [q for q in questions if q.split == split]
        assert [q.index for q in mine] == list(range(len(mine)))
        for row, q in zip(table.to_pylist(), mine, strict=True):
            assert row == {
                "data_source": f"synthetic/carry/{q.bucket}",
                "prompt": [{"role": "user", "content": tiny.question(q.a, q.b)}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": [str(q.a + q.b)]},
                "extra_info": {"split": split, "index": q.index},
            }
            gold = row["reward_model"]["ground_truth"]
            assert compute_score(row["data_source"], tiny.answer(q.a, q.b), gold, require_think=False) == 1.0
            if q.level != "no-carry":
                dropped = f"\\boxed{{{carry.carry_dropped(q.a, q.b)}}}"
                assert compute_score(row["data_source"], dropped, gold, require_think=False) == 0.0
    assert all(q.bucket == carry.bucket(q.start_p) for q in questions)
    assert json.loads(carry.questions_file(build).read_text())[0].keys() == {
        "a", "b", "level", "split", "index", "start_p", "bucket"
    }  # fmt: skip


def test_tokenizer_is_the_one_verl_loads(build):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build.model_dir)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    ids = tokenizer.encode(tiny.answer(17, 8), add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids] == ["\\", "boxed", "{", "2", "5", "}"]  # one token per digit


def test_starting_success_rates_spread_from_hard_to_easy(questions, answered):
    """A large share of the training questions certainly at p <= 0.2, some certainly at p >= 0.8, some certainly
    between: the spread holds on exact bounds, not only on the build's 32 samples per question."""
    train = [answered[q.a, q.b] for q in questions if q.split == "train"]
    lower, upper = np.array([x.right for x in train]), np.array([x.upper for x in train])
    assert (lower <= upper).all()
    hard, easy = (upper <= carry.HARD_MAX).mean(), (lower >= carry.EASY_MIN).mean()
    mid = ((lower > carry.HARD_MAX) & (upper < carry.EASY_MIN)).mean()
    print(f"training questions: certainly hard {hard:.2f}, certainly easy {easy:.2f}, certainly mid {mid:.2f}")
    assert hard >= MIN_HARD_SHARE and easy >= MIN_EASY_SHARE and mid >= MIN_MID_SHARE, (hard, easy, mid)


def test_difficulty_is_the_carry_skill_not_the_format(questions, answered):
    """The model boxes a number (the format is learned), and the harder the carry, the lower its success rate;
    most of its errors on carry questions are the forgotten carry."""
    means = {}
    for level in carry.LEVELS:
        members = [answered[q.a, q.b] for q in questions if q.level == level]
        means[level] = {key: np.mean([getattr(x, key) for x in members]) for key in ("right", "upper", "dropped")}
        boxed = min(x.boxed for x in members)
        print(f"{level}: {means[level]['right']:.3f} <= mean p(x) <= {means[level]['upper']:.3f}, boxed >= {boxed:.3f}")
        assert boxed >= 0.9, level
        if level != "no-carry":
            assert means[level]["dropped"] >= 0.5 * (1 - means[level]["right"]), level
    assert means["no-carry"]["right"] >= 0.75 and means["carry-tens"]["upper"] <= 0.2
    assert (
        means["no-carry"]["right"] > means["carry"]["upper"] and means["carry"]["right"] > means["carry-tens"]["upper"]
    )


def test_buckets_agree_with_the_bounds(questions, answered):
    """The build's sampled start p of each bucket (32 answers per question) lies within the exact bounds on
    average (the standard error of a bucket mean is below 0.02)."""
    for name in carry.BUCKETS:
        members = [q for q in questions if q.bucket == name]
        sampled = np.mean([q.start_p for q in members])
        lower = np.mean([answered[q.a, q.b].right for q in members])
        upper = np.mean([answered[q.a, q.b].upper for q in members])
        assert lower - 0.06 <= sampled <= upper + 0.06, (name, lower, sampled, upper)


def test_parse_question_reads_a_dumped_prompt():
    dumped = f"user\n{tiny.question(17, 8)}\nassistant\n"  # verl's decoded input, special tokens skipped
    assert carry.parse_question(dumped) == (17, 8)
    with pytest.raises(ValueError, match="no 'What is a\\+b\\?' question in prompt 'user\\\\nHello'"):
        carry.parse_question("user\nHello")
