"""Train with DisCO on verl 0.9.1: ``python -m recipe.disco.main_disco [hydra overrides]``.

A thin layer over verl's own entry point (``verl.trainer.main_ppo``): the same Hydra config (``ppo_trainer``
composed by ``config/disco_trainer.yaml``), verl's ``validate_config``, verl's ``run_ppo``, verl's workers and
engine. Three things differ.

**The actor worker.** DisCO's step objective couples all answers of a question and, with ``kl_unit: step``, all
answers of an optimizer step, while verl's loss hook sees one micro-batch on one rank. Before each mini-batch,
DisCO's training worker (:mod:`recipe.disco.worker`, a subclass of verl's ``TrainingWorker``) computes the exact
coefficients dL/d(score, KL sum) of every answer from the mini-batch's per-answer scalars at the current
parameters (gathered over the data-parallel ranks) and hands them to the loss as per-token weights, so that any
micro-batching (fixed sizes, token budgets, Ulysses) on any number of ranks accumulates exactly grad L.

**Which trainer, and why.** It runs verl's default v1 trainer in ``sync`` mode (``verl.trainer.ppo.v1``
``PPOTrainerSync``), subclassed as :class:`recipe.disco.trainer.DisCOTrainer`, which maps the actor role to that
worker and replaces ``_balance_batch``: verl's version Karmarkar-Karp-partitions rows over ranks, which scatters a
question's answers over mini-batches (optimizer steps); DisCO's keeps every question in one mini-batch while
balancing tokens over ranks (:mod:`recipe.disco.grouping`). The v1 trainer is used rather than the deprecated v0
``RayPPOTrainer`` because it is verl's default and maintained path, and because its ``_balance_batch`` runs on
every step at the one point where the whole batch order is decided (TransferQueue keys). The trainer is built by
:class:`recipe.disco.trainer.DisCOTaskRunner`, passed to ``run_ppo``, because verl's ``TaskRunnerV1`` takes its
trainer from a registry whose ``sync`` entry cannot be re-registered.

**Checks before anything starts.** :func:`recipe.disco.checks.check_config` stops the run, before Ray or any model
starts, on every setting that cannot train DisCO exactly (shuffled mini-batches, async trainer modes, a reference
model, rollout corrections, batch sizes verl cannot cut, ...), with one message per problem; then
:mod:`recipe.disco.preflight` checks the machine (data files, GPUs, rollout engine, credentials, disk, memory).

``DRY_RUN=1`` composes the config, runs verl's validation and the DisCO checks, prints the resolved config and
exits without starting Ray (the launch scripts pass it through).
"""

from __future__ import annotations

import os
import sys

import hydra
import ray
from omegaconf import DictConfig, OmegaConf
from verl.trainer.main_ppo import run_ppo
from verl.utils.device import auto_set_device

from recipe.disco.checks import DisCOConfigError, validate
from recipe.disco.preflight import enforce_preflight


@hydra.main(config_path="config", config_name="disco_trainer", version_base=None)
def main(config: DictConfig) -> None:
    auto_set_device(config)
    try:
        validate(config)
    except DisCOConfigError as error:
        sys.exit(str(error))
    enforce_preflight(config)
    if os.environ.get("DRY_RUN", "0") not in ("", "0"):
        print(OmegaConf.to_yaml(config, resolve=True))
        print("DRY_RUN: configuration valid for DisCO; not starting Ray")
        return
    from recipe.disco.trainer import DisCOTaskRunner

    run_ppo(config, task_runner_class=ray.remote(DisCOTaskRunner))


if __name__ == "__main__":
    main()
