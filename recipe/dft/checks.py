"""Startup checks: refuse DFT layouts that cannot be exact, or that would fail only once every rank has started.

Run by ``recipe.dft.main_dft`` on the composed config before any process group or model starts (also under
``DRY_RUN=1``); the ``dft`` block itself is checked by :class:`recipe.dft.objective.DFTSettings`. Every problem
gives one message naming the Hydra key, its value and the fix; all are reported at once, as one
:class:`DFTConfigError`.

Why each matters: DFT's collate builds jagged rows (verl reads them only with ``pad_mode=no_padding``); an
example's 1 + B rows must stay in one micro-batch (verl's ``force_group_size``), so fixed micro-batches must cut a
rank's examples evenly (verl asserts it deep in its engine) and a token budget must hold a whole example; the loss
divides by ``train_batch_size``, so every rank must get the same whole share of it (verl floors the share); a pool
with fewer examples than a batch gives no step (verl then divides by zero); and the pool files are otherwise read
only once every rank has started. Only the parquet schema, the row counts (metadata) and the ``ref_prompt`` column
are read, not the rows.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import DictConfig, ListConfig

from recipe.dft.data import COLUMNS

NEGATIVES = "python -m recipe.dft.negatives"  # writes the pool (recipe/dft/prepare_data.sh prints the command)
NO_PADDING = "no_padding"


class DFTConfigError(ValueError):
    """The configuration cannot train DFT; the message lists every problem."""


def ulysses_size(config: DictConfig) -> int:
    """The SFT engine's Ulysses sequence-parallel size (``engine.ulysses_sequence_parallel_size``, 1 if unset)."""
    return config.engine.get("ulysses_sequence_parallel_size", 1) or 1


def data_parallel_size(config: DictConfig) -> int:
    """Data-parallel ranks as verl's FSDP engine counts them: every process, divided by the Ulysses size."""
    return config.trainer.nnodes * config.trainer.n_gpus_per_node // max(ulysses_size(config), 1)


def config_problems(config: DictConfig, world_size: int | None = None) -> list[str]:
    """Every reason this config cannot train DFT, one message each (empty when it can). ``world_size``: the
    processes actually started (torchrun's ``WORLD_SIZE``), compared with the config's GPU count."""
    return _engine_problems(config, world_size) + _batch_problems(config) + _file_problems(config)


def check_config(config: DictConfig, world_size: int | None = None) -> None:
    """Raise :class:`DFTConfigError` listing every problem of :func:`config_problems`."""
    problems = config_problems(config, world_size)
    if problems:
        raise DFTConfigError("DFT cannot train with this configuration:\n  - " + "\n  - ".join(problems))


def _engine_problems(config: DictConfig, world_size: int | None) -> list[str]:
    data, problems = config.data, []
    if data.pad_mode != NO_PADDING:
        problems.append(
            f"data.pad_mode={data.pad_mode}: DFT's collate builds jagged (unpadded) rows, which verl's engine reads "
            f"only in {NO_PADDING} mode; set data.pad_mode={NO_PADDING}"
        )
    sp = ulysses_size(config)
    if sp > 1:
        problems.append(
            f"engine.ulysses_sequence_parallel_size={sp}: DFT's loss (per-sequence scores, per-example u updates) "
            "has not been verified under Ulysses sequence parallelism, where each rank holds a slice of every "
            "sequence; set engine.ulysses_sequence_parallel_size=1"
        )
    custom = (data.get("custom_cls") or {}).get("path")
    if custom:
        problems.append(
            f"data.custom_cls.path={custom}: DFT builds its own dataset from the negatives pool (recipe.dft.data), "
            "so a custom dataset class would be ignored; set data.custom_cls.path=null"
        )
    trainer = config.trainer
    gpus = trainer.nnodes * trainer.n_gpus_per_node
    if world_size is not None and world_size != gpus:
        problems.append(
            f"trainer.n_gpus_per_node={trainer.n_gpus_per_node} x trainer.nnodes={trainer.nnodes} = {gpus}, but "
            f"{world_size} processes were started (WORLD_SIZE), so the batch checks would count the wrong ranks; set "
            "trainer.nnodes and trainer.n_gpus_per_node to torchrun's --nnodes and --nproc_per_node"
        )
    return problems


