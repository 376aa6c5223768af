"""Evaluate a model or checkpoint on the six DisCO benchmarks and write the paper's pass@1 table.

``python -m recipe.disco.evaluate --model-path M [options] [hydra overrides]`` (or ``recipe/disco/run_eval.sh``)
runs verl's validation path without training: ``recipe.disco.main_disco`` with ``trainer.val_only=True``, every
problem sampled ``--n-samples`` times (16) at temperature 0.6, top_p 0.95, up to 8192 response tokens, scored by
``recipe.disco.reward.compute_score_with_info``, the generations saved with their scores
(``trainer.validation_data_dir``). It then writes ``results.md`` and ``results.csv`` in ``--output-dir``:

* pass@1 per benchmark = mean over problems of (correct samples / n), i.e. the accuracy averaged over the 16
  samples, in the paper's column order (AIME24, AIME25, MATH500, AMC23, Minerva, O-Bench) and their plain
  average (Avg);
* pass@k for k = 1..n with the unbiased estimator 1 - C(n-c, k) / C(n, k) averaged over problems.

The table builders are separate: ``--from-generations FILE`` builds the table from a saved generations file (no
model run) and ``--from-metrics FILE`` from a verl file-logger log (``val-core/<data_source>/acc/mean@N``, pass@1
only), e.g. of a training run.

``--checkpoint .../global_step_N`` (instead of ``--model-path``) evaluates a checkpoint of a training run: its
sharded FSDP weights are first merged into a Hugging Face folder, ``--output-dir``/merged_model, by verl's model
merger (``python -m verl.model_merger merge --backend fsdp``; bf16 weights, the config and tokenizer from the
checkpoint's ``actor/huggingface``), which is then evaluated like any model. The merged folder loads on any number
of GPUs, whereas verl's own loading of the shards (``trainer.resume_from_path``) needs the training run's world
size and fails only after Ray has started. The checkpoint's layout is checked before anything runs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.disco.data import DATASETS, EVAL_DATASETS, default_output_dir

# data_source -> the paper's column name, in the paper's order
COLUMNS = {
    "aime24": "AIME24",
    "aime25": "AIME25",
    "math500": "MATH500",
    "amc23": "AMC23",
    "minerva": "Minerva",
    "olympiad_bench": "O-Bench",
}
AVERAGE = "Avg"
GENERATIONS_DIR = "generations"
MERGED_MODEL_DIR = "merged_model"
# what verl's FSDP checkpoint manager writes into global_step_N/actor, and what its model merger reads
FSDP_CONFIG = "fsdp_config.json"
HF_FILES = ("config.json", "tokenizer_config.json")
PAPER_N_SAMPLES = 16
# verl's headline validation metric; data sources may contain slashes (e.g. lighteval/MATH)
_CORE_MEAN = re.compile(r"^val-core/(?P<source>.+)/(?P<var>acc|reward)/mean@(?P<n>\d+)$")


@dataclass(frozen=True)
class EvalTable:
    """pass@k per benchmark column; ``pass_at[k][column]``. Columns are the paper's, then any other data source."""

    label: str
    n_samples: int
    pass_at: dict[int, dict[str, float]]
    problems: dict[str, int] | None = None  # column -> number of problems (unknown from metrics)
    missing_samples: int = 0  # samples absent from the generations, counted as wrong

    @property
    def columns(self) -> list[str]:
        """The paper's six and Avg, then any other benchmark."""
        return [*COLUMNS.values(), AVERAGE, *(c for c in self.pass_at[1] if c not in COLUMNS.values())]

    def average(self, k: int) -> float | None:
        """Plain mean over the six benchmarks; None unless all six are present."""
        values = [self.pass_at[k].get(name) for name in COLUMNS.values()]
        return None if None in values else sum(values) / len(values)

    def cells(self, k: int) -> list[float | None]:
        """pass@k in :attr:`columns` order, Avg included; None where a benchmark is absent."""
        values = {**self.pass_at[k], AVERAGE: self.average(k)}
        return [values.get(column) for column in self.columns]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct samples out of ``n``: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def table_from_generations(
    rows: Iterable[Mapping[str, Any]],
    n_samples: int | None = None,
    expected_problems: Mapping[str, int] | None = None,
    label: str = "",
) -> EvalTable:
    """The table from verl's saved validation generations (one JSON object per sample).

    Each row needs ``benchmark`` (the data_source echoed by ``compute_score_with_info``), ``uid``
    (``{prompt}_{session}_{index}``) and ``acc`` (or ``score``) in {0, 1}; a session's outputs count once.
    ``n_samples`` (default: the most samples any problem has) is the number of samples per problem; fewer
    samples count the missing ones as wrong, as verl's own ``acc`` metric does. ``expected_problems``
    (data_source -> count) fails on a benchmark whose number of problems differs (a dropped prompt makes pass@1
    incomparable).
    """
    correct: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        missing = [key for key in ("benchmark", "uid") if key not in row]
        if missing or ("acc" not in row and "score" not in row):
            raise ValueError(
                f"a generations row lacks {missing or ['acc/score']} (keys: {sorted(row)}); generate with "
                f"reward.custom_reward_function.name=compute_score_with_info (path pkg://recipe.disco.reward)"
            )
        value = float(row["acc"] if "acc" in row else row["score"])
        if value not in (0.0, 1.0):
            raise ValueError(f"pass@k needs 0/1 correctness, got {value} for uid {row['uid']}")
        prompt, session = _prompt_and_session(str(row["uid"]))
        correct[str(row["benchmark"])][prompt][session] = value
    if not correct:
        raise ValueError("no generations to tabulate")
    counts = {source: [len(sessions) for sessions in by_prompt.values()] for source, by_prompt in correct.items()}
    n = n_samples or max(max(values) for values in counts.values())
    if any(max(values) > n for values in counts.values()):
        raise ValueError(f"a problem has more than n_samples={n} samples: {_largest(counts)}")
    for source, expected in (expected_problems or {}).items():
        if len(correct.get(source, {})) != expected:
            raise ValueError(
                f"{source}: {len(correct.get(source, {}))} problems in the generations, expected {expected} (the "
                f"parquet file's rows); were prompts dropped or truncated? raise data.max_prompt_length"
            )
    sources = _ordered(correct)
    pass_at = {
        k: {
            _column(source): sum(pass_at_k(n, int(sum(s.values())), k) for s in correct[source].values())
            / len(correct[source])
            for source in sources
        }
        for k in range(1, n + 1)
    }
    return EvalTable(
        label=label,
        n_samples=n,
        pass_at=pass_at,
        problems={_column(source): len(correct[source]) for source in sources},
        missing_samples=sum(n - count for values in counts.values() for count in values),
    )


