"""Build DFT's negatives pool: K outputs per training example sampled from the base model, with their log pi_ref.

``python -m recipe.dft.negatives --data TRAIN.parquet --out POOL.parquet --model BASE [options]`` reads the rows SFT
would train on (columns ``prompt``: the chat messages x_i, and ``response``: the data output y_i) and writes the pool
that DFT trains on (``data.train_files``), whose columns are described in :mod:`recipe.dft.data`. For each example i:

* K outputs y'_ik ~ pi_ref(. | x_bar_i) are sampled from the base model, at temperature 0.7 and top-k 50 by default
  (the official code's settings). x_bar_i is x_i with the system message ``--system-prompt`` in place of any it had
  (default "You are an unhelpful assistant.", the official UltraFeedback setting): a prompt that makes poor answers
  likely. ``--system-prompt ""`` samples on x_i itself (then ``plain`` and ``augmented`` are the same prompt).
  They are stored as token ids, ending with the stop token when generation stopped on one (as a data output's
  tokens end with EOS); an output cut at ``--max-new-tokens`` is kept as it is. Every output thus has at least one
  token, and the pool never holds an empty negative.
* log pi_ref(y'_ik | prompt) = sum_t log pi_ref(y'_ik,t | prompt, y'_ik,<t), the stop token included, is computed by
  one scorer for every backend, a plain forward pass of the base model in float32, on the prompt ``--ref-prompt``
  names: ``plain`` (x_i, as the official code does) or ``augmented`` (x_bar_i, the prompt the outputs were sampled
  on, which makes DFT's importance weights exact).

Prompts are tokenized only by :func:`recipe.dft.data.prompt_ids`, the function training uses, so log pi_ref is taken
over the very prompt tokens training sees; a run whose training sets ``model.custom_chat_template`` (a base model
without a chat template) must give the same template here, as ``--chat-template``.

Backends: ``hf`` (transformers ``generate``, for CPUs and tests) and ``vllm`` (for GPUs; vLLM must be installed). The
scorer and the ``hf`` sampler run on the GPU when there is one. Each example is sampled with its own seed, drawn
from ``--seed`` and the example's index, so the negatives do not depend on how examples are grouped into chunks or
batches (nor on ``--ref-prompt``), and a rerun with the same settings on the same machine reproduces them (vLLM's:
up to its batch-dependent numerics).

Resuming: examples are processed ``--chunk-size`` at a time, and each finished chunk is saved (atomically) as
POOL.parquet.parts/part-NNNNN.parquet; a rerun skips the chunks saved. The settings the parts were made with are
kept in POOL.parquet.parts/settings.json, and a rerun with other settings is refused (``--batch-size`` aside: it
bounds the scorer's memory and changes nothing else). When every chunk is done the parts are joined into POOL.parquet,
which is checked with :func:`recipe.dft.data.read_pool`. The parts folder is kept, so that rerunning a finished
command only rewrites the pool; delete it once the pool is final.

Example (UltraFeedback as in the official code; MetaMathQA used ``--num-samples 12``)::

    python -m recipe.dft.negatives --data ~/data/dft/ultrafeedback_sft.parquet \\
        --out ~/data/dft/ultrafeedback_pool.parquet --model mistralai/Mistral-7B-v0.1 --backend vllm
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recipe.dft.data import prompt_ids, read_pool
from recipe.dft.objective import REF_PROMPTS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SYSTEM_PROMPT = "You are an unhelpful assistant."
BACKENDS = ("hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SETTINGS_FILE = "settings.json"
# vLLM's share of the GPU memory: the rest holds the float32 scorer (a 7B model's weights alone take 28 GiB)
VLLM_GPU_MEMORY_FRACTION = 0.5

# prompts (token ids) and their seeds -> K outputs (token ids) per prompt
Sampler = Callable[[list[list[int]], list[int]], list[list[list[int]]]]


class NegativesError(ValueError):
    """Bad input or settings; the message names the flag or column and the fix."""


def augment(messages: Sequence[dict], system_prompt: str) -> list[dict]:
    """x_bar: the chat ``messages`` with ``system_prompt`` as their system message (replacing any they had); an
    empty ``system_prompt`` leaves them as they are (x_bar = x: negatives sampled on the training prompt)."""
    if not system_prompt:
        return [dict(m) for m in messages]
    return [{"role": "system", "content": system_prompt}] + [dict(m) for m in messages if m["role"] != "system"]


def example_seed(seed: int, index: int) -> int:
    """Example ``index``'s sampling seed: a stream of its own, so its outputs depend on nothing else in the run."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def until_stop(tokens: Sequence[int], stop_ids: set[int]) -> list[int]:
    """A generated row up to and including its first stop token (what follows is padding); all of it if none."""
    for position, token in enumerate(tokens):
        if token in stop_ids:
            return list(tokens[: position + 1])
    return list(tokens)


