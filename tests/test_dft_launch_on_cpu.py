"""DFT's startup checks (recipe/dft/checks.py), launch scripts and data preparation.

The checks are run on the real composed Hydra config (``recipe/dft/config/dft_trainer.yaml`` over verl's
``sft_trainer_engine``). The launch scripts are run for real with ``DRY_RUN=1`` (bash -> ``python -m
recipe.dft.main_dft`` -> Hydra -> DFT's checks), and the resolved config they print is compared with the official
settings; what lives in bash alone (torchrun's arguments, the checkpoint the evaluation merges) is read from the
commands the scripts hand to the interpreter, with a recorder standing in for Python. ``prepare_data.sh`` runs with a
stand-in ``datasets`` module (no network): tiny in-memory Hub sets, and DisCO's evaluation sources as local files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir

from recipe.dft import checks, prepare_data
from recipe.dft.objective import DFT2_PRESET, DFT_PRESET
from recipe.disco import data as disco_data

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "recipe" / "dft"
CONFIG_DIR = str(SCRIPTS / "config")
DFT_DONE = "DRY_RUN: configuration valid for DFT"
DISCO_VALIDATED = "[validate_config] All configuration checks passed successfully!\n"
EVAL_SETS = ("aime24", "aime25", "math500", "amc23", "minerva", "olympiad_bench", "gsm8k")


def compose_dft(overrides: list[str] | tuple[str, ...] = ()):
    """The config ``main_dft`` gets for these overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("dft_trainer", overrides=list(overrides))


