"""The first-run check on GPUs: two DisCO steps at learning rate 0 with a small validation, then PASS or FAIL.

``bash recipe/disco/first_run_check.sh`` runs the launch script with :data:`CHECK_OVERRIDES` (its settings
otherwise: model, GPUs, rollout, batch layout) and then ``python -m recipe.disco.first_run METRICS_FILE``, which
reads verl's file-logger records and judges each item below. At learning rate 0 the policy does not move, so every
item has a right answer whatever the model:

* step-0 validation accuracy is not near 0: near 0 means the rollout generates from vLLM's dummy weights (the
  first weight sync from the actor did not reach it) or the reward finds no answers;
* the rollout's log-probs of the sampled tokens agree with the actor's (verl's ``training/rollout_probs_diff_mean``,
  in probability, and their Pearson correlation): the weights the rollout samples with are the actor's;
* ``actor/disco/kl`` is far below delta and ``actor/disco/constraint_active`` is 0: pi equals pi_old, so any KL is
  numerics of the two forward passes;
* ``disco/questions/mixed`` > 0: some question has right and wrong answers (DisCO has something to contrast);
* ``disco/answer_missing`` is not close to 1: answers carry a ``</think>`` and a final answer;
* the actor's peak GPU memory (``perf/max_memory_reserved_gb``; vLLM's own reservation is in its process).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from recipe.disco.plot import Run, read_log

CHECK_OVERRIDES = (
    "actor_rollout_ref.actor.optim.lr=0",
    "trainer.total_training_steps=2",
    "trainer.val_before_train=True",
    "trainer.test_freq=-1",
    "trainer.save_freq=-1",
    "trainer.resume_mode=disable",
    "data.val_max_samples=64",
    "actor_rollout_ref.rollout.val_kwargs.n=4",
)
MIN_VAL_ACCURACY = 0.05  # dummy weights score 0; any real model scores well above on MATH500
MAX_PROB_DIFF_MEAN = 0.01  # bf16 rollout vs actor differ by ~1e-3 per token in probability
MIN_PROB_PEARSON = 0.9
KL_FRACTION_OF_DELTA = 0.1  # "far below delta"
MAX_MISSING_RATE = 0.9
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass(frozen=True)
class Verdict:
    item: str
    status: str
    detail: str


def _values(run: Run, key: str) -> list[float]:
    """The metric's values over the training steps (step >= 1; step 0 is the validation before training)."""
    if key not in run:
        return []
    steps, values = run[key]
    return [float(v) for s, v in zip(steps, values) if s >= 1]


def _validation(run: Run) -> Verdict:
    item = "step-0 validation accuracy"
    accuracies = {
        key: run[key][1][0]
        for key in run
        if key.startswith("val-core/") and "/acc/mean@" in key and run[key][0][0] == 0
    }
    if not accuracies:
        return Verdict(item, FAIL, "no val-core/<set>/acc/mean@N at step 0: was trainer.val_before_train=True?")
    low = {key: value for key, value in accuracies.items() if value < MIN_VAL_ACCURACY}
    shown = ", ".join(f"{key} = {value:.3f}" for key, value in accuracies.items())
    if low:
        return Verdict(
            item,
            FAIL,
            f"{shown}: below {MIN_VAL_ACCURACY}, as from vLLM's dummy weights (the actor's first weight sync did not "
            "reach the rollout) or a reward that finds no answer (see disco/answer_missing)",
        )
    return Verdict(item, PASS, shown)


def _agreement(run: Run) -> Verdict:
    item = "rollout vs actor log-probs"
    diffs, corrs = (
        _values(run, "training/rollout_probs_diff_mean"),
        _values(run, "training/rollout_actor_probs_pearson_corr"),
    )
    if not diffs:
        return Verdict(item, FAIL, "training/rollout_probs_diff_mean not logged: did a training step run?")
    detail = f"probability difference mean per step {_fmt(diffs)}, Pearson {_fmt(corrs)}"
    if max(diffs) > MAX_PROB_DIFF_MEAN or (corrs and min(corrs) < MIN_PROB_PEARSON):
        return Verdict(
            item,
            FAIL,
            f"{detail}; above {MAX_PROB_DIFF_MEAN} or below {MIN_PROB_PEARSON}: the rollout samples with other "
            "weights than the actor's (weight sync, dtype or quantization)",
        )
    return Verdict(item, PASS, detail)


