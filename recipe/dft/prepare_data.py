"""DFT's training sets and the GSM8K test set, downloaded with the Hugging Face ``datasets`` library.

``python -m recipe.dft.prepare_data [--output-dir DIR] [--datasets NAME ...]`` (or ``recipe/dft/prepare_data.sh``,
which also writes DisCO's evaluation sets, MATH500 among them, with ``python -m recipe.disco.data``) writes into
``$DATA_DIR`` (default ``~/data/dft``):

* ``ultrafeedback_sft.parquet``: ``HuggingFaceH4/ultrafeedback_binarized``, split ``train_sft`` (the chosen answers);
  prompt = ``messages[:-1]`` (the user turn(s)), response = the last (assistant) message's content;
* ``metamathqa.parquet``: ``meta-math/MetaMathQA``, split ``train``; prompt = one user message, ``query``;
  response = ``response`` with its closing "The answer is: X" written "The answer is: \\boxed{X}", so that the
  model learns to box its answer and this package's math reward (which grades the last ``\\boxed{}``) can grade
  GSM8K and MATH500 after training;
* ``eval/gsm8k.parquet``: ``openai/gsm8k`` (config ``main``), split ``test``, 1319 problems, in DisCO's evaluation
  rows (:mod:`recipe.disco.data`): the question, and the number after ``####`` as the gold answer.

The training files hold ``prompt`` (a list of chat messages) and ``response`` (a string): the input of
``python -m recipe.dft.negatives``, which adds the negatives and their log pi_ref to make the training pool. GSM8K is
converted by DisCO's own functions (the same prompt suffix, checks and schema as its MATH500), so that DisCO's
evaluation (``recipe/disco/run_eval.sh``) reads it beside DisCO's sets.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recipe.disco import data as disco_data

OUTPUT_DIR_ENV = "DATA_DIR"
DEFAULT_OUTPUT_DIR = "~/data/dft"
EVAL_SUBDIR = "eval"
TRAIN_SCHEMA = pa.schema(
    [
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("response", pa.string()),
    ]
)
GSM8K = disco_data.Dataset("gsm8k", "gsm8k.parquet", "test", 1319, "gsm8k", hub_id="openai/gsm8k")


def ultrafeedback_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """UltraFeedback's chosen conversations: the turns before the last as the prompt, the last (the assistant's
    chosen answer) as the response."""
    converted = []
    for index, row in enumerate(rows):
        messages = [{"role": message["role"], "content": message["content"]} for message in row["messages"]]
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            roles = [message["role"] for message in messages]
            raise ValueError(f"ultrafeedback row {index}: expected user turn(s) then an assistant answer, got {roles}")
        converted.append({"prompt": messages[:-1], "response": messages[-1]["content"]})
    return converted


METAMATH_ANSWER = "The answer is:"


def metamathqa_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """MetaMathQA's question as one user message and its answer as the response, the final answer boxed."""
    return [{"prompt": [{"role": "user", "content": row["query"]}], "response": boxed(row["response"])} for row in rows]


def boxed(response: str) -> str:
    """``... The answer is: X`` -> ``... The answer is: \\boxed{X}`` (the last such phrase; unchanged without one)."""
    head, phrase, answer = response.rpartition(METAMATH_ANSWER)
    return f"{head}{phrase} \\boxed{{{answer.strip()}}}" if phrase else response


def gsm8k_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """GSM8K in DisCO's evaluation rows: the question, and the final number after ``####`` (thousands separators
    dropped) as the gold answer."""
    source = [
        {"problem": row["question"], "answer": row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")}
        for row in rows
    ]
    converted = disco_data.to_verl_rows(GSM8K, source, GSM8K.location)
    disco_data.check_rows(GSM8K, converted, GSM8K.expected_rows, GSM8K.location)
    return converted


@dataclass(frozen=True)
class Source:
    """A Hub dataset split, its conversion, and the file it becomes (relative to the output folder)."""

    hub_id: str
    config: str | None
    split: str
    convert: Callable[[Iterable[Mapping[str, Any]]], list[dict[str, Any]]]
    output: str
    schema: pa.Schema


SOURCES: dict[str, Source] = {
    "ultrafeedback": Source(
        "HuggingFaceH4/ultrafeedback_binarized", None, "train_sft", ultrafeedback_rows, "ultrafeedback_sft.parquet",
        TRAIN_SCHEMA,
    ),
    "metamathqa": Source("meta-math/MetaMathQA", None, "train", metamathqa_rows, "metamathqa.parquet", TRAIN_SCHEMA),
    "gsm8k": Source("openai/gsm8k", "main", "test", gsm8k_rows, f"{EVAL_SUBDIR}/{GSM8K.output}", disco_data.SCHEMA),
}  # fmt: skip


def prepare(names: Sequence[str], output_dir: Path) -> list[Path]:
    """Download and convert every requested set, then write them (nothing is written if one fails); returns the
    files written."""
    import datasets

    converted = []
    for name in names:
        source = SOURCES[name]
        rows = source.convert(datasets.load_dataset(source.hub_id, source.config, split=source.split))
        converted.append((output_dir / source.output, pa.Table.from_pylist(rows, schema=source.schema)))
    for path, table in converted:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    return [path for path, _ in converted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path(os.environ.get(OUTPUT_DIR_ENV) or DEFAULT_OUTPUT_DIR),
        help=f"default: ${OUTPUT_DIR_ENV} or {DEFAULT_OUTPUT_DIR}",
    )
    parser.add_argument("--datasets", nargs="+", choices=sorted(SOURCES), default=list(SOURCES))
    args = parser.parse_args(argv)
    try:
        written = prepare(args.datasets, args.output_dir.expanduser())
    except (ValueError, disco_data.DataPrepError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"{path}: written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
