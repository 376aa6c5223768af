"""Shared helpers: the recipe's Hydra config and verl's real registries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# the same examples on every run and machine: a new random draw cannot turn CI red (a case found once is kept
# with @example)
settings.register_profile("fixed", derandomize=True)
settings.load_profile("fixed")

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "recipe" / "disco" / "config")

# One OpenMP thread in every test process and in every process a test starts (spawned ranks, torchrun, Ray workers,
# trainers), unless set otherwise: the test command runs 2 workers on CI's 2 cores and the multi-rank tests start up
# to 4 processes each, so torch's default of a thread per core oversubscribes the cores, and OpenMP's spin-waits burn
# them. Measured on 2 cores: the 4-rank exactness setup alone 73 s -> 45 s; the first CI environment 19.7 -> 16.3 min.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The tests that start a Ray cluster (verl's trainer, Ray actors or tasks), by module or test. Under the test
# command's `-n 2` they run one after another on one pytest-xdist worker while the other worker runs the rest, each
# module whole on one worker (its module fixtures, such as the 4-rank exactness setup, made once). One Ray cluster at
# a time keeps Ray's fixed 30-s wait for its node to register far off on 2 busy cores (measured here: 3 s alone, 5 s
# beside 4 busy processes), and the session's shared training run (``trained_run``) is made once.
RAY_TESTS = (
    "tests/test_checkpoint_engine_on_cpu.py::",
    "tests/test_cpu_backend_on_cpu.py::",
    "tests/test_demo_on_cpu.py::",
    "tests/test_e2e_disco_on_cpu.py::",
    "tests/test_evaluate_on_cpu.py::",
    "tests/test_grouping_on_cpu.py::",
    "tests/test_vllm_rollout_on_cpu.py::",
    "tests/test_reward_on_cpu.py::test_slow_answer_times_out_in_a_ray_task",
)


# The carry task's build (``carry.build_carry``: about 4 min on one busy core, once per machine, then cached in /tmp)
# is made on a clean machine by the worker beside the Ray tests, at its start: its module is the first unit after the
# Ray tests, and the Ray tests that need the build come last among them. A clean CI run had made it inside the Ray
# tests, which waited those minutes.
CARRY_BUILDER = "tests/test_carry_task_on_cpu.py::"
RAY_TESTS_NEEDING_CARRY = "tests/test_demo_on_cpu.py::"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The Ray tests first (those needing the carry build last among them), then the carry task's module, then the
    rest, each group in its collected order."""

    def group(item: pytest.Item) -> int:
        if item.nodeid.startswith(RAY_TESTS):
            return 1 if item.nodeid.startswith(RAY_TESTS_NEEDING_CARRY) else 0
        return 2 if item.nodeid.startswith(CARRY_BUILDER) else 3

    items.sort(key=group)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unused without -n
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduling by scope, the scopes being the Ray tests together and each other module, handed
    out in the collected order (not xdist's default of the most tests first): the Ray tests to one worker, the carry
    task's module to the other, then each module to the worker that is free first."""
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsInTurn(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "Ray" if nodeid.startswith(RAY_TESTS) else nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False
    return RayTestsInTurn(config, log)


def compose_disco(overrides: list[str] | tuple[str, ...] = ()):
    """The recipe's ``disco_trainer.yaml`` composed by Hydra, as verl's entry point would."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose("disco_trainer", overrides=list(overrides))


def disco_actor_config(overrides: list[str] | tuple[str, ...] = (), rollout_n: int = 8):
    """verl's FSDPActorConfig (with DisCOPolicyLossConfig) instantiated from the composed recipe YAML."""
    from verl.utils.config import omega_conf_to_dataclass

    cfg = compose_disco(
        [
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            f"actor_rollout_ref.rollout.n={rollout_n}",
            *overrides,
        ]
    )
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor), cfg


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """main_disco trained for 2 steps on 2 CPU ranks with a checkpoint (``e2e_utils.train_shared_run``), once per
    session: the end-to-end and evaluation tests share it."""
    from e2e_utils import train_shared_run

    return train_shared_run(tmp_path_factory.mktemp("disco_e2e"))


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    yield


__all__ = ["compose_disco", "disco_actor_config", "CONFIG_DIR", "os"]
