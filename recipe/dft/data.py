"""DFT's training examples: a data output and B negatives per example, tokenized for verl's SFT engine.

The negatives pool is a parquet file, one row per training example (what ``python -m recipe.dft.negatives``
writes):

    prompt         list of chat messages, the training prompt x_i (what SFT trains on)
    response       str, the data output y_i
    negative_ids   list of K token-id lists, outputs y'_ik sampled from the base model (on the augmented prompt)
    ref_log_prob   list of K floats, log pi_ref(y'_ik | prompt) as token sums, on the prompt ``ref_prompt`` names
    ref_prompt     "plain" or "augmented": which prompt ref_log_prob was computed on

Negatives are kept as token ids: log pi_ref was computed on exactly these tokens, and decoding then re-encoding
text does not always give them back.

Each epoch an example gets B of its K negatives, a fresh set while K allows: the sampler hands the dataset
``epoch * n + i`` for example i (:class:`EpochIndexSampler`), and the choice is a fixed permutation of the K per
example (seeded by ``seed`` and i), read B at a time. Nothing depends on worker processes or call order, so a
resumed run sees the same negatives as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, DistributedSampler

COLUMNS = ("prompt", "response", "negative_ids", "ref_log_prob", "ref_prompt")


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The chat template of ``messages`` with the assistant's turn opened: the tokens every output follows (the
    same function tokenizes the prompts of the negatives command and of training, so log pi_ref matches)."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_ids(tokenizer, text: str) -> list[int]:
    """A data output's tokens, closed by EOS as a generated output is."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def negative_choice(seed: int, example: int, epoch: int, num_pool: int, num_negatives: int) -> list[int]:
    """Which B of an example's K pool negatives epoch ``epoch`` uses: a fixed permutation of the K (seeded by the
    seed and the example), read B at a time, so consecutive epochs get disjoint sets while K allows."""
    order = np.random.default_rng([seed, example]).permutation(num_pool)
    return [int(order[(epoch * num_negatives + j) % num_pool]) for j in range(num_negatives)]


def read_pool(files: str | Sequence[str], num_negatives: int, ref_prompt: str | None) -> pd.DataFrame:
    """The pool's rows, checked: every column, K >= B negatives with a finite log pi_ref each, computed on the
    prompt ``ref_prompt`` asks for (None: not used, DFT2)."""
    paths = [files] if isinstance(files, str) else list(files)
    frame = pd.concat([pd.read_parquet(path) for path in paths], ignore_index=True)
    missing = [column for column in COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"{paths}: the DFT pool lacks columns {missing}; build it with python -m recipe.dft.negatives")
    for i, row in enumerate(frame.itertuples(index=False)):
        k = len(row.negative_ids)
        if k < num_negatives:
            raise ValueError(f"{paths}: example {i} has {k} negatives, fewer than dft.num_negatives={num_negatives}")
        if len(row.ref_log_prob) != k or not np.isfinite(np.asarray(row.ref_log_prob, dtype=float)).all():
            raise ValueError(f"{paths}: example {i} needs one finite ref_log_prob per negative")
        if any(len(ids) == 0 for ids in row.negative_ids):
            raise ValueError(f"{paths}: example {i} has an empty negative")
        if ref_prompt is not None and row.ref_prompt != ref_prompt:
            raise ValueError(
                f"{paths}: example {i}'s ref_log_prob was computed on the {row.ref_prompt!r} prompt, but "
                f"dft.ref_prompt={ref_prompt!r}; set dft.ref_prompt={row.ref_prompt} or rebuild the pool's "
                f"log pi_ref with --ref-prompt {ref_prompt}"
            )
    return frame


@dataclass(frozen=True)
class Example:
    """One example's sequences as verl's SFT rows: the data output first, then its B negatives."""

    index: int
    input_ids: list[torch.Tensor]
    loss_mask: list[torch.Tensor]
    ref_log_prob: torch.Tensor  # (B,) float64


class DFTDataset(Dataset):
    """The pool's examples; item ``epoch * n + i`` is example i with epoch ``epoch``'s negatives."""

    def __init__(self, frame: pd.DataFrame, tokenizer, num_negatives: int, max_length: int, seed: int) -> None:
        self.frame = frame
        self.tokenizer = tokenizer
        self.num_negatives = num_negatives
        self.max_length = max_length
        self.seed = seed

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, item: int) -> Example:
        epoch, index = divmod(int(item), len(self.frame))
        row = self.frame.iloc[index]
        prompt = prompt_ids(self.tokenizer, row["prompt"])
        picks = negative_choice(self.seed, index, epoch, len(row["negative_ids"]), self.num_negatives)
        outputs = [response_ids(self.tokenizer, row["response"])] + [list(row["negative_ids"][k]) for k in picks]
        longest = len(prompt) + max(len(output) for output in outputs)
        if longest > self.max_length:
            raise ValueError(
                f"example {index}: a sequence of {longest} tokens exceeds data.max_length={self.max_length}; raise "
                "it or drop the example from the pool"
            )
        return Example(
            index=index,
            input_ids=[torch.tensor(prompt + output) for output in outputs],
            loss_mask=[torch.tensor([0] * len(prompt) + [1] * len(output)) for output in outputs],
            ref_log_prob=torch.tensor([row["ref_log_prob"][k] for k in picks], dtype=torch.float64),
        )


class EpochIndexSampler(DistributedSampler):
    """verl's distributed sampler whose indices carry the epoch (``epoch * n + i``), so the dataset can pick that
    epoch's negatives without any state of its own."""

    def __iter__(self):
        return (self.epoch * len(self.dataset) + i for i in super().__iter__())
