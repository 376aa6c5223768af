"""The launch scripts (run_disco_1.5b.sh, run_disco_7b.sh over run_disco.sh, and run_eval.sh).

``DRY_RUN=1`` runs them for real (bash -> ``python -m recipe.disco.main_disco`` -> Hydra -> DisCO checks -> verl's
``validate_config``); the resolved config they print is parsed and compared with the paper's settings, and the
actor section is instantiated as verl's own ``FSDPActorConfig`` to read the strategy its engine gets. The logic
that lives in bash alone (which loggers, where the metrics go) is read from the arguments the script hands to the
interpreter, with a recorder standing in for Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass

from recipe.disco import data

SCRIPTS = Path(__file__).resolve().parents[1] / "recipe" / "disco"
VALIDATED = "[validate_config] All configuration checks passed successfully!\n"
FILE_LOGGER_KEY = "++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH"
NO_WANDB, WITH_WANDB = "['console','file']", "['console','file','wandb']"
PAPER_BUDGET = 4 * (1024 + 8192)  # tokens per GPU in the paper's scripts: 4 full-length answers
H100_BYTES = 81_559 * 2**20  # what an 80 GB H100 reports


def assert_fits_80_gb_cards(cfg: dict) -> None:
    """The preflight's per-GPU memory estimate of the composed layout stays within an 80 GB card in every phase."""
    from recipe.disco import preflight

    shape = preflight.PAPER_MODELS[cfg["actor_rollout_ref"]["model"]["path"]]
    estimate = preflight.estimate_memory(shape, preflight.layout_from_config(OmegaConf.create(cfg)), H100_BYTES)
    peak = estimate.total(estimate.peak_phase)
    assert peak <= H100_BYTES, f"{estimate.peak_phase}: {peak / 2**30:.1f} GiB > {H100_BYTES / 2**30:.1f} GiB"


def script_env(home: Path, **env: str) -> dict[str, str]:
    """A clean environment: nothing of the caller's shell (wandb keys, layout variables, DRY_RUN) reaches the
    script; HOME is the test's folder, so there is no ~/.netrc unless a test writes one."""
    kept = {key: os.environ[key] for key in ("PATH", "TMPDIR", "LANG") if key in os.environ}
    # the preflight checks this machine (GPUs, flash-attn, the parquet files), not the composed config tested here
    return {**kept, "HOME": str(home), "PYTHON": sys.executable, "DISCO_IGNORE_PREFLIGHT": "1", **env}


