"""A tiny offline model and task for the CPU backend (tests and the demo): built in seconds, no download.

* Task: single-digit addition, "What is 3+5? Let's think step by step and output the final answer within
  \\boxed{}." (the real data's prompt suffix), answered as ``\\boxed{8}``. Rows are written with the real data's
  parquet schema (``recipe.disco.data``: ``data_source``, one user message as ``prompt``, ``ability``,
  ``reward_model: {style: rule, ground_truth: [answers]}``, ``extra_info: {split, index}``), so the project's
  reward function (``recipe.disco.reward``, with ``require_think=False``: the tiny model does not reason in
  ``<think>`` tags) scores them.
* Tokenizer: a byte-level BPE trained on the task's own text, with a Qwen-style chat template. It must be
  byte-level: transformers 5 loads any ``model_type: qwen2`` tokenizer as ``Qwen2Tokenizer``, which installs its
  own ByteLevel pre-tokenizer and would silently drop spaces and newlines of a character-level vocabulary.
* Model: a randomly initialised ``Qwen2ForCausalLM`` (about 0.1M parameters), then a warm start of supervised
  steps on all questions in which only a fraction (``WARM_START["boxed_fraction"]``) of the target answers are
  boxed, the others being the bare number. The warm-started model mostly knows the sum but boxes it in about a
  third of its samples, so its reward starts near 0.2 with mixed groups (right and wrong answers to one question),
  and RL raises it within a few dozen steps by learning to box, as RL on real models first learns the answer
  format. The model is far too small to learn addition from RL alone. The validation questions were seen in the
  warm start but not in RL, so they measure whether what RL learned transfers.

``build_tiny(directory, seed)`` writes everything and returns the paths; it is deterministic by seed and reuses a
finished build of the same seed and specification. ``recipe.disco.cpu.carry`` builds a second task from the same
parts, whose questions start from a wide spread of success rates.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from recipe.disco.data import PROMPT_SUFFIX, write_parquet

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DATA_SOURCE = "synthetic/addition"
MAX_OPERAND = 9
NUM_VAL = 20
PAD_TOKEN, TURN_START, TURN_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"  # TURN_END is the eos
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VOCAB_SIZE = 320
MODEL_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
# vLLM's CPU attention supports head dims of 32 and up (vllm/v1/attention/backends/cpu_attn.py,
# get_supported_head_sizes), MODEL_SHAPE's is 16: the vLLM rollout on CPU uses this variant, head dim 32.
VLLM_MODEL_SHAPE = {**MODEL_SHAPE, "num_attention_heads": 2, "num_key_value_heads": 1}
WARM_START = dict(steps=250, lr=3e-3, boxed_fraction=0.3)
# A finished build is reused only if it was made with this specification (bump "version" when the code changes).
SPEC = {
    "version": 1,
    "max_operand": MAX_OPERAND,
    "num_val": NUM_VAL,
    "vocab_size": VOCAB_SIZE,
    **MODEL_SHAPE,
    **{f"warm_start_{key}": value for key, value in WARM_START.items()},
}


@dataclass(frozen=True)
class TinyBuild:
    """Where ``build_tiny`` put the model (with tokenizer) and the parquet files."""

    model_dir: Path
    train_file: Path
    val_file: Path


def question(a: int, b: int) -> str:
    """The user message for a + b."""
    return f"What is {a}+{b}? {PROMPT_SUFFIX}"


def answer(a: int, b: int) -> str:
    """The rewarded response for a + b."""
    return f"\\boxed{{{a + b}}}"


def split_problems(seed: int) -> dict[str, list[tuple[int, int]]]:
    """All operand pairs, shuffled by ``seed``, split into ``train`` and ``val`` (NUM_VAL pairs held out of RL)."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(seed).shuffle(pairs)
    return {"train": pairs[NUM_VAL:], "val": pairs[:NUM_VAL]}


def task_rows(pairs: list[tuple[int, int]], split: str) -> list[dict]:
    """verl parquet rows for the given pairs."""
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": question(a, b)}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": [str(a + b)]},
            "extra_info": {"split": split, "index": index},
        }
        for index, (a, b) in enumerate(pairs)
    ]


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for transformers with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD_TOKEN, TURN_START, TURN_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=TURN_END, pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE
    )


