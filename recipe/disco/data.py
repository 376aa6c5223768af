"""The DeepScaleR training set and the six DisCO evaluation sets as verl parquet files.

``python -m recipe.disco.data [--output-dir DIR] [--from-dir DIR] [--datasets NAME ...]`` (or
``recipe/disco/prepare_data.sh``) writes, into ``$DISCO_DATA_DIR`` (default ``~/data/disco``):

============================  ================  =====  =====================================================
file                          ``data_source``   rows   source
============================  ================  =====  =====================================================
``deepscaler_train.parquet``  ``deepscaler``    40315  Hugging Face Hub ``agentica-org/DeepScaleR-Preview-Dataset``
``aime24.parquet``            ``aime24``        30     DisCO repository, ``deepscaler/.../test/aime.json``
``aime25.parquet``            ``aime25``        30     ... ``aime25.json``
``math500.parquet``           ``math500``       500    ... ``math.json``
``amc23.parquet``             ``amc23``         83     ... ``amc.json`` (AMC 12 2022 and 2023)
``minerva.parquet``           ``minerva``       272    ... ``minerva.json``
``olympiad_bench.parquet``    ``olympiad_bench`` 675   ... ``olympiad_bench.json``
============================  ================  =====  =====================================================

The evaluation sets are the DeepScaleR packaging used by the paper, read from the DisCO GitHub repository at a
pinned commit. Each row holds one user message (the problem, a space, ``PROMPT_SUFFIX``), ``data_source``,
``ability``, ``reward_model = {style: rule, ground_truth: [accepted answers as strings]}`` and
``extra_info = {split, index}`` (the row's index in its source). All files share one schema, so verl can load any
of them together.

All sources are read and checked (row count, required fields) before anything is written; each file is then
written atomically, and left untouched when its content would not change. ``--from-dir DIR`` (or
``DISCO_DATA_SOURCE_DIR``) reads local copies named as in the table's source column (``deepscaler``, ``aime``,
``aime25``, ``amc``, ``math``, ``minerva``, ``olympiad_bench``; ``.json``, ``.jsonl`` or ``.parquet``) instead of
downloading.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recipe.disco.reward import format_number

PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."
OUTPUT_DIR_ENV = "DISCO_DATA_DIR"
SOURCE_DIR_ENV = "DISCO_DATA_SOURCE_DIR"
DEFAULT_OUTPUT_DIR = "~/data/disco"
DISCO_REPO = "https://github.com/Optimization-AI/DisCO"
DISCO_COMMIT = "bd2b078129347a87c10fbb64df12ed50dce59947"
_DISCO_TEST_URL = (
    f"https://raw.githubusercontent.com/Optimization-AI/DisCO/{DISCO_COMMIT}/deepscaler/deepscaler/data/test/{{}}.json"
)
_SOURCE_SUFFIXES = (".json", ".jsonl", ".parquet")
_DOWNLOAD_TIMEOUT_S = 60

SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.list_(pa.string()))])),
        ("extra_info", pa.struct([("split", pa.string()), ("index", pa.int64())])),
    ]
)


class DataPrepError(RuntimeError):
    """A source could not be read or failed a check; the message says which one and what to do."""


@dataclass(frozen=True)
class Dataset:
    name: str  # the data_source value
    output: str  # parquet file name in the output folder
    split: str
    expected_rows: int
    source_file: str  # file name (without suffix) in --from-dir and at the source
    hub_id: str | None = None  # Hugging Face Hub dataset, split "train"
    url: str | None = None  # JSON file

    @property
    def location(self) -> str:
        return f"Hugging Face Hub dataset {self.hub_id}" if self.hub_id else str(self.url)


def _test_set(name: str, source_file: str, expected_rows: int) -> Dataset:
    return Dataset(name, f"{name}.parquet", "test", expected_rows, source_file, url=_DISCO_TEST_URL.format(source_file))


DATASETS: dict[str, Dataset] = {
    dataset.name: dataset
    for dataset in (
        Dataset(
            "deepscaler",
            "deepscaler_train.parquet",
            "train",
            40315,
            "deepscaler",
            hub_id="agentica-org/DeepScaleR-Preview-Dataset",
        ),
        _test_set("aime24", "aime", 30),
        _test_set("aime25", "aime25", 30),
        _test_set("math500", "math", 500),
        _test_set("amc23", "amc", 83),
        _test_set("minerva", "minerva", 272),
        _test_set("olympiad_bench", "olympiad_bench", 675),
    )
}
EVAL_DATASETS = tuple(name for name, dataset in DATASETS.items() if dataset.split == "test")


def default_output_dir() -> Path:
    return Path(os.environ.get(OUTPUT_DIR_ENV) or DEFAULT_OUTPUT_DIR).expanduser()


def load_source(dataset: Dataset, from_dir: Path | None) -> list[dict[str, Any]]:
    """The source rows of ``dataset``: from the local copy in ``from_dir``, else downloaded."""
    if from_dir is not None:
        return _read_file(dataset, _local_source(dataset, from_dir))
    try:
        if dataset.hub_id:
            import datasets

            return datasets.load_dataset(dataset.hub_id, split="train").to_list()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{dataset.source_file}.json"
            with urllib.request.urlopen(dataset.url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                path.write_bytes(response.read())
            return _read_file(dataset, path)
    except DataPrepError:
        raise
    except Exception as error:  # network and Hub errors come in many types; all mean the same to the user
        raise DataPrepError(
            f"{dataset.name}: could not download {dataset.location}: {type(error).__name__}: {error}\n"
            f"Without internet access, put a copy of the source in a folder and pass --from-dir DIR "
            f"(or set {SOURCE_DIR_ENV}=DIR): expected DIR/{dataset.source_file}.json (or .jsonl/.parquet); "
            f"see docs/data.md for where each file comes from."
        ) from error


def to_verl_rows(dataset: Dataset, rows: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    """verl rows: one user message with the prompt suffix, the gold answers and the source index."""
    verl_rows = []
    for index, row in enumerate(rows):
        problem = row.get("problem")
        if not isinstance(problem, str) or not problem.strip():
            raise DataPrepError(f"{dataset.name}: row {index} of {where} has no problem text (field 'problem')")
        if "answer" not in row:
            raise DataPrepError(f"{dataset.name}: row {index} of {where} has no field 'answer'")
        verl_rows.append(
            {
                "data_source": dataset.name,
                "prompt": [{"role": "user", "content": f"{problem} {PROMPT_SUFFIX}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": ground_truth(row["answer"], dataset, index, where)},
                "extra_info": {"split": dataset.split, "index": index},
            }
        )
    return verl_rows


def ground_truth(answer: Any, dataset: Dataset, index: int, where: str) -> list[str]:
    """The accepted answers of a source row as stripped strings (a list answer lists alternatives)."""
    values = answer.tolist() if hasattr(answer, "tolist") else answer
    golds = []
    for item in values if isinstance(values, list) else [values]:
        if isinstance(item, str):
            golds.append(item.strip())
        elif isinstance(item, int | float) and not isinstance(item, bool):
            golds.append(format_number(item))
        elif item is not None:
            raise DataPrepError(
                f"{dataset.name}: row {index} of {where} has an answer of type {type(item).__name__} ({item!r}); "
                f"expected a string, a number or a list of them"
            )
    return [gold for gold in golds if gold]


def check_rows(dataset: Dataset, verl_rows: Sequence[Mapping[str, Any]], expected_rows: int, where: str) -> None:
    """Fail on a row-count mismatch or an empty gold answer in an evaluation set (training: a warning)."""
    if len(verl_rows) != expected_rows:
        raise DataPrepError(
            f"{dataset.name}: {len(verl_rows)} rows in {where}, expected {expected_rows}: this is not the set "
            "the paper used (another packaging of the benchmark, or a truncated file); use the source named in "
            "docs/data.md"
        )
    empty = [index for index, row in enumerate(verl_rows) if not row["reward_model"]["ground_truth"]]
    if empty and dataset.split == "test":
        raise DataPrepError(f"{dataset.name}: rows {empty[:10]} of {where} have an empty 'answer'")
    if empty:
        print(
            f"warning: {dataset.name}: {len(empty)} rows of {where} have an empty answer (kept: they always score 0): "
            f"rows {empty[:10]}",
            file=sys.stderr,
        )


def write_parquet(rows: list[dict[str, Any]], path: Path) -> bool:
    """Write ``rows`` atomically (temporary file, fsync, rename); False, touching nothing, if the file is current."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sink)
    content = sink.getvalue().to_pybytes()
    if path.is_file() and path.read_bytes() == content:
        return False
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def prepare(
    names: Sequence[str], output_dir: Path, from_dir: Path | None, expected_rows: Mapping[str, int] | None = None
) -> dict[str, bool]:
    """Read and check every requested source, then write their parquet files; returns file name -> rewritten."""
    converted = {}
    for name in names:
        dataset = DATASETS[name]
        where = str(_local_source(dataset, from_dir)) if from_dir is not None else dataset.location
        rows = to_verl_rows(dataset, load_source(dataset, from_dir), where)
        check_rows(dataset, rows, (expected_rows or {}).get(name, dataset.expected_rows), where)
        converted[dataset.output] = rows
    output_dir.mkdir(parents=True, exist_ok=True)
    return {output: write_parquet(rows, output_dir / output) for output, rows in converted.items()}