def write_pool(path: Path, rows: int, ref_prompt: str = "plain") -> Path:
    """A negatives pool in the schema of recipe.dft.data (the checks read only its schema, size and ref_prompt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = {
        "prompt": [{"role": "user", "content": "q"}],
        "response": "a",
        "negative_ids": [[5, 2], [7, 2], [9, 2]],
        "ref_log_prob": [-3.0, -4.0, -5.0],
        "ref_prompt": ref_prompt,
    }
    pd.DataFrame([example] * rows).to_parquet(path)
    return path


# ------------------------------------------------------------------ the checks on the composed config


@pytest.fixture
def pool(tmp_path) -> Path:
    return write_pool(tmp_path / "pool.parquet", 16)


def layout(pool: Path, *extra: str) -> list[str]:
    """A valid 2-rank layout: 8 examples per step, 4 per rank."""
    return [
        "model.path=unused",
        f"data.train_files={pool}",
        "data.train_batch_size=8",
        "trainer.n_gpus_per_node=2",
        *extra,
    ]


def test_a_valid_config_passes_and_its_data_parallel_size_follows_verls_engine(pool):
    config = compose_dft(layout(pool, f"data.val_files={pool}"))
    assert checks.config_problems(config, world_size=2) == []
    checks.check_config(config)  # raises nothing
    assert checks.data_parallel_size(config) == 2
    assert checks.data_parallel_size(compose_dft(layout(pool, "engine.ulysses_sequence_parallel_size=2"))) == 1


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["data.pad_mode=right"], ["data.pad_mode=right: DFT's collate builds jagged", "set data.pad_mode=no_padding"]),
        (
            ["engine.ulysses_sequence_parallel_size=2"],
            ["engine.ulysses_sequence_parallel_size=2: DFT's loss", "not been verified under Ulysses",
             "set engine.ulysses_sequence_parallel_size=1"],
        ),
        (
            ["data.custom_cls.path=my_data.py"],
            ["data.custom_cls.path=my_data.py: DFT builds its own dataset", "set data.custom_cls.path=null"],
        ),
        (
            ["data.train_batch_size=9"],
            ["data.train_batch_size=9: not a multiple of the 2 data-parallel ranks, so each rank would get 4",
             "set data.train_batch_size to a positive multiple of 2"],
        ),
        (["data.train_batch_size=1"], ["data.train_batch_size=1:", "set data.train_batch_size to a positive multiple"]),
        (
            ["data.use_dynamic_bsz=False", "data.micro_batch_size_per_gpu=3"],
            ["data.micro_batch_size_per_gpu=3: each rank gets 4 examples", "to a divisor of 4", "use_dynamic_bsz=True"],
        ),
        (
            ["data.max_token_len_per_gpu=3071"],
            ["data.max_token_len_per_gpu=3071: a micro-batch must hold a whole example", "= 3 sequences of up to "
             "data.max_length=1024 tokens, 3072 tokens", "at least 3072"],
        ),
        (
            ["data.max_token_len_per_gpu=3072", "dft.num_negatives=3"],
            ["data.max_token_len_per_gpu=3072:", "1 + dft.num_negatives (3) = 4", "at least 4096"],
        ),
        (
            ["dft.ref_prompt=augmented"],
            ["dft.ref_prompt=augmented: data.train_files=", "on the plain prompt", "set dft.ref_prompt=plain",
             "--ref-prompt augmented"],
        ),
        (
            ["data.train_batch_size=32"],
            ["data.train_files=[", "16 examples, fewer than data.train_batch_size=32, so not one training step"],
        ),
    ],
)  # fmt: skip
def test_each_refusal_names_the_key_the_value_and_the_fix(pool, extra, expected):
    problems = checks.config_problems(compose_dft(layout(pool, *extra)))
    assert len(problems) == 1, problems
    assert all(part in problems[0] for part in expected), problems[0]


def test_the_pool_files_must_exist_be_parquet_pools_and_hold_a_batch(pool, tmp_path):
    missing, text = tmp_path / "missing.parquet", tmp_path / "text.parquet"
    text.write_text("not parquet")
    unsampled = tmp_path / "ultrafeedback_sft.parquet"  # prepare_data.sh's output, before the negatives command
    pd.DataFrame([{"prompt": [{"role": "user", "content": "q"}], "response": "a"}] * 16).to_parquet(unsampled)
    small_val = write_pool(tmp_path / "val.parquet", 7)
    for files, expected in [
        (missing, f"data.train_files={missing}: no such file; build the negatives pool with `python -m recipe.dft."),
        (text, f"data.train_files={text}: not a readable parquet file"),
        (unsampled, "lacks the DFT pool's column(s) ['negative_ids', 'ref_log_prob', 'ref_prompt']"),
    ]:
        problems = checks.config_problems(compose_dft(layout(pool, f"data.train_files={files}")))
        assert len(problems) == 1 and expected in problems[0], problems
    problems = checks.config_problems(compose_dft(layout(pool, f"data.val_files={small_val}")))
    assert len(problems) == 1, problems
    assert f"data.val_files=['{small_val}']: 7 examples, fewer than data.train_batch_size=8" in problems[0]
    assert "validation runs whole batches" in problems[0]


def test_dft2_reads_no_ref_prompt_and_every_problem_is_reported_at_once(pool):
    assert checks.config_problems(compose_dft(layout(pool, "dft.score=dft2", "dft.ref_prompt=augmented"))) == []
    config = compose_dft(layout(pool, "data.pad_mode=right", "data.train_batch_size=9", "dft.ref_prompt=augmented"))
    with pytest.raises(checks.DFTConfigError) as error:
        checks.check_config(config, world_size=4)
    message = str(error.value)
    assert message.startswith("DFT cannot train with this configuration:")
    for part in ("data.pad_mode=right", "data.train_batch_size=9", "dft.ref_prompt=augmented", "4 processes were"):
        assert part in message
    assert isinstance(error.value, ValueError)


# ------------------------------------------------------------------ launch scripts


def script_env(home: Path, **env: str) -> dict[str, str]:
    """A clean environment: nothing of the caller's shell reaches the script; HOME is the test's folder."""
    kept = {key: os.environ[key] for key in ("PATH", "TMPDIR", "LANG") if key in os.environ}
    return {**kept, "HOME": str(home), "PYTHON": sys.executable, **env}


def run_script(name: str, home: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """Run a launch script; returns (exit code, stdout, stderr)."""
    done = subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        env=script_env(home, **env),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=home,
    )
    return done.returncode, done.stdout, done.stderr


def dft_config(stdout: str) -> dict:
    """The resolved config main_dft prints under DRY_RUN."""
    return yaml.safe_load(stdout.split(DFT_DONE, 1)[0])


def recorded_commands(name: str, home: Path, *args: str, **env: str) -> list[list[str]]:
    """The argument lists a script hands to Python, with a recorder in the interpreter's place (nothing runs)."""
    recorder = home / "record.sh"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$@" "--end--" >> "$0.out"\n')
    recorder.chmod(0o755)
    code, _, err = run_script(name, home, *args, **{"PYTHON": str(recorder), **env})
    assert code == 0, err
    commands, current = [], []
    for line in (home / "record.sh.out").read_text().splitlines():
        if line == "--end--":
            commands.append(current)
            current = []
        else:
            current.append(line)
    return commands


