"""The CPU demo of DFT: Algorithm 36 trained by verl's real SFT trainer on the carry task, on a laptop.

    python -m recipe.dft.demo [--out DIR] [--compare sft dft2] [--seeds S [S ...]] [--lr LR [LR ...]]
                              [--epochs N | --steps N]

The protocol of ``docs/experiment-dft.md``, run end to end on 2 CPU cores (``DISCO_CPU_BACKEND=1``, torchrun with
two data-parallel ranks, FSDP2 in float32):

1. **task**: the carry task (``recipe.disco.cpu.carry``, build seed 0) into ``DIR/carry-seed0``; its model is copied
   to ``DIR/model`` with a chat template whose assistant turn ends at its EOS (:data:`CHAT_TEMPLATE`; prompts render
   as before), so that verl's SFT dataset tokenizes each (prompt, answer) pair exactly as DFT's data output, which
   the demo checks row by row (:func:`check_same_positives`). The tiny template's newline after the EOS would
   otherwise be one more SFT target.
2. **data**: ``DIR/positives.parquet``, the 70 training questions with their right answers ``\\boxed{k}``, and the
   negatives pool ``DIR/pool.parquet`` by ``python -m recipe.dft.negatives`` (:data:`NEGATIVES`: K = 8 at
   temperature 0.7, top-k 50, on the training prompt itself, log pi_ref on it). Per seed S,
   ``DIR/data/seed<S>/{sft,pool}.parquet`` hold the same rows in an order drawn from S: verl 0.9.1's SFT trainer
   shuffles with its sampler's fixed seed whatever ``trainer.seed`` says, so the row order is what makes a seed's
   data order its own; SFT and DFT of one seed see the same batches.
3. **training**: DFT (``python -m recipe.dft.main_dft``, the official defaults) and each ``--compare`` method:
   ``sft`` (verl's own ``verl.trainer.sft_trainer`` on the same pairs) and ``dft2`` (its preset: tau 0.3, gamma
   0.9, token-mean score), with the same budget: 10 examples per step in micro-batches of 5, ``--epochs`` epochs
   (4: 28 steps), AdamW with verl's defaults at the constant rate ``--lr`` (each method at each rate given).
4. **evaluation**: greedy decoding of the trained weights (verl's ``huggingface`` checkpoint) in this process,
   scored by ``recipe.disco.reward.compute_score`` (``require_think=False``), on the 35 held-out questions (the
   protocol's primary metric) and the 70 training questions; the base model too (``DIR/base/eval.json``).

Defaults: DFT alone, seed 1, the protocol's settings (``--lr`` 1e-4, its pilot's choice): about 3 minutes on 2 CPU
cores, most of it building the carry task (reused by later runs in the same ``DIR``). The protocol's runs:
``--compare sft dft2 --seeds 1 2 3 4 5`` (about 6 minutes more).

Each run writes ``DIR/<method>/lr<LR>/seed<S>/``: ``metrics.jsonl`` (verl's file logger), ``trainer.log`` (the whole
output), ``checkpoints/`` (verl's, the last step's), ``eval.json`` and ``done.json`` (its command and data), which
a later demo with the same command and data reuses instead of training again. ``DIR/summary.md``: every run's
accuracies and, with several seeds, the mean over seeds with its 95 % t interval per method and the paired t-test
of each method against SFT (also printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from recipe.dft.data import prompt_ids
from recipe.dft.objective import PRESETS
from recipe.disco.cpu import carry, tiny
from recipe.disco.cpu.launch import run_trainer
from recipe.disco.demo import STEP_LINE, decision, paired_t_test
from recipe.disco.plot import mean_and_halfwidth
from recipe.disco.reward import compute_score

DEFAULT_OUT = "dft_demo"
BUILD_SEED = 0
RANKS = 2
BATCH, MICRO_BATCH = 10, 5  # examples per step (all ranks) and per micro-batch: one micro-batch per rank and step
EPOCHS = 4
# the protocol's pilot (SFT, seed 0): held-out accuracy 1.000 at 1e-4 and 3e-4, 0.857 at 1e-3 on carry build
# version 1 (a tie goes to the smaller rate); 1.000, 0.943 and 0.857 on version 2
LR = 1e-4
SEED = 1
MAX_LENGTH = 64  # tokens of prompt + output; the carry task's longest is 44
NEGATIVES = dict(num_samples=8, temperature=0.7, top_k=50, max_new_tokens=carry.SAMPLE_MAX_TOKENS, seed=0)
TRAIN_TIMEOUT_S = 1800
# tiny's chat template, with the newline after each turn's EOS kept off the assistant's turn (the turn a data output
# fills): the generation prompt and every prompt render as with tiny's own
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% if message['role'] != 'assistant' %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SHOWN = ("train/loss", "train/grad_norm", "dft/weight_mean")  # per-step metrics echoed while a run trains


@dataclass(frozen=True)
class Method:
    label: str
    module: str
    data: str  # which of a seed's files it trains on: "sft" (messages) or "pool" (the negatives pool)
    overrides: tuple[str, ...] = ()


def preset_overrides(name: str) -> tuple[str, ...]:
    """The ``dft.*`` overrides of one of :data:`recipe.dft.objective.PRESETS`."""
    preset = PRESETS[name]
    return tuple(f"dft.{field.name}={getattr(preset, field.name)}" for field in fields(preset))


METHODS = {
    "dft": Method("DFT (tau 1, gamma 0.85, B 2)", "recipe.dft.main_dft", "pool", preset_overrides("dft")),
    "sft": Method("SFT (verl's sft_trainer)", "verl.trainer.sft_trainer", "sft"),
    "dft2": Method("DFT2 (tau 0.3, gamma 0.9, B 2)", "recipe.dft.main_dft", "pool", preset_overrides("dft2")),
}


@dataclass(frozen=True)
class Task:
    """The demo's task in ``DIR``: the model all methods start from, the RL questions and the two data files."""

    model_dir: Path
    questions: list[carry.Question]
    positives: Path  # prompt, response: the pairs SFT trains on, in the build's order
    pool: Path  # the negatives pool of the same rows


