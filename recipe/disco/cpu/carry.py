"""A tiny offline task with a wide spread of difficulty: carrying in sums (the demo's ``--task carry``).

The addition task (``recipe.disco.cpu.tiny``) starts every question near the same success rate, and RL only learns
the answer format. Here the warm-started model knows every sum but often forgets to carry, and the less often the
harder the carry, so the questions' starting success rates p(x) spread from near 0 to near 1, and RL can improve a
skill (carrying), not only a format.

* Questions: ``a+b`` for a in 0..19 and b in 0..9, in tiny's prompt ("What is 17+8? Let's think step by step and
  output the final answer within \\boxed{}."), answered ``\\boxed{25}``, in the real data's parquet schema, scored
  by the project's reward (``require_think=False``). Three levels of the skill:
  ``no-carry`` (12+5: the units do not carry), ``carry`` (7+8=15: the carry writes a new tens digit) and
  ``carry-tens`` (17+8=25: the carry adds to a tens digit).
* Warm start: tiny's model, tokenizer and optimiser, trained on all 200 sums to give each question its right
  answer with probability ``CARRY_RATE[level]``, otherwise the answer with its carry dropped (15 -> 5, 25 -> 15),
  by the mixture's expected loss (``tiny.fit_mixture``): nothing is drawn, so another CPU's arithmetic moves each
  question's rate by a few hundredths at most, and the rates lie 0.1 or more from the bucket bounds. (Version 1
  drew each step's targets and put carry-tens at 0.2, on the bound: its per-question rates moved by up to 0.2 with
  the weights' last bits, and seed 0 put at least 35 % of the training questions certainly in the hard bucket on the
  AMD EPYC machines its tests passed on, 11 % on an Intel Xeon.) Its tokenizer is the one verl loads
  (``AutoTokenizer`` turns it into a ``Qwen2Tokenizer``, whose pre-tokenizer splits digits), so the warm start sees
  exactly the token ids verl's rollout and actor see.
* RL questions: ``SPLITS`` gives each level's numbers of training and held-out questions (all 45 ``carry-tens``
  questions, fewer of the others), drawn by seed. Held-out questions were in the warm start but not in RL, so
  they measure whether what RL learned transfers.
* Difficulty buckets: the starting success rate of each RL question is measured on the warm-started model with
  ``START_SAMPLES`` answers at temperature 1 (as verl's rollout samples) and scored by the project's reward; it
  gives the question's bucket, ``hard`` (p <= 0.2), ``easy`` (p >= 0.8) or ``mid``. The bucket is the row's
  ``data_source`` (``synthetic/carry/<bucket>``), so verl's validation reports held-out accuracy per bucket, and
  ``questions.json`` in the build lists every RL question with its level, split, row index, p and bucket.

``build_carry(directory, seed)`` writes everything into ``directory/carry-seed<seed>`` and returns the paths (a
``TinyBuild``, as ``build_tiny``); it is deterministic by seed and reuses a finished build of the same
specification.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from recipe.disco.cpu import tiny
from recipe.disco.data import write_parquet
from recipe.disco.reward import compute_score

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DATA_SOURCE_PREFIX = "synthetic/carry"
FIRST_OPERANDS, SECOND_OPERANDS = range(20), range(10)
LEVELS = ("no-carry", "carry", "carry-tens")
# probability that a warm-start target of the level is right rather than carry-dropped
# (each level's rate away from the bucket bounds HARD_MAX and EASY_MIN, so that no question sits on a bound)
CARRY_RATE = {"no-carry": 1.0, "carry": 0.4, "carry-tens": 0.1}
SPLITS = {"no-carry": (20, 10), "carry": (20, 10), "carry-tens": (30, 15)}  # (training, held-out) questions
# 600 steps fit every question's rate to within 0.01 on average (seed 0 on an Intel Xeon, teacher-forced: no carry
# 0.99, carry 0.40, carry-tens 0.10). A build whose questions without a carry miss is refused (_check_converged).
WARM_START = dict(steps=600, lr=3e-3)
START_SAMPLES = 32  # answers per question that measure its starting success rate
SAMPLE_MAX_TOKENS = 16  # as the CPU runs' data.max_response_length
HARD_MAX, EASY_MIN = 0.2, 0.8  # bucket bounds on the starting success rate
BUCKETS = ("hard", "mid", "easy")
QUESTION = re.compile(r"What is (\d+)\+(\d+)\?")
SPEC = {
    "task": "carry",
    "version": 2,
    "vocab_size": tiny.VOCAB_SIZE,
    **tiny.MODEL_SHAPE,
    "carry_rate": CARRY_RATE,
    "splits": {level: list(counts) for level, counts in SPLITS.items()},
    **{f"warm_start_{key}": value for key, value in WARM_START.items()},
    "start_samples": START_SAMPLES,
    "buckets": [HARD_MAX, EASY_MIN],
}


@dataclass(frozen=True)
class Question:
    """One RL question of a build, as listed in its ``questions.json``."""

    a: int
    b: int
    level: str
    split: str  # "train" or "val" (held out)
    index: int  # row in the split's parquet file
    start_p: float  # success rate of the warm-started model, from START_SAMPLES answers
    bucket: str

    @property
    def data_source(self) -> str:
        return f"{DATA_SOURCE_PREFIX}/{self.bucket}"


def level(a: int, b: int) -> str:
    """The carrying skill a + b needs."""
    if a % 10 + b < 10:
        return "no-carry"
    return "carry" if a < 10 else "carry-tens"


def carry_dropped(a: int, b: int) -> int:
    """The answer with the carry forgotten: 7+8 -> 5, 17+8 -> 15 (a + b itself when nothing carries)."""
    return a + b - 10 if level(a, b) != "no-carry" else a + b


def bucket(start_p: float) -> str:
    """The difficulty bucket of a starting success rate."""
    if start_p <= HARD_MAX:
        return "hard"
    return "easy" if start_p >= EASY_MIN else "mid"


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in FIRST_OPERANDS for b in SECOND_OPERANDS]


def split_questions(seed: int) -> dict[str, list[tuple[int, int]]]:
    """The RL questions, drawn by ``seed`` per level in ``SPLITS`` numbers: ``train`` and ``val`` (held out)."""
    by_level = defaultdict(list)
    for pair in all_pairs():
        by_level[level(*pair)].append(pair)
    rng = random.Random(seed)
    splits = {"train": [], "val": []}
    for name in LEVELS:
        train, val = SPLITS[name]
        drawn = rng.sample(by_level[name], train + val)
        splits["train"] += drawn[:train]
        splits["val"] += drawn[train:]
    for pairs in splits.values():
        rng.shuffle(pairs)
    return splits


def build_carry(directory: str | Path, seed: int = 0) -> tiny.TinyBuild:
    """Build (or reuse) the carry task's model, tokenizer, parquet files and ``questions.json`` under
    ``directory/carry-seed<seed>``."""
    target = Path(directory) / f"carry-seed{seed}"
    tiny.build_once(target, {**SPEC, "seed": seed}, lambda staging: _write_build(staging, seed))
    return tiny.build_at(target)


def questions_file(build: tiny.TinyBuild) -> Path:
    return build.model_dir.parent / "questions.json"


def read_questions(build: tiny.TinyBuild) -> list[Question]:
    """The RL questions of a carry build, training ones first."""
    return [Question(**record) for record in json.loads(questions_file(build).read_text())]


def _write_build(directory: Path, seed: int) -> None:
    from transformers import AutoTokenizer

    pairs = all_pairs()
    tiny.build_tokenizer(tiny.corpus(pairs)).save_pretrained(directory / "model")
    tokenizer = AutoTokenizer.from_pretrained(directory / "model")  # as verl loads it
    splits = split_questions(seed)
    with torch.random.fork_rng():  # leaves the caller's random state alone
        torch.manual_seed(seed)
        model = tiny.build_model(tokenizer)
        warm_start(model, tokenizer, pairs)
        rates = success_rates(model, tokenizer, splits["train"] + splits["val"], START_SAMPLES, seed)
    model.save_pretrained(directory / "model")
    start_p = dict(zip(splits["train"] + splits["val"], rates, strict=True))
    _check_converged(start_p, seed)
    questions = [
        Question(a, b, level(a, b), split, index, start_p[a, b], bucket(start_p[a, b]))
        for split, split_pairs in splits.items()
        for index, (a, b) in enumerate(split_pairs)
    ]
    for split in splits:
        rows = [_row(question) for question in questions if question.split == split]
        write_parquet(rows, directory / f"{split}.parquet")
    (directory / "questions.json").write_text(json.dumps([asdict(question) for question in questions], indent=0))


def _check_converged(start_p: dict[tuple[int, int], float], seed: int) -> None:
    """Refuse a build whose warm start did not teach the questions without a carry (taught with probability 1):
    their mean starting success rate must reach the easy bucket's bound, else the task has no easy end."""
    no_carry = [p for (a, b), p in start_p.items() if level(a, b) == "no-carry"]
    mean = sum(no_carry) / len(no_carry)
    if mean < EASY_MIN:
        raise RuntimeError(
            f"the carry task's warm start did not converge for seed {seed}: questions without a carry start at mean "
            f"p {mean:.2f} < {EASY_MIN}, so the task lacks its easy end; build another seed"
        )


