"""Binary math reward for DisCO: the last ``\\boxed{}`` after ``</think>``, checked with math-verify.

Rules (``grade``):

1. Reasoning block: only the text after the first ``</think>`` is graded. A response without ``</think>`` was cut
   off inside its reasoning (the DeepSeek-R1-Distill chat template opens ``<think>`` in the prompt) and has no
   answer. ``require_think=False`` (for models that do not reason in tags) grades the whole response when it
   contains neither ``<think>`` nor ``</think>``.
2. Answer: the content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched; none, an empty one or an
   unclosed one means no answer.
3. Gold: a string, a number or a list of accepted answers (any match counts); a ``\\boxed{}`` inside a gold string is
   unwrapped. Unescaped ``$`` and percent signs are dropped from both sides (``10\\%`` equals ``10``, as in
   DeepScaleR's grader), and a plain number in e-notation (``4.5e33``) is read as such, not as Euler's e.
4. Check: math-verify ``parse`` of both in a ``\\boxed{}``, then ``verify(gold, answer)`` with the gold first.

The check runs in a pool of persistent verifier processes (so it works from any thread, asyncio executor or Ray
worker), ``POOL_SIZE`` per process that scores, handed to calls first come, first served. ``timeout_s`` limits the
CPU time of the check itself, enforced by the kernel in the verifier: past it the verifier ends, the call scores 0.0
with outcome ``timeout`` and a fresh verifier takes its place. The wait for a free verifier, its start-up and the
time it waits for a CPU on a busy machine do not count, so load cannot turn a right answer into a timeout; and as
every check ahead in the queue ends within its own limit, no call waits without bound.

``compute_score`` returns exactly 1.0 or 0.0. ``compute_score_with_info`` (the function wired into
``reward.custom_reward_function``) returns verl's dict form: ``score``, ``acc`` (the same 0/1 value, verl's core
validation metric), one 0/1 flag per outcome (``answer_missing``, ``answer_wrong``, ``answer_right``,
``answer_timeout``), ``pred`` (the extracted answer, for verl's majority vote) and ``benchmark`` (the
data_source, so saved generations can be grouped by benchmark). verl logs the numeric keys per benchmark as
``val-aux/<data_source>/answer_<outcome>/mean@N``: the rate of each outcome.
"""

from __future__ import annotations

import atexit
import collections
import enum
import logging
import math
import numbers
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DEFAULT_TIMEOUT_S = 10.0
POOL_SIZE = min(4, os.cpu_count() or 1)

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_PERCENT = re.compile(r"\\?%")
# a plain number in e-notation such as 4.5e33: math-verify reads a lower-case e as Euler's number
_E_NOTATION = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))e([+-]?\d+)$")


class Outcome(enum.Enum):
    MISSING = "missing"
    WRONG = "wrong"
    RIGHT = "right"
    TIMEOUT = "timeout"

    @property
    def flag(self) -> str:
        """The reward extra-info key of this outcome's 0/1 flag."""
        return f"answer_{self.value}"