def read_examples(paths: Sequence[str]) -> pa.Table:
    """The ``prompt`` and ``response`` columns of the input files, in order, checked: every prompt a non-empty list
    of {role, content} messages, every response a string."""
    tables = []
    for path in paths:
        if not Path(path).is_file():
            raise NegativesError(f"--data {path}: no such file")
        names = pq.read_schema(path).names
        missing = [column for column in ("prompt", "response") if column not in names]
        if missing:
            raise NegativesError(
                f"--data {path}: no column {missing[0]!r} (found {names}); the input needs 'prompt' (the chat "
                "messages x_i) and 'response' (the data output y_i), the rows SFT would train on"
            )
        table = pq.read_table(path, columns=["prompt", "response"])
        _check_examples(table, path)
        tables.append(table)
    examples = pa.concat_tables(tables, promote_options="permissive")
    if examples.num_rows == 0:
        raise NegativesError(f"--data {' '.join(paths)}: no rows")
    return examples


def _check_examples(table: pa.Table, path: str) -> None:
    prompt, response = table.column("prompt"), table.column("response")
    if not _is_string(response.type):
        raise NegativesError(f"--data {path}: column 'response' must hold strings (the outputs), not {response.type}")
    if not _is_messages(prompt.type):
        raise NegativesError(
            f"--data {path}: column 'prompt' must hold chat messages (a list of {{role, content}} strings), "
            f"not {prompt.type}"
        )
    messages = pc.list_flatten(prompt)
    bad_rows = {
        "an empty or missing 'prompt'": pc.fill_null(pc.list_value_length(prompt), 0).to_numpy() == 0,
        "a missing 'response'": response.is_null().to_numpy(zero_copy_only=False),
    }
    for problem, rows in bad_rows.items():
        if rows.any():
            raise NegativesError(f"--data {path}: row {int(np.flatnonzero(rows)[0])} has {problem}")
    if pc.struct_field(messages, "role").null_count or pc.struct_field(messages, "content").null_count:
        raise NegativesError(f"--data {path}: column 'prompt' has a message without a role or content")


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _is_messages(type_: pa.DataType) -> bool:
    """Whether ``type_`` is a list of structs with string fields ``role`` and ``content``."""
    if not (pa.types.is_list(type_) or pa.types.is_large_list(type_)) or not pa.types.is_struct(type_.value_type):
        return False
    fields = {field.name: field.type for field in type_.value_type}
    return all(key in fields and _is_string(fields[key]) for key in ("role", "content"))


def settings_record(args: argparse.Namespace) -> dict:
    """What a part's contents depend on, keyed by flag name: the input files' contents (sha256) and every setting
    but ``--batch-size`` and ``--out``."""
    model = Path(args.model).expanduser()
    return {
        "data": [_sha256(path) for path in args.data],
        "model": str(model.resolve()) if model.exists() else args.model,
        **{
            key: getattr(args, key)
            for key in (
                "num_samples",
                "system_prompt",
                "chat_template",
                "ref_prompt",
                "backend",
                "temperature",
                "top_k",
                "max_new_tokens",
                "chunk_size",
                "seed",
                "dtype",
            )
        },
    }


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def part_path(parts: Path, index: int) -> Path:
    return parts / f"part-{index:05d}.parquet"