def _row(question: Question) -> dict:
    return {
        "data_source": question.data_source,
        "prompt": [{"role": "user", "content": tiny.question(question.a, question.b)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": [str(question.a + question.b)]},
        "extra_info": {"split": question.split, "index": question.index},
    }


def warm_start(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[int, int]]) -> None:
    """Supervised steps on all ``pairs`` towards each question's right answer with its level's ``CARRY_RATE``,
    otherwise its carry-dropped answer."""
    prompts = [tiny.prompt_ids(tokenizer, a, b) for a, b in pairs]
    targets = [
        (
            tiny.response_ids(tokenizer, tiny.answer(a, b)),
            tiny.response_ids(tokenizer, f"\\boxed{{{carry_dropped(a, b)}}}"),
        )
        for a, b in pairs
    ]
    rates = torch.tensor([CARRY_RATE[level(a, b)] for a, b in pairs])
    tiny.fit_mixture(model, prompts, targets, rates, steps=WARM_START["steps"], lr=WARM_START["lr"])


def success_rates(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[int, int]], n: int, seed: int
) -> list[float]:
    """Per question a + b, the share of ``n`` answers sampled at temperature 1 (at most ``SAMPLE_MAX_TOKENS``
    tokens, as verl's rollout samples) that the project's reward scores 1. Questions are batched by prompt length,
    so no padding enters the model."""
    prompts = [tiny.prompt_ids(tokenizer, a, b) for a, b in pairs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            answers = tiny.generate_unpadded(
                model,
                tokenizer,
                prompts,
                n,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=SAMPLE_MAX_TOKENS,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
    finally:
        torch.set_num_threads(threads)
    return [
        sum(compute_score("", text, [str(a + b)], require_think=False) for text in texts) / n
        for (a, b), texts in zip(pairs, answers, strict=True)
    ]


def parse_question(prompt: str) -> tuple[int, int]:
    """(a, b) of the question in a prompt text (a rollout dump's decoded input, for example)."""
    match = QUESTION.search(prompt)
    if match is None:
        raise ValueError(f"no 'What is a+b?' question in prompt {prompt[:120]!r}")
    return int(match[1]), int(match[2])