def assert_official(cfg: dict, preset=DFT_PRESET) -> None:
    """The official settings (reference: dft-algorithm.md) in a composed config."""
    dft = cfg["dft"]
    assert (dft["score"], dft["tau"], dft["gamma"], dft["num_negatives"], dft["ref_prompt"]) == (
        preset.score,
        preset.tau,
        preset.gamma,
        preset.num_negatives,
        preset.ref_prompt,
    )
    assert (cfg["optim"]["lr"], cfg["optim"]["lr_scheduler_type"]) == (2e-6, "cosine")
    data, trainer = cfg["data"], cfg["trainer"]
    assert (trainer["total_epochs"], data["train_batch_size"], data["max_length"]) == (2, 128, 1024)
    assert (cfg["engine"]["strategy"], cfg["data"]["pad_mode"]) == ("fsdp2", "no_padding")


def test_7b_dry_run_composes_the_official_settings_on_8_gpus(tmp_path):
    pool = write_pool(tmp_path / "data" / "dft" / "ultrafeedback_pool.parquet", 128)
    code, out, err = run_script("run_dft_7b.sh", tmp_path, DRY_RUN="1")
    assert code == 0, err[-3000:]
    cfg = dft_config(out)
    assert_official(cfg)
    assert cfg["model"]["path"] == "mistralai/Mistral-7B-v0.1"
    assert (cfg["data"]["train_files"], cfg["data"]["val_files"]) == (str(pool), None)
    assert (cfg["trainer"]["nnodes"], cfg["trainer"]["n_gpus_per_node"]) == (1, 8)
    data = cfg["data"]
    # token budgets of 8 full-length examples (3 x 1024 tokens) per GPU; a rank's share is 16 examples
    assert (data["use_dynamic_bsz"], data["max_token_len_per_gpu"]) == (True, 24576)
    run_dir = tmp_path / "dft_runs" / "mistral-7b-ultrafeedback-dft"
    assert cfg["trainer"]["default_local_dir"] == str(run_dir)
    assert (cfg["trainer"]["save_freq"], cfg["trainer"]["logger"]) == ("after_each_epoch", ["console"])
    assert not run_dir.exists()  # a dry run writes nothing