# --- task and data -------------------------------------------------------------------------------------------------


def messages(question: carry.Question) -> list[dict]:
    """The chat prompt of a question (as the carry build's parquet rows hold it)."""
    return [{"role": "user", "content": tiny.question(question.a, question.b)}]


def demo_model(build: tiny.TinyBuild, out: Path) -> Path:
    """``out/model``: the build's model and tokenizer with :data:`CHAT_TEMPLATE` (built once per build)."""
    from transformers import AutoTokenizer

    def write(staging: Path) -> None:
        shutil.copytree(build.model_dir, staging, dirs_exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(build.model_dir)
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(staging)

    spec = {"build": json.loads((build.model_dir.parent / "spec.json").read_text()), "chat_template": CHAT_TEMPLATE}
    target = out / "model"
    tiny.build_once(target, spec, write)
    return target


def prepare_task(out: Path) -> Task:
    """Build (or reuse) the carry task, the demo's model, the positives and the negatives pool under ``out``."""
    print(f"=== the carry task (build seed {BUILD_SEED}) in {out}: about 3 min the first time, then reused", flush=True)
    build = carry.build_carry(out, BUILD_SEED)
    model_dir = demo_model(build, out)
    questions = carry.read_questions(build)
    train = sorted((q for q in questions if q.split == "train"), key=lambda q: q.index)
    positives = out / "positives.parquet"
    pd.DataFrame(
        {"prompt": [messages(q) for q in train], "response": [tiny.answer(q.a, q.b) for q in train]}
    ).to_parquet(positives)
    pool = out / "pool.parquet"
    build_pool(model_dir, positives, pool)
    return Task(model_dir, questions, positives, pool)


def build_pool(model_dir: Path, positives: Path, pool: Path) -> None:
    """The negatives pool by ``python -m recipe.dft.negatives`` (which reuses its finished parts on a rerun)."""
    options = [f"--{key.replace('_', '-')}={value}" for key, value in NEGATIVES.items()]
    command = [
        *("-m", "recipe.dft.negatives", f"--data={positives}", f"--out={pool}", f"--model={model_dir}"),
        *(*options, "--system-prompt=", "--ref-prompt=plain", "--backend=hf"),
    ]
    print(f"\n=== negatives: python {shlex.join(command)}", flush=True)
    subprocess.run([sys.executable, *command], check=True)


def seed_files(task: Task, out: Path, seed: int) -> dict[str, Path]:
    """``out/data/seed<S>/``: the positives as verl's SFT rows (``messages``: prompt + answer) and the pool, both in
    the row order drawn from ``seed``; checked to give SFT and DFT the same positives."""
    positives, pool = pd.read_parquet(task.positives), pd.read_parquet(task.pool)
    order = np.random.default_rng(seed).permutation(len(positives))
    folder = out / "data" / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"sft": folder / "sft.parquet", "pool": folder / "pool.parquet"}
    sft = [
        {"messages": [*map(dict, row.prompt), {"role": "assistant", "content": row.response}]}
        for row in positives.iloc[order].itertuples()
    ]
    pd.DataFrame(sft).to_parquet(files["sft"])
    pool.iloc[order].reset_index(drop=True).to_parquet(files["pool"])
    check_same_positives(task.model_dir, files["sft"], files["pool"])
    return files


