"""``python -m recipe.disco.demo``: the methods it compares, and two reduced runs through verl's real trainer.

The end-to-end runs are the demo's own command in a subprocess (from a clean working directory, as Ray puts the
driver's directory on the workers' path) with ``--steps 20``: once as shipped, once with the DisCO loss's sign
flipped by the test-only verl module ``tests/flipped_disco_loss.py``. Expected values are read from the runs'
file-logger JSON lines with ``json`` and numpy here, not through the demo's summary code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIG_DIR, compose_disco
from e2e_utils import TINY_CACHE, cached_tiny_build
from matplotlib.image import imread
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import omega_conf_to_dataclass, validate_config

from recipe.disco import demo
from recipe.disco.main_disco import validate
from recipe.disco.plot import draw, plot_runs, read_log

STEPS = 20
RISE = 0.15  # DisCO: mean reward of the last 3 steps >= reward of step 1 (the untrained model's samples) + RISE
FLIPPED_SLACK = 0.05  # flipped sign: mean reward of the last 3 steps <= reward of step 1 + FLIPPED_SLACK
ALL_PANELS = ["reward", "entropy", "response_length", "kl", "constraint_active", "score_margin", "val_accuracy"]
POLICY_LOSS = "actor_rollout_ref.actor.policy_loss"
# tests/flipped_disco_loss.py logs this; importing that module here would re-register "disco" flipped in pytest
FLIPPED_METRIC = "actor/flipped_loss"
# what each compared method changes against the DisCO run; everything else (data, seeds, budget) must be equal
METHOD_KEYS = {
    "grpo": {"algorithm.adv_estimator": "grpo", f"{POLICY_LOSS}.loss_mode": "vanilla"},
    "disco-b": {f"{POLICY_LOSS}.objective": "disco-b"},
    "lratio": {f"{POLICY_LOSS}.score_func": "Lratio", f"{POLICY_LOSS}.tau": 1.0},
}


# --- the methods (composed by Hydra, checked as their entry points check them; no run) -----------------------


def composed(name: str, *extra: str):
    module, args = demo.method_command(name, cached_tiny_build(), steps=demo.STEPS, seed=0)
    flags = [arg for arg in args if arg.startswith("--")]
    if module == "verl.trainer.main_ppo":  # verl's own entry point, on the recipe's config
        assert flags == [f"--config-path={CONFIG_DIR}", "--config-name=disco_trainer"]
    else:
        assert module == "recipe.disco.main_disco" and flags == []
    return module, compose_disco([*(arg for arg in args if not arg.startswith("--")), *extra])


def flat(config) -> dict:
    def walk(node, prefix: str):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node

    return dict(walk(OmegaConf.to_container(config, resolve=True), ""))


@pytest.mark.parametrize("name", sorted(METHOD_KEYS))
def test_compared_methods_differ_from_disco_only_in_their_method(name):
    disco = flat(composed("disco")[1])
    assert disco["trainer.experiment_name"] == "disco" and flat(composed(name)[1])["trainer.experiment_name"] == name
    other = flat(composed(name, "trainer.experiment_name=disco")[1])  # the name enters paths; set it equal
    changed = {key for key in disco.keys() | other.keys() if disco.get(key) != other.get(key)}
    mirror = f"{POLICY_LOSS}.adv_estimator"  # the loss config's copy of algorithm.adv_estimator
    assert changed - {mirror} == set(METHOD_KEYS[name])
    assert all(other[key] == value for key, value in METHOD_KEYS[name].items())
    assert disco["data.seed"] == disco["actor_rollout_ref.rollout.seed"] == 0
    assert disco["data.train_batch_size"] == 8 and disco["actor_rollout_ref.rollout.n"] == 8
    assert disco["actor_rollout_ref.actor.ppo_mini_batch_size"] == 4  # two optimizer steps per training step
    assert disco["trainer.total_training_steps"] == demo.STEPS


@pytest.mark.parametrize("name", ["disco", *sorted(METHOD_KEYS)])
def test_each_method_passes_its_entry_points_checks(name):
    module, config = composed(name)
    if module == "recipe.disco.main_disco":
        validate(config)  # DisCO's startup checks, then verl's validate_config
    else:
        validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    omega_conf_to_dataclass(config.actor_rollout_ref.actor)  # the policy loss config checks its own values


# --- reduced runs ---------------------------------------------------------------------------------------------


def run_demo(root: Path, env: dict[str, str] | None = None) -> tuple[Path, str]:
    """``python -m recipe.disco.demo --steps STEPS`` into ``root/out``; returns the output folder and stdout."""
    out, cwd = root / "out", root / "cwd"
    cwd.mkdir(parents=True)
    build = cached_tiny_build()  # copied in: the demo reuses a finished build of the same seed and specification
    shutil.copytree(build.model_dir.parent, out / build.model_dir.parent.name)
    assert build.model_dir.parent.parent == TINY_CACHE
    done = subprocess.run(
        [sys.executable, "-m", "recipe.disco.demo", "--steps", str(STEPS), "--out", str(out)],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"demo failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return out, done.stdout


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "disco" / "metrics.jsonl").read_text().splitlines()]


def rewards(out: Path) -> np.ndarray:
    by_step = {r["step"]: r["data"]["critic/score/mean"] for r in records(out) if "critic/score/mean" in r["data"]}
    assert sorted(by_step) == list(range(1, STEPS + 1))
    return np.array([by_step[step] for step in range(1, STEPS + 1)])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    return run_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def flipped_run(tmp_path_factory) -> tuple[Path, str]:
    tests = str(Path(__file__).parent)
    path = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    env = {"VERL_USE_EXTERNAL_MODULES": "flipped_disco_loss", "PYTHONPATH": path}
    return run_demo(tmp_path_factory.mktemp("flipped"), env)


def test_disco_raises_the_training_reward(demo_run):
    out, stdout = demo_run
    reward = rewards(out)
    print(f"DisCO reward: step 1 {reward[0]:.3f}, last 3 steps {reward[-3:].mean():.3f}, all {reward.round(3)}")
    assert reward[-3:].mean() >= reward[0] + RISE
    assert all(FLIPPED_METRIC not in r["data"] for r in records(out))
    assert f"Training Progress: 100%|██████████| {STEPS}/{STEPS}" in stdout  # verl's progress, shown
    assert re.search(rf"^step:{STEPS} - critic/score/mean:[0-9.]+ - actor/entropy:", stdout, re.MULTILINE)


def test_disco_with_its_sign_flipped_does_not(flipped_run):
    out, _ = flipped_run
    reward = rewards(out)
    print(f"flipped reward: step 1 {reward[0]:.3f}, last 3 steps {reward[-3:].mean():.3f}, all {reward.round(3)}")
    assert reward[-3:].mean() <= reward[0] + FLIPPED_SLACK
    steps = [r for r in records(out) if "critic/score/mean" in r["data"]]
    assert all(r["data"][FLIPPED_METRIC] == 1.0 for r in steps)  # the workers trained with the flipped loss


def assert_rounded(cell: str, value: float, digits: int) -> None:
    """The cell shows `value` rounded to `digits` decimals (a tie such as 0.4375 may round either way)."""
    assert abs(float(cell) - value) <= 0.5 * 10**-digits + 1e-12, (cell, value)


def test_summary_table_holds_the_logged_values(demo_run):
    out, stdout = demo_run
    reward = rewards(out)
    by_step = {r["step"]: r["data"] for r in records(out)}
    entropy = np.array([by_step[step]["actor/entropy"] for step in range(1, STEPS + 1)])
    trailing = [reward[max(0, i - 4) : i + 1].mean() for i in range(STEPS)]
    reached = next((i + 1 for i, value in enumerate(trailing) if value >= demo.LEVEL), None)
    val = [by_step[s][demo.VAL_ACCURACY] for s in sorted(by_step) if demo.VAL_ACCURACY in by_step[s]]
    assert len(val) == STEPS // demo.VAL_EVERY + 1  # before training and every VAL_EVERY steps
    row = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| DisCO"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == demo.METHODS["disco"].label
    assert_rounded(cells[1], reward[:5].mean(), digits=3)
    assert_rounded(cells[2], reward[-5:].mean(), digits=3)
    assert cells[3] == (str(reached) if reached else f"not within {STEPS}")
    assert_rounded(cells[4], entropy[-5:].mean(), digits=3)
    assert_rounded(cells[5], val[-1], digits=2)
    assert row in stdout  # printed as well


def test_figure_of_the_demo_output(demo_run, flipped_run, tmp_path):
    out, stdout = demo_run
    assert f"wrote {out / 'demo_curves.png'} with panels {ALL_PANELS}" in stdout
    image = imread(out / "demo_curves.png")
    assert image.shape[:2] == (3 * 360, 3 * 500) and image[..., :3].std() > 0.05  # 3x3 grid, not blank
    fig, drawn = draw({"DisCO": read_log(out / "disco" / "metrics.jsonl")}, smooth=demo.WINDOW)
    assert drawn == ALL_PANELS
    (reward_ax,) = [ax for ax in fig.axes if ax.get_title() == "Training reward"]
    (line,) = reward_ax.get_lines()
    reward = rewards(out)
    np.testing.assert_allclose(line.get_ydata(), [reward[max(0, i - 4) : i + 1].mean() for i in range(STEPS)])
    both = [out / "disco" / "metrics.jsonl", flipped_run[0] / "disco" / "metrics.jsonl"]
    assert plot_runs(both, out=tmp_path / "both.png", labels=["DisCO", "flipped"]) == ALL_PANELS
    assert imread(tmp_path / "both.png")[..., :3].std() > 0.05