def claim_parts(parts: Path, record: dict) -> None:
    """Make ``parts`` the work folder of a run with settings ``record``; refuse if it holds finished parts made with
    other settings (resuming would mix two pools)."""
    parts.mkdir(parents=True, exist_ok=True)
    settings_file = parts / SETTINGS_FILE
    finished = sorted(parts.glob("part-*.parquet"))
    if finished:
        recorded = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        changed = [key for key in record if recorded.get(key) != record[key]]
        if changed:
            what = "; ".join(
                "--data: the files' contents differ"
                if key == "data"
                else f"--{key.replace('_', '-')} was {recorded.get(key)!r}, now {record[key]!r}"
                for key in changed
            )
            raise NegativesError(
                f"{parts} holds {len(finished)} finished parts made with other settings ({what}); rerun with their "
                f"settings to resume, or delete {parts} to start over"
            )
    _write_atomic(settings_file, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def write_part(table: pa.Table, path: Path) -> None:
    """Save a finished chunk; atomic, so a part file on disk is always complete."""
    _write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def chunk_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[dict]], system_prompt: str, ref_prompt: str
) -> tuple[list[list[int]], list[list[int]]]:
    """The token ids of x_bar (the sampling prompt) and of the prompt log pi_ref is computed on, per example."""
    sampling, scoring = [], []
    for messages in prompts:
        try:
            bar = prompt_ids(tokenizer, augment(messages, system_prompt))
            sampling.append(bar)
            scoring.append(bar if ref_prompt == "augmented" else prompt_ids(tokenizer, messages))
        except Exception as error:  # chat templates raise what they like (ValueError, jinja2's TemplateError)
            raise NegativesError(
                f"the chat template cannot render {list(messages)} with the system message --system-prompt "
                f"{system_prompt!r}: {type(error).__name__}: {error}; give one that can with --chat-template (the "
                "same as training's model.custom_chat_template)"
            ) from error
    return sampling, scoring


def sequence_log_probs(
    model: PreTrainedModel, prompt: Sequence[int], outputs: Sequence[Sequence[int]], batch_size: int
) -> list[float]:
    """log pi(y | prompt) = sum_t log pi(y_t | prompt, y_<t) for each output y, by forward passes of ``model`` over
    prompt + y, ``batch_size`` outputs at a time.

    Outputs are right-padded: causal attention keeps padding out of every real position. Only the logits that
    predict output tokens are computed (the last longest + 1 positions); token terms are summed in float64.
    """
    import torch

    prompt = list(prompt)
    sums = []
    for first in range(0, len(outputs), batch_size):
        batch = [list(y) for y in outputs[first : first + batch_size]]
        width = max(len(y) for y in batch)
        input_ids = torch.zeros((len(batch), len(prompt) + width), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, y in enumerate(batch):
            input_ids[row, : len(prompt) + len(y)] = torch.tensor(prompt + y)
            attention_mask[row, : len(prompt) + len(y)] = 1
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=width + 1).logits
        logits = logits[:, :-1].float()  # position j predicts output token j
        targets = input_ids[:, len(prompt) :]
        token_log_probs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        on_output = attention_mask[:, len(prompt) :].bool()
        sums += torch.where(on_output, token_log_probs, 0).double().sum(-1).tolist()
    return sums


def hf_sampler(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    temperature: float,
    top_k: int,
    max_new_tokens: int,
) -> Sampler:
    """K outputs per prompt by transformers' ``generate``, one prompt at a time under its own seed."""
    import torch
    from transformers import GenerationConfig

    stop = model.generation_config.eos_token_id
    stop = tokenizer.eos_token_id if stop is None else stop
    stop_ids = set(stop) if isinstance(stop, list) else {stop}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    # generate() fills every setting left unset from the model's generation config, whose top_p or
    # repetition_penalty (chat checkpoints set them) would change the distribution: keep only the stop and pad ids
    model.generation_config = GenerationConfig(eos_token_id=stop, pad_token_id=pad)

    def sample(prompts: list[list[int]], seeds: list[int]) -> list[list[list[int]]]:
        results = []
        for prompt, seed in zip(prompts, seeds):
            torch.manual_seed(seed)
            input_ids = torch.tensor([prompt], device=model.device)
            rows = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=temperature,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
            )
            results.append([until_stop(row, stop_ids) for row in rows[:, len(prompt) :].tolist()])
        return results

    return sample


