"""Startup checks (one message per refused setting); the launch scripts are tested in test_launch_scripts_on_cpu.py."""

from __future__ import annotations

import pytest
from conftest import compose_disco
from verl.trainer.ppo.v1 import get_trainer_cls

from recipe.disco import checks
from recipe.disco.trainer import TRAINERS, DisCOHooks

MICRO = "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"
LOG_PROB_MICRO = "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu"
# the paper's batch shape on one node of 8 GPUs: 128 prompts x 8 answers, 32 prompts per mini-batch, 4 per GPU
VALID = [
    "trainer.n_gpus_per_node=8",
    "data.train_batch_size=128",
    "actor_rollout_ref.rollout.n=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=32",
    f"{MICRO}=4",
    f"{LOG_PROB_MICRO}=8",
]


# separate_async on that node: a standalone rollout pool of 4 more GPUs, weights sent by NCCL every 4 updates of
# one mini-batch (verl's default parameter_sync_step: 128 = 4 x 32)
SEPARATE = [
    "trainer.v1.trainer_mode=separate_async",
    "actor_rollout_ref.rollout.nnodes=1",
    "actor_rollout_ref.rollout.n_gpus_per_node=4",
    "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl",
]


def problems_with(*overrides: str) -> list[str]:
    return checks.config_problems(compose_disco([*VALID, *overrides]))


def test_the_paper_setting_passes():
    assert problems_with() == []
    assert problems_with("trainer.n_gpus_per_node=4", "trainer.nnodes=2") == []  # 2 nodes x 4 GPUs


@pytest.mark.parametrize(
    "overrides",
    [
        # 24 answers per rank and mini-batch, micro-batches of 3 (n = 8 is no multiple of 3)
        ["data.train_batch_size=96", "actor_rollout_ref.actor.ppo_mini_batch_size=24", f"{MICRO}=3"],
        ["trainer.n_gpus_per_node=1"],
        ["trainer.n_gpus_per_node=4", "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2"],
        [f"{MICRO}=1", "actor_rollout_ref.actor.policy_loss.kl_unit=question"],
        [
            "actor_rollout_ref.actor.use_dynamic_bsz=true",
            "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1500",  # below one question's 8 answers
            "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true",
            "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=4096",
        ],
        # LoRA (verl's vLLM rollout loads the adapter): only which parameters train changes
        [
            "actor_rollout_ref.model.lora_rank=8",
            "actor_rollout_ref.model.lora_alpha=16",
            "actor_rollout_ref.model.target_modules=all-linear",
        ],
        ["trainer.v1.trainer_mode=colocate_async"],
        SEPARATE,
        [*SEPARATE, "trainer.v1.sampler.max_off_policy_strategy=wait"],
        [  # and on the CPU backend through vLLM's CPU build, its LoRA layers sharded (recipe.disco.cpu.vllm)
            "actor_rollout_ref.model.lora_rank=8",
            "trainer.device=cpu",
            "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
            "+actor_rollout_ref.model.lora.fully_sharded_loras=True",
        ],
    ],
)
def test_layouts_users_run_are_accepted(overrides):
    """DisCO is exact under any micro-batching, token budget, rank count and Ulysses size (the step coefficients)."""
    assert problems_with(*overrides) == []


@pytest.mark.parametrize(
    ("overrides", "in_loss", "unit_rows"),
    [
        ([], False, 256),  # kl_unit step: whole questions per mini-batch, coefficients from the worker
        (["actor_rollout_ref.actor.policy_loss.kl_unit=question"], True, 32),  # 8 GPUs x 4 = 4 whole questions
        (["actor_rollout_ref.actor.policy_loss.kl_unit=question", f"{MICRO}=3", f"{LOG_PROB_MICRO}=4"], False, 256),
        (
            ["actor_rollout_ref.actor.policy_loss.kl_unit=question", "actor_rollout_ref.actor.use_dynamic_bsz=true"],
            False,
            256,
        ),
    ],
)
def test_the_loss_computes_its_own_coefficients_only_where_global_micro_batches_hold_whole_questions(
    overrides, in_loss, unit_rows
):
    config = compose_disco([*VALID, *overrides])
    assert checks.coefficients_in_loss(config) is in_loss
    assert checks.update_shape(config).unit_rows == unit_rows