def test_dry_run_takes_environment_settings_and_hydra_overrides(tmp_path):
    pool = write_pool(tmp_path / "pool.parquet", 64)
    env = dict(
        MODEL_PATH="/models/m",
        TRAIN_FILES=str(pool),
        VAL_FILES=str(pool),
        SCORE="dft2",  # tau follows the score (0.3); an explicit GAMMA wins over its 0.9
        GAMMA="0.95",
        NUM_NEGATIVES="3",
        REF_PROMPT="augmented",
        LR="1e-6",
        EPOCHS="3",
        BATCH_SIZE="64",
        MAX_LENGTH="512",
        USE_DYNAMIC_BSZ="False",
        MICRO_BATCH_SIZE="4",
        NNODES="2",
        NGPUS_PER_NODE="4",
        PROJECT_NAME="p",
        SAVE_DIR="/out/run",
        SAVE_FREQ="50",
        LOGGER="['console','wandb']",
        DRY_RUN="1",
    )
    code, out, err = run_script("run_dft.sh", tmp_path, "trainer.total_training_steps=7", "optim.weight_decay=0", **env)
    assert code == 0, err[-3000:]
    cfg = dft_config(out)
    dft, data, trainer = cfg["dft"], cfg["data"], cfg["trainer"]
    assert (dft["score"], dft["tau"], dft["gamma"]) == ("dft2", DFT2_PRESET.tau, 0.95)
    assert (dft["num_negatives"], dft["ref_prompt"]) == (3, "augmented")
    assert (cfg["model"]["path"], data["train_files"], data["val_files"]) == ("/models/m", str(pool), str(pool))
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], trainer["total_training_steps"]) == (1e-6, 0, 7)
    assert (data["train_batch_size"], data["max_length"], data["use_dynamic_bsz"]) == (64, 512, False)
    assert data["micro_batch_size_per_gpu"] == 4
    assert (trainer["nnodes"], trainer["n_gpus_per_node"], trainer["total_epochs"]) == (2, 4, 3)
    assert (trainer["project_name"], trainer["experiment_name"]) == ("p", "m-dft2")
    assert (trainer["default_local_dir"], trainer["save_freq"]) == ("/out/run", 50)
    assert trainer["logger"] == ["console", "wandb"]


def test_a_refused_setting_stops_the_launch_before_anything_starts(tmp_path):
    write_pool(tmp_path / "data" / "dft" / "ultrafeedback_pool.parquet", 128)
    env = dict(NGPUS_PER_NODE="1", USE_DYNAMIC_BSZ="False")  # torchrun with one process: 128 examples on the rank
    code, out, err = run_script("run_dft_7b.sh", tmp_path, "data.micro_batch_size_per_gpu=3", **env)
    assert code != 0
    assert "data.micro_batch_size_per_gpu=3: each rank gets 128 examples" in err and "a divisor of 128" in err
    assert DFT_DONE not in out and not (tmp_path / "dft_runs").exists()
    code, _, err = run_script("run_dft.sh", tmp_path, MODEL_PATH="m", TRAIN_FILES="p", SCORE="dpo")
    assert code == 2 and "SCORE=dpo: use dft or dft2" in err