def vllm_sampler(
    model: str, dtype: str, num_samples: int, temperature: float, top_k: int, max_new_tokens: int
) -> Sampler:
    """K outputs per prompt by vLLM's offline engine, each prompt's under its own seed (its ``token_ids`` end with
    the stop token, which vLLM keeps there while it strips it from the text)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, gpu_memory_utilization=VLLM_GPU_MEMORY_FRACTION)
    top_k = top_k if top_k > 0 else -1  # vLLM's "no cut" (what verl's rollout config passes it)

    def sample(prompts: list[list[int]], seeds: list[int]) -> list[list[list[int]]]:
        params = [
            SamplingParams(n=num_samples, temperature=temperature, top_k=top_k, max_tokens=max_new_tokens, seed=seed)
            for seed in seeds
        ]
        requests = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts], params, use_tqdm=False)
        return [[list(output.token_ids) for output in request.outputs] for request in requests]

    return sample


def make_part(
    rows: pa.Table,
    start: int,
    tokenizer: PreTrainedTokenizerBase,
    sample: Sampler,
    score: Callable[[list[int], list[list[int]]], list[float]],
    args: argparse.Namespace,
) -> pa.Table:
    """The pool rows of examples ``start .. start + len(rows) - 1``."""
    sampling, scoring = chunk_prompts(tokenizer, rows.column("prompt").to_pylist(), args.system_prompt, args.ref_prompt)
    negatives = sample(sampling, [example_seed(args.seed, start + i) for i in range(rows.num_rows)])
    for i, outputs in enumerate(negatives):
        if len(outputs) != args.num_samples or not all(outputs):
            raise RuntimeError(
                f"the {args.backend} backend returned {[len(y) for y in outputs]} tokens for example {start + i}'s "
                f"--num-samples {args.num_samples} outputs; every output should have at least its stop token"
            )
    log_probs = [score(prompt, outputs) for prompt, outputs in zip(scoring, negatives)]
    return pa.table(
        {
            "prompt": rows.column("prompt"),
            "response": rows.column("response"),
            "negative_ids": pa.array(negatives, type=pa.list_(pa.list_(pa.int32()))),
            "ref_log_prob": pa.array(log_probs, type=pa.list_(pa.float64())),
            "ref_prompt": pa.array([args.ref_prompt] * rows.num_rows, type=pa.string()),
        }
    )


def load_models(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase
) -> tuple[Sampler, Callable[[list[int], list[list[int]]], list[float]]]:
    """The sampler of ``--backend`` and the float32 scorer."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sampling = dict(
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
    )
    if args.backend == "vllm":  # first: vLLM sizes its cache from the GPU memory it finds free
        sample = vllm_sampler(args.model, args.dtype, **sampling)
    scorer = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    if args.backend == "hf":
        dtype = args.dtype if args.dtype != "auto" else ("float32" if device.type == "cpu" else "auto")
        if dtype == "float32":
            generator = scorer
        else:
            torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
            generator = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch_dtype).to(device).eval()
        sample = hf_sampler(generator, tokenizer, **sampling)
    return sample, lambda prompt, outputs: sequence_log_probs(scorer, prompt, outputs, args.batch_size)


def build_pool(args: argparse.Namespace) -> pd.DataFrame:
    """Sample and score every chunk not yet saved, join the parts into ``args.out``; returns the pool as
    :func:`recipe.dft.data.read_pool` reads it."""
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise NegativesError(f"--out {out} is a folder; give the pool's file name, e.g. {out / 'pool.parquet'}")
    if args.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise NegativesError(
            "--backend vllm: vLLM is not installed in this environment; install it (pip install 'disco-verl[vllm]', "
            "docs/install.md) or sample with --backend hf"
        )
    examples = read_examples(args.data)
    parts = out.with_name(out.name + ".parts")
    claim_parts(parts, settings_record(args))
    starts = range(0, examples.num_rows, args.chunk_size)
    pending = [(index, start) for index, start in enumerate(starts) if not part_path(parts, index).exists()]
    if pending:
        _fill_parts(examples, pending, parts, args)
    _write_atomic(out, lambda tmp: _join(parts, len(starts), tmp))
    return read_pool(str(out), 1, args.ref_prompt)


