"""The CPU demo: DisCO trained by verl's real trainer on a tiny model and task, on a laptop.

    python -m recipe.disco.demo [--task addition|carry] [--out DIR] [--compare grpo drgrpo disco-b lratio]
                                [--steps N] [--seeds S [S ...]] [--lr LR | METHOD=LR ...] [--level R]
                                [--rollout hf|vllm]

It builds a tiny offline model and task into ``DIR`` (``--task addition``, the default: ``recipe.disco.cpu.tiny``;
``--task carry``: ``recipe.disco.cpu.carry``, questions with a wide spread of starting difficulty), trains it with
``python -m recipe.disco.main_disco`` on the CPU backend (``DISCO_CPU_BACKEND=1``, two simulated data-parallel
ranks, the ``hf`` rollout), prints verl's progress bar and per-step metrics, and writes into ``DIR`` (default
``./disco_demo``), per method and seed (``<method>/``, or ``<method>/seed<S>/`` with several seeds):

* ``metrics.jsonl``: verl's ``file`` logger, one record per step; ``trainer.log``: the whole output of the run;
  ``done.json``: the command of a finished run, which a later demo with the same command reuses instead of
  training again;
* carry task only: ``rollouts/<step>.jsonl``, verl's rollout dumps (``trainer.rollout_data_dir``), and
  ``difficulty.jsonl``, computed from them in verl's file-logger format: per step and difficulty bucket (the
  question's starting success rate) the training accuracy and the share of the update's weight, and at each
  validation the accuracy over all held-out questions;
* ``demo_curves.png``: the panels of ``recipe.disco.plot`` (5-step trailing means; several seeds of a method as
  their mean with a 95 % band);
* ``summary.md``: one row per run, and with several seeds the mean over seeds with a 95 % interval per method and
  the paired t-test of DisCO against each other method on the primary metric (also printed).

``--compare`` adds runs of other methods with the same prompts, seeds, step budget and batch sizes: ``grpo``
(verl's own ``main_ppo`` with the ``grpo`` estimator and ``vanilla`` PPO-clip loss on the same ``disco_trainer``
config), ``drgrpo`` (the same without the std normalisation of the advantage, ``norm_adv_by_std_in_grpo=False``),
``disco-b`` (``objective=disco-b``) and ``lratio`` (``score_func=Lratio``, tau=1 as in the paper). ``--lr`` sets
the learning rate of every method, or per method with ``METHOD=LR``.

``--rollout vllm`` generates with verl's own vLLM rollout instead of the ``hf`` stand-in, in the environment of
``recipe/disco/cpu/vllm_env.sh`` (vLLM's CPU build, ``recipe.disco.cpu.vllm``): the engine starts from dummy weights
and becomes the model at the actor's first weight sync, as on GPUs. vLLM's CPU attention needs a head dimension of
32, so the addition task is built with ``tiny.VLLM_MODEL_SHAPE`` (``tiny-vllm-seed<S>``; its figures differ from
the default build's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from recipe.disco.config import DisCOPolicyLossConfig
from recipe.disco.cpu import carry
from recipe.disco.cpu.launch import cpu_overrides, run_trainer
from recipe.disco.cpu.tiny import DATA_SOURCE, VLLM_MODEL_SHAPE, TinyBuild, build_tiny
from recipe.disco.objective import Answers, answer_coefficients
from recipe.disco.plot import CONFIDENCE, mean_and_halfwidth, plot_runs, smoothed, student_t_cdf

CONFIG_DIR = Path(__file__).with_name("config")
POLICY_LOSS = "actor_rollout_ref.actor.policy_loss"
DEFAULT_OUT = "disco_demo"
STEPS = 30  # the reward levels off by step 30; the default demo takes 2.5 minutes on 2 CPU cores
LEVEL = 0.6
WINDOW = 5  # steps averaged for the start/final figures, the level crossing and the plotted curves
# The tiny tasks' budget, the same for every method: 8 questions x 8 answers per step in 2 optimizer steps of
# 4 questions (so the second one runs off-policy and DisCO's trust region acts, as with the paper's 4 per step),
# AdamW at a constant 3e-4 (``--lr``), sampling at temperature 1. DisCO keeps the paper's delta=1e-4, beta=1e3, tau=10.
BUDGET = dict(prompts_per_step=8, rollout_n=8, mini_batches=2, lr=3e-4)
VAL_EVERY = 5  # held-out accuracy before training and every VAL_EVERY steps
REWARD, ENTROPY = "critic/score/mean", "actor/entropy"
VAL_ACCURACY = f"val-core/{DATA_SOURCE}/acc/mean@1"
SHOWN = (REWARD, ENTROPY, "actor/pg_loss", "actor/disco/kl", "actor/disco/constraint_active")
SHOWN_VAL = re.compile(r"val-core/.+/acc/mean@\d+")  # held-out accuracy of each data source (bucket)
STEP_LINE = re.compile(r"\bstep:(\d+) - (.*)")
NUMPY_SCALAR = re.compile(r"np\.\w+\((.*)\)")  # how verl's console logger prints numpy values
HELDOUT_SAMPLES = 4  # carry task: held-out answers per question, sampled as in training (temperature 1)
HELDOUT = "difficulty/heldout_acc"
BUCKET_VAL = re.compile(rf"val-core/{re.escape(carry.DATA_SOURCE_PREFIX)}/(\w+)/acc/mean@\d+")


@dataclass(frozen=True)
class StepAnswers:
    """The answers of one training step: question id (0..G-1), reward and number of response tokens of each."""

    question: np.ndarray
    score: np.ndarray
    length: np.ndarray


def grpo_weights(answers: StepAnswers, std_normalised: bool) -> np.ndarray:
    """Each answer's weight in GRPO's token-mean update, |A_i| * |y_i| (the same normaliser 1/#tokens for all),
    with A_i from verl's own GRPO advantage function on the step's rewards."""
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    length = torch.as_tensor(answers.length)
    mask = (torch.arange(int(length.max()))[None, :] < length[:, None]).float()
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(length)), length - 1] = torch.as_tensor(answers.score, dtype=torch.float32)
    advantages, _ = compute_grpo_outcome_advantage(
        rewards, mask, answers.question, norm_adv_by_std_in_grpo=std_normalised
    )
    return advantages.abs().sum(-1).double().numpy()


def disco_weights(answers: StepAnswers, objective: str) -> np.ndarray:
    """Each answer's weight in DisCO's update, |dJ/ds_i| (its score is a token mean, so its tokens' coefficients
    sum to that), by autograd through ``recipe.disco.objective`` on policy (KL 0, no penalty).

    Within a mixed question these sum to 2 whatever the scores (1 over the positives, 1 over the softmax- or
    mean-weighted negatives), so the scores, which the dumps do not hold, are set to 0."""
    num_questions = int(answers.question.max()) + 1
    policy = Answers(
        s=torch.zeros(len(answers.score), dtype=torch.float64),
        kl_sum=torch.zeros(len(answers.score), dtype=torch.float64),
        num_tokens=torch.as_tensor(answers.length),
        group=torch.as_tensor(answers.question),
        positive=torch.as_tensor(answers.score) == 1,
        num_groups=num_questions,
    )
    coefficients, _, _ = answer_coefficients(policy, DisCOPolicyLossConfig(objective=objective), num_questions)
    return (coefficients[:, 0].abs() * num_questions).numpy()


@dataclass(frozen=True)
class Method:
    label: str
    module: str
    update_weights: Callable[[StepAnswers], np.ndarray]
    overrides: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()  # Hydra flags, which must come before the overrides


GRPO_FLAGS = (f"--config-path={CONFIG_DIR}", "--config-name=disco_trainer")
GRPO = ("algorithm.adv_estimator=grpo", f"{POLICY_LOSS}.loss_mode=vanilla")
METHODS = {
    "disco": Method("DisCO (logL, tau=10)", "recipe.disco.main_disco", partial(disco_weights, objective="disco")),
    "grpo": Method("GRPO", "verl.trainer.main_ppo", partial(grpo_weights, std_normalised=True), GRPO, flags=GRPO_FLAGS),
    "drgrpo": Method(
        "Dr. GRPO (no std normalisation)",
        "verl.trainer.main_ppo",
        partial(grpo_weights, std_normalised=False),
        (*GRPO, "algorithm.norm_adv_by_std_in_grpo=False"),
        flags=GRPO_FLAGS,
    ),
    "disco-b": Method(
        "DisCO-b (logL)",
        "recipe.disco.main_disco",
        partial(disco_weights, objective="disco-b"),
        (f"{POLICY_LOSS}.objective=disco-b",),
    ),
    "lratio": Method(  # on policy the Lratio score has the logL score's gradient
        "DisCO (Lratio, tau=1)",
        "recipe.disco.main_disco",
        partial(disco_weights, objective="disco"),
        (f"{POLICY_LOSS}.score_func=Lratio", f"{POLICY_LOSS}.tau=1"),
    ),
}


@dataclass(frozen=True)
class Task:
    build: Callable[[Path, int], TinyBuild]
    overrides: tuple[str, ...] = ()
    by_difficulty: bool = False  # rollout dumps, per-bucket metrics and the held-out summary


TASKS = {
    "addition": Task(build_tiny),
    "carry": Task(
        carry.build_carry,
        overrides=(  # held-out accuracy sampled like the training answers, so that it moves with p(x)
            "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
            "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
            f"actor_rollout_ref.rollout.val_kwargs.n={HELDOUT_SAMPLES}",
        ),
        by_difficulty=True,
    ),
}


def method_command(
    name: str,
    build: TinyBuild,
    steps: int,
    seed: int,
    lr: float = BUDGET["lr"],
    task: str = "addition",
    rollout_dir: Path | None = None,
    rollout: str = "hf",
) -> tuple[str, list[str]]:
    """The module and arguments of one method's run: the CPU launcher's, the demo's budget and task, then the
    method's."""
    method = METHODS[name]
    demo = [
        f"data.seed={seed}",  # the same questions in the same order for every method
        f"actor_rollout_ref.rollout.seed={seed}",
        "trainer.val_before_train=True",
        f"trainer.test_freq={VAL_EVERY}",
        "trainer.project_name=disco_demo",
        f"trainer.experiment_name={name}",
        *TASKS[task].overrides,
        *([f"trainer.rollout_data_dir={rollout_dir}"] if rollout_dir is not None else []),
    ]
    budget = {**BUDGET, "lr": lr, "rollout": rollout}
    return method.module, [*method.flags, *cpu_overrides(build, steps=steps, **budget), *demo, *method.overrides]


def show_progress(line: str) -> None:
    """Print verl's progress bar, and its per-step console line cut to the metrics in ``SHOWN``."""
    if "Training Progress" in line:
        print("Training Progress" + line.rsplit("Training Progress", 1)[1], flush=True)
    elif match := STEP_LINE.search(line):
        metrics = dict(item.split(":", 1) for item in match[2].split(" - ") if ":" in item)
        keys = [*SHOWN, *sorted(key for key in metrics if SHOWN_VAL.fullmatch(key))]
        shown = [f"{key}:{_short(metrics[key])}" for key in keys if key in metrics]
        print(" - ".join([f"step:{match[1]}", *shown]), flush=True)


def _short(value: str) -> str:
    """A logged value (``0.25``, ``np.float64(0.25)``) to 4 significant digits, other text as it is."""
    scalar = NUMPY_SCALAR.fullmatch(value.strip())
    try:
        return f"{float(scalar[1] if scalar else value):.4g}"
    except ValueError:
        return value


def run_method(
    name: str, build: TinyBuild, workdir: Path, steps: int, seed: int, lr: float, task: str, rollout: str = "hf"
) -> list[dict]:
    """Train one method from ``workdir`` (or reuse its finished run of the same command); return its file-logger
    records (``workdir/metrics.jsonl``), with the carry task's per-bucket records written to
    ``workdir/difficulty.jsonl``."""
    rollout_dir = workdir / "rollouts" if TASKS[task].by_difficulty else None
    module, args = method_command(name, build, steps, seed, lr, task, rollout_dir, rollout)
    done = workdir / "done.json"
    command = {"module": module, "args": args}
    if done.is_file() and json.loads(done.read_text()) == command:
        print(f"\n=== {name}, seed {seed}: reusing the finished run in {workdir}", flush=True)
        return _read_jsonl(workdir / "metrics.jsonl")
    done.unlink(missing_ok=True)
    if rollout_dir is not None:
        shutil.rmtree(rollout_dir, ignore_errors=True)
    print(f"\n=== {name}: python -m {module} {shlex.join(args)}\n(full output: {workdir / 'trainer.log'})", flush=True)
    start = time.monotonic()
    records = run_trainer(module, args, workdir, timeout_s=3600, echo=show_progress)
    print(f"=== {name}, seed {seed}: {steps} steps in {time.monotonic() - start:.0f} s", flush=True)
    if rollout_dir is not None:
        difficulty = difficulty_records(rollout_dir, records, build, name)
        (workdir / "difficulty.jsonl").write_text("".join(json.dumps(record) + "\n" for record in difficulty))
    done.write_text(json.dumps(command))
    return records


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- the carry task: per-bucket metrics from verl's rollout dumps -----------------------------------------------


def difficulty_records(rollout_dir: Path, records: list[dict], build: TinyBuild, method: str) -> list[dict]:
    """File-logger records of the difficulty metrics: per training step (rollout dump ``<step>.jsonl``) and bucket
    ``difficulty/<bucket>/train_acc`` and ``.../weight_share``; per validation ``difficulty/heldout_acc``, the
    accuracy over all held-out questions from verl's per-bucket validation metrics."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build.model_dir)
    questions = carry.read_questions(build)
    train = {(q.a, q.b): q.bucket for q in questions if q.split == "train"}
    heldout_counts = {b: sum(q.split == "val" and q.bucket == b for q in questions) for b in carry.BUCKETS}
    by_step: dict[int, dict] = {}
    for record in records:
        if (accuracy := heldout_accuracy(record["data"], heldout_counts)) is not None:
            by_step.setdefault(record["step"], {})[HELDOUT] = accuracy
    for dump in sorted(rollout_dir.glob("*.jsonl"), key=lambda path: int(path.stem)):
        answers = _read_jsonl(dump)
        lengths = [response_length(tokenizer, answer["output"]) for answer in answers]
        metrics = step_bucket_metrics(answers, lengths, train, METHODS[method].update_weights)
        by_step.setdefault(int(dump.stem), {}).update(metrics)
    return [{"step": step, "data": data} for step, data in sorted(by_step.items())]


def response_length(tokenizer, output: str) -> int:
    """Tokens of a dumped response: its text re-tokenised, plus the eos that ended it, at most the rollout's limit.

    The dump holds decoded text, so a response the model spelled in non-canonical tokens is counted as its
    canonical tokenisation."""
    return min(len(tokenizer.encode(output, add_special_tokens=False)) + 1, carry.SAMPLE_MAX_TOKENS)


def step_bucket_metrics(
    answers: list[dict],
    lengths: list[int],
    bucket_of: dict[tuple[int, int], str],
    update_weights: Callable[[StepAnswers], np.ndarray],
) -> dict[str, float | None]:
    """Training accuracy and share of the update's weight of each bucket in one step's answers (verl's dump
    records: ``input``, ``output``, ``score``, and ``uid`` = ``<question uid>_<rollout>_<answer>``). A bucket
    without questions in the step has no accuracy (None); a step without weight has no shares."""
    uids = [answer["uid"].rsplit("_", 2)[0] for answer in answers]
    question_ids = {uid: index for index, uid in enumerate(dict.fromkeys(uids))}
    buckets = np.array([bucket_of[carry.parse_question(answer["input"])] for answer in answers])
    scores = np.array([float(answer["score"]) for answer in answers])
    weights = update_weights(
        StepAnswers(np.array([question_ids[uid] for uid in uids]), scores, np.array(lengths, dtype=np.int64))
    )
    metrics: dict[str, float | None] = {}
    for name in carry.BUCKETS:
        mine = buckets == name
        metrics[f"difficulty/{name}/train_acc"] = float(scores[mine].mean()) if mine.any() else None
        share = weights[mine].sum() / weights.sum() if weights.sum() > 0 else None
        metrics[f"difficulty/{name}/weight_share"] = None if share is None else float(share)
    return metrics


def heldout_accuracy(data: dict, counts: dict[str, int]) -> float | None:
    """Accuracy over all held-out questions from verl's per-bucket validation means (None if none logged)."""
    means = {match[1]: value for key, value in data.items() if (match := BUCKET_VAL.fullmatch(key))}
    if not means:
        return None
    missing = [name for name, count in counts.items() if count and name not in means]
    if missing:
        raise ValueError(f"validation logged buckets {sorted(means)} but not {missing}, which hold held-out questions")
    return sum(counts[name] * means[name] for name in means) / sum(counts[name] for name in means)


# --- summaries -------------------------------------------------------------------------------------------------


def _series(records: list[dict], key: str) -> np.ndarray:
    return np.array([r["data"][key] for r in records if r["data"].get(key) is not None])


@dataclass(frozen=True)
class Summary:
    start_reward: float  # mean training reward of the first WINDOW steps
    final_reward: float  # ... of the last WINDOW steps
    steps_to_level: int | None  # first step whose WINDOW-step trailing mean reward reaches the level
    final_entropy: float  # mean entropy of the last WINDOW steps
    final_val_accuracy: float | None  # held-out greedy accuracy at the last validation


def summarize(records: list[dict], level: float) -> Summary:
    """The table's figures for one run's file-logger records (the validation-only record of step 0 is skipped)."""
    records = sorted(records, key=lambda record: record["step"])
    steps = [record for record in records if REWARD in record["data"]]
    reward, entropy = _series(steps, REWARD), _series(steps, ENTROPY)
    reached = np.flatnonzero(smoothed(reward, WINDOW) >= level)
    val = _series(records, VAL_ACCURACY)
    return Summary(
        start_reward=float(reward[:WINDOW].mean()),
        final_reward=float(reward[-WINDOW:].mean()),
        steps_to_level=steps[reached[0]]["step"] if len(reached) else None,
        final_entropy=float(entropy[-WINDOW:].mean()),
        final_val_accuracy=float(val[-1]) if len(val) else None,
    )


def summary_table(summaries: dict[str, Summary], level: float, steps: int) -> str:
    """A Markdown table of the summaries, one row per run."""
    header = (
        f"| method | reward, first {WINDOW} steps | reward, last {WINDOW} steps | first step with {WINDOW}-step mean "
        f">= {level:g} | entropy, last {WINDOW} steps | held-out greedy accuracy, end |\n|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {label} | {s.start_reward:.3f} | {s.final_reward:.3f} | "
        f"{s.steps_to_level if s.steps_to_level is not None else f'not within {steps}'} | {s.final_entropy:.3f} | "
        f"{'-' if s.final_val_accuracy is None else f'{s.final_val_accuracy:.2f}'} |"
        for label, s in summaries.items()
    ]
    return header + "\n".join(rows) + "\n"


@dataclass(frozen=True)
class DifficultySummary:
    """The carry task's figures of one run; ``heldout_mean`` is the primary metric of the DisCO vs GRPO protocol."""

    heldout_mean: float  # held-out accuracy averaged over the validations after step 0 (area under its curve)
    heldout_end: float  # ... at the last validation
    steps_to_level: int | None  # first validation step with held-out accuracy >= the level
    hard_train_acc: float  # training accuracy of the hard bucket, averaged over the steps with hard questions
    final_reward: float  # training reward of the last WINDOW steps
    final_entropy: float  # entropy of the last WINDOW steps
    weight_share: dict[str, float]  # per bucket, averaged over steps


def summarize_difficulty(records: list[dict], difficulty: list[dict], level: float) -> DifficultySummary:
    """The carry task's figures from verl's records and the demo's difficulty records of one run."""
    steps = [record for record in sorted(records, key=lambda r: r["step"]) if REWARD in record["data"]]
    validations = sorted((r["step"], r["data"][HELDOUT]) for r in difficulty if HELDOUT in r["data"])
    after_start = [accuracy for step, accuracy in validations if step > 0]
    reached = [step for step, accuracy in validations if accuracy >= level]
    return DifficultySummary(
        heldout_mean=float(np.mean(after_start)),
        heldout_end=float(validations[-1][1]),
        steps_to_level=reached[0] if reached else None,
        hard_train_acc=float(_series(difficulty, "difficulty/hard/train_acc").mean()),
        final_reward=float(_series(steps, REWARD)[-WINDOW:].mean()),
        final_entropy=float(_series(steps, ENTROPY)[-WINDOW:].mean()),
        weight_share={b: float(_series(difficulty, f"difficulty/{b}/weight_share").mean()) for b in carry.BUCKETS},
    )


def start_histogram(questions: list[carry.Question], seed: int) -> str:
    """One line on a build's training questions: how many per bucket and per tenth of the starting p(x)."""
    train = [q.start_p for q in questions if q.split == "train"]
    counts = {name: sum(carry.bucket(p) == name for p in train) for name in carry.BUCKETS}
    tenths, _ = np.histogram(train, bins=np.linspace(0, 1, 11))
    return (
        f"seed {seed}: {len(train)} training questions, starting p(x) from {carry.START_SAMPLES} answers each: "
        + ", ".join(f"{name} {count}" for name, count in counts.items())
        + f"; per tenth of p from 0 to 1: {' '.join(map(str, tenths))}"
    )


def difficulty_columns(level: float) -> list[tuple[str, Callable[[DifficultySummary], float | None]]]:
    """(column title, figure) of the carry task's tables; the first is the primary metric."""
    return [
        ("held-out accuracy, mean over validations after step 0 (primary)", lambda s: s.heldout_mean),
        ("held-out accuracy, end", lambda s: s.heldout_end),
        (f"first validation step with held-out accuracy >= {level:g}", lambda s: s.steps_to_level),
        ("hard-bucket training accuracy, mean over steps", lambda s: s.hard_train_acc),
        (f"reward, last {WINDOW} steps", lambda s: s.final_reward),
        (f"entropy, last {WINDOW} steps", lambda s: s.final_entropy),
        *((f"weight share, {b}", partial(lambda s, b: s.weight_share[b], b=b)) for b in carry.BUCKETS),
    ]


def _cell(value: float | None, steps: int) -> str:
    if value is None:
        return f"not within {steps}"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def difficulty_tables(summaries: dict[str, dict[int, DifficultySummary]], level: float, steps: int) -> str:
    """Markdown: one row per run; with several seeds, the mean over seeds with its 95 % interval per method and
    the paired t-test of the first method against each other one on the primary metric."""
    columns = difficulty_columns(level)
    header = "| method | seed | " + " | ".join(title for title, _ in columns) + " |\n|" + "---|" * (len(columns) + 2)
    rows = [
        f"| {label} | {seed} | " + " | ".join(_cell(figure(s), steps) for _, figure in columns) + " |"
        for label, by_seed in summaries.items()
        for seed, s in by_seed.items()
    ]
    tables = [header + "\n" + "\n".join(rows) + "\n"]
    if max(len(by_seed) for by_seed in summaries.values()) > 1:
        tables.append(seed_means_table(summaries, columns, steps))
        tables.append(paired_tests_table(summaries, columns[0][1]))
    return "\n".join(tables)


def seed_means_table(
    summaries: dict[str, dict[int, DifficultySummary]],
    columns: list[tuple[str, Callable[[DifficultySummary], float | None]]],
    steps: int,
) -> str:
    """Per method and figure, the mean over seeds +- the half-width of its 95 % t interval (a level not reached
    counts as ``steps``, and the number of seeds that reached it is shown)."""
    header = "| method | seeds | " + " | ".join(title for title, _ in columns) + " |\n|" + "---|" * (len(columns) + 2)
    rows = []
    for label, by_seed in summaries.items():
        cells = []
        for _, figure in columns:
            values = [figure(s) for s in by_seed.values()]
            mean, halfwidth = mean_and_halfwidth([steps if v is None else v for v in values])
            cell = f"{mean:.3f}" + ("" if math.isnan(halfwidth) else f" ± {halfwidth:.3f}")
            if any(v is None for v in values):
                cell += f" ({sum(v is not None for v in values)}/{len(values)} reached)"
            cells.append(cell)
        rows.append(f"| {label} | {len(by_seed)} | " + " | ".join(cells) + " |")
    return header + "\n" + "\n".join(rows) + "\n"


@dataclass(frozen=True)
class PairedTest:
    seeds: int
    mean_difference: float
    halfwidth: float  # of the 95 % interval of the mean difference
    t: float
    p: float  # two-sided


def paired_t_test(first: Sequence[float], second: Sequence[float]) -> PairedTest:
    """Two-sided paired t-test of mean(first - second) = 0 over seeds."""
    differences = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    mean, halfwidth = mean_and_halfwidth(differences)
    spread = differences.std(ddof=1) / math.sqrt(len(differences))
    if spread == 0:  # identical differences: certain unless all zero
        return PairedTest(len(differences), mean, 0.0, math.copysign(math.inf, mean) if mean else 0.0, float(mean == 0))
    t = mean / spread
    return PairedTest(len(differences), mean, halfwidth, t, 2 * (1 - student_t_cdf(abs(t), len(differences) - 1)))


def decision(test: PairedTest, first: str, second: str, alpha: float = 1 - CONFIDENCE) -> str:
    """The protocol's reading of a paired test."""
    if test.p >= alpha:
        return "no difference detected"
    return f"{first} better" if test.mean_difference > 0 else f"{second} better"


def paired_tests_table(
    summaries: dict[str, dict[int, DifficultySummary]], primary: Callable[[DifficultySummary], float]
) -> str:
    """The first method against each other one on the primary metric, paired by seed (seeds both ran)."""
    (first, first_runs), *others = summaries.items()
    rows = []
    for label, runs in others:
        seeds = sorted(first_runs.keys() & runs.keys())
        if len(seeds) < 2:
            continue
        test = paired_t_test([primary(first_runs[s]) for s in seeds], [primary(runs[s]) for s in seeds])
        rows.append(
            f"| {first} - {label} | {test.seeds} | {test.mean_difference:+.3f} ± {test.halfwidth:.3f} | "
            f"{test.t:.2f} | {test.p:.3f} | {decision(test, first, label)} |"
        )
    header = (
        "| comparison (primary metric, paired by seed) | seeds | mean difference ± 95 % | t | p (two-sided) | "
        "decision at 0.05 |\n|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(rows) + "\n"


# --- command line ------------------------------------------------------------------------------------------------


def parse_learning_rates(values: Sequence[str], methods: Sequence[str]) -> dict[str, float]:
    """``--lr`` values: one learning rate for every method, or ``METHOD=LR`` for each method run."""
    if len(values) == 1 and "=" not in values[0]:
        return dict.fromkeys(methods, float(values[0]))
    rates = {}
    for value in values:
        name, sep, rate = value.partition("=")
        if not sep or name not in methods:
            raise ValueError(f"--lr {value!r}: give one learning rate, or METHOD=LR for each of {list(methods)}")
        rates[name] = float(rate)
    if missing := [name for name in methods if name not in rates]:
        raise ValueError(f"--lr gives no learning rate for {missing}: add {missing[0]}=LR")
    return rates


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipe.disco.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="addition", help="tiny task (default addition)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    parser.add_argument(
        "--compare", nargs="+", default=[], choices=[m for m in METHODS if m != "disco"], help="methods to add"
    )
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps per run (default {STEPS})")
    parser.add_argument("--level", type=float, default=LEVEL, help=f"level for the tables (default {LEVEL})")
    parser.add_argument(
        "--seeds", "--seed", nargs="+", type=int, default=[0], help="seeds: tiny build, question order, sampling"
    )
    parser.add_argument("--lr", nargs="+", default=[str(BUDGET["lr"])], help="learning rate, or METHOD=LR each")
    parser.add_argument(
        "--rollout", choices=("hf", "vllm"), default="hf", help="hf stand-in (default) or verl's vLLM rollout"
    )
    args = parser.parse_args(argv)
    task, steps = TASKS[args.task], args.steps
    if args.rollout == "vllm":
        if args.task != "addition":
            parser.error("--rollout vllm: only the addition task has a build vLLM's CPU attention runs")
        if importlib.util.find_spec("vllm") is None:
            parser.error("--rollout vllm needs vLLM's CPU build: bash recipe/disco/cpu/vllm_env.sh .venv-vllm")
        task = Task(partial(build_tiny, shape=VLLM_MODEL_SHAPE))
    if steps < WINDOW:
        parser.error(f"--steps {steps}: the summary averages {WINDOW} steps; give at least {WINDOW}")
    names = ["disco", *dict.fromkeys(args.compare)]
    seeds = list(dict.fromkeys(args.seeds))
    try:
        learning_rates = parse_learning_rates(args.lr, names)
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out).resolve()
    start = time.monotonic()
    builds = {seed: task.build(out, seed) for seed in seeds}
    # seed by seed, so that an interrupted experiment has whole seeds; a rerun reuses the finished runs
    runs = {(name, seed): out / name / (f"seed{seed}" if len(seeds) > 1 else "") for seed in seeds for name in names}
    try:
        records = {
            (name, seed): run_method(
                name, builds[seed], workdir, steps, seed, learning_rates[name], args.task, args.rollout
            )
            for (name, seed), workdir in runs.items()
        }
    except AssertionError as error:  # run_trainer's report of a failed run, with the log's tail
        sys.exit(f"error: {error}")
    print()
    labels = [METHODS[name].label for name, _ in runs]
    plot_runs(list(runs.values()), out / "demo_curves.png", labels, DisCOPolicyLossConfig.delta, smooth=WINDOW)
    if task.by_difficulty:
        table = difficulty_summary(records, runs, builds, args.level, steps)
    else:
        several = len(seeds) > 1
        summaries = {
            METHODS[name].label + (f", seed {seed}" if several else ""): summarize(run_records, args.level)
            for (name, seed), run_records in records.items()
        }
        table = summary_table(summaries, args.level, steps)
    rates = ", ".join(f"{name} {rate:g}" for name, rate in learning_rates.items())
    note = (
        f"task {args.task}: {steps} steps x {BUDGET['prompts_per_step']} questions x {BUDGET['rollout_n']} answers "
        f"per run, seeds {' '.join(map(str, seeds))}, learning rates {rates}; {time.monotonic() - start:.0f} s in "
        f"all. Curves: {WINDOW}-step trailing means.\n"
    )
    (out / "summary.md").write_text(table + "\n" + note)
    print(f"\n{table}\n{note}figure: {out / 'demo_curves.png'}\ntable: {out / 'summary.md'}")


def difficulty_summary(
    records: dict[tuple[str, int], list[dict]],
    runs: dict[tuple[str, int], Path],
    builds: dict[int, TinyBuild],
    level: float,
    steps: int,
) -> str:
    """The carry task's tables for all runs, then each seed's starting histogram."""
    summaries: dict[str, dict[int, DifficultySummary]] = {}
    for (name, seed), run_records in records.items():
        difficulty = _read_jsonl(runs[name, seed] / "difficulty.jsonl")
        summaries.setdefault(METHODS[name].label, {})[seed] = summarize_difficulty(run_records, difficulty, level)
    histograms = [start_histogram(carry.read_questions(build), seed) for seed, build in builds.items()]
    return difficulty_tables(summaries, level, steps) + "\n" + "\n".join(histograms) + "\n"


if __name__ == "__main__":
    main()