def build_model(tokenizer: PreTrainedTokenizerBase, shape: dict = MODEL_SHAPE) -> PreTrainedModel:
    """A randomly initialised Qwen2 causal LM of ``shape``, sized for the tokenizer (``torch.manual_seed`` first)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def prompt_ids(tokenizer: PreTrainedTokenizerBase, a: int, b: int) -> list[int]:
    """Token ids of the chat-rendered question, ending with the assistant header (as verl renders it)."""
    messages = [{"role": "user", "content": question(a, b)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def warm_start(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[int, int]], seed: int
) -> None:
    """Full-batch supervised steps on all ``pairs``; each step boxes a random ``boxed_fraction`` of the targets."""
    prompts = [prompt_ids(tokenizer, a, b) for a, b in pairs]
    targets = [(response_ids(tokenizer, answer(a, b)), response_ids(tokenizer, str(a + b))) for a, b in pairs]
    rates = torch.full((len(pairs),), WARM_START["boxed_fraction"])
    fit_two_targets(model, prompts, targets, rates, steps=WARM_START["steps"], lr=WARM_START["lr"], seed=seed)


def fit_two_targets(
    model: PreTrainedModel,
    prompts: list[list[int]],
    targets: list[tuple[list[int], list[int]]],
    first_rates: torch.Tensor,
    *,
    steps: int,
    lr: float,
    seed: int,
) -> None:
    """Full-batch supervised steps with AdamW: each step trains example i on its first target with probability
    ``first_rates[i]`` (drawn anew each step), else on its second, so the model learns that mixture.

    The loss covers the response tokens only. The draws make the result depend chaotically on the arithmetic: with
    the carry task's 600 steps, changing the initial weights by 1e-7 (another CPU's kernels do as much) moved the
    examples' fitted rates by up to 0.22 (0.03 on average); :func:`fit_mixture` moved them by up to 0.05 (0.006).
    """
    generator = torch.Generator().manual_seed(seed)

    def loss() -> torch.Tensor:
        use_first = (torch.rand(len(prompts), generator=generator) < first_rates).tolist()
        examples = [(p, t[0] if first else t[1]) for p, t, first in zip(prompts, targets, use_first, strict=True)]
        input_ids, attention_mask, labels = _right_padded(examples, model.config.pad_token_id)
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    _adamw_steps(model, loss, steps=steps, lr=lr)


def fit_mixture(
    model: PreTrainedModel,
    prompts: list[list[int]],
    targets: list[tuple[list[int], list[int]]],
    first_rates: torch.Tensor,
    *,
    steps: int,
    lr: float,
) -> None:
    """Full-batch AdamW steps on the expected loss of the mixture, (1/N) sum_i [r_i NLL(first_i) + (1 - r_i)
    NLL(second_i)] with r = ``first_rates`` (NLL over the response tokens), whose minimum over the answers'
    probabilities is P(first_i) = r_i. Nothing is drawn, so another CPU's arithmetic moves the fitted rates little
    (see :func:`fit_two_targets`)."""
    rates = first_rates.double().tolist()
    examples, weights = [], []
    for prompt, pair, rate in zip(prompts, targets, rates, strict=True):
        for target, weight in zip(pair, (rate, 1 - rate)):
            if weight > 0:
                examples.append((prompt, target))
                weights.append(weight / len(prompts))
    input_ids, attention_mask, labels = _right_padded(examples, model.config.pad_token_id)
    weights = torch.tensor(weights)

    def loss() -> torch.Tensor:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none").sum(1)
        return (weights * nll).sum()

    _adamw_steps(model, loss, steps=steps, lr=lr)


def _adamw_steps(model: PreTrainedModel, loss: Callable[[], torch.Tensor], *, steps: int, lr: float) -> None:
    """``steps`` AdamW steps on ``loss()``, on one torch thread (fast on a busy machine); leaves the model in eval
    mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(steps):
            value = loss()
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