def _fill_parts(examples: pa.Table, pending: list[tuple[int, int]], parts: Path, args: argparse.Namespace) -> None:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.chat_template is not None:  # as verl applies model.custom_chat_template
        tokenizer.chat_template = args.chat_template
    chunk_prompts(tokenizer, examples.column("prompt").slice(0, 1).to_pylist(), args.system_prompt, args.ref_prompt)
    sample, score = load_models(args, tokenizer)
    left = sum(min(args.chunk_size, examples.num_rows - start) for _, start in pending)
    with tqdm(total=examples.num_rows, initial=examples.num_rows - left, unit="example", desc="negatives") as bar:
        for index, start in pending:
            rows = examples.slice(start, args.chunk_size)
            write_part(make_part(rows, start, tokenizer, sample, score, args), part_path(parts, index))
            bar.update(rows.num_rows)


def _join(parts: Path, count: int, path: Path) -> None:
    """Concatenate parts 0 .. count - 1 into ``path``, one part in memory at a time."""
    writer = None
    for index in range(count):
        table = pq.read_table(part_path(parts, index))
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def summary(pool: pd.DataFrame, path: str, max_new_tokens: int) -> str:
    """A few lines on the pool written."""
    lengths = np.array([len(y) for outputs in pool["negative_ids"] for y in outputs])
    log_probs = np.concatenate([np.asarray(values, dtype=float) for values in pool["ref_log_prob"]])
    return (
        f"wrote {path}: {len(pool)} examples x {len(pool['negative_ids'].iloc[0])} negatives\n"
        f"negatives: mean {lengths.mean():.1f} tokens, {int((lengths >= max_new_tokens).sum())} of {lengths.size} "
        f"reached --max-new-tokens {max_new_tokens}\n"
        f"ref_log_prob ({pool['ref_prompt'].iloc[0]} prompt): mean {log_probs.mean():.2f} "
        f"({(log_probs / lengths).mean():.3f} per token)"
    )


def _at_least(minimum: float, kind: type = int, strict: bool = False) -> Callable[[str], float]:
    def parse(text: str):
        value = kind(text)
        if not (value > minimum if strict else value >= minimum):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recipe.dft.negatives", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help="input parquet file(s) with columns prompt, response")
    parser.add_argument("--out", required=True, help="the pool parquet file to write")
    parser.add_argument("--model", required=True, help="the base model pi_ref: a local folder or a Hub name")
    parser.add_argument("--num-samples", type=_at_least(1), default=16, help="K, negatives per example (%(default)s)")
    parser.add_argument(
        "--system-prompt", default=SYSTEM_PROMPT, help="x_bar's system message (%(default)r; '' for none: x_bar = x)"
    )
    parser.add_argument(
        "--chat-template",
        help="a Jinja chat template in place of the tokenizer's: training's model.custom_chat_template, if it sets one "
        "(base models without a template, e.g. Mistral-7B-v0.1, need it)",
    )
    parser.add_argument(
        "--ref-prompt",
        choices=REF_PROMPTS,
        default="plain",
        help="log pi_ref's prompt: plain, x (the official code's), or augmented, x_bar (%(default)s)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="hf", help="hf: CPUs, tests; vllm: GPUs (%(default)s)")
    positive = _at_least(0, float, strict=True)
    parser.add_argument("--temperature", type=positive, default=0.7, help="sampling temperature (%(default)s)")
    parser.add_argument("--top-k", type=_at_least(0), default=50, help="0: no top-k cut (%(default)s)")
    parser.add_argument("--max-new-tokens", type=_at_least(1), default=512, help="the longest negative (%(default)s)")
    parser.add_argument("--chunk-size", type=_at_least(1), default=256, help="examples per saved part (%(default)s)")
    parser.add_argument("--seed", type=_at_least(0), default=0, help="seeds every example's sampling (%(default)s)")
    parser.add_argument(
        "--batch-size", type=_at_least(1), default=16, help="outputs per scorer forward pass (%(default)s)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="the sampler's; auto: float32 on a CPU (%(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        pool = build_pool(args)
    except NegativesError as error:
        parser.error(str(error))
    print(summary(pool, args.out, args.max_new_tokens))


if __name__ == "__main__":
    main()
