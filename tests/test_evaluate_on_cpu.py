"""The evaluation table (recipe/disco/evaluate.py) on validation outputs recorded by verl's own writers, a dry
run of run_eval.sh, the checks of a checkpoint to evaluate, and run_eval.sh on a trained checkpoint.

A simulated validation (known correct/wrong pattern per sample) is scored by the real reward function and
recorded exactly as verl's v1 trainer records it: the generations file by ``PPOTrainer._write_generations`` and
the metrics by ``PPOTrainer._val_metrics_update`` logged through verl's ``FileLogger``. Expected pass@k values
come from enumerating every k-subset of each problem's samples.

The checkpoint is the shared training run's (``trained_run`` in conftest.py: main_disco, 2 steps, 2 ranks, FSDP2):
the checks run on broken copies of it, and run_eval.sh evaluates it on 1 rank.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import compose_disco
from e2e_utils import N_GPUS, TRAINED_STEPS, cached_tiny_build
from safetensors.torch import load_file
from torch.distributed.tensor import Shard

from recipe.disco import data, evaluate
from recipe.disco.reward import compute_score_with_info

REPO = Path(__file__).resolve().parents[1]
PAPER_ORDER = ["AIME24", "AIME25", "MATH500", "AMC23", "Minerva", "O-Bench", "Avg"]
N = 4
# data_source -> per problem, which of its N samples are correct (None: the response was cut off, no answer)
PATTERNS = {
    "aime24": [[1, 0, 0, 0], [0, 0, 0, 0]],
    "aime25": [[1, 1, 0, None]],
    "math500": [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1]],
    "amc23": [[0, 1, 0, 0], [1, 1, 1, 0]],
    "minerva": [[None, None, 0, 1]],
    "olympiad_bench": [[0, 0, 1, 1], [1, 1, 1, 1]],
}


def brute_pass_at_k(samples: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(samples, k))
    return sum(any(subset) for subset in subsets) / len(subsets)


def expected_table(patterns: dict) -> dict[int, dict[str, float]]:
    return {
        k: {
            evaluate.COLUMNS[source]: sum(brute_pass_at_k([s == 1 for s in p], k) for p in problems) / len(problems)
            for source, problems in patterns.items()
        }
        for k in range(1, N + 1)
    }


def _response(correct: int | None, gold: str) -> str:
    if correct is None:
        return "Let me think about it more carefully, so"
    return f"Thinking.</think> The answer is $\\boxed{{{gold if correct else gold + '1'}}}$."


def record_validation(tmp_path: Path, patterns: dict, monkeypatch) -> tuple[Path, Path]:
    """Score the samples with the real reward and record them with verl's writers; returns (generations, log)."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.tracking import FileLogger

    inputs, outputs, gts, scores, keys, data_sources, sample_uids = [], [], [], [], [], [], []
    infos: dict[str, list] = defaultdict(list)
    expected_acc_counts = {}
    for source, problems in patterns.items():
        for index, pattern in enumerate(problems):
            uid, gold = str(uuid.uuid4()), str(17 + index)
            expected_acc_counts[(source, uid)] = N
            for session, correct in enumerate(pattern):
                response = _response(correct, gold)
                info = compute_score_with_info(data_source=source, solution_str=response, ground_truth=[gold])
                inputs.append(f"problem {index} of {source}")
                outputs.append(response)
                gts.append([gold])
                scores.append(info["score"])
                keys.append(f"{uid}_{session}_0")
                data_sources.append(source)
                sample_uids.append(uid)
                infos["reward"].append(info["score"])
                for key, value in info.items():
                    infos[key].append(value)
    generations = tmp_path / "generations"
    PPOTrainer._write_generations(inputs, outputs, gts, scores, {**infos, "uid": keys}, str(generations), 0)
    metrics = PPOTrainer._val_metrics_update(None, data_sources, sample_uids, dict(infos), [], expected_acc_counts)
    log = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(log))
    logger = FileLogger("disco", "eval")
    logger.log(data={"training/global_step": 0}, step=0)
    logger.log(data=metrics, step=0)
    logger.finish()
    return generations / "0.jsonl", log


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return record_validation(tmp_path_factory.mktemp("recorded"), PATTERNS, monkeypatch)