def _local_source(dataset: Dataset, from_dir: Path) -> Path:
    candidates = [from_dir / f"{dataset.source_file}{suffix}" for suffix in _SOURCE_SUFFIXES]
    present = [path for path in candidates if path.is_file()]
    if len(present) != 1:
        found = f"found {', '.join(map(str, present))}" if present else "found none"
        raise DataPrepError(
            f"{dataset.name}: expected exactly one of {', '.join(str(p) for p in candidates)} ({found}); "
            f"copy {dataset.location} there"
        )
    return present[0]


def _read_file(dataset: Dataset, path: Path) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    builder = "parquet" if path.suffix == ".parquet" else "json"
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train").to_list()
    except Exception as error:  # datasets/pyarrow raise various types for a malformed file
        raise DataPrepError(
            f"{dataset.name}: could not read {path} as {builder}: {type(error).__name__}: {error}; "
            f"replace it with an intact copy of {dataset.location}"
        ) from error


def _expected_rows_arg(text: str) -> tuple[str, int]:
    name, _, count = text.partition("=")
    if name not in DATASETS or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=COUNT with NAME in {sorted(DATASETS)}, got {text!r}")
    return name, int(count)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir", type=Path, default=None, help=f"default: ${OUTPUT_DIR_ENV} or {DEFAULT_OUTPUT_DIR}"
    )
    parser.add_argument(
        "--from-dir",
        type=Path,
        default=os.environ.get(SOURCE_DIR_ENV) or None,
        help=f"read local source copies instead of downloading (default: ${SOURCE_DIR_ENV})",
    )
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument(
        "--expected-rows",
        type=_expected_rows_arg,
        action="append",
        default=[],
        metavar="NAME=COUNT",
        help="replace a dataset's expected row count (for test fixtures and deliberate subsets)",
    )
    args = parser.parse_args(argv)
    output_dir = (args.output_dir or default_output_dir()).expanduser()
    from_dir = Path(args.from_dir).expanduser() if args.from_dir else None
    try:
        written = prepare(args.datasets, output_dir, from_dir, dict(args.expected_rows))
    except DataPrepError as error:
        print(f"error: {error}\nNothing was written to {output_dir}.", file=sys.stderr)
        return 1
    for output, changed in written.items():
        print(f"{output_dir / output}: {'written' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
