"""DFT on verl 0.9.1's SFT trainer (``verl.trainer.sft_trainer.SFTTrainer``), subclassed, not patched.

What differs from SFT, each through one of the trainer's own extension points:

* **data** (``_build_dataset``, ``_build_dataloader``): the negatives pool (:mod:`recipe.dft.data`); each example
  becomes 1 + B consecutive rows (:func:`collate_examples`), the sampler carries the epoch so that each epoch picks
  fresh negatives;
* **loss** (``_build_engine``): :class:`recipe.dft.loss.DFTLoss` in verl's ``TrainingWorker``, subclassed as
  :class:`DFTTrainingWorker`, which asks verl's micro-batching to keep each example's rows together
  (``force_group_size`` = 1 + B), gathers the step's u updates of every rank after it so that u is identical
  everywhere, and keeps validation away from u;
* **checkpoints** (``_build_ckpt_handler``): u is saved in every checkpoint before verl marks it the latest, and
  restored on resume (:class:`DFTCheckpointHandler`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from verl.trainer.sft_trainer import SFTTrainer
from verl.utils import tensordict_utils as tu
from verl.utils.checkpoint import CheckpointHandler
from verl.workers.engine_workers import TrainingWorker, TrainingWorkerConfig

from recipe.dft import objective as obj
from recipe.dft.data import DFTDataset, EpochIndexSampler, Example, read_pool
from recipe.dft.loss import DFTLoss, UTable

U_FILE = "dft_u.pt"


def dft_settings(config) -> obj.DFTSettings:
    """The ``dft`` block of the Hydra config as :class:`recipe.dft.objective.DFTSettings` (checked there)."""
    block = config.dft
    return obj.DFTSettings(
        tau=block.tau, gamma=block.gamma, num_negatives=block.num_negatives, score=block.score,
        ref_prompt=block.ref_prompt,
    )  # fmt: skip


def collate_examples(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """verl's SFT batch of jagged rows (``input_ids``, ``loss_mask``, ``position_ids``), each example's data
    output and B negatives consecutive, with DFT's per-row ``dft_example``, ``dft_role`` and
    ``dft_ref_log_prob`` (0 for the data output)."""
    input_ids = [ids for example in examples for ids in example.input_ids]
    loss_mask = [mask for example in examples for mask in example.loss_mask]

    def jagged(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.nested.as_nested_tensor(tensors, layout=torch.jagged)

    return {
        "input_ids": jagged(input_ids),
        "loss_mask": jagged(loss_mask),
        "position_ids": jagged([torch.arange(len(ids)) for ids in input_ids]),
        "dft_example": torch.tensor([e.index for e in examples for _ in e.input_ids]),
        "dft_role": torch.tensor([role for e in examples for role in range(len(e.input_ids))]),
        "dft_ref_log_prob": torch.cat([torch.cat([e.ref_log_prob.new_zeros(1), e.ref_log_prob]) for e in examples]),
    }


class DFTTrainingWorker(TrainingWorker):
    """verl's in-process training worker with u kept per example and identical on every rank."""

    def __init__(self, config: TrainingWorkerConfig, table: UTable, group_size: int, tau: float) -> None:
        super().__init__(config=config)
        self.table, self.group_size, self.tau = table, group_size, tau

    def train_batch(self, data):
        tu.assign_non_tensor(data, force_group_size=self.group_size)
        output = super().train_batch(data)
        records = self._gathered(self.table.take())
        self.table.apply(records["examples"], records["log_u"])
        if output is not None:
            terms = (records["s_pos"], records["s_neg"], records["weights"], records["log_u"], self.tau)
            tu.get(output, "metrics").update(obj.step_metrics(*terms))
        return output

    def infer_batch(self, data):
        tu.assign_non_tensor(data, force_group_size=self.group_size)
        self.table.training = False
        try:
            return super().infer_batch(data)
        finally:
            self.table.training = True

    def _gathered(self, records: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every data-parallel rank's records of the step, concatenated (the same on every rank)."""
        group = self.engine.get_data_parallel_group()
        if group is None or dist.get_world_size(group) == 1:
            parts = [records]
        else:
            parts = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, records, group=group)
        parts = [part for part in parts if part]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


