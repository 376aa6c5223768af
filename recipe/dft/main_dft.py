"""Train with DFT on verl 0.9.1's SFT trainer: ``torchrun --nproc_per_node=N -m recipe.dft.main_dft [overrides]``.

The same Hydra config as verl's SFT trainer (``sft_trainer_engine``, composed by ``config/dft_trainer.yaml``) with
a ``dft`` block; :class:`recipe.dft.trainer.DFTTrainer` subclasses verl's ``SFTTrainer``. Before anything starts,
the ``dft`` block is checked (:func:`recipe.dft.trainer.dft_settings`) and then the layout and the pool files
(:mod:`recipe.dft.checks`): a problem stops the run with one message listing every problem. ``DRY_RUN=1`` composes
and checks the config and exits before any process group or model starts.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from verl.utils.device import auto_set_device

from recipe.dft.checks import check_config
from recipe.dft.trainer import dft_settings


@hydra.main(config_path="config", config_name="dft_trainer", version_base=None)
def main(config: DictConfig) -> None:
    auto_set_device(config)
    world_size = os.environ.get("WORLD_SIZE")  # set by torchrun; unset for a plain DRY_RUN
    try:
        dft_settings(config)
        check_config(config, world_size=int(world_size) if world_size else None)
    except ValueError as error:  # DFTSettings' and DFTConfigError: the message says what to change
        sys.exit(str(error))
    if os.environ.get("DRY_RUN", "0") not in ("", "0"):
        print(OmegaConf.to_yaml(config, resolve=True))
        print("DRY_RUN: configuration valid for DFT; not starting training")
        return
    run_dft(config)


def run_dft(config: DictConfig) -> None:
    """verl's SFT run with DFT's trainer: the process group (verl's, looked up at call time so that a platform's
    version applies), the trainer, its fit."""
    from verl.utils import distributed

    from recipe.dft.trainer import DFTTrainer

    distributed.initialize_global_process_group()
    DFTTrainer(config=config).fit()
    distributed.destroy_global_process_group()


if __name__ == "__main__":
    main()
