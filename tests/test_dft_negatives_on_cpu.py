"""``python -m recipe.dft.negatives`` (recipe/dft/negatives.py) on the tiny model: the pool it writes is what DFT's
training reads, its log pi_ref is the base model's (against an independent float64 recomputation, on the prompt
asked for), an interrupted run resumes to the uninterrupted pool, and bad input or changed settings are refused
before any model loads. Nothing checked depends on which tokens get sampled."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from e2e_utils import cached_tiny_build
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipe.dft import negatives
from recipe.dft.data import DFTDataset, prompt_ids, read_pool

K, MAX_NEW_TOKENS, CHUNK, N = 3, 6, 2, 5  # 5 examples: chunks of 2, 2 and 1
HELPFUL = {"role": "system", "content": "You are a helpful assistant."}  # example 0's own system message
# a chat template of another layout than the tiny tokenizer's, and one refusing system messages (as some do)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + PLAIN_TEMPLATE
)


class Interrupted(Exception):
    """Stands in for a run killed after its first chunk."""


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny model's many small kernels run fastest so, and do not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def build():
    return cached_tiny_build()


@pytest.fixture(scope="module")
def tokenizer(build):
    return AutoTokenizer.from_pretrained(build.model_dir)


@pytest.fixture
def data(tmp_path, build) -> Path:
    """N examples of the tiny task as SFT rows; the first has a system message of its own."""
    rows = pq.read_table(build.train_file).slice(0, N).to_pylist()
    examples = [
        {"prompt": row["prompt"], "response": f"\\boxed{{{row['reward_model']['ground_truth'][0]}}}"} for row in rows
    ]
    examples[0]["prompt"] = [HELPFUL, *examples[0]["prompt"]]
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(examples), path)
    return path


def run(data: Path, out: Path, build, *extra: str):
    """The command on ``data`` with K samples in chunks of CHUNK examples; the pool as training reads it."""
    negatives.main(
        ["--data", str(data), "--out", str(out), "--model", str(build.model_dir), "--num-samples", str(K)]
        + ["--max-new-tokens", str(MAX_NEW_TOKENS), "--chunk-size", str(CHUNK), *extra]
    )
    return read_pool(str(out), K, None)


def refusal(capsys, *argv: str) -> str:
    """The message of a command line refused by the CLI (argparse's exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        negatives.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def interrupted_run(data: Path, out: Path, build, monkeypatch) -> None:
    """A run that stops right after saving its first chunk."""
    write_part = negatives.write_part

    def write_then_stop(table, path):
        write_part(table, path)
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(negatives, "write_part", write_then_stop)
        with pytest.raises(Interrupted):
            run(data, out, build)


def as_lists(pool) -> tuple[list, list]:
    ids = [[[int(token) for token in output] for output in outputs] for outputs in pool["negative_ids"]]
    return ids, [list(values) for values in pool["ref_log_prob"]]


def test_pool_is_read_by_read_pool_and_dft_dataset_with_k_negatives_per_example(data, tmp_path, build, tokenizer):
    pool = run(data, tmp_path / "pool.parquet", build)
    source = pq.read_table(data).to_pylist()

    assert read_pool(str(tmp_path / "pool.parquet"), K, "plain") is not None  # ref_prompt column: plain (default)
    assert len(pool) == N and all(len(outputs) == K for outputs in pool["negative_ids"])
    assert list(pool["response"]) == [row["response"] for row in source]
    dataset = DFTDataset(pool, tokenizer, num_negatives=2, max_length=256, seed=0)
    for i in range(N):
        example = dataset[i]
        prompt = prompt_ids(tokenizer, source[i]["prompt"])  # training's prompt is the plain one
        assert all(sequence[: len(prompt)].tolist() == prompt for sequence in example.input_ids)
        pool_outputs = as_lists(pool)[0][i]
        assert all(sequence[len(prompt) :].tolist() in pool_outputs for sequence in example.input_ids[1:])


def test_each_negative_ends_at_its_stop_token_or_at_the_token_limit(data, tmp_path, build, tokenizer):
    ids, _ = as_lists(run(data, tmp_path / "pool.parquet", build))

    for outputs in ids:
        for output in outputs:
            assert 1 <= len(output) <= MAX_NEW_TOKENS
            assert tokenizer.eos_token_id not in output[:-1]
            assert output[-1] == tokenizer.eos_token_id or len(output) == MAX_NEW_TOKENS


def record_sampled_prompts(monkeypatch) -> list[list[int]]:
    """The prompts the hf sampler is given, as token ids (filled in as the command runs)."""
    seen = []
    hf_sampler = negatives.hf_sampler

    def recording_sampler(*args, **kwargs):
        sample = hf_sampler(*args, **kwargs)

        def recorded(prompts, seeds):
            seen.extend(prompts)
            return sample(prompts, seeds)

        return recorded

    monkeypatch.setattr(negatives, "hf_sampler", recording_sampler)
    return seen


def users(data: Path) -> list[list[dict]]:
    """Each example's messages less any system message."""
    return [[m for m in row["prompt"] if m["role"] != "system"] for row in pq.read_table(data).to_pylist()]


def test_negatives_are_sampled_on_the_augmented_prompt_replacing_a_system_message(
    data, tmp_path, build, tokenizer, monkeypatch
):
    seen = record_sampled_prompts(monkeypatch)
    run(data, tmp_path / "pool.parquet", build, "--system-prompt", "Answer badly.")

    unhelpful = {"role": "system", "content": "Answer badly."}
    assert seen == [prompt_ids(tokenizer, [unhelpful, *messages]) for messages in users(data)]


def test_chat_template_flag_renders_the_prompts_as_training_custom_chat_template_does(
    data, tmp_path, build, monkeypatch
):
    seen = record_sampled_prompts(monkeypatch)
    run(data, tmp_path / "pool.parquet", build, "--chat-template", PLAIN_TEMPLATE)

    custom = AutoTokenizer.from_pretrained(build.model_dir)
    custom.chat_template = PLAIN_TEMPLATE  # what verl's model.custom_chat_template does to training's tokenizer
    system = {"role": "system", "content": negatives.SYSTEM_PROMPT}
    assert seen == [prompt_ids(custom, [system, *messages]) for messages in users(data)]


def test_a_chat_template_that_cannot_render_the_prompts_is_refused_before_the_model_loads(
    data, tmp_path, build, monkeypatch, capsys
):
    monkeypatch.setattr(negatives, "load_models", None)  # calling it would fail: the refusal must come first
    argv = ["--data", str(data), "--out", str(tmp_path / "pool.parquet"), "--model", str(build.model_dir)]

    message = refusal(capsys, *argv, "--chat-template", NO_SYSTEM_TEMPLATE)

    assert "System role not supported" in message and "--chat-template" in message


def test_ref_log_prob_equals_a_float64_recomputation_on_the_plain_or_augmented_prompt(data, tmp_path, build, tokenizer):
    plain = run(data, tmp_path / "plain.parquet", build)
    augmented = run(data, tmp_path / "augmented.parquet", build, "--ref-prompt", "augmented")
    model = AutoModelForCausalLM.from_pretrained(build.model_dir, dtype=torch.float64).eval()

    def reference(messages, output) -> float:
        """log pi(output | messages): one forward pass, log_softmax written out, a python sum over the tokens."""
        prompt = prompt_ids(tokenizer, messages)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + output])).logits[0].double()
        log_probs = logits - logits.logsumexp(-1, keepdim=True)
        return sum(float(log_probs[len(prompt) - 1 + t, token]) for t, token in enumerate(output))

    ids, plain_values = as_lists(plain)
    augmented_ids, augmented_values = as_lists(augmented)
    assert augmented_ids == ids  # each example's seed alone decides its negatives
    assert list(plain["ref_prompt"]) == ["plain"] * N and list(augmented["ref_prompt"]) == ["augmented"] * N
    differences = []
    for i, row in enumerate(pq.read_table(data).to_pylist()):
        x_bar = negatives.augment(row["prompt"], negatives.SYSTEM_PROMPT)
        for k, output in enumerate(ids[i]):
            assert plain_values[i][k] == pytest.approx(reference(row["prompt"], output), abs=1e-4)
            assert augmented_values[i][k] == pytest.approx(reference(x_bar, output), abs=1e-4)
            differences.append(abs(plain_values[i][k] - augmented_values[i][k]))
    assert max(differences) > 1e-2  # the two prompts give different values, each matching its own prompt