def test_torchrun_gets_the_node_layout(tmp_path):
    (one_node,) = recorded_commands("run_dft.sh", tmp_path, "x=1", MODEL_PATH="m", TRAIN_FILES="p")
    assert one_node[:5] == ["-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=8", "--standalone"]
    assert one_node[5:7] == ["-m", "recipe.dft.main_dft"] and one_node[-1] == "x=1"
    (tmp_path / "record.sh.out").unlink()
    env = dict(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", NGPUS_PER_NODE="4")
    commands = recorded_commands("run_dft_metamath.sh", tmp_path, **env)
    assert len(commands) == 1  # training only: node 0 evaluates
    assert commands[0][2:7] == [
        "--nnodes=2",
        "--nproc_per_node=4",
        "--node_rank=1",
        "--master_addr=10.0.0.1",
        "--master_port=29500",
    ]


def test_metamath_trains_then_merges_the_last_checkpoint_and_evaluates_it(tmp_path):
    run_dir = tmp_path / "dft_runs" / "mistral-7b-metamath-dft"
    run_dir.mkdir(parents=True)
    (run_dir / "latest_checkpointed_iteration.txt").write_text("954")  # what verl writes after each save
    train, merge, evaluate = recorded_commands("run_dft_metamath.sh", tmp_path, "trainer.seed=3")
    assert f"data.train_files={tmp_path}/data/dft/metamathqa_pool.parquet" in train and train[-1] == "trainer.seed=3"
    assert f"trainer.default_local_dir={run_dir}" in train
    merged = run_dir / "eval" / "merged_model"
    assert merge == [
        "-m",
        "verl.model_merger",
        "merge",
        "--backend",
        "fsdp",
        "--local_dir",
        str(run_dir / "global_step_954"),
        "--target_dir",
        str(merged),
    ]
    assert evaluate[:2] == ["-m", "recipe.disco.evaluate"]
    options = dict(zip(evaluate[2 : evaluate.index("--") : 2], evaluate[3 : evaluate.index("--") : 2]))
    assert options["--model-path"] == str(merged) and "--checkpoint" not in options
    assert (options["--n-samples"], options["--temperature"], options["--response-length"]) == ("1", "0", "1024")
    assert options["--data-dir"] == f"{tmp_path}/data/dft/eval" and options["--output-dir"] == str(run_dir / "eval")


def test_metamath_dry_run_composes_training_and_evaluation(tmp_path):
    data_dir = tmp_path / "data" / "dft"
    pool = write_pool(data_dir / "metamathqa_pool.parquet", 128)
    (data_dir / "eval").mkdir()
    for name in EVAL_SETS:  # the evaluation's dry run checks that the files exist, it does not read them
        (data_dir / "eval" / f"{name}.parquet").touch()
    # the preflight checks this machine (vLLM, GPUs, the files' content), not the composed config tested here
    code, out, err = run_script("run_dft_metamath.sh", tmp_path, DRY_RUN="1", DISCO_IGNORE_PREFLIGHT="1")
    assert code == 0, err[-3000:]
    training, evaluation = out.split(DFT_DONE, 1)
    cfg = yaml.safe_load(training)
    assert_official(cfg)
    assert (cfg["data"]["train_files"], cfg["model"]["path"]) == (str(pool), "mistralai/Mistral-7B-v0.1")
    run_dir = tmp_path / "dft_runs" / "mistral-7b-metamath-dft"
    assert cfg["trainer"]["default_local_dir"] == str(run_dir)
    eval_cfg = yaml.safe_load(evaluation.split(DISCO_VALIDATED, 1)[1].split("DRY_RUN:", 1)[0])
    assert eval_cfg["actor_rollout_ref"]["model"]["path"] == str(run_dir / "eval" / "merged_model")
    assert eval_cfg["data"]["val_files"] == [str(data_dir / "eval" / f"{name}.parquet") for name in EVAL_SETS]
    val = eval_cfg["actor_rollout_ref"]["rollout"]["val_kwargs"]
    assert (val["n"], val["temperature"], eval_cfg["data"]["max_response_length"]) == (1, 0, 1024)
    reward = eval_cfg["reward"]["custom_reward_function"]
    assert reward["path"] == "pkg://recipe.disco.reward" and reward["reward_kwargs"]["require_think"] is False
    assert eval_cfg["trainer"]["val_only"] is True
    assert not run_dir.exists()


# ------------------------------------------------------------------ prepare_data.sh

DATASETS_STUB = '''"""A stand-in for the datasets library: tiny Hub sets, local JSON files; logs each call."""
import json
import os


class Rows(list):
    def to_list(self):
        return list(self)


HUB = {
    ("HuggingFaceH4/ultrafeedback_binarized", None, "train_sft"): [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    ],
    ("meta-math/MetaMathQA", None, "train"): [
        {"query": "What is 2+3?", "response": "2+3=5.\\nThe answer is: 5", "type": "GSM_AnsAug"},
    ],
    ("openai/gsm8k", "main", "test"): [
        {"question": f"Question {i}?", "answer": f"Some steps.\\n#### {1000 + i:,}"} for i in range(1319)
    ],
}


def disable_progress_bars():
    pass


def load_dataset(path, name=None, split=None, data_files=None):
    with open(os.environ["STUB_DATASETS_LOG"], "a") as log:
        log.write(json.dumps([path, name, split]) + "\\n")
    if path == "json":
        with open(data_files) as handle:
            return Rows(json.load(handle))
    return Rows(HUB[(path, name, split)])
'''


def test_prepare_data_writes_the_training_sets_the_evaluation_sets_and_prints_the_negatives_commands(tmp_path):
    stub = tmp_path / "stub" / "datasets"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(DATASETS_STUB)
    sources = tmp_path / "sources"  # DisCO's evaluation sources, read from local copies (DISCO_DATA_SOURCE_DIR)
    sources.mkdir()
    for name in disco_data.EVAL_DATASETS:
        dataset = disco_data.DATASETS[name]
        rows = [{"problem": f"{name} {i}", "answer": str(i)} for i in range(dataset.expected_rows)]
        (sources / f"{dataset.source_file}.json").write_text(json.dumps(rows))
    log = tmp_path / "calls.jsonl"
    env = dict(PYTHONPATH=str(stub.parent), DISCO_DATA_SOURCE_DIR=str(sources), STUB_DATASETS_LOG=str(log))
    code, out, err = run_script("prepare_data.sh", tmp_path, **env)
    assert code == 0, err[-3000:]

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[:3] == [
        ["HuggingFaceH4/ultrafeedback_binarized", None, "train_sft"],
        ["meta-math/MetaMathQA", None, "train"],
        ["openai/gsm8k", "main", "test"],
    ]
    data_dir = tmp_path / "data" / "dft"
    uf = pd.read_parquet(data_dir / "ultrafeedback_sft.parquet")
    assert list(uf.columns) == ["prompt", "response"] and list(uf["response"]) == ["Hello!", "d"]
    assert [list(p) for p in uf["prompt"]][1] == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    mm = pd.read_parquet(data_dir / "metamathqa.parquet")
    assert list(mm["prompt"][0]) == [{"role": "user", "content": "What is 2+3?"}]
    assert mm["response"][0] == "2+3=5.\nThe answer is: \\boxed{5}"  # what the math reward grades

    gsm8k = pd.read_parquet(data_dir / "eval" / "gsm8k.parquet")  # DisCO's evaluation rows
    assert list(gsm8k.columns) == disco_data.SCHEMA.names and len(gsm8k) == 1319
    assert list(gsm8k["reward_model"][1234]["ground_truth"]) == ["2234"]  # "2,234" after ####
    assert gsm8k["prompt"][0][0]["content"] == f"Question 0? {disco_data.PROMPT_SUFFIX}"
    assert set(gsm8k["data_source"]) == {"gsm8k"}
    for name in disco_data.EVAL_DATASETS:
        written = pd.read_parquet(data_dir / "eval" / f"{name}.parquet")
        assert len(written) == disco_data.DATASETS[name].expected_rows

    commands = [" ".join(line.split()) for line in out.replace("\\\n", " ").splitlines()]
    for source, pool, extra in (
        ("ultrafeedback_sft", "ultrafeedback", '--num-samples 16 --system-prompt "You are an unhelpful assistant."'),
        ("metamathqa", "metamathqa", "--num-samples 12"),
    ):
        (command,) = [line for line in commands if f"--data {data_dir}/{source}.parquet" in line]
        assert f"--out {data_dir}/{pool}_pool.parquet" in command  # the TRAIN_FILES default of its launch script
        assert f"--model mistralai/Mistral-7B-v0.1 {extra} --ref-prompt plain --backend vllm" in command


def test_prepare_data_refuses_rows_it_cannot_convert():
    with pytest.raises(ValueError, match=r"ultrafeedback row 1: expected user turn\(s\) then an assistant answer"):
        prepare_data.ultrafeedback_rows(
            [
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                {"messages": [{"role": "user", "content": "q"}]},
            ]
        )
    with pytest.raises(disco_data.DataPrepError, match="gsm8k: 1 rows in Hugging Face Hub dataset openai/gsm8k"):
        prepare_data.gsm8k_rows([{"question": "q", "answer": "#### 1"}])  # not the 1319 problems of the test split