def _trust_region(run: Run, delta: float) -> Verdict:
    item = "trust region at lr 0"
    kls, active = _values(run, "actor/disco/kl"), _values(run, "actor/disco/constraint_active")
    if not kls:
        return Verdict(item, FAIL, "actor/disco/kl not logged: is the loss DisCO's?")
    detail = f"actor/disco/kl {_fmt(kls)} (delta {delta:g}), constraint_active {_fmt(active)}"
    if max(abs(kl) for kl in kls) > KL_FRACTION_OF_DELTA * delta or any(active):
        return Verdict(
            item,
            FAIL,
            f"{detail}: at learning rate 0 pi = pi_old, so the KL is numerics of the old-log-prob and update passes "
            f"and must stay below {KL_FRACTION_OF_DELTA} x delta with the hinge inactive",
        )
    return Verdict(item, PASS, detail)


def _mixed(run: Run) -> Verdict:
    mixed = _values(run, "disco/questions/mixed")
    if not mixed:
        return Verdict("mixed questions", FAIL, "disco/questions/mixed not logged: is the trainer DisCO's?")
    status = PASS if max(mixed) > 0 else FAIL
    why = "" if status == PASS else ": no question had both right and wrong answers, so DisCO's gradient is 0"
    return Verdict("mixed questions", status, f"disco/questions/mixed per step {_fmt(mixed)}{why}")


def _missing(run: Run) -> Verdict:
    missing = _values(run, "disco/answer_missing")
    if not missing:
        return Verdict("answers found", FAIL, "disco/answer_missing not logged: is the reward DisCO's (with info)?")
    if max(missing) > MAX_MISSING_RATE:
        return Verdict(
            "answers found",
            FAIL,
            f"disco/answer_missing per step {_fmt(missing)}: almost no answer has a final boxed answer after </think> "
            "(truncated answers, or a tokenizer that drops </think>: run the preflight)",
        )
    return Verdict("answers found", PASS, f"disco/answer_missing per step {_fmt(missing)}")


def _memory(run: Run, card_gib: float | None) -> Verdict:
    item = "actor peak GPU memory"
    peaks = _values(run, "perf/max_memory_reserved_gb")
    if not peaks or not max(peaks):
        return Verdict(item, SKIP, "no GPU memory logged (a CPU run)")
    detail = f"perf/max_memory_reserved_gb {max(peaks):.1f} GiB (the actor's process; vLLM reserves its own share)"
    if card_gib is None:
        return Verdict(item, PASS, detail)
    if max(peaks) > 0.95 * card_gib:
        return Verdict(item, FAIL, f"{detail}: within 5 % of the card's {card_gib:.1f} GiB; lower the token budget")
    return Verdict(item, PASS, f"{detail} of {card_gib:.1f} GiB")


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{value:.3g}" for value in values) + "]"


def verdicts(run: Run, delta: float, card_gib: float | None = None) -> list[Verdict]:
    """Every item of the check on the records of a run made with :data:`CHECK_OVERRIDES`."""
    return [
        _validation(run),
        _agreement(run),
        _trust_region(run, delta),
        _mixed(run),
        _missing(run),
        _memory(run, card_gib),
    ]


def format_verdicts(results: Sequence[Verdict]) -> str:
    lines = ["DisCO first-run check:"]
    lines += [f"  [{result.status}] {result.item}: {result.detail}" for result in results]
    failed = sum(result.status == FAIL for result in results)
    lines.append(f"{failed} item(s) failed." if failed else "All items passed.")
    return "\n".join(lines)


def _card_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, nargs="?", help="verl's file-logger file of the check run")
    parser.add_argument("--delta", type=float, default=1e-4, help="the run's policy_loss.delta")
    parser.add_argument("--overrides", action="store_true", help="print the check's Hydra overrides, one a line")
    args = parser.parse_args(argv)
    if args.overrides:
        print("\n".join(CHECK_OVERRIDES))
        return 0
    if args.metrics is None:
        parser.error("give the metrics file (or --overrides)")
    results = verdicts(read_log(args.metrics), args.delta, _card_gib())
    print(format_verdicts(results))
    return 1 if any(result.status == FAIL for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