def test_an_interrupted_run_resumes_to_the_uninterrupted_pool_without_redoing_finished_chunks(
    data, tmp_path, build, monkeypatch
):
    whole = run(data, tmp_path / "whole.parquet", build)
    out = tmp_path / "resumed.parquet"
    interrupted_run(data, out, build, monkeypatch)
    parts = tmp_path / "resumed.parquet.parts"
    assert not out.exists() and sorted(p.name for p in parts.glob("part-*")) == ["part-00000.parquet"]

    starts = []
    make_part = negatives.make_part

    def recording_make_part(rows, start, *args):
        starts.append(start)
        return make_part(rows, start, *args)

    monkeypatch.setattr(negatives, "make_part", recording_make_part)
    resumed = run(data, out, build)

    assert starts == [2, 4]  # chunk 0 (examples 0 and 1) was not made again
    assert as_lists(resumed) == as_lists(whole)
    assert list(resumed["response"]) == list(whole["response"])


def test_the_negatives_do_not_depend_on_the_chunk_size_or_the_batch_size(data, tmp_path, build):
    chunks_of_two = run(data, tmp_path / "two.parquet", build)
    one_chunk = run(data, tmp_path / "one.parquet", build, "--chunk-size", str(N), "--batch-size", "1")

    assert as_lists(one_chunk)[0] == as_lists(chunks_of_two)[0]  # each example's own seed decides its negatives
    for values, same in zip(as_lists(one_chunk)[1], as_lists(chunks_of_two)[1]):
        assert values == pytest.approx(same, abs=1e-5)  # one output per forward pass vs three: float32 rounding


