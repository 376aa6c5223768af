"""The math reward (recipe/disco/reward.py): a table of graded cases, its hard time limit, and verl's reward path.

Expected scores in the tables are the mathematical truth of each case, written by hand; a case math-verify gets
wrong would fail here rather than be adjusted to the code.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np
import psutil
import pytest
from conftest import compose_disco
from hypothesis import given, settings
from hypothesis import strategies as st

from recipe.disco import reward
from recipe.disco.reward import Outcome, compute_score, compute_score_with_info, grade

SLOW_ANSWER = "(10^{100})!"  # sympy evaluates the factorial: minutes of CPU, little memory
LIMIT_S = 1.5
SLACK_S = 1.0  # IPC, killing the hung worker and starting its replacement


def r(answer: str) -> str:
    """A DeepSeek-R1-Distill style response: reasoning, ``</think>``, a summary with the boxed answer."""
    return f"Okay, let me work this out.\n</think>\n\nSo the final answer is $\\boxed{{{answer}}}$."


# (response, ground truth, expected score)
INTEGERS = [
    (r("42"), "42", 1), (r("43"), "42", 0), (r("25"), "025", 1), (r("025"), "25", 1), (r("25.0"), "25", 1),
    (r("25.5"), "25", 0), (r("1000"), "1,000", 1), (r("1,000"), "1000", 1), (r("1{,}000"), "1000", 1),
    (r("100"), "1000", 0), (r("0"), "0", 1), (r("0"), "1", 0), (r("2.0"), "2", 1),
]  # fmt: skip
FRACTIONS = [
    (r("0.5"), "\\frac{1}{2}", 1), (r("\\frac{1}{2}"), "0.5", 1), (r("\\dfrac{1}{2}"), "\\frac{1}{2}", 1),
    (r("\\tfrac{1}{2}"), "\\frac12", 1), (r("1/2"), "\\frac{1}{2}", 1), (r("\\frac12"), "\\dfrac{1}{2}", 1),
    (r("\\frac{2}{4}"), "\\frac{1}{2}", 1), (r("\\frac{1}{3}"), "\\frac{1}{2}", 0),
    (r("\\dfrac{14}{3}"), "\\frac{14}{3}", 1), (r("\\frac{3}{14}"), "\\frac{14}{3}", 0),
    (r("4\\frac{2}{3}"), "\\frac{14}{3}", 1), (r("0.3888"), "\\frac{243}{625}", 1), (r("0.389"), "\\frac{243}{625}", 0),
    (r("\\frac{-1}{6}"), "-\\frac{1}{6}", 1), (r("-\\dfrac{1}{6}"), "\\frac{-1}{6}", 1),
    (r("\\frac{1}{6}"), "-\\frac{1}{6}", 0),
]  # fmt: skip
DECIMALS = [
    (r("\\frac{3}{20}"), "0.15", 1), (r(".15"), "0.15", 1), (r("0.150"), "0.15", 1), (r("0.16"), "0.15", 0),
    (r("\\frac{5}{4}"), "1.25", 1), (r("1.2"), "1.25", 0), (r("12.5"), "\\frac{25}{2}", 1), (r("3.14"), "\\pi", 0),
]  # fmt: skip
LATEX_SPACING = [
    (r("\\frac {1} {2}"), "\\frac{1}{2}", 1), (r("3 \\sqrt{13}"), "3\\sqrt{13}", 1),
    (r("\\sqrt{117}"), "3\\sqrt{13}", 1),
    (r("\\left( 3, \\frac{\\pi}{2} \\right)"), "\\left( 3, \\frac{\\pi}{2} \\right)", 1),
    (r("(3,\\frac{\\pi}{2})"), "\\left( 3, \\frac{\\pi}{2} \\right)", 1),
    (r("(3, \\pi)"), "\\left( 3, \\frac{\\pi}{2} \\right)", 0), (r("70\\sqrt{2}"), "70 \\sqrt{2}", 1),
    (r("\\sqrt{9800}"), "70 \\sqrt{2}", 1), (r("70\\sqrt{3}"), "70 \\sqrt{2}", 0),
    (r("\\displaystyle \\frac{35}{64}"), "\\frac{35}{64}", 1), (r("\\;\\frac{35}{64}\\,"), "\\frac{35}{64}", 1),
    (r("\\sqrt{242}"), "11\\sqrt2", 1), (r("11\\sqrt{3}"), "11\\sqrt2", 0),
]  # fmt: skip
INTERVALS = [
    (r("[2, 3)"), "[2,3)", 1), (r("(2,3)"), "[2,3)", 0), (r("[2,3]"), "[2,3)", 0),
    (r("(-\\infty, 5]"), "(-\\infty,5]", 1),
    (r("(-\\infty, 5)"), "(-\\infty,5]", 0), (r("(-\\infty,1)\\cup(2,\\infty)"), "(-\\infty, 1) \\cup (2, \\infty)", 1),
    (r("(-\\infty,1]\\cup(2,\\infty)"), "(-\\infty, 1) \\cup (2, \\infty)", 0), (r("[0, \\infty)"), "[0,\\infty)", 1),
]  # fmt: skip
SETS = [
    (r("\\{1,2\\}"), "\\{2,1\\}", 1), (r("\\{1,3\\}"), "\\{2,1\\}", 0), (r("7,5,3"), "3, 5, 7", 1),
    (r("3, 5"), "3, 5, 7", 0),
    (r("-2, 1"), "1,-2", 1), (r("1, 2"), "1,-2", 0), (r("x=1, x=-2"), "1,-2", 1), (r("(6, 31, -1)"), "(6,31,-1)", 1),
    (r("(6,31,1)"), "(6,31,-1)", 0), (r("(31,6,-1)"), "(6,31,-1)", 0),
    (r("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 1),
    (r("\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"), "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 0),
]  # fmt: skip
UNITS = [
    (r("5 \\text{ cm}"), "5", 1), (r("5"), "5 \\text{ cm}", 1), (r("6 \\text{ cm}"), "5", 0), (r("90^\\circ"), "90", 1),
    (r("90"), "90^\\circ", 1), (r("91^\\circ"), "90^\\circ", 0), (r("\\$5"), "5", 1),
    (r("5.4"), "5.4 \\text{ cents}", 1),
    (r("5 \\text{ cents}"), "5.4 \\text{ cents}", 0), (r("41.8^{\\circ}"), "41.8^\\circ", 1),
    (r("12 \\mathrm{~cm}"), "12", 1),
    (r("\\frac{270}{7}"), "\\frac{270}7\\text{ degrees}", 1), (r("20\\text{ inches}"), "20", 1),
    (r("7.5 \\times 10^{3}"), "7500", 1), (r("7500"), "7.5 \\times 10^3", 1), (r("7.5 \\times 10^{4}"), "7500", 0),
    (r("4.5 \\times 10^{33}"), "4.5e33", 1), (r("4.5 \\times 10^{32}"), "4.5e33", 0),
]  # fmt: skip
PERCENT = [
    (r("10\\%"), "10", 1), (r("10"), "10\\%", 1), (r("10%"), "10", 1), (r("4.2\\%"), "4.2", 1), (r("11\\%"), "10", 0),
    (r("10 \\%"), "10", 1),
]  # fmt: skip
MULTIPLE_CHOICE = [
    (r("C"), "\\text{(C)}", 1), (r("\\text{(C)}"), "C", 1), (r("(C)"), "C", 1), (r("\\textbf{(C)}"), "C", 1),
    (r("\\text{C}"), "C", 1), (r("D"), "C", 0), (r("\\text{(B)}"), "\\text{(E)}", 0), (r("B"), "A", 0),
]  # fmt: skip
NEGATIVE = [
    (r("-50"), "-50", 1), (r("- 50"), "-50", 1), (r("50"), "-50", 0), (r("-\\pi/6"), "-\\frac{\\pi}{6}", 1),
    (r("\\frac{\\pi}{6}"), "-\\frac{\\pi}{6}", 0), (r("7i-2"), "-2 + 7i", 1), (r("2 - 7i"), "-2 + 7i", 0),
]  # fmt: skip
NESTED_BRACES = [
    (r("\\frac{\\sqrt{3}}{{2}}"), "\\frac{\\sqrt3}{2}", 1), (r("{\\frac{1}{2}}"), "\\frac{1}{2}", 1),
    (r("2^{\\frac{1}{2}}"), "\\sqrt{2}", 1), (r("\\sqrt{\\frac{1}{4}}"), "\\frac{1}{2}", 1),
    (r("\\frac{\\sqrt{2}}{3}"), "\\frac{\\sqrt{3}}{2}", 0), ("</think> \\boxed{\\{1,2\\}}", "\\{1,2\\}", 1),
]  # fmt: skip
EXPRESSIONS = [
    (r("-1 + x - x^2 + x^3 - x^4 + x^5"), "x^5 - x^4 + x^3 - x^2 + x - 1", 1),
    (r("x^5 - x^4 + x^3 - x^2 + x + 1"), "x^5 - x^4 + x^3 - x^2 + x - 1", 0), (r("p-q"), "p - q", 1),
    (r("q - p"), "p - q", 0), (r("3x + x^3 - 6"), "x^3+3x-6", 1), (r("51^{1/2}"), "\\sqrt{51}", 1),
    (r("\\sqrt{50}"), "\\sqrt{51}", 0), (r("2\\sqrt{2}"), "\\sqrt{8}", 1), (r("5"), "x=5", 1), (r("x = 5"), "5", 1),
    (r("x=6"), "x=5", 0), (r("Evelyn"), "\\text{Evelyn}", 1), (r("\\text{Briana}"), "\\text{Evelyn}", 0),
    (r("\\text{parabola}"), "\\text{ellipse}", 0), (r("52_8"), "52_8", 1),
]  # fmt: skip
NON_ASCII = [
    ("思考……</think>答案是 $\\boxed{12}$。", "12", 1), ("Réponse : </think> donc $\\boxed{12}$ ✓", "12", 1),
    ("</think>Final: $\\boxed{13}$ — done ✓", "12", 0), (r("12 \\text{ yuán}"), "12", 1),
    ("</think> ∴ \\boxed{\\frac{1}{2}} ∎", "0.5", 1),
]  # fmt: skip
GOLD_TYPES = [
    (r("204"), 204, 1), (r("205"), 204, 0), (r("142"), 142.0, 1), (r("142.5"), 142.0, 0), (r("2.5"), 2.5, 1),
    (r("9.6"), np.array(["9.6\n"], dtype=object), 1), (r("9.7"), np.array(["9.6\n"], dtype=object), 0),
    (r("0.02"), ["0.01\n", "0.02\n"], 1), (r("0.01"), ["0.01\n", "0.02\n"], 1), (r("0.03"), ["0.01\n", "0.02\n"], 0),
    (r("6630"), ("6630.65", "6630"), 1), (r("70"), np.int64(70), 1), (r("70"), np.float64(70.0), 1),
    (r("69, 84"), ["$69$,$84$"], 1), (r("69"), ["$69$,$84$"], 0),
    (r("(1,8,19), (2,7,13), (4,5,7)"), ["$(1,8,19), (2,7,13), (4,5,7)$"], 1), (r("4"), "\\boxed{4}", 1),
    (r("5"), "$5$", 1),
    (r("5"), "", 0), (r("5"), [], 0),
]  # fmt: skip
SEVERAL_BOXED = [
    ("</think> First \\boxed{3}, on reflection \\boxed{4}.", "4", 1),
    ("</think> First \\boxed{3}, on reflection \\boxed{4}.", "3", 0),
    ("</think> \\boxed{4} and then \\fbox{5}", "5", 1),
    ("Maybe \\boxed{4}?</think> The answer is \\boxed{5}.", "5", 1),
    ("Maybe \\boxed{4}?</think> The answer is \\boxed{5}.", "4", 0),
    ("a</think> \\boxed{4} </think> \\boxed{5}", "5", 1),
    ("</think> \\boxed {7}", "7", 1),
]  # fmt: skip
NO_BOXED = [
    ("Maybe \\boxed{4}?</think> The answer is 4.", "4", 0), ("</think> The answer is 4.", "4", 0),
    ("</think> The answer is $4$.", "4", 0), ("</think>", "4", 0), ("", "4", 0), ("</think> \\boxed{}", "4", 0),
    ("</think> \\boxed{ }", "4", 0), ("</think> \\boxed{4", "4", 0),
    ("</think> \\boxed{3} then \\boxed{\\frac{4}{", "3", 0),
]  # fmt: skip
TRUNCATED = [
    ("Let me think. The answer is \\boxed{4}", "4", 0), ("<think>\nThe answer is \\boxed{4}", "4", 0),
    ("We need 4... so \\boxed{4} wait, let me recheck", "4", 0),
]  # fmt: skip

TABLE = {
    "integers": INTEGERS, "fractions": FRACTIONS, "decimals": DECIMALS, "latex_spacing": LATEX_SPACING,
    "intervals": INTERVALS, "sets_tuples": SETS, "units": UNITS, "percent": PERCENT,
    "multiple_choice": MULTIPLE_CHOICE, "negative": NEGATIVE, "nested_braces": NESTED_BRACES,
    "expressions": EXPRESSIONS, "non_ascii": NON_ASCII, "gold_types": GOLD_TYPES, "several_boxed": SEVERAL_BOXED,
    "no_boxed": NO_BOXED, "truncated": TRUNCATED,
}  # fmt: skip
CASES = [
    pytest.param(response, gold, expected, id=f"{name}-{i}")
    for name, cases in TABLE.items()
    for i, (response, gold, expected) in enumerate(cases)
]


def _verifier_processes() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if "_serve" in " ".join(p.cmdline())]


def test_table_has_at_least_150_cases():
    assert len(CASES) >= 150


@pytest.mark.parametrize(("response", "gold", "expected"), CASES)
def test_reward_table(response, gold, expected):
    score = compute_score(data_source="test", solution_str=response, ground_truth=gold)
    assert type(score) is float
    assert score == float(expected)


@settings(max_examples=40, deadline=None)
@given(st.integers(-(10**6), 10**6), st.integers(-(10**6), 10**6))
def test_integers_match_exactly_when_equal(answer, gold):
    assert grade(r(str(answer)), str(gold)).score == float(answer == gold)


@settings(max_examples=40, deadline=None)
@given(st.integers(-50, 50), st.integers(1, 50), st.integers(-50, 50), st.integers(1, 50))
def test_fractions_match_by_value(p, q, a, b):
    assert grade(r(f"\\frac{{{p}}}{{{q}}}"), f"{a}/{b}").score == float(Fraction(p, q) == Fraction(a, b))


@pytest.mark.parametrize(
    ("response", "outcome", "pred"),
    [
        (r("\\frac{1}{2}"), Outcome.RIGHT, "\\frac{1}{2}"),
        (r("3"), Outcome.WRONG, "3"),
        ("</think> no box", Outcome.MISSING, ""),
        ("cut off \\boxed{0.5}", Outcome.MISSING, ""),
    ],
)
def test_outcome_flags_in_verl_dict_form(response, outcome, pred):
    info = compute_score_with_info(data_source="aime24", solution_str=response, ground_truth="0.5")
    expected_score = 1.0 if outcome is Outcome.RIGHT else 0.0
    assert info["score"] == info["acc"] == expected_score
    assert {key: info[f"answer_{key}"] for key in ("missing", "wrong", "right", "timeout")} == {
        o.value: float(o is outcome) for o in Outcome
    }
    assert info["pred"] == pred and info["benchmark"] == "aime24"


def test_require_think_false_grades_responses_without_reasoning_tags():
    plain = "The answer is \\boxed{7}."
    assert compute_score("s", plain, "7") == 0.0
    assert compute_score("s", plain, "7", require_think=False) == 1.0
    assert compute_score("s", "<think> cut \\boxed{7}", "7", require_think=False) == 0.0
    assert compute_score("s", "x</think> \\boxed{7}", "7", require_think=False) == 1.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_bad_timeout_is_rejected(bad):
    with pytest.raises(ValueError, match="timeout_s"):
        compute_score("s", r("1"), "1", timeout_s=bad)


@pytest.mark.parametrize("bad", [{"answer": "1"}, True, np.bool_(True), None, ["1", None]])
def test_bad_ground_truth_type_is_rejected(bad):
    with pytest.raises(TypeError, match="ground_truth"):
        compute_score("s", r("1"), bad)


def test_slow_answer_times_out_within_the_limit():
    assert grade(r("0.5"), "\\frac{1}{2}", timeout_s=60).outcome is Outcome.RIGHT  # pool started and warm
    start = time.monotonic()
    result = grade(r(SLOW_ANSWER), "5", timeout_s=LIMIT_S)
    elapsed = time.monotonic() - start
    assert result.outcome is Outcome.TIMEOUT and result.score == 0.0
    assert elapsed < LIMIT_S + SLACK_S
    assert len(_verifier_processes()) == reward.POOL_SIZE  # the hung worker was killed and replaced


def _warm_every_worker() -> None:
    """Until every pool worker has started and answered once (a starting worker is legitimately not killed)."""
    workers = reward._get_pool()._workers.queue
    give_up = time.monotonic() + 120
    while not all(worker._ready for worker in list(workers)) and time.monotonic() < give_up:
        with ThreadPoolExecutor(reward.POOL_SIZE) as executor:
            list(executor.map(lambda _: grade(r("0.5"), "\\frac{1}{2}", timeout_s=60), range(reward.POOL_SIZE)))


def test_slow_answers_from_8_threads_time_out_within_the_limit():
    _warm_every_worker()
    busy = {p.pid for p in _verifier_processes()}  # every worker gets one of the 8 slow answers

    def timed_call(_: int) -> tuple[float, float]:
        start = time.monotonic()
        score = compute_score("s", r(SLOW_ANSWER), "5", timeout_s=LIMIT_S)
        return score, time.monotonic() - start

    with ThreadPoolExecutor(8) as executor:
        results = list(executor.map(timed_call, range(8)))
    assert [score for score, _ in results] == [0.0] * 8
    assert max(elapsed for _, elapsed in results) < LIMIT_S + SLACK_S
    workers = {p.pid for p in _verifier_processes()}
    assert len(workers) == reward.POOL_SIZE and not workers & busy  # hung workers killed (and reaped), replaced
    assert not any(psutil.pid_exists(pid) for pid in busy)
    assert grade(r("0.5"), "\\frac{1}{2}", timeout_s=60).outcome is Outcome.RIGHT


def test_dead_workers_are_replaced():
    grade(r("0.5"), "\\frac{1}{2}", timeout_s=60)
    for process in _verifier_processes():
        process.kill()
        process.wait()
    for _ in range(reward.POOL_SIZE):  # each call takes the next worker from the queue
        assert grade(r("0.5"), "\\frac{1}{2}", timeout_s=60).outcome is Outcome.RIGHT
    assert len(_verifier_processes()) == reward.POOL_SIZE


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # one worker process, reused by both tasks
    yield ray
    ray.shutdown()


def test_slow_answer_times_out_in_a_ray_task(ray_local):
    remote_score = ray_local.remote(compute_score)
    assert ray_local.get(remote_score.remote("s", r("0.5"), "\\frac{1}{2}", timeout_s=60), timeout=120) == 1.0
    start = time.monotonic()
    assert ray_local.get(remote_score.remote("s", r(SLOW_ANSWER), "5", timeout_s=LIMIT_S), timeout=120) == 0.0
    assert time.monotonic() - start < LIMIT_S + SLACK_S


def _tiny_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained on ``texts`` (decodes them back exactly), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>")


def test_verl_naive_reward_manager_logs_the_outcome_flags():
    """The wired function loaded by verl from the recipe YAML and called by verl's naive reward-loop manager."""
    import torch
    from tensordict import TensorDict
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = compose_disco(["reward.custom_reward_function.name=compute_score_with_info"])
    assert config.reward.custom_reward_function.path == "pkg://recipe.disco.reward"
    response_text = "so 1/2.</think> The answer is \\boxed{\\dfrac{1}{2}}."
    tokenizer = _tiny_tokenizer(["What is 0.5 as a fraction?", response_text])
    prompt_ids = tokenizer("What is 0.5 as a fraction?")["input_ids"]
    response_ids = tokenizer(response_text)["input_ids"]
    assert tokenizer.decode(response_ids) == response_text

    prompts = torch.tensor([prompt_ids])
    responses = torch.tensor([response_ids + [tokenizer.pad_token_id] * 3])
    attention_mask = torch.cat([torch.ones_like(prompts), (responses != tokenizer.pad_token_id).long()], dim=1)
    data = DataProto(
        batch=TensorDict({"prompts": prompts, "responses": responses, "attention_mask": attention_mask}, batch_size=1),
        non_tensor_batch={
            "data_source": np.array(["math500"], dtype=object),
            "reward_model": np.array([{"ground_truth": ["0.5"], "style": "rule"}], dtype=object),
            "extra_info": np.array([{"index": 0, "split": "test"}], dtype=object),
        },
    )
    manager = get_reward_manager_cls(config.reward.reward_manager.name)(
        config, tokenizer, compute_score=get_custom_reward_fn(config)
    )
    result = manager.loop.run_until_complete(manager.run_single(data))
    assert result["reward_score"] == 1.0
    extra = result["reward_extra_info"]
    assert extra["acc"] == 1.0 and extra["answer_right"] == 1.0 and extra["answer_timeout"] == 0.0
    assert extra["benchmark"] == "math500"