def check_same_positives(model_dir: Path, sft_file: Path, pool_file: Path) -> None:
    """Raise unless verl's SFT dataset gives every row of ``sft_file`` the token ids and loss mask that DFT's dataset
    gives the data output of the same row of ``pool_file``."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    from recipe.dft.bench import positive_differences
    from recipe.dft.data import DFTDataset, read_pool

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = OmegaConf.load(resources.files("verl.trainer.config") / "sft_trainer_engine.yaml").data
    config.max_length = MAX_LENGTH
    sft = MultiTurnSFTDataset(parquet_files=str(sft_file), tokenizer=tokenizer, config=config)
    dft = DFTDataset(read_pool(str(pool_file), 1, None), tokenizer, 1, MAX_LENGTH, seed=0)
    differences = positive_differences(sft, dft, tokenizer)
    if differences:
        raise RuntimeError(
            f"verl's SFT dataset tokenizes {sft_file} unlike DFT's data outputs: {'; '.join(differences)}"
        )


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# --- training ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """What varies between runs of a method: the learning rate, the seed and the length (``steps`` None: whole
    ``epochs``)."""

    lr: float
    seed: int
    epochs: int
    steps: int | None


def train_overrides(name: str, model_dir: Path, data: Path, workdir: Path, setting: Setting) -> list[str]:
    """verl's Hydra overrides of one run: the shared CPU layout and budget, then the method's own."""
    return [
        f"model.path={model_dir}",
        f"data.train_files={data}",
        f"data.train_batch_size={BATCH}",
        f"data.micro_batch_size_per_gpu={MICRO_BATCH}",
        "data.use_dynamic_bsz=False",
        "data.num_workers=0",
        f"data.max_length={MAX_LENGTH}",
        "model.use_remove_padding=False",
        "+model.override_config.attn_implementation=sdpa",
        "engine.strategy=fsdp2",
        "engine.model_dtype=fp32",
        "+engine.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "engine.use_torch_compile=False",
        f"optim.lr={setting.lr}",
        "trainer.device=cpu",
        "trainer.nnodes=1",
        f"trainer.n_gpus_per_node={RANKS}",
        f"trainer.total_epochs={setting.epochs}",
        f"trainer.total_training_steps={'null' if setting.steps is None else setting.steps}",
        f"trainer.seed={setting.seed}",
        "trainer.logger=[console,file]",
        "trainer.project_name=dft_demo",
        f"trainer.experiment_name={name}",
        f"trainer.default_local_dir={workdir / 'checkpoints'}",
        "trainer.resume_mode=disable",
        "checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        *METHODS[name].overrides,
    ]


def show_progress(line: str) -> None:
    """Print the step number and a few metrics of verl's per-step console line."""
    if match := STEP_LINE.search(line):
        metrics = dict(item.split(":", 1) for item in match[2].split(" - ") if ":" in item)
        shown = [f"{key}:{_short(metrics[key])}" for key in SHOWN if key in metrics]
        print(" - ".join([f"step:{match[1]}", *shown]), flush=True)


def _short(value: str) -> str:
    """A logged number to 4 significant digits; other text as it is."""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value.strip()