@pytest.mark.parametrize("n", range(1, 8))
def test_unbiased_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert evaluate.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(samples, k), abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        evaluate.pass_at_k(n, c, k)


def test_table_from_verl_generations(recorded):
    generations, _ = recorded
    rows = evaluate.read_jsonl(generations)
    expected_problems = {source: len(problems) for source, problems in PATTERNS.items()}
    table = evaluate.table_from_generations(rows, n_samples=N, expected_problems=expected_problems, label="m")
    expected = expected_table(PATTERNS)
    assert table.n_samples == N and table.missing_samples == 0
    assert table.problems == {evaluate.COLUMNS[s]: count for s, count in expected_problems.items()}
    for k in range(1, N + 1):
        assert table.pass_at[k] == pytest.approx(expected[k])
        assert table.average(k) == pytest.approx(sum(expected[k].values()) / 6)
    # pass@1 is the plain accuracy over all samples of a benchmark's problems
    aime25 = [s == 1 for p in PATTERNS["aime25"] for s in p]
    assert table.pass_at[1]["AIME25"] == pytest.approx(sum(aime25) / len(aime25))


def test_markdown_and_csv_in_paper_order(recorded, tmp_path):
    table = evaluate.table_from_generations(evaluate.read_jsonl(recorded[0]), n_samples=N, label="my-model")
    markdown, csv_path = evaluate.write_table(table, tmp_path)
    lines = markdown.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Model |"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == ["Model", *PAPER_ORDER]
    row = next(line for line in lines if line.startswith("| my-model |"))
    expected = expected_table(PATTERNS)[1]
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    assert cells == [f"{v:.3f}" for v in [*expected.values(), sum(expected.values()) / 6]]
    assert sum(line.startswith(f"| {k} |") for k in range(1, N + 1) for line in lines) == N
    records = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [r["metric"] for r in records] == [f"pass@{k}" for k in range(1, N + 1)]
    assert list(records[0])[1:] == PAPER_ORDER
    for k, record in enumerate(records, start=1):
        values = expected_table(PATTERNS)[k]
        assert float(record["Avg"]) == pytest.approx(sum(values.values()) / 6, abs=1e-6)
        assert {c: float(record[c]) for c in values} == pytest.approx(values, abs=1e-6)


def test_table_from_recorded_metrics_matches_generations(recorded):
    generations, log = recorded
    metrics = evaluate.last_validation_metrics(evaluate.read_jsonl(log))
    from_metrics = evaluate.table_from_metrics(metrics)
    from_generations = evaluate.table_from_generations(evaluate.read_jsonl(generations), n_samples=N)
    assert from_metrics.n_samples == N
    assert from_metrics.pass_at[1] == pytest.approx(from_generations.pass_at[1])
    assert from_metrics.pass_at[1] == pytest.approx(expected_table(PATTERNS)[1])
    assert evaluate.to_csv(from_metrics).splitlines()[0] == ",".join(["metric", *PAPER_ORDER])


def test_outcome_rates_are_logged_per_benchmark(recorded):
    metrics = evaluate.last_validation_metrics(evaluate.read_jsonl(recorded[1]))
    minerva = [s for p in PATTERNS["minerva"] for s in p]
    assert metrics[f"val-aux/minerva/answer_missing/mean@{N}"] == pytest.approx(minerva.count(None) / len(minerva))
    assert metrics[f"val-aux/minerva/answer_right/mean@{N}"] == pytest.approx(minerva.count(1) / len(minerva))