def _batch_problems(config: DictConfig) -> list[str]:
    """The step's examples over ranks and micro-batches, which verl would otherwise floor or assert late."""
    data, problems = config.data, []
    dp, batch = data_parallel_size(config), data.train_batch_size
    group = 1 + config.dft.num_negatives
    if batch < dp or batch % dp:
        problems.append(
            f"data.train_batch_size={batch}: not a multiple of the {dp} data-parallel ranks, so each rank would get "
            f"{batch // dp} examples while DFT's loss divides by data.train_batch_size; set data.train_batch_size "
            f"to a positive multiple of {dp}"
        )
        return problems
    per_rank = batch // dp
    micro = data.micro_batch_size_per_gpu
    if not data.use_dynamic_bsz and (not micro or micro < 1 or per_rank % micro):
        problems.append(
            f"data.micro_batch_size_per_gpu={micro}: each rank gets {per_rank} examples per step "
            f"(data.train_batch_size / {dp} ranks), which verl cuts into micro-batches of this many examples "
            f"({group} rows each, kept together); set data.micro_batch_size_per_gpu to a divisor of {per_rank}, or "
            "data.use_dynamic_bsz=True"
        )
    budget, example = data.max_token_len_per_gpu, group * data.max_length
    if data.use_dynamic_bsz and budget < example:
        problems.append(
            f"data.max_token_len_per_gpu={budget}: a micro-batch must hold a whole example, 1 + dft.num_negatives "
            f"({group - 1}) = {group} sequences of up to data.max_length={data.max_length} tokens, {example} tokens "
            f"(verl cannot split an example's rows); set data.max_token_len_per_gpu to at least {example}, or lower "
            "data.max_length or dft.num_negatives"
        )
    return problems


def _paths(files) -> list[str]:
    """A Hydra file setting (one path, a list of them, or null) as a list."""
    if not files:
        return []
    return [str(path) for path in files] if isinstance(files, ListConfig | list | tuple) else [str(files)]


def _file_problems(config: DictConfig) -> list[str]:
    """The pool files: present, parquet with the pool's columns, at least one batch of rows, and (``dft``) log
    pi_ref computed on the prompt ``dft.ref_prompt`` names. Remote paths (``scheme://``) are not checked."""
    ref_prompt = config.dft.ref_prompt if config.dft.score == "dft" else None  # dft2 has no log pi_ref
    batch = config.data.train_batch_size
    problems = []
    for name, why in (
        ("train_files", "so not one training step"),
        ("val_files", "and validation runs whole batches of that many (verl drops a partial one), so none"),
    ):
        key = f"data.{name}"
        paths = [path for path in _paths(config.data.get(name)) if "://" not in path]
        rows, file_problems = 0, []
        for path in paths:
            found, count = _pool_file_problems(key, path, ref_prompt)
            file_problems += found
            rows += count
        problems += file_problems
        if paths and not file_problems and rows < batch:
            problems.append(
                f"{key}={paths}: {rows} examples, fewer than data.train_batch_size={batch}, {why}; use a larger "
                "pool or lower data.train_batch_size"
            )
    return problems


def _pool_file_problems(key: str, path: str, ref_prompt: str | None) -> tuple[list[str], int]:
    """One pool file's problems and its row count."""
    if not Path(path).is_file():
        return [f"{key}={path}: no such file; build the negatives pool with `{NEGATIVES} --out {path} ...`"], 0
    try:
        metadata = pq.read_metadata(path)
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        return [f"{key}={path}: not a readable parquet file ({error}); rebuild it with `{NEGATIVES}`"], 0
    missing = [column for column in COLUMNS if column not in metadata.schema.to_arrow_schema().names]
    if missing:
        return [
            f"{key}={path}: lacks the DFT pool's column(s) {missing}, so it is not a negatives pool; build one with "
            f"`{NEGATIVES} --data {path} --out POOL ...` and train on POOL"
        ], metadata.num_rows
    if ref_prompt is None:
        return [], metadata.num_rows
    column = pq.read_table(path, columns=["ref_prompt"]).column("ref_prompt").to_pylist()
    other = sorted({str(value) for value in column if value != ref_prompt})
    if other:
        return [
            f"dft.ref_prompt={ref_prompt}: {key}={path} has log pi_ref computed on the {' and '.join(other)} "
            f"prompt (its ref_prompt column); set dft.ref_prompt={other[0]} or rebuild the pool's log pi_ref with "
            f"`{NEGATIVES} --ref-prompt {ref_prompt}`"
        ], metadata.num_rows
    return [], metadata.num_rows