def last_hf_model(workdir: Path) -> Path:
    """The ``huggingface`` folder of the run's last checkpoint."""
    checkpoints = workdir / "checkpoints"
    step = (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip()
    return checkpoints / f"global_step_{step}" / "huggingface"


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    seed: int
    heldout_accuracy: float
    train_accuracy: float
    train_seconds: float


def run_method(name: str, task: Task, data: Path, workdir: Path, setting: Setting) -> Run:
    """Train one method from ``workdir`` and evaluate it (or reuse its finished run of the same command and data)."""
    args = ["--standalone", f"--nproc_per_node={RANKS}", "-m", METHODS[name].module]
    args += train_overrides(name, task.model_dir, data, workdir, setting)
    done, results = workdir / "done.json", workdir / "eval.json"
    command = {"module": "torch.distributed.run", "args": args, "data_sha256": file_digest(data)}
    title = f"{name}, lr {setting.lr:g}, seed {setting.seed}"
    if done.is_file() and json.loads(done.read_text()) == command:
        print(f"\n=== {title}: reusing the finished run in {workdir}", flush=True)
        return Run(**json.loads(results.read_text())["run"])
    done.unlink(missing_ok=True)
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    print(f"\n=== {title}: torchrun {shlex.join(args)}\n(full output: {workdir / 'trainer.log'})", flush=True)
    start = time.monotonic()
    run_trainer(command["module"], args, workdir, timeout_s=TRAIN_TIMEOUT_S, echo=show_progress)
    seconds = round(time.monotonic() - start, 1)
    evaluation = evaluate(last_hf_model(workdir), task)
    run = Run(name, setting.lr, setting.seed, evaluation["heldout_accuracy"], evaluation["train_accuracy"], seconds)
    results.write_text(json.dumps({"run": asdict(run), **evaluation}, indent=1))
    done.write_text(json.dumps(command))
    print(f"=== {title}: {describe(evaluation)}; trained in {seconds:.0f} s", flush=True)
    return run


# --- evaluation ----------------------------------------------------------------------------------------------------


def greedy_outputs(model_dir: Path, tokenizer_dir: Path, questions: Sequence[carry.Question]) -> list[str]:
    """Each question's greedy answer (at most the carry task's ``SAMPLE_MAX_TOKENS`` tokens), by transformers'
    ``generate`` in float32; prompts batched by length, so no padding enters the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    greedy = GenerationConfig(
        do_sample=False,
        max_new_tokens=carry.SAMPLE_MAX_TOKENS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompts = [prompt_ids(tokenizer, messages(q)) for q in questions]
    with torch.inference_mode():
        return [texts[0] for texts in tiny.generate_unpadded(model, tokenizer, prompts, generation_config=greedy)]


def evaluate(model_dir: Path, task: Task) -> dict:
    """Held-out and training accuracy of greedy answers scored by the project's reward, with every answer."""
    outputs = greedy_outputs(model_dir, task.model_dir, task.questions)
    answers = [
        {
            "a": q.a,
            "b": q.b,
            "level": q.level,
            "split": q.split,
            "output": output,
            "score": compute_score("", output, [str(q.a + q.b)], require_think=False),
        }
        for q, output in zip(task.questions, outputs)
    ]

    def accuracy(split: str) -> float:
        return float(np.mean([answer["score"] for answer in answers if answer["split"] == split]))

    return {"heldout_accuracy": accuracy("val"), "train_accuracy": accuracy("train"), "answers": answers}


def describe(evaluation: dict) -> str:
    return (
        f"held-out accuracy {evaluation['heldout_accuracy']:.3f}, training accuracy {evaluation['train_accuracy']:.3f}"
    )


# --- summary -------------------------------------------------------------------------------------------------------

METRICS = {"heldout_accuracy": "held-out accuracy (primary)", "train_accuracy": "training accuracy"}


def runs_table(runs: Sequence[Run]) -> str:
    """Markdown: one row per run."""
    rows = [
        f"| {METHODS[r.method].label} | {r.lr:g} | {r.seed} | {r.heldout_accuracy:.3f} | {r.train_accuracy:.3f} | "
        f"{r.train_seconds:.0f} |"
        for r in runs
    ]
    header = f"| method | lr | seed | {' | '.join(METRICS.values())} | training s |\n|---|---|---|---|---|---|\n"
    return header + "\n".join(rows) + "\n"


def by_method(runs: Sequence[Run]) -> dict[tuple[str, float], dict[int, Run]]:
    groups: dict[tuple[str, float], dict[int, Run]] = defaultdict(dict)
    for run in runs:
        groups[run.method, run.lr][run.seed] = run
    return groups


def means_table(runs: Sequence[Run]) -> str:
    """Markdown: per method and learning rate, the mean over seeds +- the half-width of its 95 % t interval."""
    rows = []
    for (method, lr), seeds in by_method(runs).items():
        cells = []
        for key in METRICS:
            mean, halfwidth = mean_and_halfwidth([getattr(run, key) for run in seeds.values()])
            cells.append(f"{mean:.3f}" + ("" if np.isnan(halfwidth) else f" ± {halfwidth:.3f}"))
        rows.append(f"| {METHODS[method].label} | {lr:g} | {len(seeds)} | {' | '.join(cells)} |")
    header = f"| method | lr | seeds | {' | '.join(f'{t}, mean ± 95 %' for t in METRICS.values())} |\n"
    return header + "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"


def paired_table(runs: Sequence[Run]) -> str:
    """Markdown: each method minus SFT at the same learning rate, paired by seed, two-sided paired t-test."""
    groups, rows = by_method(runs), []
    for (method, lr), seeds in groups.items():
        sft = groups.get(("sft", lr), {})
        common = sorted(seeds.keys() & sft.keys())
        if method == "sft" or len(common) < 2:
            continue
        for key, title in METRICS.items():
            test = paired_t_test([getattr(seeds[s], key) for s in common], [getattr(sft[s], key) for s in common])
            rows.append(
                f"| {METHODS[method].label} - SFT | {lr:g} | {title} | {test.seeds} | {test.mean_difference:+.3f} ± "
                f"{test.halfwidth:.3f} | {test.t:.2f} | {test.p:.2g} | {decision(test, method.upper(), 'SFT')} |"
            )
    if not rows:
        return ""
    header = (
        "| comparison | lr | metric | seeds | mean difference ± 95 % | t | p (two-sided) | decision at 0.05 |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(rows) + "\n"


def summary_markdown(base: dict, runs: Sequence[Run], note: str) -> str:
    """The demo's report: the base model's accuracy, every run, and the statistics over seeds where there are any."""
    parts = [f"Base model (before training): {describe(base)}.\n", runs_table(runs)]
    if any(len(seeds) > 1 for seeds in by_method(runs).values()):
        parts += [means_table(runs), paired_table(runs)]
    return "\n".join(part for part in parts if part) + "\n" + note


# --- command line --------------------------------------------------------------------------------------------------


def run_folder(out: Path, name: str, lr: float, seed: int) -> Path:
    return out / name / f"lr{lr:g}" / f"seed{seed}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recipe.dft.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default ./{DEFAULT_OUT})")
    parser.add_argument("--compare", nargs="+", default=[], choices=["sft", "dft2"], help="methods to add to DFT")
    parser.add_argument("--seeds", "--seed", nargs="+", type=int, default=[SEED], help=f"seeds (default {SEED})")
    parser.add_argument(
        "--lr", nargs="+", type=float, default=[LR], help=f"learning rate(s), each run at each ({LR:g})"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=EPOCHS, help=f"epochs over the 70 questions (default {EPOCHS})")
    budget.add_argument("--steps", type=int, help="stop after this many steps instead (a quick look)")
    args = parser.parse_args(argv)
    if min(args.epochs, args.steps or 1) < 1:
        parser.error("--epochs and --steps must be at least 1")
    return args


def run_all(task: Task, out: Path, names: Sequence[str], settings: Sequence[Setting]) -> list[Run]:
    """Every method at every setting (ordered by seed, so that an interrupted experiment has whole seeds)."""
    runs, files = [], {}
    for setting in settings:
        if setting.seed not in files:
            files[setting.seed] = seed_files(task, out, setting.seed)
        for name in names:
            data = files[setting.seed][METHODS[name].data]
            runs.append(run_method(name, task, data, run_folder(out, name, setting.lr, setting.seed), setting))
    return runs


def settings_note(task: Task, settings: Sequence[Setting], seconds: float) -> str:
    """One paragraph on what the runs shared."""
    first = settings[0]
    length = f"{first.steps} steps" if first.steps else f"{first.epochs} epochs"
    splits = {split: sum(q.split == split for q in task.questions) for split in ("val", "train")}
    rates = " ".join(f"{lr:g}" for lr in dict.fromkeys(s.lr for s in settings))
    seeds = " ".join(str(seed) for seed in dict.fromkeys(s.seed for s in settings))
    return (
        f"carry task (build seed {BUILD_SEED}): {length} of {BATCH} examples per step on {RANKS} CPU ranks, "
        f"micro-batches of {MICRO_BATCH}; negatives K={NEGATIVES['num_samples']} at temperature "
        f"{NEGATIVES['temperature']}, top-k {NEGATIVES['top_k']}, on the training prompt; learning rates {rates}; "
        f"seeds {seeds}; greedy accuracy on {splits['val']} held-out and {splits['train']} training questions; "
        f"{seconds:.0f} s in all.\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    names = ["dft", *dict.fromkeys(args.compare)]
    settings = [
        Setting(lr, seed, args.epochs, args.steps)
        for seed in dict.fromkeys(args.seeds)
        for lr in dict.fromkeys(args.lr)
    ]
    out = Path(args.out).resolve()
    start = time.monotonic()
    task = prepare_task(out)
    base = evaluate(task.model_dir, task)
    (out / "base").mkdir(exist_ok=True)
    (out / "base" / "eval.json").write_text(json.dumps(base, indent=1))
    print(f"\n=== base model: {describe(base)}", flush=True)
    try:
        runs = run_all(task, out, names, settings)
    except AssertionError as error:  # run_trainer's report of a failed run, with the log's tail
        sys.exit(f"error: {error}")
    summary = summary_markdown(base, runs, settings_note(task, settings, time.monotonic() - start))
    (out / "summary.md").write_text(summary)
    print(f"\n{summary}\noutputs: {out} (summary.md; runs in <method>/lr<LR>/seed<S>/)")


if __name__ == "__main__":
    main()
