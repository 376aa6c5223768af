"""Startup checks (one message per refused setting) and ``DRY_RUN=1`` of both launch scripts.

The scripts run for real (bash -> ``python -m recipe.disco.main_disco`` -> Hydra -> DisCO checks -> verl's
``validate_config``); their printed resolved config is parsed and compared with the paper's settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose_disco
from verl.trainer.ppo.v1 import get_trainer_cls

from recipe.disco import checks
from recipe.disco.trainer import DisCOTrainer

SCRIPTS = Path(__file__).resolve().parents[1] / "recipe" / "disco"
MICRO = "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"
LOG_PROB_MICRO = "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu"
# the paper's batch shape on one node of 8 GPUs: 128 prompts x 8 answers, 32 prompts per mini-batch, 4 per GPU
VALID = [
    "trainer.n_gpus_per_node=8",
    "data.train_batch_size=128",
    "actor_rollout_ref.rollout.n=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=32",
    f"{MICRO}=4",
]


def problems_with(*overrides: str) -> list[str]:
    return checks.config_problems(compose_disco([*VALID, *overrides]))


def test_the_paper_setting_passes():
    assert problems_with() == []
    assert problems_with("trainer.n_gpus_per_node=4", "trainer.nnodes=2") == []  # 2 nodes x 4 GPUs


@pytest.mark.parametrize(
    ("override", "key", "fix"),
    [
        ("actor_rollout_ref.actor.use_dynamic_bsz=true", "actor_rollout_ref.actor.use_dynamic_bsz=True", "=False"),
        ("actor_rollout_ref.actor.shuffle=true", "actor_rollout_ref.actor.shuffle=True", "=False"),
        ("trainer.use_v1=false", "trainer.use_v1=False", "set trainer.use_v1=True"),
        ("trainer.v1.trainer_mode=colocate_async", "trainer.v1.trainer_mode=colocate_async", "=sync"),
        ("actor_rollout_ref.actor.policy_loss.loss_mode=vanilla", "loss_mode=vanilla", "loss_mode=disco"),
        ("actor_rollout_ref.actor.use_kl_loss=true", "use_kl_loss=True", "use_kl_loss=False"),
        ("algorithm.use_kl_in_reward=true", "algorithm.use_kl_in_reward=True", "=False"),
        ("critic.enable=true", "critic.enable=True", "critic.enable=False"),
        ("distillation.enabled=true", "distillation.enabled=True", "distillation.enabled=False"),
        ("actor_rollout_ref.actor.strategy=megatron", "strategy=megatron", "strategy=fsdp2"),
        (
            "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2",
            "ulysses_sequence_parallel_size=2",
            "to 1",
        ),
        ("actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.n=1", "rollout.n=8"),
        ("data.train_batch_size=100", "data.train_batch_size=100", "multiple of 32"),
        (f"{MICRO}=3", f"{MICRO}=3", f"set {MICRO}=2"),  # 8 x 3 = 24 answers: not whole groups of 8
        (f"{MICRO}=null", f"{MICRO}=None", f"set {MICRO}=4"),
        ("trainer.n_gpus_per_node=1", f"{MICRO}=4", f"set {MICRO}=8"),  # 1 GPU: 4 answers < n
        ("trainer.n_gpus_per_node=3", f"{MICRO}=4", "multiple of rollout.n x the number of GPUs"),
        (f"{LOG_PROB_MICRO}=5", f"{LOG_PROB_MICRO}=5", "to a divisor of 32"),  # 256 answers / 8 ranks
    ],
)
def test_each_refused_setting_has_one_message_naming_key_value_and_fix(override, key, fix):
    problems = problems_with(override)
    assert len(problems) == 1, problems
    assert key in problems[0] and fix in problems[0]


def test_all_problems_are_reported_at_once_and_raise():
    config = compose_disco([*VALID, "actor_rollout_ref.actor.shuffle=true", "actor_rollout_ref.actor.use_kl_loss=true"])
    with pytest.raises(checks.DisCOConfigError) as error:
        checks.check_config(config)
    assert str(error.value).count("\n  - ") == 2


def test_another_verl_version_is_refused(monkeypatch):
    monkeypatch.setattr(checks.verl, "__version__", "0.10.0")
    assert problems_with() == [
        "verl==0.10.0: the whole-group layout follows verl 0.9.1's dispatch and mini/micro-batch split; "
        "install verl[verl-core]==0.9.1"
    ]


def test_an_entropy_bonus_warns():
    with pytest.warns(UserWarning, match="entropy_coeff=0.01"):
        checks.check_config(compose_disco([*VALID, "actor_rollout_ref.actor.entropy_coeff=0.01"]))


def test_the_trainer_is_verls_registered_sync_trainer_with_the_layout_hook():
    assert issubclass(DisCOTrainer, get_trainer_cls("sync"))
    assert "_balance_batch" in vars(DisCOTrainer) and "_compute_metrics" in vars(DisCOTrainer)


# ------------------------------------------------------------------ launch scripts


def run_script(name: str, tmp_path: Path, *args: str, dry_run: bool = True, **env: str):
    """Run a launch script with a clean HOME; returns (exit code, stdout, stderr)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DRY_RUN")}
    environ.update(HOME=str(tmp_path), PYTHON=sys.executable, **env)
    if dry_run:
        environ["DRY_RUN"] = "1"
    done = subprocess.run(
        ["bash", str(SCRIPTS / name), *args], env=environ, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    return done.returncode, done.stdout, done.stderr


def resolved_config(stdout: str) -> dict:
    """The YAML that DRY_RUN prints after verl's validation message."""
    body = stdout.split("[validate_config] All configuration checks passed successfully!\n", 1)[1]
    return yaml.safe_load(body.split("DRY_RUN:", 1)[0])


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
    data_dir = home / "data" / "disco"
    assert cfg["data"]["train_files"] == str(data_dir / "deepscaler_train.parquet")
    names = ["aime24", "aime25", "math500", "amc23", "minerva", "olympiad_bench"]
    assert cfg["data"]["val_files"] == [str(data_dir / f"{name}.parquet") for name in names]
    assert "address" not in cfg["ray_kwargs"]["ray_init"]


@pytest.mark.parametrize(
    ("script", "model", "lr", "score_func", "tau"),
    [
        ("run_disco_1.5b.sh", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 2e-6, "logL", 10),
        ("run_disco_7b.sh", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1e-6, "Lratio", 1),
    ],
)
def test_dry_run_defaults_are_the_papers(tmp_path, script, model, lr, score_func, tau):
    code, out, err = run_script(script, tmp_path)
    assert code == 0, err[-3000:]
    paper_checks(resolved_config(out), model, lr, score_func, tau, tmp_path)


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
    )
    code, out, err = run_script(script, tmp_path, "trainer.logger=[console]", "trainer.total_training_steps=7", **env)
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
    assert cfg["trainer"]["logger"] == ["console"] and cfg["trainer"]["total_training_steps"] == 7


def test_explicit_tau_wins_and_a_refused_setting_stops_before_ray(tmp_path):
    code, out, _ = run_script("run_disco_1.5b.sh", tmp_path, TAU="3.5")
    assert code == 0 and resolved_config(out)["actor_rollout_ref"]["actor"]["policy_loss"]["tau"] == 3.5

    code, out, err = run_script("run_disco_1.5b.sh", tmp_path, dry_run=False, NGPUS_PER_NODE="1")
    assert code != 0
    assert f"{MICRO}=4: with 1 data-parallel ranks a global micro-batch holds 4 answers" in err
    assert f"set {MICRO}=8" in err
    assert "ray init" not in out + err and "Started a local Ray instance" not in out + err
