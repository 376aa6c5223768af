"""Startup checks (one message per refused setting); the launch scripts are tested in test_launch_scripts_on_cpu.py."""

from __future__ import annotations

import pytest
from conftest import compose_disco
from verl.trainer.ppo.v1 import get_trainer_cls

from recipe.disco import checks
from recipe.disco.trainer import DisCOTrainer

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