def generate_unpadded(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], n: int = 1, **settings
) -> list[list[str]]:
    """``n`` continuations of each prompt by ``model.generate(**settings)``, decoded without special tokens. Prompts
    are batched by length (shortest first), so no padding enters the model."""
    by_length: dict[int, list[int]] = {}
    for position, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(position)
    texts: list[list[str]] = [[] for _ in prompts]
    for length in sorted(by_length):
        positions = by_length[length]
        batch = torch.tensor([prompts[p] for p in positions]).repeat_interleave(n, 0)
        output = model.generate(batch, attention_mask=torch.ones_like(batch), **settings)
        decoded = tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
        for row, position in enumerate(positions):
            texts[position] = decoded[row * n : (row + 1) * n]
    return texts


def response_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a response: the text, then the eos that ends it."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def _right_padded(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt+response ids right-padded with ``pad_id``, their attention mask, labels (-100 off the response)."""
    width = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for row, (prompt, response) in enumerate(examples):
        sequence = torch.tensor(prompt + response)
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
        labels[row, len(prompt) : len(sequence)] = torch.tensor(response)
    return input_ids, attention_mask, labels


def build_tiny(directory: str | os.PathLike, seed: int = 0, shape: dict = MODEL_SHAPE) -> TinyBuild:
    """Build (or reuse) the tiny model, tokenizer and train/val parquet files under ``directory/tiny-seed<seed>``
    (``tiny-vllm-seed<seed>`` for ``shape=VLLM_MODEL_SHAPE``, the vLLM rollout's)."""
    if shape not in (MODEL_SHAPE, VLLM_MODEL_SHAPE):
        raise ValueError(f"no tiny build of shape {shape}")
    variant = "" if shape == MODEL_SHAPE else "vllm-"
    target = Path(directory) / f"tiny-{variant}seed{seed}"
    build_once(target, {**SPEC, **shape, "seed": seed}, lambda staging: _write_build(staging, seed, shape))
    return build_at(target)


def build_at(target: Path) -> TinyBuild:
    """The paths of a build written into ``target``."""
    return TinyBuild(model_dir=target / "model", train_file=target / "train.parquet", val_file=target / "val.parquet")


def build_once(target: Path, spec: dict, write: Callable[[Path], None]) -> None:
    """Make ``target`` a finished build of ``spec``: reuse it if it is one, else ``write`` into a staging directory
    renamed into place, so a reader sees either no build or a finished one. Builders of one target take turns (a
    lock file beside it): a second process, such as another test worker, waits for the first's build and reuses it
    instead of repeating minutes of work."""
    if _read_spec(target) == spec:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if _read_spec(target) == spec:  # built while this process waited
            return
        shutil.rmtree(target, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        staging.chmod(0o755)
        try:
            write(staging)
            (staging / "spec.json").write_text(json.dumps(spec))
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # left only by a failed build


def _read_spec(target: Path) -> dict | None:
    spec_file = target / "spec.json"
    return json.loads(spec_file.read_text()) if spec_file.exists() else None


def _write_build(directory: Path, seed: int, shape: dict = MODEL_SHAPE) -> None:
    splits = split_problems(seed)
    tokenizer = build_tokenizer(corpus(splits["train"] + splits["val"]))
    with torch.random.fork_rng():  # leaves the caller's random state alone
        torch.manual_seed(seed)
        model = build_model(tokenizer, shape)
        warm_start(model, tokenizer, splits["train"] + splits["val"], seed)
    tokenizer.save_pretrained(directory / "model")
    model.save_pretrained(directory / "model")
    for split, pairs in splits.items():
        write_parquet(task_rows(pairs, split), directory / f"{split}.parquet")


def corpus(pairs: list[tuple[int, int]]) -> list[str]:
    """Text the tokenizer is trained on: every question and its boxed response, in the chat layout."""
    return [
        f"{TURN_START}user\n{question(a, b)}{TURN_END}\n{TURN_START}assistant\n{answer(a, b)}{TURN_END}\n"
        for a, b in pairs
    ]