@dataclass(frozen=True)
class Grade:
    outcome: Outcome
    answer: str  # the extracted answer, "" when missing

    @property
    def score(self) -> float:
        return 1.0 if self.outcome is Outcome.RIGHT else 0.0


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` in ``text``; None if there is none or it is unclosed."""
    matches = list(_BOX_OPEN.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes the box
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def extract_answer(solution_str: str, require_think: bool = True) -> str | None:
    """The graded answer of a response (rules 1-2 of the module docstring), cleaned; None when missing."""
    if THINK_CLOSE in solution_str:
        text = solution_str.split(THINK_CLOSE, 1)[1]
    elif require_think or THINK_OPEN in solution_str:
        return None
    else:
        text = solution_str
    boxed = last_boxed(text)
    answer = _clean(boxed) if boxed is not None else ""
    return answer or None


def gold_answers(ground_truth: Any) -> list[str]:
    """Accepted gold answers as cleaned strings (rule 3): a string, a number, or a list/tuple/array of them."""
    if hasattr(ground_truth, "tolist"):  # numpy arrays and scalars, as verl hands over parquet lists
        ground_truth = ground_truth.tolist()
    if isinstance(ground_truth, list | tuple):
        return [gold for item in ground_truth for gold in gold_answers(item)]
    if isinstance(ground_truth, numbers.Real) and not isinstance(ground_truth, bool):
        ground_truth = format_number(ground_truth)
    if not isinstance(ground_truth, str):
        raise TypeError(
            f"ground_truth must be a string, a number or a list of them, got {type(ground_truth).__name__}: "
            f"{ground_truth!r}; fix the dataset's reward_model.ground_truth (see recipe/disco/data.py)"
        )
    boxed = last_boxed(ground_truth)
    gold = _clean(boxed if boxed is not None else ground_truth)
    return [gold] if gold else []


def grade(
    solution_str: str, ground_truth: Any, timeout_s: float = DEFAULT_TIMEOUT_S, require_think: bool = True
) -> Grade:
    """Grade one response against its gold answer(s); the check may use ``timeout_s`` seconds of CPU time."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not 0 < timeout_s < math.inf:
        raise ValueError(
            f"timeout_s must be a finite number of CPU seconds > 0, got {timeout_s!r}; "
            "set reward_kwargs.timeout_s to e.g. 10"
        )
    answer = extract_answer(solution_str, require_think)
    if answer is None:
        return Grade(Outcome.MISSING, "")
    golds = gold_answers(ground_truth)
    if answer in golds:
        return Grade(Outcome.RIGHT, answer)
    if not golds:
        return Grade(Outcome.WRONG, answer)
    verdict = _get_pool().verify(tuple(golds), answer, timeout_s)
    if verdict is None:
        return Grade(Outcome.TIMEOUT, answer)
    return Grade(Outcome.RIGHT if verdict else Outcome.WRONG, answer)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    require_think: bool = True,
    **kwargs: Any,
) -> float:
    """verl reward function: exactly 1.0 if the response's final boxed answer matches the gold, else 0.0."""
    return grade(solution_str, ground_truth, timeout_s, require_think).score


def compute_score_with_info(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    require_think: bool = True,
    **kwargs: Any,
) -> dict[str, float | str]:
    """``compute_score`` in verl's dict form: the score plus the outcome flags logged as reward extra info."""
    result = grade(solution_str, ground_truth, timeout_s, require_think)
    info: dict[str, float | str] = {"score": result.score, "acc": result.score}
    for outcome in Outcome:
        info[outcome.flag] = float(result.outcome is outcome)
    info["pred"] = result.answer
    info["benchmark"] = str(data_source)  # not "data_source": that would collide with the batch column in verl v0
    return info


def format_number(value: numbers.Real) -> str:
    """A gold number as text: integers and integral floats without a decimal point (142.0 -> "142")."""
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _clean(text: str) -> str:
    text = _PERCENT.sub("", _UNESCAPED_DOLLAR.sub("", text)).strip()
    return _E_NOTATION.sub(r"\1E\2", text)


# --- verifier processes -----------------------------------------------------------------------------------------


def _boxed(text: str) -> str:
    return "\\boxed{" + text + "}"


def _serve(job_fd: int, result_fd: int) -> None:
    """Verifier process: import and warm up math-verify, then answer (golds, answer, timeout_s) jobs until EOF."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warnings: by design here
    extraction = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

    def check(golds: tuple[str, ...], answer: str) -> bool:
        # math-verify's own timeouts (signal.alarm, wall clock) are off: the CPU-time limit below replaces them
        try:
            parsed_answer = parse(_boxed(answer), extraction, parsing_timeout=None)
            return bool(parsed_answer) and any(
                verify(parse(_boxed(gold), extraction, parsing_timeout=None), parsed_answer, timeout_seconds=None)
                for gold in golds
            )
        except Exception:  # math-verify catches its own errors; anything else is a failed match
            logger.debug("math-verify failed on %r vs %r", answer, golds, exc_info=True)
            return False

    jobs = Connection(job_fd, writable=False)
    results = Connection(result_fd, readable=False)
    # SIGPROF's default action ends the process: that is the time limit (a disposition or mask inherited from the
    # thread that started this process could otherwise ignore or hold it)
    signal.signal(signal.SIGPROF, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGPROF})
    check(("\\frac{1}{2}",), "0.5")  # builds math-verify's parsers, so the first timed check costs what others do
    results.send("ready")
    while True:
        try:
            golds, answer, timeout_s = jobs.recv()
        except EOFError:
            return
        # the kernel ends this process once the check has used timeout_s of CPU time, even inside C code; time
        # spent waiting for a CPU on a busy machine does not count
        signal.setitimer(signal.ITIMER_PROF, timeout_s)
        verdict = check(golds, answer)
        signal.setitimer(signal.ITIMER_PROF, 0)
        results.send(verdict)


class _StartFailed(Exception):
    """The verifier process ended before it was ready (math-verify missing or broken, or killed while starting)."""


class _Verifier:
    """A ``python -c`` child process (not multiprocessing: nothing re-imports the caller's ``__main__``)."""

    def __init__(self) -> None:
        job_read, job_write = os.pipe()
        result_read, result_write = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        code = f"from recipe.disco.reward import _serve; _serve({job_read}, {result_write})"
        self._process = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(job_read, result_write), stdin=subprocess.DEVNULL, env=env
        )
        os.close(job_read)
        os.close(result_write)
        self._jobs = Connection(job_write, readable=False)
        self._results = Connection(result_read, writable=False)
        self._ready = False

    def check(self, golds: tuple[str, ...], answer: str, timeout_s: float) -> bool | None:
        """The verdict; None if the check used up ``timeout_s`` of CPU time (the process has then ended).

        Raises _StartFailed if the process ended before it was ready, EOFError or OSError if it died later (killed
        from outside).
        """
        if not self._ready:
            try:
                self._results.recv()  # start-up and warm-up count against no call's time limit
            except EOFError:
                raise _StartFailed(f"exit status {self._process.wait()}") from None
            self._ready = True
        self._jobs.send((golds, answer, timeout_s))
        try:
            return self._results.recv()
        except EOFError:
            if self._process.wait() == -signal.SIGPROF:
                return None
            raise

    def restart(self) -> _Verifier:
        """Kill this process (if it still runs) and start its replacement."""
        self.kill()
        return _Verifier()

    def kill(self) -> None:
        self._process.kill()
        self._process.wait()
        self._jobs.close()
        self._results.close()


class _VerifierPool:
    """``size`` verifier processes, handed to calls first come, first served; one that ends is replaced.

    A call waits for a free verifier behind at most the calls that arrived before it, and each of those holds a
    verifier for at most its ``timeout_s`` of CPU time (plus starting a replacement): the wait is bounded.
    """

    def __init__(self, size: int):
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._idle = collections.deque(_Verifier() for _ in range(size))
        self._waiting: collections.deque[queue.SimpleQueue[_Verifier]] = collections.deque()  # one per waiting call

    def verify(self, golds: tuple[str, ...], answer: str, timeout_s: float) -> bool | None:
        """math-verify's verdict for ``answer`` against any of ``golds``; None if the check ran out of CPU time."""
        verifier = self._acquire()
        try:
            for attempt in range(2):
                try:
                    verdict = verifier.check(golds, answer, timeout_s)
                except _StartFailed as failure:  # twice in a row is a broken install: fail loudly, score nothing
                    verifier = verifier.restart()
                    if attempt:
                        raise RuntimeError(
                            f"math-verify verifier processes fail to start ({failure}, twice in a row); check that "
                            f"`{sys.executable} -c 'import math_verify'` works where the reward runs"
                        ) from None
                    continue
                except (EOFError, OSError):  # it had died (killed from outside): retry once
                    verifier = verifier.restart()
                    continue
                if verdict is None:
                    verifier = verifier.restart()
                return verdict
            logger.warning("math-verify verifiers died twice while checking %r; scoring it as wrong", answer[:200])
            return False
        except BaseException:  # interrupted between job and verdict: its late verdict must not answer the next call
            verifier = verifier.restart()
            raise
        finally:
            self._release(verifier)

    def close(self) -> None:
        """Kill the idle verifiers (at interpreter exit)."""
        with self._lock:
            while self._idle:
                self._idle.popleft().kill()

    def _acquire(self) -> _Verifier:
        with self._lock:
            if self._idle:  # never while calls wait: a release hands its verifier to the first of them
                return self._idle.popleft()
            handoff: queue.SimpleQueue[_Verifier] = queue.SimpleQueue()
            self._waiting.append(handoff)
        try:
            return handoff.get()
        except BaseException:  # interrupted while waiting: leave the queue, or pass on a verifier handed over meanwhile
            with self._lock:
                handed_over = handoff not in self._waiting
                if not handed_over:
                    self._waiting.remove(handoff)
            if handed_over:
                self._release(handoff.get())
            raise

    def _release(self, verifier: _Verifier) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().put(verifier)
            else:
                self._idle.append(verifier)


_pool: _VerifierPool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _VerifierPool:
    """The process's verifier pool, started on first use (and again in a forked child)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():
            _pool = _VerifierPool(POOL_SIZE)
            atexit.register(_pool.close)
        return _pool