class DFTCheckpointHandler(CheckpointHandler):
    """verl's checkpoint handler, with u in every checkpoint (``dft_u.pt``) and restored on resume."""

    def __init__(self, *args, table: UTable, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.table = table

    def save_checkpoint(self, step):
        if self.rank == 0:  # before verl's save, which marks the checkpoint the latest last
            folder = os.path.join(self.default_local_dir, f"global_step_{step}")
            os.makedirs(folder, exist_ok=True)
            torch.save(self.table.state_dict(), os.path.join(folder, U_FILE))
        super().save_checkpoint(step)

    def load_checkpoint(self):
        path = self._determine_resume_path()
        step = super().load_checkpoint()
        if step:
            u_file = os.path.join(path, U_FILE)
            if not os.path.exists(u_file):
                raise FileNotFoundError(
                    f"{path} has no {U_FILE}: it is not a DFT checkpoint, and DFT cannot resume without its u; "
                    "start a fresh run (trainer.resume_mode=disable) or point trainer.resume_from_path at one"
                )
            self.table.load_state_dict(torch.load(u_file, map_location="cpu"))
        return step


class DFTTrainer(SFTTrainer):
    """verl's SFT trainer with DFT's data, loss, u and checkpoints."""

    def _build_config(self):
        super()._build_config()
        self.dft = dft_settings(self.config)

    def _build_dataset(self):
        data, dft = self.config.data, self.dft
        tokenizer = self.model_config.tokenizer
        ref_prompt = dft.ref_prompt if dft.uses_ref else None

        def dataset(files) -> DFTDataset:
            frame = read_pool(files, dft.num_negatives, ref_prompt)
            return DFTDataset(frame, tokenizer, dft.num_negatives, data.max_length, self.config.trainer.seed)

        self.train_dataset = dataset(data.train_files)
        self.val_dataset = dataset(data.val_files) if data.val_files else None
        self.u_table = UTable(len(self.train_dataset))

    def _build_engine(self):
        config = TrainingWorkerConfig(
            model_type="language_model",
            model_config=self.model_config,
            engine_config=self.engine_config,
            optimizer_config=self.optimizer_config,
            checkpoint_config=self.checkpoint_config,
            profiler_config=self.profiler_config,
        )
        group_size = self.dft.num_negatives + 1
        self.training_client = DFTTrainingWorker(config, self.u_table, group_size, self.dft.tau)
        self.loss_fn = DFTLoss(self.dft, self.u_table)
        self.training_client.set_loss_fn(loss_fn=self.loss_fn)
        self.engine = self.training_client.engine

    def _build_dataloader(self):
        dp_rank, dp_size = self.engine.get_data_parallel_rank(), self.engine.get_data_parallel_size()
        self.global_batch_size = self.config.data.train_batch_size  # examples, each 1 + B rows
        self.train_batch_size_per_dp = self.global_batch_size // dp_size

        def loader(dataset, sampler) -> StatefulDataLoader:
            return StatefulDataLoader(
                dataset=dataset,
                batch_size=self.train_batch_size_per_dp,
                sampler=sampler,
                collate_fn=collate_examples,
                num_workers=self.config.data.num_workers,
                drop_last=True,
            )

        self.train_sampler = EpochIndexSampler(
            self.train_dataset, shuffle=True, num_replicas=dp_size, rank=dp_rank, drop_last=True
        )
        self.train_dataloader = loader(self.train_dataset, self.train_sampler)
        self.val_dataloader = None
        if self.val_dataset:
            val_sampler = DistributedSampler(
                self.val_dataset, shuffle=False, num_replicas=dp_size, rank=dp_rank, drop_last=True
            )
            self.val_dataloader = loader(self.val_dataset, val_sampler)

    def _build_ckpt_handler(self):
        trainer = self.config.trainer
        self.ckpt_handler = DFTCheckpointHandler(
            engine=self.engine,
            train_dataloader=self.train_dataloader,
            default_local_dir=trainer.default_local_dir,
            max_ckpt_to_keep=trainer.get("max_ckpt_to_keep"),
            default_hdfs_dir=trainer.get("default_hdfs_dir"),
            resume_mode=trainer.get("resume_mode", "auto"),
            resume_from_path=trainer.get("resume_from_path"),
            lora_train_meta=self._get_lora_train_meta(),
            table=self.u_table,
        )
