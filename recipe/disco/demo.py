"""The CPU demo: DisCO trained by verl's real trainer on a tiny model and task, on a laptop.

    python -m recipe.disco.demo [--out DIR] [--compare grpo disco-b lratio] [--steps N] [--level R] [--seed S]

It builds the tiny offline model and addition task (``recipe.disco.cpu.tiny``, into ``DIR/tiny-seed<S>``), trains
it with ``python -m recipe.disco.main_disco`` on the CPU backend (``DISCO_CPU_BACKEND=1``, two simulated
data-parallel ranks, the ``hf`` rollout), prints verl's progress bar and per-step metrics, and writes into ``DIR``
(default ``./disco_demo``):

* ``<method>/metrics.jsonl``: verl's ``file`` logger, one record per step; ``<method>/trainer.log``: the whole
  output of the run;
* ``demo_curves.png``: training reward, entropy, response length, KL, constraint activity, score margin and
  held-out accuracy (``recipe.disco.plot``; 5-step trailing means);
* ``summary.md``: per method, the training reward of the first and last 5 steps, the first step at which the
  5-step trailing mean reaches ``--level``, the entropy of the last 5 steps and the final held-out accuracy
  (also printed).

``--compare`` adds runs of other methods with the same prompts, seeds, step budget, batch sizes and learning
rate: ``grpo`` (verl's own ``main_ppo`` with the ``grpo`` estimator and ``vanilla`` PPO-clip loss on the same
``disco_trainer`` config), ``disco-b`` (``objective=disco-b``) and ``lratio`` (``score_func=Lratio``, tau=1 as
in the paper).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recipe.disco.config import DisCOPolicyLossConfig
from recipe.disco.cpu.launch import cpu_overrides, run_trainer
from recipe.disco.cpu.tiny import DATA_SOURCE, TinyBuild, build_tiny
from recipe.disco.plot import plot_runs, smoothed

CONFIG_DIR = Path(__file__).with_name("config")
POLICY_LOSS = "actor_rollout_ref.actor.policy_loss"
DEFAULT_OUT = "disco_demo"
STEPS = 50
LEVEL = 0.6
WINDOW = 5  # steps averaged for the start/final figures, the level crossing and the plotted curves
# The tiny task's budget, the same for every method: 8 questions x 8 answers per step in 2 optimizer steps of
# 4 questions (so the second one runs off-policy and DisCO's trust region acts, as with the paper's 4 per step),
# AdamW at a constant 3e-4, sampling at temperature 1. DisCO keeps the paper's delta=1e-4, beta=1e3, tau=10.
BUDGET = dict(prompts_per_step=8, rollout_n=8, mini_batches=2, lr=3e-4)
VAL_EVERY = 5  # greedy accuracy on the 20 held-out questions before training and every VAL_EVERY steps
REWARD, ENTROPY = "critic/score/mean", "actor/entropy"
VAL_ACCURACY = f"val-core/{DATA_SOURCE}/acc/mean@1"
SHOWN = (REWARD, ENTROPY, "actor/pg_loss", "actor/disco/kl", "actor/disco/constraint_active", VAL_ACCURACY)
STEP_LINE = re.compile(r"\bstep:(\d+) - (.*)")
NUMPY_SCALAR = re.compile(r"np\.\w+\((.*)\)")  # how verl's console logger prints numpy values


@dataclass(frozen=True)
class Method:
    label: str
    module: str
    overrides: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()  # Hydra flags, which must come before the overrides


METHODS = {
    "disco": Method("DisCO (logL, tau=10)", "recipe.disco.main_disco"),
    "grpo": Method(
        "GRPO",
        "verl.trainer.main_ppo",
        overrides=("algorithm.adv_estimator=grpo", f"{POLICY_LOSS}.loss_mode=vanilla"),
        flags=(f"--config-path={CONFIG_DIR}", "--config-name=disco_trainer"),
    ),
    "disco-b": Method("DisCO-b (logL)", "recipe.disco.main_disco", overrides=(f"{POLICY_LOSS}.objective=disco-b",)),
    "lratio": Method(
        "DisCO (Lratio, tau=1)",
        "recipe.disco.main_disco",
        overrides=(f"{POLICY_LOSS}.score_func=Lratio", f"{POLICY_LOSS}.tau=1"),
    ),
}


def method_command(name: str, build: TinyBuild, steps: int, seed: int) -> tuple[str, list[str]]:
    """The module and arguments of one method's run: the CPU launcher's, the demo's budget, then the method's."""
    method = METHODS[name]
    demo = [
        f"data.seed={seed}",  # the same questions in the same order for every method
        f"actor_rollout_ref.rollout.seed={seed}",
        "trainer.val_before_train=True",
        f"trainer.test_freq={VAL_EVERY}",
        "trainer.project_name=disco_demo",
        f"trainer.experiment_name={name}",
    ]
    return method.module, [*method.flags, *cpu_overrides(build, steps=steps, **BUDGET), *demo, *method.overrides]


def show_progress(line: str) -> None:
    """Print verl's progress bar, and its per-step console line cut to the metrics in ``SHOWN``."""
    if "Training Progress" in line:
        print("Training Progress" + line.rsplit("Training Progress", 1)[1], flush=True)
    elif match := STEP_LINE.search(line):
        metrics = dict(item.split(":", 1) for item in match[2].split(" - ") if ":" in item)
        shown = [f"{key}:{_short(metrics[key])}" for key in SHOWN if key in metrics]
        print(" - ".join([f"step:{match[1]}", *shown]), flush=True)


