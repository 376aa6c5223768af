"""The math reward (recipe/disco/reward.py): a table of graded cases, its CPU-time limit, its verifier pool under
load, and verl's reward path.

Expected scores in the tables are the mathematical truth of each case, written by hand; a case math-verify gets
wrong would fail here rather than be adjusted to the code.
"""

from __future__ import annotations

import resource
import subprocess
import sys
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

# answers math-verify cannot check in reasonable time: none finished in 20 CPU seconds here (40x LOAD_LIMIT_S)
SLOW_ANSWER = "(10^{100})!"  # sympy evaluates the factorial
SLOW_ANSWERS = [SLOW_ANSWER, "9^{9^{9^{9}}}", "(10^{7})!", "99^{99^{99}}", "\\frac{1}{" * 60 + "2" + "}" * 60]
LIMIT_S = 1.5  # CPU seconds
# the kernel checks CPU-time limits at clock ticks (1-10 ms), and the CPU time it reports for an ended process can
# differ from the one its timer counts (3-9% less here under load, in a virtual machine)
CPU_TICKS_S = 0.25
HANG_S = 120  # a call that has not returned by then hangs: fail instead of waiting forever
LOAD_ANSWERS = 1000
LOAD_LIMIT_S = 0.5  # CPU seconds; each load-test answer that is not slow needs 1-50 ms here


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


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "10", True])
def test_bad_timeout_is_rejected(bad):
    with pytest.raises(ValueError, match="timeout_s"):
        compute_score("s", r("1"), "1", timeout_s=bad)


@pytest.mark.parametrize("bad", [{"answer": "1"}, True, np.bool_(True), None, ["1", None]])
def test_bad_ground_truth_type_is_rejected(bad):
    with pytest.raises(TypeError, match="ground_truth"):
        compute_score("s", r("1"), bad)