@pytest.mark.parametrize(
    ("override", "key", "fix"),
    [
        ("actor_rollout_ref.actor.shuffle=true", "actor_rollout_ref.actor.shuffle=True", "=False"),
        ("trainer.use_v1=false", "trainer.use_v1=False", "set trainer.use_v1=True"),
        ("trainer.v1.trainer_mode=fully_async", "trainer.v1.trainer_mode=fully_async", "one of ('sync', "),
        ("trainer.v1.sampler.max_off_policy_threshold=null", "max_off_policy_threshold=None with", "threshold=8"),
        ("trainer.v1.separate_async.parameter_sync_step=2", "train_batch_size=128: separate_async", "size=64 (2 x"),
        ("actor_rollout_ref.rollout.n_gpus_per_node=0", "rollout.n_gpus_per_node=0: separate_async", "at least 1"),
        ("actor_rollout_ref.rollout.checkpoint_engine.backend=naive", "backend=naive: separate_async", "to nccl"),
        ("actor_rollout_ref.actor.policy_loss.loss_mode=vanilla", "loss_mode=vanilla", "loss_mode=disco"),
        ("actor_rollout_ref.actor.use_kl_loss=true", "use_kl_loss=True", "use_kl_loss=False"),
        ("algorithm.use_kl_in_reward=true", "algorithm.use_kl_in_reward=True", "=False"),
        ("algorithm.rollout_correction.bypass_mode=true", "bypass_mode=True", "bypass_mode=False"),
        ("algorithm.rollout_correction.rollout_is=token", "rollout_is=token", "rollout_is=None"),
        ("algorithm.rollout_correction.rollout_rs=token", "rollout_rs=token", "rollout_rs=None"),
        (
            "actor_rollout_ref.rollout.full_determinism=true",
            "full_determinism=True: verl then seeds every request of a rollout replica alike",
            "full_determinism=False",
        ),
        ("critic.enable=true", "critic.enable=True", "critic.enable=False"),
        ("distillation.enabled=true", "distillation.enabled=True", "distillation.enabled=False"),
        ("actor_rollout_ref.actor.strategy=megatron", "strategy=megatron", "strategy=fsdp2"),
        ("actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.n=1", "rollout.n=8"),  # (with log-prob micro 4)
        ("data.train_batch_size=100", "data.train_batch_size=100", "multiple of 32"),
        (f"{MICRO}=3", f"{MICRO}=3", "divisor of 32 (1, 2, 4, 8, 16, 32)"),  # 256 answers / 8 ranks per mini-batch
        (f"{MICRO}=null", f"{MICRO}=None", "actor_rollout_ref.actor.use_dynamic_bsz=True"),
        ("trainer.n_gpus_per_node=3", "ppo_mini_batch_size=32", "multiple of 3"),
        (f"{LOG_PROB_MICRO}=5", f"{LOG_PROB_MICRO}=5", "divisor of 32"),
        (
            "actor_rollout_ref.actor.use_dynamic_bsz=true",  # the default budget (16384) holds every sequence
            "ppo_max_token_len_per_gpu=100",
            "at least 1024",
        ),
        (
            "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2",  # with sdpa (extra override)
            "ulysses_sequence_parallel_size=2 with attn_implementation=sdpa",
            "install flash-attn",
        ),
        (  # with the CPU backend's hf rollout (extra override): it takes full weights, not LoRA adapters
            "actor_rollout_ref.model.lora_rank=8",
            "lora_rank=8 with actor_rollout_ref.rollout.name=hf",
            "set actor_rollout_ref.rollout.name=vllm",
        ),
        (  # LoRA through vLLM's CPU build with tensor parallelism 2 (extra overrides), its LoRA layers unsharded
            "trainer.device=cpu",
            "fully_sharded_loras=False with LoRA (lora_rank=8) and rollout.tensor_model_parallel_size=2",
            "set +actor_rollout_ref.model.lora.fully_sharded_loras=True",
        ),
    ],
)
def test_each_refused_setting_has_one_message_naming_key_value_and_fix(override, key, fix):
    extra = {
        "actor_rollout_ref.actor.use_dynamic_bsz=true": [
            "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=100",
            "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=false",
        ],
        "actor_rollout_ref.rollout.n=1": [f"{LOG_PROB_MICRO}=4"],  # 32 prompts x 1 answer / 8 ranks
        "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2": [
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa"
        ],
        "actor_rollout_ref.model.lora_rank=8": ["actor_rollout_ref.rollout.name=hf"],
        "trainer.v1.sampler.max_off_policy_threshold=null": ["trainer.v1.trainer_mode=colocate_async"],
        "trainer.v1.separate_async.parameter_sync_step=2": SEPARATE,
        "actor_rollout_ref.rollout.n_gpus_per_node=0": SEPARATE,
        "actor_rollout_ref.rollout.checkpoint_engine.backend=naive": SEPARATE,
        "trainer.device=cpu": [
            "actor_rollout_ref.model.lora_rank=8",
            "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
        ],
    }
    problems = problems_with(*extra.get(override, []), override)
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
        "verl==0.10.0: DisCO's layout and actor worker follow verl 0.9.1's dispatch, mini-batch split and worker "
        "classes; install verl[verl-core]==0.9.1"
    ]