def _short(value: str) -> str:
    """A logged value (``0.25``, ``np.float64(0.25)``) to 4 significant digits, other text as it is."""
    scalar = NUMPY_SCALAR.fullmatch(value.strip())
    try:
        return f"{float(scalar[1] if scalar else value):.4g}"
    except ValueError:
        return value


def run_method(name: str, build: TinyBuild, workdir: Path, steps: int, seed: int) -> list[dict]:
    """Train one method from ``workdir``; return its file-logger records (also in ``workdir/metrics.jsonl``)."""
    module, args = method_command(name, build, steps, seed)
    print(f"\n=== {name}: python -m {module} {shlex.join(args)}\n(full output: {workdir / 'trainer.log'})", flush=True)
    start = time.monotonic()
    records = run_trainer(module, args, workdir, timeout_s=1800, echo=show_progress)
    print(f"=== {name}: {steps} steps in {time.monotonic() - start:.0f} s", flush=True)
    return records


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
    """A Markdown table of the summaries, one row per method."""
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipe.disco.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    parser.add_argument(
        "--compare", nargs="+", default=[], choices=[m for m in METHODS if m != "disco"], help="methods to add"
    )
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps per method (default {STEPS})")
    parser.add_argument("--level", type=float, default=LEVEL, help=f"reward level for the table (default {LEVEL})")
    parser.add_argument("--seed", type=int, default=0, help="tiny build, question order and sampling seed")
    args = parser.parse_args(argv)
    if args.steps < WINDOW:
        parser.error(f"--steps {args.steps}: the summary averages {WINDOW} steps; give at least {WINDOW}")
    out = Path(args.out).resolve()
    start = time.monotonic()
    names = ["disco", *dict.fromkeys(args.compare)]
    build = build_tiny(out, args.seed)
    try:
        records = {name: run_method(name, build, out / name, args.steps, args.seed) for name in names}
    except AssertionError as error:  # run_trainer's report of a failed run, with the log's tail
        sys.exit(f"error: {error}")
    print()
    labels = [METHODS[name].label for name in names]
    logs = [out / name / "metrics.jsonl" for name in names]
    plot_runs(logs, out=out / "demo_curves.png", labels=labels, delta=DisCOPolicyLossConfig.delta, smooth=WINDOW)
    summaries = {METHODS[name].label: summarize(records[name], args.level) for name in names}
    table = summary_table(summaries, args.level, args.steps)
    elapsed = time.monotonic() - start
    note = (
        f"{args.steps} steps x {BUDGET['prompts_per_step']} questions x {BUDGET['rollout_n']} answers per method, "
        f"seed {args.seed}; {elapsed:.0f} s in all. Curves: {WINDOW}-step trailing means.\n"
    )
    (out / "summary.md").write_text(table + "\n" + note)
    print(f"\n{table}\n{note}figure: {out / 'demo_curves.png'}\ntable: {out / 'summary.md'}")


if __name__ == "__main__":
    main()