def test_a_rerun_with_changed_settings_is_refused_naming_the_flag_but_batch_size_may_change(
    data, tmp_path, build, monkeypatch, capsys
):
    out = tmp_path / "pool.parquet"
    interrupted_run(data, out, build, monkeypatch)
    base = ["--data", str(data), "--out", str(out), "--model", str(build.model_dir), "--num-samples", str(K)]
    base += ["--max-new-tokens", str(MAX_NEW_TOKENS), "--chunk-size", str(CHUNK)]

    assert "--num-samples was 3, now 4" in refusal(capsys, *base, "--num-samples", "4")
    assert "--ref-prompt was 'plain', now 'augmented'" in refusal(capsys, *base, "--ref-prompt", "augmented")
    assert "--chunk-size was 2, now 3" in refusal(capsys, *base, "--chunk-size", "3")
    assert len(run(data, out, build, "--batch-size", "1")) == N  # the scorer's batch is no setting of the pool
    edited = pq.read_table(data).to_pylist()
    edited[0]["response"] = "\\boxed{0}"
    pq.write_table(pa.Table.from_pylist(edited), data)
    message = refusal(capsys, *base)
    assert "--data: the files' contents differ" in message and f"delete {out}.parts" in message


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing file", "--data"),
        ("missing column", "no column 'response'"),
        ("prompt not messages", "column 'prompt' must hold chat messages"),
        ("empty prompt", "row 1 has an empty or missing 'prompt'"),
        ("num samples 0", "--num-samples: must be >= 1"),
        ("temperature 0", "--temperature: must be > 0"),
        ("out is a folder", "--out"),
        ("vllm missing", "--backend vllm: vLLM is not installed"),
    ],
)
def test_bad_input_is_refused_before_the_model_loads_naming_the_flag_or_column(
    case, expected, tmp_path, monkeypatch, capsys
):
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "response": "2"}] * 2
    data, extra = tmp_path / "sft.parquet", []
    if case == "missing file":
        data = tmp_path / "absent.parquet"
    elif case == "missing column":
        rows = [{"prompt": row["prompt"]} for row in rows]
    elif case == "prompt not messages":
        rows = [{"prompt": "1+1?", "response": "2"}] * 2
    elif case == "empty prompt":
        rows = [rows[0], {"prompt": [], "response": "2"}]
    elif case == "num samples 0":
        extra = ["--num-samples", "0"]
    elif case == "temperature 0":
        extra = ["--temperature", "0"]
    elif case == "vllm missing":
        monkeypatch.setitem(sys.modules, "vllm", None)  # not importable, whatever this environment has
        extra = ["--backend", "vllm"]
    if case != "missing file":
        pq.write_table(pa.Table.from_pylist(rows), data)
    out = tmp_path if case == "out is a folder" else tmp_path / "pool.parquet"

    # no model at --model: a refusal that names the input came before any model load
    message = refusal(capsys, "--data", str(data), "--out", str(out), "--model", str(tmp_path / "no-model"), *extra)

    assert expected in message
    if case == "vllm missing":
        assert "--backend hf" in message
    assert not (tmp_path / "pool.parquet.parts").exists()


def test_augment_puts_the_system_prompt_in_place_of_any_system_message():
    user = {"role": "user", "content": "hi"}

    assert negatives.augment([user], "Be bad.") == [{"role": "system", "content": "Be bad."}, user]
    assert negatives.augment([HELPFUL, user], "Be bad.") == [{"role": "system", "content": "Be bad."}, user]


def test_an_empty_system_prompt_samples_on_the_training_prompt_itself():
    messages = [HELPFUL, {"role": "user", "content": "hi"}]

    assert negatives.augment(messages, "") == messages