def run_script(name: str, tmp_path: Path, *args: str, dry_run: bool = True, **env: str):
    """Run a launch script; returns (exit code, stdout, stderr)."""
    environ = script_env(tmp_path, **env)
    if dry_run:
        environ["DRY_RUN"] = "1"
    done = subprocess.run(
        ["bash", str(SCRIPTS / name), *args], env=environ, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    return done.returncode, done.stdout, done.stderr


def resolved_config(stdout: str) -> dict:
    """The YAML that DRY_RUN prints after verl's validation message."""
    return yaml.safe_load(stdout.split(VALIDATED, 1)[1].split("DRY_RUN:", 1)[0])


def engine_strategy(cfg: dict) -> str:
    """The FSDP version verl's engine gets: its ``FSDPActorConfig`` copies ``actor.strategy`` into the engine
    config (the printed ``fsdp_config.strategy`` still shows the YAML default)."""
    actor = omega_conf_to_dataclass(OmegaConf.create(cfg["actor_rollout_ref"]["actor"]))
    return actor.engine.strategy


def layout(cfg: dict) -> tuple:
    """(use_dynamic_bsz, token budget per GPU, Ulysses size) of the update, and the same of the log-prob pass."""
    actor, rollout = cfg["actor_rollout_ref"]["actor"], cfg["actor_rollout_ref"]["rollout"]
    update = (actor["use_dynamic_bsz"], actor["ppo_max_token_len_per_gpu"])
    log_prob = (rollout["log_prob_use_dynamic_bsz"], rollout["log_prob_max_token_len_per_gpu"])
    return update, log_prob, actor["fsdp_config"]["ulysses_sequence_parallel_size"]


def launch_arguments(name: str, tmp_path: Path, *args: str, **env: str) -> tuple[str, list[str]]:
    """What a launch script hands to Python, with a recorder in the interpreter's place (nothing runs):
    ($VERL_FILE_LOGGER_PATH as exported, the argument list)."""
    recorder = tmp_path / "record.sh"
    recorder.write_text('#!/bin/sh\nprintf "%s\\n" "$VERL_FILE_LOGGER_PATH" "$@" > "$0.out"\n')
    recorder.chmod(0o755)
    done = subprocess.run(
        ["bash", str(SCRIPTS / name), *args],
        env=script_env(tmp_path, **{"PYTHON": str(recorder), **env}),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    file_logger_path, *argv = (tmp_path / "record.sh.out").read_text().splitlines()
    return file_logger_path, argv


def override(argv: list[str], key: str) -> str:
    """The value of the last ``key=value`` override (Hydra applies the last one)."""
    values = [arg.split("=", 1)[1] for arg in argv if arg.split("=", 1)[0] == key]
    assert values, f"{key} not passed: {argv}"
    return values[-1]


# ------------------------------------------------------------------ training: DRY_RUN through Hydra and verl


def paper_checks(cfg: dict, model: str, lr: float, score_func: str, tau: float, home: Path) -> None:
    actor, rollout = cfg["actor_rollout_ref"]["actor"], cfg["actor_rollout_ref"]["rollout"]
    assert cfg["actor_rollout_ref"]["model"]["path"] == model
    assert actor["optim"]["lr"] == lr
    assert (cfg["data"]["train_batch_size"], rollout["n"], actor["ppo_mini_batch_size"]) == (128, 8, 32)
    assert (cfg["data"]["max_prompt_length"], cfg["data"]["max_response_length"]) == (1024, 8192)
    assert rollout["temperature"] == 0.6
    loss = actor["policy_loss"]
    assert (loss["loss_mode"], loss["objective"], loss["score_func"]) == ("disco", "disco", score_func)
    assert (loss["tau"], loss["delta"], loss["beta"]) == (tau, 1e-4, 1e3)
    assert (actor["use_kl_loss"], actor["entropy_coeff"], cfg["algorithm"]["use_kl_in_reward"]) == (False, 0, False)
    val = rollout["val_kwargs"]
    assert (val["n"], val["temperature"], val["top_p"], val["do_sample"]) == (16, 0.6, 0.95, True)
    trainer = cfg["trainer"]
    assert (trainer["test_freq"], trainer["save_freq"], trainer["resume_mode"]) == (20, 20, "auto")
    assert (trainer["nnodes"], trainer["n_gpus_per_node"], trainer["use_v1"]) == (1, 8, True)
    assert (trainer["v1"]["trainer_mode"], trainer["v1"]["sampler"]["max_off_policy_threshold"]) == ("sync", 8)
    assert (rollout["nnodes"], rollout["checkpoint_engine"]["backend"]) == (0, "naive")  # no standalone pool
    data_dir = home / "data" / "disco"
    assert cfg["data"]["train_files"] == str(data_dir / "deepscaler_train.parquet")
    names = ["aime24", "aime25", "math500", "amc23", "minerva", "olympiad_bench"]
    assert cfg["data"]["val_files"] == [str(data_dir / f"{name}.parquet") for name in names]
    assert "address" not in cfg["ray_kwargs"]["ray_init"]


@pytest.mark.parametrize(
    ("script", "model", "lr", "score_func", "tau", "gpu_memory"),
    [
        ("run_disco_1.5b.sh", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 2e-6, "logL", 10, 0.85),
        ("run_disco_7b.sh", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1e-6, "Lratio", 1, 0.6),
    ],
)
def test_dry_run_defaults_are_the_papers_with_bounded_disk_fsdp2_and_a_metrics_file(
    tmp_path, script, model, lr, score_func, tau, gpu_memory
):
    code, out, err = run_script(script, tmp_path)
    assert code == 0, err[-3000:]
    cfg = resolved_config(out)
    paper_checks(cfg, model, lr, score_func, tau, tmp_path)
    # the paper's layout: token budgets of 4 full-length answers per GPU, no sequence parallelism, and the
    # old-log-prob pass on the same setting (verl asserts the two use_dynamic_bsz are equal)
    assert layout(cfg) == ((True, PAPER_BUDGET), (True, PAPER_BUDGET), 1)
    assert cfg["actor_rollout_ref"]["actor"]["strategy"] == "fsdp2" and engine_strategy(cfg) == "fsdp2"
    rollout = cfg["actor_rollout_ref"]["rollout"]
    assert rollout["gpu_memory_utilization"] == gpu_memory
    # the original runs' scheduling limits; CUDA graphs on (the original had them off: ENFORCE_EAGER=True)
    assert (rollout["max_num_seqs"], rollout["max_num_batched_tokens"], rollout["enforce_eager"]) == (
        1024,
        10240,
        False,
    )
    run_dir = tmp_path / "disco_runs" / f"{script[len('run_disco_') : -len('.sh')].upper()}-disco-{score_func}"
    assert cfg["trainer"]["default_local_dir"] == str(run_dir / "checkpoints")
    assert cfg["trainer"]["max_actor_ckpt_to_keep"] == 2
    assert_fits_80_gb_cards(cfg)  # 7B: 0.85 (the paper's) would not, by the estimate
    # no wandb credentials in this environment: console and verl's file logger, into the run's folder, for
    # recipe.disco.plot; the path is handed to Ray so that a trainer on another node writes it too
    assert cfg["trainer"]["logger"] == ["console", "file"]
    assert cfg["ray_kwargs"]["ray_init"]["runtime_env"]["env_vars"] == {
        "VERL_FILE_LOGGER_PATH": str(run_dir / "metrics.jsonl")
    }
    assert "no wandb credentials" in err
    assert not (tmp_path / "disco_runs").exists()  # a dry run writes nothing


@pytest.mark.parametrize("script", ["run_disco_1.5b.sh", "run_disco_7b.sh"])
def test_dry_run_takes_environment_and_hydra_overrides(tmp_path, script):
    env = dict(
        MODEL_PATH="/models/m",
        TRAIN_FILE="/d/train.parquet",
        VAL_FILES="['/d/a.parquet','/d/b.parquet']",
        NNODES="2",
        NGPUS_PER_NODE="4",
        SCORE_FUNC="Lratio" if script == "run_disco_1.5b.sh" else "logL",
        OBJECTIVE="disco-b",
        OUTPUT_DIR="/out/run",
        RAY_ADDRESS="10.0.0.1:6379",
        LR="5e-7",
        MAX_CKPT_TO_KEEP="5",
        USE_DYNAMIC_BSZ="False",
        MAX_TOKEN_LEN_PER_GPU="20000",
        SP_SIZE="2",
        WANDB_API_KEY="test-key",
    )
    budget = "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24000"
    code, out, err = run_script(script, tmp_path, "trainer.total_training_steps=7", budget, **env)
    assert code == 0, err[-3000:]
    cfg = resolved_config(out)
    actor = cfg["actor_rollout_ref"]["actor"]
    assert cfg["actor_rollout_ref"]["model"]["path"] == "/models/m" and actor["optim"]["lr"] == 5e-7
    assert cfg["data"]["train_files"] == "/d/train.parquet"
    assert cfg["data"]["val_files"] == ["/d/a.parquet", "/d/b.parquet"]
    assert (cfg["trainer"]["nnodes"], cfg["trainer"]["n_gpus_per_node"]) == (2, 4)
    expected_tau = 1 if env["SCORE_FUNC"] == "Lratio" else 10  # follows SCORE_FUNC when TAU is unset
    policy_loss = actor["policy_loss"]
    assert (policy_loss["score_func"], policy_loss["tau"], policy_loss["objective"]) == (
        env["SCORE_FUNC"],
        expected_tau,
        "disco-b",
    )
    assert cfg["trainer"]["default_local_dir"] == "/out/run/checkpoints"
    assert cfg["ray_kwargs"]["ray_init"]["address"] == "10.0.0.1:6379"
    assert cfg["trainer"]["total_training_steps"] == 7 and cfg["trainer"]["max_actor_ckpt_to_keep"] == 5
    # USE_DYNAMIC_BSZ reaches both passes; the appended Hydra budget wins and the log-prob pass follows it
    assert layout(cfg) == ((False, 24000), (False, 24000), 2)
    assert cfg["trainer"]["logger"] == ["console", "file", "wandb"]  # WANDB_API_KEY is set
    assert "no wandb credentials" not in err


@pytest.mark.parametrize(
    ("env", "mode", "sync_step", "rollout_pool"),
    [  # (sync, the default: test_dry_run_defaults_are_the_papers...)
        ({"TRAINER_MODE": "colocate_async"}, "colocate_async", None, None),
        (  # 2 mini-batches per set of answers, an 8-GPU rollout node beside a training node, a looser bound
            {
                "TRAINER_MODE": "separate_async",
                "MINI_BATCH_SIZE": "64",
                "ROLLOUT_GPUS_PER_NODE": "8",
                "MAX_OFF_POLICY": "4",
            },
            "separate_async",
            2,
            (1, 8),
        ),
    ],
)
def test_trainer_mode_composes_verls_async_trainers_with_their_settings(tmp_path, env, mode, sync_step, rollout_pool):
    code, out, err = run_script("run_disco_1.5b.sh", tmp_path, **env)
    assert code == 0, err[-3000:]
    cfg = resolved_config(out)
    v1, rollout = cfg["trainer"]["v1"], cfg["actor_rollout_ref"]["rollout"]
    assert v1["trainer_mode"] == mode
    assert v1["sampler"]["max_off_policy_threshold"] == int(env.get("MAX_OFF_POLICY", 8))
    if sync_step is None:  # the standalone pool's settings stay verl's
        assert (rollout["nnodes"], rollout["checkpoint_engine"]["backend"]) == (0, "naive")
        return
    assert v1["separate_async"]["parameter_sync_step"] == sync_step
    assert cfg["data"]["train_batch_size"] == sync_step * cfg["actor_rollout_ref"]["actor"]["ppo_mini_batch_size"]
    assert (rollout["nnodes"], rollout["n_gpus_per_node"], rollout["checkpoint_engine"]["backend"]) == (
        *rollout_pool,
        "nccl",
    )


def test_explicit_tau_wins_and_a_refused_setting_stops_before_ray(tmp_path):
    code, out, _ = run_script("run_disco_1.5b.sh", tmp_path, TAU="3.5")
    assert code == 0 and resolved_config(out)["actor_rollout_ref"]["actor"]["policy_loss"]["tau"] == 3.5

    shuffle = "actor_rollout_ref.actor.shuffle"
    code, out, err = run_script("run_disco_1.5b.sh", tmp_path, f"{shuffle}=True", dry_run=False)
    assert code != 0
    assert f"{shuffle}=True: shuffled mini-batches split" in err and f"set {shuffle}=False" in err
    assert "ray init" not in out + err and "Started a local Ray instance" not in out + err


def test_7b_with_32k_answers_splits_micro_batches_over_2_gpus_with_room_for_one_full_answer(tmp_path):
    code, out, err = run_script("run_disco_7b.sh", tmp_path, MAX_RESPONSE_LENGTH="32768")
    assert code == 0, err[-3000:]
    cfg = resolved_config(out)
    (dynamic, budget), log_prob, sp_size = layout(cfg)
    assert (dynamic, budget, sp_size) == (True, 18432, 2) and log_prob == (True, 18432)
    longest = cfg["data"]["max_prompt_length"] + cfg["data"]["max_response_length"]
    assert cfg["actor_rollout_ref"]["rollout"]["response_length"] == 32768
    # verl's token-budget split asserts that the longest sequence fits one micro-batch of budget x SP tokens;
    # the micro-batch holds the paper's 36864 tokens, each GPU half of them
    assert budget * sp_size == PAPER_BUDGET >= longest == 33792
    assert engine_strategy(cfg) == "fsdp2" and cfg["actor_rollout_ref"]["rollout"]["gpu_memory_utilization"] == 0.6
    assert_fits_80_gb_cards(cfg)


# ------------------------------------------------------------------ evaluation


def test_eval_dry_run_uses_fsdp2_like_training_and_names_the_rollout_engine(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in data.EVAL_DATASETS:  # a dry run checks that the files exist, it does not read them
        (data_dir / data.DATASETS[name].output).touch()
    env = dict(DISCO_DATA_DIR=str(data_dir), OUTPUT_DIR=str(tmp_path / "eval"), MODEL_PATH=str(tmp_path / "model"))
    code, out, err = run_script("run_eval.sh", tmp_path, **env)
    assert code == 0, out[-3000:] + err[-3000:]
    cfg = resolved_config(out)
    assert cfg["actor_rollout_ref"]["actor"]["strategy"] == "fsdp2" and engine_strategy(cfg) == "fsdp2"
    assert cfg["actor_rollout_ref"]["rollout"]["name"] == "vllm"  # verl's default is ??? (no engine)
    assert cfg["trainer"]["val_only"] is True


def test_eval_puts_its_defaults_before_the_callers_overrides(tmp_path):
    strategy = "actor_rollout_ref.actor.strategy"
    _, argv = launch_arguments("run_eval.sh", tmp_path, f"{strategy}=fsdp", RAY_ADDRESS="10.0.0.1:6379")
    hydra = argv[argv.index("--") + 1 :]
    engine = "actor_rollout_ref.rollout.name=vllm"
    assert hydra == ["+ray_kwargs.ray_init.address=10.0.0.1:6379", f"{strategy}=fsdp2", engine, f"{strategy}=fsdp"]


# ------------------------------------------------------------------ bash-only logic, read from the arguments


@pytest.mark.parametrize(
    ("env", "netrc", "expected"),
    [
        ({}, None, NO_WANDB),
        ({"WANDB_API_KEY": "k"}, None, WITH_WANDB),
        ({"WANDB_MODE": "offline"}, None, WITH_WANDB),
        ({"WANDB_MODE": "disabled"}, None, NO_WANDB),
        ({}, "machine api.wandb.ai\n  login user\n  password k\n", WITH_WANDB),  # `wandb login` writes this
        ({}, "machine example.org login u password p\n", NO_WANDB),
        ({"NETRC": "{home}/elsewhere"}, "machine api.wandb.ai login user password k\n", WITH_WANDB),
        ({"LOGGER": "['console','tensorboard']", "WANDB_API_KEY": "k"}, None, "['console','tensorboard']"),
    ],
)
def test_wandb_is_logged_to_only_with_credentials_or_when_asked(tmp_path, env, netrc, expected):
    env = {key: value.format(home=tmp_path) for key, value in env.items()}
    if netrc is not None:
        Path(env.get("NETRC", tmp_path / ".netrc")).write_text(netrc)
    _, argv = launch_arguments("run_disco_1.5b.sh", tmp_path, DRY_RUN="1", **env)
    assert override(argv, "trainer.logger") == expected


def test_a_relaunch_keeps_the_earlier_metrics_log_and_a_dry_run_writes_nothing(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    env = dict(OUTPUT_DIR="runs/r")  # relative: resolved against the launch directory, as Ray workers run elsewhere

    launch_arguments("run_disco_1.5b.sh", tmp_path, DRY_RUN="1", **env)
    assert not run_dir.exists()

    exported, argv = launch_arguments("run_disco_1.5b.sh", tmp_path, **env)
    metrics = run_dir / "metrics.jsonl"
    assert exported == override(argv, FILE_LOGGER_KEY) == str(metrics)
    assert override(argv, "trainer.default_local_dir") == str(run_dir / "checkpoints")
    assert run_dir.is_dir() and not metrics.exists()  # verl's FileLogger opens the file but makes no folder

    metrics.write_text('{"step": 1, "data": {"critic/score/mean": 0.5}}\n')  # a first launch logged a step
    launch_arguments("run_disco_1.5b.sh", tmp_path, **env)  # the resumed launch: verl would truncate the file
    kept = list(run_dir.glob("metrics.jsonl.*"))
    assert len(kept) == 1 and kept[0].read_text() == '{"step": 1, "data": {"critic/score/mean": 0.5}}\n'
    assert not metrics.exists()


def test_the_first_run_check_composes_the_launch_script_with_lr_0_two_steps_and_a_small_validation(tmp_path):
    code, out, err = run_script("first_run_check.sh", tmp_path, "trainer.nnodes=1")
    assert code == 0, err
    cfg = resolved_config(out)
    assert cfg["actor_rollout_ref"]["actor"]["optim"]["lr"] == 0
    assert cfg["actor_rollout_ref"]["model"]["path"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"  # the 1.5B script
    assert cfg["trainer"]["total_training_steps"] == 2 and cfg["trainer"]["val_before_train"] is True
    assert (cfg["trainer"]["resume_mode"], cfg["trainer"]["save_freq"]) == ("disable", -1)
    assert (cfg["data"]["val_max_samples"], cfg["actor_rollout_ref"]["rollout"]["val_kwargs"]["n"]) == (64, 4)
    assert cfg["data"]["val_files"] == [f"{tmp_path}/data/disco/math500.parquet"]
    assert cfg["trainer"]["default_local_dir"] == f"{tmp_path}/disco_runs/first-run-check/checkpoints"
