"""DisCO's Hydra config: composition from any directory, defaults, and bad values refused when it is built."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import compose_disco, disco_actor_config
from hydra.errors import InstantiationException

from recipe.disco.config import DisCOPolicyLossConfig

KEY = "actor_rollout_ref.actor.policy_loss"


def test_recipe_yaml_selects_the_paper_defaults():
    actor_cfg, cfg = disco_actor_config()
    hp = actor_cfg.policy_loss
    assert isinstance(hp, DisCOPolicyLossConfig)
    assert (hp.loss_mode, hp.objective, hp.score_func, hp.tau, hp.delta, hp.beta, hp.kl_unit) == (
        "disco",
        "disco",
        "logL",
        10.0,
        1e-4,
        1e3,
        "step",
    )
    assert actor_cfg.strategy == "fsdp2"
    assert cfg.algorithm.adv_estimator == "disco" and hp.adv_estimator == "disco"
    assert cfg.reward.custom_reward_function.path == "pkg://recipe.disco.reward"
    assert not actor_cfg.use_kl_loss and actor_cfg.entropy_coeff == 0


@pytest.mark.parametrize(
    "override,message",
    [
        (f"{KEY}.score_func=logl", rf"{KEY}.score_func='logl' is not one of \['logL', 'Lratio'\]"),
        (f"{KEY}.objective=dro", rf"{KEY}.objective='dro' is not one of \['disco', 'disco-b'\]"),
        (f"{KEY}.tau=0", rf"{KEY}.tau=0 must be > 0"),
        (f"{KEY}.kl_unit=token", rf"{KEY}.kl_unit='token' is not one of \['step', 'question'\]"),
        (f"{KEY}.tau=-1", rf"{KEY}.tau=-1 must be > 0"),
        (f"{KEY}.beta=-1", rf"{KEY}.beta=-1 must be >= 0"),
        (f"{KEY}.delta=-0.1", rf"{KEY}.delta=-0.1 must be >= 0"),
        (f"{KEY}.loss_mode=vanilla", r"loss_mode='vanilla' with algorithm.adv_estimator='disco'"),
        ("algorithm.adv_estimator=grpo", r"loss_mode='disco' with algorithm.adv_estimator='grpo'"),
    ],
)
def test_bad_values_are_refused_when_the_config_is_built(override, message):
    with pytest.raises(InstantiationException, match=message):
        disco_actor_config([override])


def test_every_problem_is_reported_at_once():
    with pytest.raises(InstantiationException) as error:
        disco_actor_config([f"{KEY}.tau=0", f"{KEY}.beta=-1", f"{KEY}.score_func=x"])
    assert all(key in str(error.value) for key in (".tau=", ".beta=", ".score_func="))


def test_other_methods_can_run_on_the_recipe_yaml():
    actor_cfg, _ = disco_actor_config([f"{KEY}.loss_mode=vanilla", "algorithm.adv_estimator=grpo"])
    assert actor_cfg.policy_loss.loss_mode == "vanilla"


def test_yaml_composes_through_verl_validate_config():
    """verl's own driver-side validation (what main_ppo runs before Ray) accepts the recipe config."""
    from verl.utils.config import validate_config as verl_validate

    cfg = compose_disco(
        [
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            "trainer.n_gpus_per_node=8",
        ]
    )
    verl_validate(cfg, use_reference_policy=False, use_critic=False)


PROBE = (
    "import verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as L, ADV_ESTIMATOR_REGISTRY as A; "
    "print('disco' in L, 'disco' in A)"
)


def test_import_verl_registers_disco_through_the_entry_point(tmp_path):
    """A fresh interpreter, started outside the repository: `import verl` alone loads the plugin."""
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["True", "True"]


def test_a_broken_plugin_fails_loudly_when_disco_is_selected(tmp_path):
    code = (
        "import sys; sys.modules['recipe.disco.plugin'] = None\n"  # simulates an import error in the plugin
        "from recipe.disco.config import DisCOPolicyLossConfig\n"
        "DisCOPolicyLossConfig(loss_mode='disco')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0
    assert "DisCO is selected but its verl plugin recipe.disco.plugin failed to import" in out.stderr