def test_an_entropy_bonus_warns():
    with pytest.warns(UserWarning, match="entropy_coeff=0.01"):
        checks.check_config(compose_disco([*VALID, "actor_rollout_ref.actor.entropy_coeff=0.01"]))


def test_each_of_verls_trainers_has_discos_hooks():
    assert tuple(TRAINERS) == checks.TRAINER_MODES
    for mode, trainer in TRAINERS.items():
        assert trainer.__mro__[1:3] == (DisCOHooks, get_trainer_cls(mode))
    hooks = ("_init_resource_pool_mgr", "_balance_batch", "_update_actor", "_compute_metrics")
    assert all(hook in vars(DisCOHooks) for hook in hooks)


@pytest.mark.parametrize(
    ("mode", "overrides", "verl_worker", "live_at_triggers"),
    [
        ("sync", [], "ActorRolloutRefWorker", [True]),
        ("colocate_async", ["trainer.v1.trainer_mode=colocate_async"], "ActorRolloutRefWorker", [True]),
        ("separate_async", SEPARATE, "DetachActorWorker", [True, False, False, False]),
    ],
)
def test_the_actor_role_runs_discos_worker_and_knows_where_old_log_probs_were_computed(
    mode, overrides, verl_worker, live_at_triggers
):
    """The resource-pool hook maps the actor role to DisCO's version of the worker verl's trainer uses (verl's
    hybrid worker, or separate_async's detach worker with pi_old's CPU copies), with DisCO's training worker; the
    update hook says whether the old log-probs came from the live weights, per update of a parameter-sync cycle."""
    from verl.experimental.separation import engine_workers as detach
    from verl.trainer.ppo.utils import Role
    from verl.workers import engine_workers

    from recipe.disco.worker import DisCOTrainingWorker

    trainer = object.__new__(TRAINERS[mode])
    trainer.config = compose_disco([*VALID, *overrides])
    trainer._init_resource_pool_mgr()
    worker = trainer.role_worker_mapping[Role.ActorRollout].__ray_metadata__.modified_class.__mro__[1]
    assert worker is TRAINERS[mode].actor_worker_cls
    verl_cls = getattr(detach, verl_worker, None) or getattr(engine_workers, verl_worker)
    assert worker.__mro__[1] is verl_cls
    assert worker.actor_worker_cls is DisCOTrainingWorker
    assert issubclass(DisCOTrainingWorker, engine_workers.TrainingWorker)
    live = []
    for trainer.local_trigger_step in range(len(live_at_triggers)):
        live.append(trainer._old_log_probs_at_live_parameters())
    assert live == live_at_triggers