def test_metrics_of_other_data_sources_and_partial_tables():
    metrics = {"val-core/lighteval/MATH/acc/mean@16": 0.5, "val-core/aime24/acc/mean@16": 0.25, "val-aux/x": 1.0}
    table = evaluate.table_from_metrics(metrics, label="partial")
    assert table.pass_at[1] == {"AIME24": 0.25, "lighteval/MATH": 0.5}
    assert table.average(1) is None  # not all six benchmarks
    row = next(line for line in evaluate.to_markdown(table).splitlines() if line.startswith("| partial |"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["partial", "0.250", *["–"] * 6, "0.500"]


def test_missing_samples_count_as_wrong(recorded):
    rows = evaluate.read_jsonl(recorded[0])
    dropped = [row for row in rows if not (row["benchmark"] == "math500" and row["uid"].endswith("_0_0"))]
    table = evaluate.table_from_generations(dropped, n_samples=N)
    patterns = {**PATTERNS, "math500": [[0, *p[1:]] for p in PATTERNS["math500"]]}
    assert table.missing_samples == len(PATTERNS["math500"])
    assert table.pass_at[1] == pytest.approx(expected_table(patterns)[1])
    assert "count as wrong" in evaluate.to_markdown(table)


def test_generations_are_checked(recorded):
    rows = evaluate.read_jsonl(recorded[0])
    with pytest.raises(ValueError, match="aime24: 2 problems in the generations, expected 30"):
        evaluate.table_from_generations(rows, n_samples=N, expected_problems={"aime24": 30})
    with pytest.raises(ValueError, match="compute_score_with_info"):
        evaluate.table_from_generations([{k: v for k, v in r.items() if k != "benchmark"} for r in rows])
    with pytest.raises(ValueError, match="0/1 correctness"):
        evaluate.table_from_generations([{**rows[0], "acc": 0.5}])
    with pytest.raises(ValueError, match="more than n_samples"):
        evaluate.table_from_generations(rows, n_samples=N - 1)


def test_cli_tables_from_saved_files(recorded, tmp_path):
    generations, log = recorded
    assert evaluate.main(["--from-generations", str(generations), "--output-dir", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "results.csv").read_text().count("pass@") == N
    assert evaluate.main(["--from-metrics", str(log), "--output-dir", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "results.csv").read_text().count("pass@") == 1


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_data")
    fixtures = REPO / "tests" / "fixtures" / "data"
    counts = [
        f"--expected-rows={name}={len(json.loads((fixtures / f'{data.DATASETS[name].source_file}.json').read_text()))}"
        for name in data.EVAL_DATASETS
    ]
    argv = ["--output-dir", str(out), "--from-dir", str(fixtures), "--datasets", *data.EVAL_DATASETS, *counts]
    assert data.main(argv) == 0
    return out


def test_eval_config_composes_with_the_paper_protocol(eval_data, tmp_path):
    """The overrides evaluate passes to main_disco, composed with the recipe YAML by Hydra."""
    args = evaluate._parser().parse_args(
        ["--model-path", "m", "--data-dir", str(eval_data), "--output-dir", str(tmp_path), "--n-samples", "16"]
    )
    config = compose_disco(evaluate.eval_overrides(args))
    sampling = config.actor_rollout_ref.rollout.val_kwargs
    assert (sampling.n, sampling.temperature, sampling.top_p, sampling.do_sample) == (16, 0.6, 0.95, True)
    assert config.data.max_response_length == config.actor_rollout_ref.rollout.response_length == 8192
    assert config.trainer.val_only and config.trainer.val_before_train and config.trainer.resume_mode == "disable"
    assert list(config.data.val_files) == [str(eval_data / data.DATASETS[n].output) for n in data.EVAL_DATASETS]
    assert config.reward.custom_reward_function.name == "compute_score_with_info"
    assert config.trainer.validation_data_dir == str(tmp_path / "generations")
    assert not config.data.filter_overlong_prompts


def test_run_eval_dry_run_composes_and_validates(eval_data, tmp_path):
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "DISCO_IGNORE_PREFLIGHT": "1",  # the preflight checks this machine (vllm, flash-attn), not the config
        "PYTHON": sys.executable,
        "DISCO_DATA_DIR": str(eval_data),
        "OUTPUT_DIR": str(tmp_path / "eval"),
        "MODEL_PATH": str(tmp_path / "model"),
        "NGPUS_PER_NODE": "4",
        "N_SAMPLES": "12",
    }
    result = subprocess.run(
        ["bash", str(REPO / "recipe/disco/run_eval.sh"), "trainer.project_name=dry-run-project"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "DRY_RUN: configuration valid for DisCO" in out
    for expected in (
        "val_only: true",
        "'n': 12",  # N_SAMPLES reaches val_kwargs.n (YAML quotes the key n)
        "top_p: 0.95",
        "max_response_length: 8192",
        "n_gpus_per_node: 4",
        "name: compute_score_with_info",
        f"validation_data_dir: {tmp_path / 'eval' / 'generations'}",
        "project_name: dry-run-project",  # Hydra overrides pass through
    ):
        assert expected in out, expected
    for name in data.EVAL_DATASETS:
        assert f"- {eval_data / data.DATASETS[name].output}" in out
    assert not (tmp_path / "eval" / "results.md").exists()


def test_run_eval_without_data_says_what_to_do(tmp_path):
    result = subprocess.run(
        ["bash", str(REPO / "recipe/disco/run_eval.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "DISCO_DATA_DIR": str(tmp_path), "OUTPUT_DIR": str(tmp_path)},
        timeout=300,
    )
    assert result.returncode == 1 and "prepare_data.sh" in result.stderr


# ------------------------------------------------------------------ a trained checkpoint


def trained_checkpoint(trained_run) -> Path:
    return trained_run["checkpoint_dir"] / f"global_step_{TRAINED_STEPS}"


def broken_copy(trained_run, tmp_path: Path, breakage: str) -> tuple[Path, str]:
    """A copy of the trained checkpoint broken as named; returns (the CHECKPOINT to pass, text the error must say)."""
    checkpoint = tmp_path / "run" / "checkpoints" / f"global_step_{TRAINED_STEPS}"
    shutil.copytree(trained_checkpoint(trained_run), checkpoint)
    actor = checkpoint / "actor"
    if breakage == "no such folder":
        return tmp_path / "nowhere", "no such folder"
    if breakage == "actor folder given":
        return actor, f"pass CHECKPOINT={checkpoint}"
    if breakage == "checkpoints folder given":  # the latest by step number, not by name: 10 sorts before 2
        shutil.copytree(checkpoint, checkpoint.parent / "global_step_10")
        return checkpoint.parent, f"the latest CHECKPOINT={checkpoint.parent / 'global_step_10'}"
    if breakage == "Hugging Face folder given":
        return actor / "huggingface", f"MODEL_PATH={actor / 'huggingface'} and no CHECKPOINT"
    if breakage == "not FSDP":
        (actor / evaluate.FSDP_CONFIG).unlink()
        return checkpoint, "not an FSDP checkpoint"
    if breakage == "world size unreadable":
        (actor / evaluate.FSDP_CONFIG).write_text('{"FSDP_version": 2}')
        return checkpoint, "world_size=unreadable (KeyError: 'world_size'), not a positive integer"
    if breakage == "shard missing":
        (actor / f"model_world_size_{N_GPUS}_rank_1.pt").unlink()
        return checkpoint, f"world_size={N_GPUS}, but {actor} lacks model_world_size_{N_GPUS}_rank_1.pt"
    if breakage == "config missing":
        (actor / "huggingface" / "config.json").unlink()
        return checkpoint, f"{actor / 'huggingface'} lacks config.json"
    raise ValueError(breakage)


BREAKAGES = [
    "no such folder",
    "actor folder given",
    "checkpoints folder given",
    "Hugging Face folder given",
    "not FSDP",
    "world size unreadable",
    "shard missing",
    "config missing",
]


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_checkpoint_that_cannot_be_merged_is_refused_before_anything_runs(
    breakage, trained_run, eval_data, tmp_path, capsys, monkeypatch
):
    checkpoint, says = broken_copy(trained_run, tmp_path, breakage)
    monkeypatch.setattr(evaluate.subprocess, "run", lambda *a, **k: pytest.fail(f"launched {a}"))
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(checkpoint), "--data-dir", str(eval_data), "--output-dir", str(out)]) == 1
    error = capsys.readouterr().err
    assert f"error: CHECKPOINT={checkpoint}" in error and says in error, error
    assert not out.exists()


def test_run_eval_refuses_a_checkpoint_with_a_model_path(trained_run, eval_data, tmp_path):
    """MODEL_PATH and CHECKPOINT together are ambiguous; CHECKPOINT alone does not pass MODEL_PATH's default (a
    broken checkpoint gets its own message, not this one)."""
    checkpoint = trained_checkpoint(trained_run)
    env = {**os.environ, "PYTHON": sys.executable, "DISCO_DATA_DIR": str(eval_data), "OUTPUT_DIR": str(tmp_path)}
    env.pop("MODEL_PATH", None)
    script = ["bash", str(REPO / "recipe/disco/run_eval.sh")]
    both = subprocess.run(
        script,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "MODEL_PATH": "m", "CHECKPOINT": str(checkpoint)},
    )
    assert both.returncode == 2
    assert f"MODEL_PATH=m (--model-path) and CHECKPOINT={checkpoint} (--checkpoint)" in both.stderr
    assert "unset MODEL_PATH" in both.stderr
    actor = subprocess.run(
        script, capture_output=True, text=True, timeout=300, env={**env, "CHECKPOINT": str(checkpoint / "actor")}
    )
    assert actor.returncode == 1 and f"pass CHECKPOINT={checkpoint}" in actor.stderr, actor.stderr


def test_dry_run_checks_the_checkpoint_but_merges_nothing(trained_run, eval_data, tmp_path, monkeypatch):
    launched = []

    def record(command, **_):
        launched.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(evaluate.subprocess, "run", record)
    monkeypatch.setenv("DRY_RUN", "1")
    out, checkpoint = tmp_path / "eval", trained_checkpoint(trained_run)
    assert evaluate.main(["--checkpoint", str(checkpoint), "--data-dir", str(eval_data), "--output-dir", str(out)]) == 0
    [command] = launched  # main_disco only, no model merger
    assert command[1:3] == ["-m", "recipe.disco.main_disco"]
    assert f"actor_rollout_ref.model.path='{out / evaluate.MERGED_MODEL_DIR}'" in command
    assert not (out / evaluate.MERGED_MODEL_DIR).exists()


def assert_merged_model_is_the_checkpoint(merged: Path, actor: Path) -> None:
    """The merged weights are the checkpoint's, in bf16: every rank's shard (``Shard(0)``: rank r holds chunk r of
    dim 0) is the matching chunk of the merged tensor, whose shape is the DTensor's global shape; a tied
    ``lm_head`` is left out, as Hugging Face saves it. And they are not the base model's: training changed them."""
    weights = load_file(merged / "model.safetensors")
    shards = [
        torch.load(actor / f"model_world_size_{N_GPUS}_rank_{rank}.pt", weights_only=False) for rank in range(N_GPUS)
    ]
    tied = {"lm_head.weight"} if json.loads((merged / "config.json").read_text()).get("tie_word_embeddings") else set()
    assert set(weights) == set(shards[0]) - tied
    for name, full in weights.items():
        assert full.dtype == torch.bfloat16 and full.shape == shards[0][name].shape
        for rank, shard in enumerate(shards):
            assert shard[name].placements == (Shard(0),)
            assert torch.equal(torch.chunk(full, N_GPUS, dim=0)[rank], shard[name].to_local().bfloat16()), name
    base = load_file(cached_tiny_build().model_dir / "model.safetensors")
    assert any(not torch.equal(full, base[name].bfloat16()) for name, full in weights.items())


def test_run_eval_merges_a_two_rank_checkpoint_and_evaluates_it_on_one(trained_run, tmp_path):
    """run_eval.sh with CHECKPOINT= the shared training run's 2-rank FSDP2 checkpoint and NGPUS_PER_NODE=1 (which
    verl's own loading of the shards cannot do): the model merger's folder holds the trained weights and is the
    model verl's real validation-only run evaluates (the CPU backend, six 3-problem benchmarks made of the tiny
    task's rows under the six data_source names, 2 samples each); the table agrees with the pass@1 that verl itself
    logs (val-core/<data_source>/acc/mean@2, captured by verl's file logger)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(cached_tiny_build().val_file).to_pylist()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for i, name in enumerate(data.EVAL_DATASETS):
        data.write_parquet(
            [{**row, "data_source": name} for row in rows[3 * i : 3 * i + 3]], data_dir / f"{name}.parquet"
        )
    checkpoint, out, log = trained_checkpoint(trained_run), tmp_path / "eval", tmp_path / "metrics.jsonl"
    env = {
        **os.environ,
        "DISCO_CPU_BACKEND": "1",
        "VERL_FILE_LOGGER_PATH": str(log),
        "PYTHON": sys.executable,
        "DISCO_DATA_DIR": str(data_dir),
        "OUTPUT_DIR": str(out),
        "CHECKPOINT": str(checkpoint),
        "LABEL": "trained",
        "N_SAMPLES": "2",
        "RESPONSE_LENGTH": "16",
        "PROMPT_LENGTH": "64",
        "NGPUS_PER_NODE": "1",
    }
    env.pop("MODEL_PATH", None)
    cpu = [  # the CPU backend's settings (recipe/disco/cpu/launch.py), for a validation-only run
        "actor_rollout_ref.rollout.name=hf",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "data.dataloader_num_workers=0",
        "trainer.device=cpu",
        "+ray_kwargs.ray_init.num_gpus=1",
        "ray_kwargs.ray_init.num_cpus=16",
        "reward.num_workers=1",
        "trainer.logger=[console,file]",
        "+reward.custom_reward_function.reward_kwargs.require_think=false",  # the tiny model does not use <think>
    ]
    with open(tmp_path / "run.log", "w") as output:
        process = subprocess.Popen(
            ["bash", str(REPO / "recipe/disco/run_eval.sh"), *cpu],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a timeout ends Ray's processes with the run
        )
        try:
            returncode = process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = "timeout"
    run_log = (tmp_path / "run.log").read_text()
    assert returncode == 0, run_log[-5000:]
    merged = out / evaluate.MERGED_MODEL_DIR
    assert_merged_model_is_the_checkpoint(merged, checkpoint / "actor")
    assert f"actor_rollout_ref.model.path='{merged}'" in run_log and "trainer.n_gpus_per_node=1" in run_log
    records = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert [r["metric"] for r in records] == ["pass@1", "pass@2"] and list(records[0])[1:] == PAPER_ORDER
    table = evaluate.table_from_generations(evaluate.read_jsonl(out / "generations" / "0.jsonl"))
    assert table.n_samples == 2 and table.problems == dict.fromkeys(PAPER_ORDER[:6], 3)
    verl_pass_at_1 = evaluate.table_from_metrics(evaluate.last_validation_metrics(evaluate.read_jsonl(log)))
    assert verl_pass_at_1.pass_at[1] == pytest.approx(table.pass_at[1])
    assert {c: float(records[0][c]) for c in PAPER_ORDER[:6]} == pytest.approx(table.pass_at[1], abs=1e-6)
    assert "| trained |" in (out / "results.md").read_text()