def table_from_metrics(metrics: Mapping[str, Any], label: str = "") -> EvalTable:
    """pass@1 from verl's validation metrics: ``val-core/<data_source>/acc/mean@N`` (or ``reward`` without acc)."""
    found: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
    for key, value in metrics.items():
        match = _CORE_MEAN.match(key)
        if match:
            found[match["source"]][match["var"]] = (int(match["n"]), float(value))
    if not found:
        raise ValueError(f"no val-core/<data_source>/acc/mean@N metric among {sorted(metrics)[:20]}")
    chosen = {source: by_var.get("acc", by_var.get("reward")) for source, by_var in found.items()}
    ns = {n for n, _ in chosen.values()}
    if len(ns) != 1:
        raise ValueError(f"benchmarks were sampled a different number of times: {chosen}")
    sources = _ordered(chosen)
    return EvalTable(
        label=label, n_samples=ns.pop(), pass_at={1: {_column(source): chosen[source][1] for source in sources}}
    )


def to_markdown(table: EvalTable) -> str:
    columns = table.columns
    header = "| {} | " + " | ".join(columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    lines = [
        f"pass@1 = accuracy averaged over {table.n_samples} samples per problem; {AVERAGE} = plain mean of the "
        f"six benchmarks.",
        "",
        header.format("Model"),
        rule,
        _markdown_row(table, table.label or "this model", 1),
    ]
    if len(table.pass_at) > 1:
        lines += [
            "",
            f"pass@k, unbiased estimator 1 - C(n-c,k)/C(n,k) with n = {table.n_samples}, averaged over problems:",
            "",
            header.format("k"),
            rule,
            *(_markdown_row(table, str(k), k) for k in table.pass_at),
        ]
    if table.problems:
        lines += ["", "Problems: " + ", ".join(f"{column} {count}" for column, count in table.problems.items()) + "."]
    if table.missing_samples:
        lines.append(f"{table.missing_samples} samples were missing from the generations and count as wrong.")
    return "\n".join(lines).rstrip() + "\n"


def to_csv(table: EvalTable) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", *table.columns])
    for k in table.pass_at:
        writer.writerow([f"pass@{k}", *("" if value is None else f"{value:.6f}" for value in table.cells(k))])
    return buffer.getvalue()


def write_table(table: EvalTable, output_dir: Path) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown, csv_path = output_dir / "results.md", output_dir / "results.csv"
    markdown.write_text(to_markdown(table))
    csv_path.write_text(to_csv(table))
    return markdown, csv_path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def last_validation_metrics(log_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last ``data`` dict with ``val-core`` metrics in a verl file-logger log (``{"step", "data"}`` lines)."""
    for row in reversed(log_rows):
        data = row.get("data", {})
        if any(key.startswith("val-core/") for key in data):
            return data
    raise ValueError("no val-core/... metrics in the log; was validation run (trainer.test_freq, val_before_train)?")


def eval_overrides(args: argparse.Namespace) -> list[str]:
    """Hydra overrides for ``recipe.disco.main_disco``: validation only, the paper's sampling, dumped generations."""
    files = [args.data_dir / DATASETS[name].output for name in EVAL_DATASETS]
    dp = args.nnodes * args.n_gpus_per_node
    overrides = [
        # a train file is still loaded by the trainer; nothing trains
        f"data.train_files={_quoted(files[EVAL_DATASETS.index('math500')])}",
        "data.val_files=[" + ",".join(_quoted(path) for path in files) + "]",
        f"data.max_prompt_length={args.prompt_length}",
        f"data.max_response_length={args.response_length}",
        "data.filter_overlong_prompts=False",  # a dropped problem would change pass@1: fail instead
        "data.truncation=error",
        f"actor_rollout_ref.model.path={_quoted(args.model_path)}",
        f"actor_rollout_ref.rollout.val_kwargs.n={args.n_samples}",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
        f"actor_rollout_ref.rollout.val_kwargs.temperature={args.temperature}",
        f"actor_rollout_ref.rollout.val_kwargs.top_p={args.top_p}",
        "actor_rollout_ref.rollout.val_kwargs.top_k=-1",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",  # as the paper's evaluation; fits 7B at 8k
        "reward.custom_reward_function.path=pkg://recipe.disco.reward",
        "reward.custom_reward_function.name=compute_score_with_info",
        # training-only settings the startup checks require (whole groups per micro-batch); nothing trains
        "actor_rollout_ref.rollout.n=8",
        f"data.train_batch_size={dp}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={dp}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        f"trainer.nnodes={args.nnodes}",
        f"trainer.n_gpus_per_node={args.n_gpus_per_node}",
        "trainer.val_only=True",
        "trainer.val_before_train=True",
        f"trainer.validation_data_dir={_quoted(args.output_dir / GENERATIONS_DIR)}",
        "trainer.logger=[console]",
        "trainer.experiment_name=disco-eval",
        "trainer.resume_mode=disable",  # a checkpoint is merged into --model-path first
    ]
    return overrides


class CheckpointError(ValueError):
    """A ``--checkpoint`` folder that verl's FSDP model merger cannot read; the message says what to pass instead."""


def fsdp_actor_dir(checkpoint: Path) -> Path:
    """The ``actor`` folder of a verl FSDP checkpoint ``.../global_step_N``, checked to hold what the model merger
    reads: ``fsdp_config.json`` (the world size W), the W model shards and the Hugging Face config and tokenizer."""
    key = f"CHECKPOINT={checkpoint}"
    if not checkpoint.is_dir():
        raise CheckpointError(f"{key}: no such folder; pass a checkpoint folder .../checkpoints/global_step_N")
    actor = checkpoint / "actor"
    if not actor.is_dir():
        raise CheckpointError(f"{key} is not a verl checkpoint (no actor/ folder); {_checkpoint_hint(checkpoint)}")
    fsdp_config = actor / FSDP_CONFIG
    if not fsdp_config.is_file():
        raise CheckpointError(
            f"{key}: {fsdp_config} is missing, so this is not an FSDP checkpoint (verl's FSDP engine writes it next "
            f"to the shards); merge another backend's checkpoint with `python -m verl.model_merger merge --backend "
            f"megatron --local_dir {actor} --target_dir DIR` and evaluate MODEL_PATH=DIR"
        )
    world_size = _world_size(fsdp_config, key)
    missing = [rank for rank in range(world_size) if not (actor / _shard_name(world_size, rank)).is_file()]
    if missing:
        raise CheckpointError(
            f"{key}: {fsdp_config} says world_size={world_size}, but {actor} lacks "
            f"{', '.join(_shard_name(world_size, rank) for rank in missing)}; copy the whole checkpoint folder"
        )
    hf_dir = actor / "huggingface"
    absent = [name for name in HF_FILES if not (hf_dir / name).is_file()]
    if absent:
        raise CheckpointError(
            f"{key}: {hf_dir} lacks {', '.join(absent)}, which the merged model needs (verl saves the model config "
            f"and tokenizer there); copy the training run's base model files (config.json, generation_config.json, "
            f"tokenizer*) from its MODEL_PATH into {hf_dir}"
        )
    return actor


def merge_checkpoint(actor: Path, target: Path) -> int:
    """Merge the FSDP shards in ``actor`` into the Hugging Face folder ``target`` with verl's model merger; any
    earlier content of ``target`` (another checkpoint's merge) is removed first."""
    if target.exists():
        shutil.rmtree(target)
    command = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp"]
    command += ["--local_dir", str(actor), "--target_dir", str(target)]
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode


def run(args: argparse.Namespace) -> int:
    """Merge a checkpoint if given, generate with verl's validation path, then tabulate the saved generations."""
    missing = [str(args.data_dir / DATASETS[name].output) for name in EVAL_DATASETS]
    missing = [path for path in missing if not Path(path).is_file()]
    if missing:
        print(f"error: missing {missing}; run recipe/disco/prepare_data.sh first", file=sys.stderr)
        return 1
    if args.checkpoint:
        try:
            actor = fsdp_actor_dir(args.checkpoint)
        except CheckpointError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        args.model_path = args.output_dir / MERGED_MODEL_DIR
        if _dry_run():
            print(f"DRY_RUN: not merging {actor} into {args.model_path}", flush=True)
        elif (returncode := merge_checkpoint(actor, args.model_path)) != 0:
            print(f"error: verl's model merger failed on {actor} (exit status {returncode})", file=sys.stderr)
            return returncode
    generations = args.output_dir / GENERATIONS_DIR
    for stale in generations.glob("*.jsonl"):
        stale.unlink()
    command = [sys.executable, "-m", "recipe.disco.main_disco", *eval_overrides(args), *args.overrides]
    print("+ " + " ".join(command), flush=True)
    returncode = subprocess.run(command, check=False).returncode
    if returncode != 0 or _dry_run():
        return returncode
    dumps = sorted(generations.glob("*.jsonl"))
    if len(dumps) != 1:
        print(f"error: expected one generations file in {generations}, found {dumps}", file=sys.stderr)
        return 1
    expected = {name: _parquet_rows(args.data_dir / DATASETS[name].output) for name in EVAL_DATASETS}
    label = str(args.label or args.checkpoint or args.model_path)
    table = table_from_generations(read_jsonl(dumps[0]), args.n_samples, expected, label)
    return _report(table, args.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.output_dir = args.output_dir.expanduser()
    if args.from_generations:
        rows = read_jsonl(args.from_generations)
        return _report(table_from_generations(rows, args.n_samples, label=args.label), args.output_dir)
    if args.from_metrics:
        metrics = last_validation_metrics(read_jsonl(args.from_metrics))
        return _report(table_from_metrics(metrics, label=args.label), args.output_dir)
    if not args.model_path and not args.checkpoint:
        print("error: --model-path or --checkpoint is required (or --from-generations/--from-metrics)", file=sys.stderr)
        return 2
    if args.model_path and args.checkpoint:
        print(
            f"error: MODEL_PATH={args.model_path} (--model-path) and CHECKPOINT={args.checkpoint} (--checkpoint) are "
            f"both set; a checkpoint brings its own model config and tokenizer (actor/huggingface): unset MODEL_PATH",
            file=sys.stderr,
        )
        return 2
    args.data_dir = args.data_dir.expanduser()
    if args.checkpoint:
        args.checkpoint = args.checkpoint.expanduser()
    args.n_samples = args.n_samples or PAPER_N_SAMPLES
    return run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", help="Hugging Face model id or folder")
    parser.add_argument(
        "--checkpoint", type=Path, help="or a verl FSDP checkpoint .../global_step_N, merged into OUTPUT_DIR first"
    )
    parser.add_argument("--data-dir", type=Path, default=default_output_dir(), help="prepare_data.sh's output")
    parser.add_argument("--output-dir", type=Path, default=Path("disco_eval"), help="results and generations")
    parser.add_argument("--label", default="", help="row label in results.md (default: the model path)")
    parser.add_argument(
        "--n-samples", type=int, default=None, help=f"samples per problem (run: {PAPER_N_SAMPLES}; tables: inferred)"
    )
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--response-length", type=int, default=8192)
    parser.add_argument("--prompt-length", type=int, default=2048, help="longest prompt in tokens")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--n-gpus-per-node", type=int, default=8)
    parser.add_argument("--from-generations", type=Path, help="tabulate a saved generations file; no model run")
    parser.add_argument("--from-metrics", type=Path, help="tabulate pass@1 from a verl file-logger log")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for recipe.disco.main_disco")
    return parser


def _dry_run() -> bool:
    return os.environ.get("DRY_RUN", "0") not in ("", "0")


def _checkpoint_hint(folder: Path) -> str:
    """What to pass instead of a folder without actor/: its parent, its latest global_step_N, or MODEL_PATH."""
    if (folder / FSDP_CONFIG).is_file() or any(folder.glob("model_world_size_*_rank_*.pt")):
        return f"this is the actor folder inside one: pass CHECKPOINT={folder.parent}"
    steps = sorted(folder.glob("global_step_*"), key=lambda step: _step_number(step.name))
    if steps:
        return f"it holds checkpoints: pass one of them, e.g. the latest CHECKPOINT={steps[-1]}"
    if (folder / "config.json").is_file():
        return f"it is a Hugging Face model folder: evaluate it with MODEL_PATH={folder} and no CHECKPOINT"
    return "pass a folder .../checkpoints/global_step_N written by verl's trainer (trainer.save_freq)"


def _step_number(name: str) -> int:
    suffix = name.removeprefix("global_step_")
    return int(suffix) if suffix.isdigit() else -1


def _world_size(fsdp_config: Path, key: str) -> int:
    try:
        world_size = json.loads(fsdp_config.read_text())["world_size"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        world_size = f"unreadable ({type(error).__name__}: {error})"
    if not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(
            f"{key}: {fsdp_config} gives world_size={world_size}, not a positive integer; the checkpoint is damaged, "
            f"copy it again from the training run"
        )
    return world_size


def _shard_name(world_size: int, rank: int) -> str:
    return f"model_world_size_{world_size}_rank_{rank}.pt"


def _report(table: EvalTable, output_dir: Path) -> int:
    markdown, csv_path = write_table(table, output_dir)
    print(to_markdown(table))
    print(f"wrote {markdown} and {csv_path}")
    return 0


def _prompt_and_session(uid: str) -> tuple[str, str]:
    """verl's generation keys are ``{prompt uid}_{session}_{output index}``; the outputs of a session count once."""
    parts = uid.rsplit("_", 2)
    return (parts[0], parts[1]) if len(parts) == 3 else (uid, uid)


def _ordered(sources: Iterable[str]) -> list[str]:
    known = [source for source in COLUMNS if source in sources]
    return known + sorted(source for source in sources if source not in COLUMNS)


def _column(source: str) -> str:
    return COLUMNS.get(source, source)


def _largest(counts: Mapping[str, list[int]]) -> dict[str, int]:
    return {source: max(values) for source, values in counts.items()}


def _markdown_row(table: EvalTable, label: str, k: int) -> str:
    return f"| {label} | " + " | ".join("–" if value is None else f"{value:.3f}" for value in table.cells(k)) + " |"


def _quoted(path: Any) -> str:
    """A Hydra override value quoted so that paths with spaces, commas or '=' survive."""
    text = str(path)
    if "'" in text:
        raise ValueError(f"paths with a single quote cannot be passed to Hydra: {text!r}")
    return f"'{text}'"


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


if __name__ == "__main__":
    sys.exit(main())
