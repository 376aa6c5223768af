"""Whole-question batch layout for verl 0.9.1's actor update (pure functions, no Ray, no TransferQueue).

How verl 0.9.1's v1 trainer cuts a step batch of N rows for the actor update (``actor.shuffle=False``; see
``verl/single_controller/base/decorator.py``, ``utils/tensordict_utils.py`` ``make_iterator`` and
``workers/engine/utils.py`` ``prepare_micro_batches``):

* dispatch gives data-parallel rank w the contiguous rows [w*N/W, (w+1)*N/W);
* each rank cuts its rows into contiguous mini-batches of R/W rows (R = ``ppo_mini_batch_size * rollout.n``),
  one optimizer step each;
* each mini-batch is cut into micro-batches: contiguous chunks of ``ppo_micro_batch_size_per_gpu`` rows, or
  token-budget groups (``use_dynamic_bsz``).

DisCO's step objective needs every question's answers in one optimizer step, i.e. in the same-index mini-batch
of the ranks (its actor worker then makes any micro-batching exact). When the loss computes its coefficients
itself (``kl_unit: question``, see ``recipe.disco.checks.coefficients_in_loss``), each *global micro-batch* (the
k-th micro-batch of every rank, over which the loss gathers) must hold whole questions instead. Either way the
unit of whole questions has U rows, U/W per rank, and unit b of the dispatched batch sits at rows
w*N/W + b*U/W ... + U/W - 1 of rank w.

:func:`whole_group_order` returns the row permutation that makes this true:

1. questions (rows sharing a uid; verl's padding rows excluded) are packed first-fit-decreasing into units of
   U rows, and the units are dealt round-robin over the mini-batches so that padding spreads evenly; verl's
   padding rows fill the free slots;
2. each unit is split into W parts of U/W rows with verl's Karmarkar-Karp partitioner
   (``get_seqlen_balanced_partitions``) on verl's workload estimate of the sequence lengths, and the parts
   go to the ranks heaviest part to least loaded rank, so that total work per rank is balanced by moving
   answers between ranks *within* a unit, never between units.

A question may thus be spread over several ranks (4 answers per GPU with n=8 in the 1.5B recipe), but always
within one unit. Groups of unequal size (failed trajectories, multi-output agent loops) pack like any others;
:func:`padded_rows` says how many rows the batch needs (padding included) so that all units fit, which can add a
mostly-padding mini-batch when groups pack badly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import torch
from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions


@dataclass(frozen=True)
class UpdateShape:
    """How the actor update cuts a step batch: W ranks, R rows per mini-batch, U rows per unit of whole questions."""

    dp_size: int
    mini_batch_rows: int
    unit_rows: int

    def __post_init__(self) -> None:
        if min(self.dp_size, self.mini_batch_rows, self.unit_rows) < 1:
            raise ValueError(f"{self} must have positive sizes")
        if self.unit_rows % self.dp_size or self.mini_batch_rows % self.unit_rows:
            raise ValueError(
                f"a unit of {self.unit_rows} rows must split evenly over {self.dp_size} ranks and divide a "
                f"mini-batch of {self.mini_batch_rows} rows"
            )

    @property
    def rank_rows(self) -> int:
        """Rows of a unit on one rank."""
        return self.unit_rows // self.dp_size

    @property
    def units_per_mini_batch(self) -> int:
        return self.mini_batch_rows // self.unit_rows


def uid_of_key(key: str) -> str:
    """The prompt uid of a TransferQueue key ``{uid}_{session}_{index}`` (verl's ReplayBuffer convention)."""
    return key.split("_", 1)[0]


def question_rows(uids: Sequence[str], is_padding: Sequence[bool]) -> list[list[int]]:
    """Row indices of each question (rows sharing a uid), in order of first appearance; padding rows left out."""
    rows: dict[str, list[int]] = {}
    for row, (uid, padding) in enumerate(zip(uids, is_padding, strict=True)):
        if not padding:
            rows.setdefault(uid, []).append(row)
    return list(rows.values())


def pack_questions(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing packing of question sizes into bins of ``capacity`` rows (lists of question indices)."""
    largest = max(sizes, default=0)
    if largest > capacity:
        raise ValueError(
            f"a question has {largest} answers but a unit of whole questions holds only {capacity} rows, so its "
            "answers cannot be scored together; raise actor_rollout_ref.actor.ppo_mini_batch_size (or, with "
            "kl_unit=question, ppo_micro_batch_size_per_gpu) or use an agent loop with one output per answer"
        )
    bins: list[list[int]] = []
    free: list[int] = []
    for question in sorted(range(len(sizes)), key=lambda q: -sizes[q]):
        target = next((b for b, room in enumerate(free) if room >= sizes[question]), len(bins))
        if target == len(bins):
            bins.append([])
            free.append(capacity)
        bins[target].append(question)
        free[target] -= sizes[question]
    return bins


def _rows_for(num_bins: int, num_rows: int, shape: UpdateShape) -> int:
    """Rows of the fewest whole mini-batches that hold ``num_bins`` bins and ``num_rows`` rows."""
    mini_batches = max(math.ceil(num_bins / shape.units_per_mini_batch), math.ceil(num_rows / shape.mini_batch_rows))
    return max(mini_batches, 1) * shape.mini_batch_rows


def padded_rows(uids: Sequence[str], is_padding: Sequence[bool], shape: UpdateShape) -> int:
    """Rows the batch must have (padding included) for :func:`whole_group_order`: whole mini-batches, all bins."""
    sizes = [len(rows) for rows in question_rows(uids, is_padding)]
    return _rows_for(len(pack_questions(sizes, shape.unit_rows)), len(uids), shape)


def _filled_bins(uids: Sequence[str], is_padding: Sequence[bool], shape: UpdateShape) -> list[list[int]]:
    """Rows of each unit in dispatch order: questions packed, dealt over mini-batches, padded."""
    questions = question_rows(uids, is_padding)
    packed = pack_questions([len(rows) for rows in questions], shape.unit_rows)
    num_rows, needed = len(uids), _rows_for(len(packed), len(uids), shape)
    if num_rows % shape.mini_batch_rows or num_rows < needed:
        raise ValueError(
            f"a batch of {num_rows} rows cannot be laid out in whole groups; pad it to {needed} rows first "
            "(verl.trainer.ppo.padding_utils.upsample_batch_to_divisible_size)"
        )
    num_mini_batches = num_rows // shape.mini_batch_rows
    bins: list[list[int]] = [[] for _ in range(num_rows // shape.unit_rows)]
    for i, members in enumerate(packed):
        position = (i % num_mini_batches) * shape.units_per_mini_batch + i // num_mini_batches
        bins[position] = [row for question in members for row in questions[question]]
    fillers = iter([row for row, padding in enumerate(is_padding) if padding])
    for rows in bins:
        rows.extend(islice(fillers, shape.unit_rows - len(rows)))
    return bins


def _rank_parts(bins: list[list[int]], workloads: list[int], dp_size: int) -> list[list[list[int]]]:
    """parts[b][w]: the rows of bin b for rank w, balancing total workload per rank over all bins."""
    loads = [0] * dp_size
    parts: list[list[list[int]]] = [[] for _ in bins]

    def load(rows: list[int]) -> int:
        return sum(workloads[row] for row in rows)

    for b in sorted(range(len(bins)), key=lambda b: -load(bins[b])):
        rows = bins[b]
        split = get_seqlen_balanced_partitions([workloads[row] for row in rows], dp_size, equal_size=True)
        heaviest_first = sorted(([rows[i] for i in part] for part in split), key=lambda part: -load(part))
        parts[b] = [[] for _ in range(dp_size)]
        for rank, part in zip(sorted(range(dp_size), key=loads.__getitem__), heaviest_first, strict=True):
            parts[b][rank] = part
            loads[rank] += load(part)
    return parts


def whole_group_order(
    uids: Sequence[str], seq_lens: Sequence[int], is_padding: Sequence[bool], shape: UpdateShape
) -> list[int]:
    """Row permutation (for ``KVBatchMeta.reorder``) giving whole questions per unit and balanced ranks.

    ``uids[i]``, ``seq_lens[i]`` (prompt + response tokens) and ``is_padding[i]`` describe row i; the batch must
    already hold :func:`padded_rows` rows. Row ``order[p]`` of the input goes to position p.
    """
    bins = _filled_bins(uids, is_padding, shape)
    workloads = calculate_workload(torch.tensor(list(seq_lens), dtype=torch.int64)).tolist()
    parts = _rank_parts(bins, workloads, shape.dp_size)
    rows_per_rank = len(uids) // shape.dp_size
    order = [0] * len(uids)
    m = shape.rank_rows
    for b, bin_parts in enumerate(parts):
        for rank, part in enumerate(bin_parts):
            start = rank * rows_per_rank + b * m
            order[start : start + m] = part
    return order


def rank_partitions(order: Sequence[int], dp_size: int) -> list[list[int]]:
    """The original row indices each rank receives after ``reorder(order)`` and verl's contiguous dispatch."""
    rows_per_rank = len(order) // dp_size
    return [list(order[rank * rows_per_rank : (rank + 1) * rows_per_rank]) for rank in range(dp_size)]