def _children_cpu_s() -> float:
    """CPU seconds used by this process's ended and reaped children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _start_every_verifier() -> None:
    """Wait until every verifier of the pool has started, warmed up and answered a check."""
    pool = reward._get_pool()
    verifiers = [pool._acquire() for _ in range(reward.POOL_SIZE)]
    for verifier in verifiers:
        assert verifier.check(("1/2",), "0.5", timeout_s=60) is True
        pool._release(verifier)


def test_slow_answer_times_out_after_exactly_its_cpu_time():
    _start_every_verifier()  # no start-up left to run in the verifier that gets the slow answer
    cpu_before = {p.pid: sum(p.cpu_times()[:2]) for p in _verifier_processes()}
    reaped_before = _children_cpu_s()
    with ThreadPoolExecutor(1) as executor:  # a hang fails the test instead of stopping it
        result = executor.submit(grade, r(SLOW_ANSWER), "5", timeout_s=LIMIT_S).result(timeout=HANG_S)
    assert result.outcome is Outcome.TIMEOUT and result.score == 0.0
    (ended,) = set(cpu_before) - {p.pid for p in _verifier_processes()}  # killed by the kernel, reaped, replaced
    check_cpu_s = _children_cpu_s() - reaped_before - cpu_before[ended]
    assert abs(check_cpu_s - LIMIT_S) < CPU_TICKS_S
    assert len(_verifier_processes()) == reward.POOL_SIZE


def test_time_a_verifier_waits_for_a_cpu_does_not_count():
    """A busy machine, made deterministic: the verifiers get no CPU at all for many times the limit."""
    assert grade(r("0.5"), "\\frac{1}{2}", timeout_s=60).outcome is Outcome.RIGHT  # pool started
    verifiers = _verifier_processes()
    for process in verifiers:
        process.suspend()
    with ThreadPoolExecutor(1) as executor:
        pending = executor.submit(grade, r("\\frac{3}{4}"), "0.75", timeout_s=0.2)
        time.sleep(1.0)  # under a wall-clock limit this alone would time the answer out
        for process in verifiers:
            process.resume()
        assert pending.result(timeout=HANG_S).outcome is Outcome.RIGHT
    assert {p.pid for p in _verifier_processes()} == {p.pid for p in verifiers}


def test_verifiers_go_to_waiting_calls_first_come_first_served():
    pool = reward._get_pool()
    held = [pool._acquire() for _ in range(reward.POOL_SIZE)]
    served = []

    def call(position: int) -> None:
        verifier = pool._acquire()
        served.append(position)
        pool._release(verifier)

    with ThreadPoolExecutor(3) as executor:
        for position in range(3):
            executor.submit(call, position)
            while len(pool._waiting) < position + 1:  # this call now waits behind the earlier ones
                time.sleep(0.01)
        idle_while_calls_wait = len(pool._idle)  # a new call would take an idle verifier, jumping the queue
        pool._release(held.pop())  # passes from each served call to the one waiting longest
    assert served == [0, 1, 2] and idle_while_calls_wait == 0
    for verifier in held:
        pool._release(verifier)
    assert len(pool._idle) == reward.POOL_SIZE and not pool._waiting


def _load_case(i: int) -> tuple[str, str, Outcome]:
    """Answer ``i`` of the load test and its true outcome: every 50th is slow, the others need math-verify."""
    if i % 50 == 25:
        return SLOW_ANSWERS[i // 50 % len(SLOW_ANSWERS)], "5", Outcome.TIMEOUT
    a, q = 3 + i, (2, 4, 5, 8)[i // 8 % 4]
    fraction, right, wrong = f"\\frac{{{a}}}{{{q}}}", Outcome.RIGHT, Outcome.WRONG
    cases = [
        (fraction, str(a / q), right), (f"\\frac{{{a + q}}}{{{q}}}", str(a / q), wrong),
        (f"{a}/{q}", fraction, right), (f"{a}/{q + 1}", fraction, wrong),
        (f"\\dfrac{{{2 * a}}}{{{2 * q}}}", fraction, right), (f"\\dfrac{{{2 * a}}}{{{q}}}", fraction, wrong),
        (f"x = {a}", str(a), right), (f"x = {a}", str(a + 1), wrong),
    ]  # fmt: skip
    return cases[i % len(cases)]


def test_no_right_answer_times_out_under_load_from_32_threads():
    """verl's reward loop calls the reward from up to 32 threads per process; 2% of these answers never finish.

    The others need 1-50 ms of CPU time each, far below the limit, and nothing else counts against it: no timing
    margin decides the outcome, however long the calls queue behind slow checks or the machine is busy.
    """
    cases = [_load_case(i) for i in range(LOAD_ANSWERS)]

    def score(case: tuple[str, str, Outcome]) -> dict:
        return compute_score_with_info("load", r(case[0]), case[1], timeout_s=LOAD_LIMIT_S)

    with ThreadPoolExecutor(32) as executor:
        infos = list(executor.map(score, cases))
    right = [info for info, (_, _, outcome) in zip(infos, cases, strict=True) if outcome is Outcome.RIGHT]
    assert sum(info["answer_timeout"] for info in right) == 0
    assert all(info["score"] == 1.0 for info in right)
    outcomes = [next(o for o in Outcome if info[o.flag] == 1.0) for info in infos]
    assert outcomes == [outcome for _, _, outcome in cases]
    assert not [p for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]  # ended ones reaped
    assert len(_verifier_processes()) == reward.POOL_SIZE  # and replaced


def test_dead_verifiers_are_replaced():
    grade(r("0.5"), "\\frac{1}{2}", timeout_s=60)
    for process in _verifier_processes():
        process.kill()
        process.wait()
    for _ in range(reward.POOL_SIZE):  # each call takes the next verifier in turn
        assert grade(r("0.5"), "\\frac{1}{2}", timeout_s=60).outcome is Outcome.RIGHT
    assert len(_verifier_processes()) == reward.POOL_SIZE


def test_verifiers_that_cannot_start_stop_the_reward_loudly(tmp_path):
    """A broken install (math-verify not importable) must not score every answer 0 silently: after a restart the
    call raises, naming the check to run. Run in a fresh process whose verifiers import a broken math_verify."""
    (tmp_path / "math_verify.py").write_text("raise ImportError('broken on purpose')\n")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from recipe.disco.reward import compute_score; "
        "compute_score('s', '\\\\boxed{0.5}', '\\\\frac{1}{2}', require_think=False)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode != 0
    assert "math-verify verifier processes fail to start" in done.stderr and "import math_verify" in done.stderr


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # one worker process, reused by both tasks
    yield ray
    ray.shutdown()


def test_slow_answer_times_out_in_a_ray_task(ray_local):
    remote_score = ray_local.remote(compute_score)
    assert ray_local.get(remote_score.remote("s", r("0.5"), "\\frac{1}{2}", timeout_s=60), timeout=HANG_S) == 1.0
    assert ray_local.get(remote_score.remote("s", r(SLOW_ANSWER), "5", timeout_s=LIMIT_S), timeout=HANG_S) == 0.0


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
