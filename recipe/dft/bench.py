"""The cost of a DFT training step against an SFT step on the same positives, measured in one run.

    python -m recipe.dft.bench [--steps 20] [--warmup 2] [--batch-size 8] [--micro-batch-size 2]
        [--num-negatives 2] [--model DIR] [--data ROWS.parquet] [--examples 32] [--ranks 1] [--json PATH]
        [--workdir DIR] [HYDRA_OVERRIDE ...]

Data: the positives are (prompt, response) rows: ``--data`` (the negatives command's input: columns ``prompt``,
chat messages, and ``response``) or, by default, the tiny addition task of :mod:`recipe.disco.cpu.tiny`; the first
``--examples`` rows are used. The negatives pool is built from them with ``python -m recipe.dft.negatives`` (run
in-process, hf backend, K = 2B outputs per example sampled from ``--model`` itself, so the negatives have the base
model's own lengths), and the same rows are written as a ``messages`` parquet for verl's stock SFT dataset. The bench
reports whether the positives' token ids and loss masks are identical in the two datasets, and exactly how they
differ if not.

Trainers: one process per rank (``--ranks``, FSDP2; verl's CPU backend where no GPU is visible) builds verl's stock
``SFTTrainer`` (config ``sft_trainer_engine``) and :class:`recipe.dft.trainer.DFTTrainer` (``dft_trainer``) with the
same overrides: fp32, ``--batch-size`` examples per step in micro-batches of ``--micro-batch-size`` examples (an
SFT example is one sequence, a DFT example its 1 + B sequences), no token budget, no gradient checkpointing, and on
a CPU sdpa attention without padding removal (each micro-batch padded to its longest row); the HYDRA_OVERRIDEs
given last apply to both. Their samplers share a seed, so step t of each trains on the same
examples.

Time: one training step is ``training_client.train_batch`` on a batch built as verl's ``fit`` builds it; the two
methods' steps alternate (order rotating each round), ``--warmup`` rounds are discarded, and the figure is the
median of ``--steps`` rounds per method, with the ratio DFT / SFT. On a GPU it is wall time; on a CPU each rank
computes on one thread and the figure is the rank's CPU time, which other jobs on the machine do not stretch as
they do wall time. Tokens per step are all ranks' sequence tokens (prompts included), mean over the rounds run.

Memory: one more step per method with ``torch.autograd.graph.saved_tensors_hooks``: the bytes of the distinct
storages autograd saves for backward, per micro-batch (parameters excluded), i.e. the activation memory a
micro-batch holds until its backward; the figure is the largest micro-batch of the step, on rank 0. It is exact and
does not depend on the load, but it is not everything: parameters, gradients, optimizer states (the same for both
methods) and temporaries freed during the forward pass are not in it. On a GPU the step's
``torch.cuda.max_memory_allocated`` (all of it) is reported as well.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port

from recipe.disco.gpu_check import median_times

METHODS = ("SFT", "DFT")
POOL_PER_NEGATIVE = 2  # K = 2B pool negatives per example: two epochs of fresh negatives
MAX_LENGTH = 1 << 16  # the datasets' length check only (no padding): the model's own limit applies
RESULT_FILE = "result.json"


def positive_rows(data: str | None, examples: int) -> list[dict]:
    """The first ``examples`` (prompt, response) rows of ``data``, or of the tiny task's training split."""
    if data is not None:
        return pq.read_table(data, columns=["prompt", "response"]).slice(0, examples).to_pylist()
    from recipe.disco.cpu import tiny

    pairs = tiny.split_problems(0)["train"][:examples]
    return [
        {"prompt": [{"role": "user", "content": tiny.question(a, b)}], "response": tiny.answer(a, b)} for a, b in pairs
    ]


def write_inputs(rows: list[dict], model: str, num_negatives: int, max_new_tokens: int, workdir: Path) -> dict:
    """The SFT ``messages`` parquet of ``rows`` and their DFT pool (built by the negatives command); their paths."""
    from recipe.dft import negatives

    paths = {name: str(workdir / f"{name}.parquet") for name in ("rows", "sft", "pool")}
    pq.write_table(pa.Table.from_pylist(rows), paths["rows"])
    messages = [{"messages": [*row["prompt"], {"role": "assistant", "content": row["response"]}]} for row in rows]
    pq.write_table(pa.Table.from_pylist(messages), paths["sft"])
    negatives.main(
        ["--data", paths["rows"], "--out", paths["pool"], "--model", model]
        + ["--num-samples", str(POOL_PER_NEGATIVE * num_negatives), "--max-new-tokens", str(max_new_tokens)]
    )
    return paths


def shared_overrides(settings: dict, world: int) -> list[str]:
    """The Hydra overrides both trainers get: the model, the step layout, fp32, the device, no checkpoints."""
    precision = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"
    on_cpu = settings["device"] == "cpu"
    return [
        f"model.path={settings['model']}",
        "model.enable_gradient_checkpointing=False",
        f"data.train_batch_size={settings['batch_size']}",
        f"data.micro_batch_size_per_gpu={settings['micro_batch_size']}",
        "data.use_dynamic_bsz=False",
        "data.num_workers=0",
        f"data.max_length={MAX_LENGTH}",
        "engine.strategy=fsdp2",
        "engine.model_dtype=fp32",
        f"+engine.mixed_precision={precision}",
        f"trainer.device={settings['device']}",
        f"trainer.n_gpus_per_node={world}",
        f"trainer.total_training_steps={settings['warmup'] + settings['steps'] + 1}",
        f"trainer.default_local_dir={settings['workdir']}/checkpoints",
        "trainer.resume_mode=disable",
        "trainer.logger=[console]",
        *(["model.use_remove_padding=False", "+model.override_config.attn_implementation=sdpa"] if on_cpu else []),
        *(["engine.use_torch_compile=False"] if on_cpu else []),
        *settings["overrides"],
    ]


def compose_configs(settings: dict, world: int) -> dict:
    """The SFT trainer's config (verl's ``sft_trainer_engine``) and the DFT trainer's (``dft_trainer``)."""
    from hydra import compose, initialize_config_dir, initialize_config_module

    shared = shared_overrides(settings, world)
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        sft = compose("sft_trainer_engine", overrides=[f"data.train_files={settings['sft']}", *shared])
    with initialize_config_dir(config_dir=str(Path(__file__).parent / "config"), version_base=None):
        dft_overrides = [f"data.train_files={settings['pool']}", f"dft.num_negatives={settings['num_negatives']}"]
        dft = compose("dft_trainer", overrides=[*dft_overrides, *shared])
    return {"SFT": sft, "DFT": dft}


def step_batch(trainer, rows: dict):
    """verl's training batch of a loader's ``rows`` with the meta information the SFT trainer's ``fit`` adds."""
    from tensordict.tensorclass import NonTensorData
    from verl.utils import tensordict_utils as tu

    config = trainer.config
    meta = {
        "use_remove_padding": config.model.use_remove_padding,
        "use_dynamic_bsz": config.data.use_dynamic_bsz,
        "max_token_len_per_gpu": config.data.max_token_len_per_gpu,
        "micro_batch_size_per_gpu": config.data.micro_batch_size_per_gpu,
        "temperature": 1.0,
        "global_batch_size": trainer.global_batch_size,
        "pad_mode": config.data.pad_mode,
        "pad_token_id": trainer.model_config.tokenizer.pad_token_id,
    }
    data = tu.get_tensordict(tensor_dict=rows, non_tensor_dict=meta)
    seqlens = trainer._get_batch_seqlens(data=data)  # every rank's, as fit logs them
    tu.assign_non_tensor(data, update_lr_scheduler=True, global_token_num=NonTensorData(seqlens))
    return data


def batch_stream(trainer) -> Iterator[dict]:
    """The trainer's training batches, epoch after epoch (its sampler told each epoch, as ``fit`` does)."""
    for epoch in itertools.count():
        trainer.train_sampler.set_epoch(epoch)
        yield from trainer.train_dataloader


class SavedActivations:
    """Bytes of the distinct storages autograd saves for backward, per forward pass of ``module`` (one per
    micro-batch), parameters (and views of them) excluded; what the loss saves counts with its micro-batch."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.micro_batches: list[int] = []
        self._storages: set[int] = set()

    def __enter__(self) -> SavedActivations:
        self._handle = self.module.register_forward_pre_hook(lambda module, args: self._start())
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._handle.remove()

    def _start(self) -> None:
        self.micro_batches.append(0)
        self._storages = set()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if base.is_leaf and base.requires_grad:
            return tensor
        if not self.micro_batches:
            self._start()
        for part in (tensor.values(), tensor.offsets()) if tensor.is_nested else (tensor,):  # jagged: its buffers
            storage = part.untyped_storage()
            if storage.data_ptr() not in self._storages:
                self._storages.add(storage.data_ptr())
                self.micro_batches[-1] += storage.nbytes()
        return tensor


def step_clock(device: str) -> Callable[[], float]:
    """Wall time on a GPU (steps end synchronized); on a CPU this process's CPU time, which other jobs on the
    machine do not stretch (the rank computes on one thread)."""
    return time.process_time if device == "cpu" else time.perf_counter


def timed_step(trainer, batches: Iterator[dict], tokens: list[int]) -> float:
    """Seconds of one ``train_batch`` on the next batch (:func:`step_clock`); its tokens (all ranks) appended to
    ``tokens``."""
    from verl.utils.device import get_torch_device

    clock = step_clock(trainer.device_name)
    data = step_batch(trainer, next(batches))
    tokens.append(sum(data["global_token_num"]))
    get_torch_device().synchronize()
    start = clock()
    trainer.training_client.train_batch(data)
    get_torch_device().synchronize()
    return clock() - start


def memory_step(trainer, batches: Iterator[dict]) -> dict:
    """One ``train_batch`` with the saved-activation count on (and the CUDA peak on a GPU)."""
    data = step_batch(trainer, next(batches))
    cuda = trainer.device_name == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with SavedActivations(trainer.engine.module) as saved:
        trainer.training_client.train_batch(data)
    return {
        "saved_bytes_per_micro_batch": saved.micro_batches,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def positive_differences(sft_dataset, dft_dataset, tokenizer) -> list[str]:
    """How verl's SFT rows differ from DFT's data outputs (token ids and loss masks), grouped over the examples:
    one line per kind of difference with its count; empty if every example is identical."""
    kinds = Counter()
    for i in range(len(dft_dataset)):
        sft, dft = sft_dataset[i], dft_dataset[i]
        kind = _difference(
            list(zip(sft["input_ids"].tolist(), sft["loss_mask"].tolist())),
            list(zip(dft.input_ids[0].tolist(), dft.loss_mask[0].tolist())),
            tokenizer,
        )
        if kind:
            kinds[kind] += 1
    return [f"{count} of {len(dft_dataset)} examples: {kind}" for kind, count in kinds.items()]


def _difference(sft: list[tuple[int, int]], dft: list[tuple[int, int]], tokenizer) -> str | None:
    """None if the (token, loss mask) rows are equal, else what follows their common prefix in each."""
    if sft == dft:
        return None
    common = next((i for i, (a, b) in enumerate(zip(sft, dft)) if a != b), min(len(sft), len(dft)))

    def shown(pairs: list[tuple[int, int]]) -> str:
        return ", ".join(f"{token} {tokenizer.decode([token])!r} (mask {mask})" for token, mask in pairs) or "nothing"

    return f"after a common prefix, verl's SFT row has [{shown(sft[common:])}] where DFT's has [{shown(dft[common:])}]"


def check_same_order(trainers: dict) -> None:
    """Step t of both trainers must hold the same examples: their samplers' first epochs must agree."""
    sft, dft = trainers["SFT"].train_sampler, trainers["DFT"].train_sampler
    sft.set_epoch(0)
    dft.set_epoch(0)
    if list(sft) != list(dft):  # DFT's indices carry the epoch, 0 here
        raise RuntimeError("the SFT and DFT samplers order the examples differently; the steps would not compare")


def run_rank(rank: int, world: int, port: int, settings: dict) -> None:
    """One rank: both trainers, the alternating timed steps, the memory steps; rank 0 writes the result file."""
    from recipe.disco.cpu import actor

    actor.init_distributed(rank, world, port)
    if settings["device"] != "cpu":
        os.environ.pop("DISCO_CPU_BACKEND")  # init_distributed's CPU backend is for machines without a GPU
    else:
        torch.set_num_threads(1)  # the step's CPU time is then its work, not threads waiting on each other
    log = os.open(Path(settings["workdir"]) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)  # verl's config dumps and progress lines go to the log
    os.dup2(log, 2)
    from verl.trainer.sft_trainer import SFTTrainer
    from verl.utils import distributed

    from recipe.dft.trainer import DFTTrainer

    distributed.initialize_global_process_group()
    configs = compose_configs(settings, world)
    trainers = {"SFT": SFTTrainer(config=configs["SFT"]), "DFT": DFTTrainer(config=configs["DFT"])}
    check_same_order(trainers)
    streams = {method: batch_stream(trainer) for method, trainer in trainers.items()}
    tokens: dict[str, list[int]] = {method: [] for method in METHODS}
    runs: dict[str, Callable[[], float]] = {
        method: (lambda method=method: timed_step(trainers[method], streams[method], tokens[method]))
        for method in METHODS
    }
    for _ in range(settings["warmup"] - 1):  # median_times runs one more warm-up round itself
        for run in runs.values():
            run()
    times = median_times(runs, settings["steps"])
    memory = {method: memory_step(trainers[method], streams[method]) for method in METHODS}
    if rank == 0:
        tokenizer = trainers["DFT"].model_config.tokenizer
        differences = positive_differences(trainers["SFT"].train_dataset, trainers["DFT"].train_dataset, tokenizer)
        result = summarize(times, tokens, memory, differences, torch.get_num_threads())
        (Path(settings["workdir"]) / RESULT_FILE).write_text(json.dumps(result))
    distributed.destroy_global_process_group()


def summarize(times: dict, tokens: dict, memory: dict, differences: list[str], threads: int) -> dict:
    """The figures of a run: per method and DFT / SFT ratios."""
    mean_tokens = {method: sum(values) / len(values) for method, values in tokens.items()}
    saved = {method: max(memory[method]["saved_bytes_per_micro_batch"]) for method in METHODS}
    cuda = {method: memory[method]["cuda_peak_bytes"] for method in METHODS}
    return {
        "step_seconds": times,
        "tokens_per_step": mean_tokens,
        "tokens_each_step": tokens,
        "saved_activation_bytes": saved,
        "saved_bytes_per_micro_batch": {method: memory[method]["saved_bytes_per_micro_batch"] for method in METHODS},
        "cuda_peak_bytes": cuda if cuda["SFT"] is not None else None,
        "ratio": {
            "time": times["DFT"] / times["SFT"],
            "tokens": mean_tokens["DFT"] / mean_tokens["SFT"],
            "saved_activations": saved["DFT"] / saved["SFT"],
            **({"cuda_peak": cuda["DFT"] / cuda["SFT"]} if cuda["SFT"] else {}),
        },
        "positives_identical": not differences,
        "positive_differences": differences,
        "threads_per_rank": threads,
    }


def machine(device: str) -> str:
    """The machine in words: the GPUs' name, or the CPU's model and core count."""
    if device != "cpu":
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return f"{os.cpu_count()} CPU cores ({_cpu_model()})"


def _cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def report(result: dict, settings: dict) -> str:
    """The table printed to stdout."""
    mib = 1 << 20
    b = settings["num_negatives"]
    lines = [
        f"DFT vs SFT training step: {settings['model']} on {result['machine']}, {settings['ranks']} rank(s) on "
        f"{settings['device']} ({result['threads_per_rank']} torch thread(s) per rank), fp32, "
        f"{settings['batch_size']} examples per step in micro-batches of {settings['micro_batch_size']}, "
        f"B={b} negatives per example (pool K="
        f"{POOL_PER_NEGATIVE * b}); median of {settings['steps']} alternating steps after {settings['warmup']} "
        f"warm-up ({'CPU time of the rank' if settings['device'] == 'cpu' else 'wall time'}); overrides: "
        f"{' '.join(settings['overrides']) or 'none'}",
        f"{'':8}{'step s':>9}{'tokens/step':>13}{'saved activations (largest micro-batch)':>42}"
        + (f"{'CUDA peak':>12}" if result["cuda_peak_bytes"] else ""),
    ]
    for method in METHODS:
        cuda = f"{result['cuda_peak_bytes'][method] / mib:9.1f} MiB" if result["cuda_peak_bytes"] else ""
        lines.append(
            f"{method:8}{result['step_seconds'][method]:9.4f}{result['tokens_per_step'][method]:13.1f}"
            f"{result['saved_activation_bytes'][method] / mib:38.3f} MiB{cuda}"
        )
    ratio = result["ratio"]
    cuda = f"{ratio['cuda_peak']:12.2f}" if "cuda_peak" in ratio else ""
    lines.append(f"{'DFT/SFT':8}{ratio['time']:9.2f}{ratio['tokens']:13.2f}{ratio['saved_activations']:42.2f}{cuda}")
    if result["positives_identical"]:
        lines.append("positives: identical token ids and loss masks in verl's SFT dataset and DFT's")
    else:
        lines += [
            "positives: verl's SFT dataset and DFT's differ:",
            *(f"  {d}" for d in result["positive_differences"]),
        ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recipe.dft.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (%(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per method, >= 1 (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step, all ranks (%(default)s)")
    parser.add_argument("--micro-batch-size", type=int, default=2, help="examples per micro-batch (%(default)s)")
    parser.add_argument("--num-negatives", type=int, default=2, help="B, negatives per example (%(default)s)")
    parser.add_argument("--model", help="the base model (default: the tiny model, built in ~/.cache/disco-tiny)")
    parser.add_argument("--data", help="(prompt, response) rows parquet (default: the tiny addition task)")
    parser.add_argument("--examples", type=int, default=32, help="rows used, the pool's size (%(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the longest negative (%(default)s)")
    parser.add_argument("--ranks", type=int, default=1, help="processes, one per GPU or CPU rank (%(default)s)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--workdir", help="keep the inputs (rows, SFT parquet, pool) and rank logs here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both trainers, e.g. engine.model_dtype=bf16")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; print the table and return the figures."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.batch_size % args.ranks or args.examples < args.batch_size:
        parser.error("--batch-size must be a multiple of --ranks and at most --examples (a step's examples)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model is None:
        from recipe.disco.cpu import tiny

        args.model = str(tiny.build_tiny(Path.home() / ".cache" / "disco-tiny", seed=0).model_dir)
    settings = {**vars(args), "device": device}
    with _workdir(args.workdir) as workdir:
        rows = positive_rows(args.data, args.examples)
        paths = write_inputs(rows, args.model, args.num_negatives, args.max_new_tokens, workdir)
        rank_settings = {**settings, **paths, "workdir": str(workdir)}
        mp.spawn(run_rank, args=(args.ranks, get_free_port(), rank_settings), nprocs=args.ranks)
        result = {**json.loads((workdir / RESULT_FILE).read_text()), "machine": machine(device)}
    print(report(result, settings))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, **result}, indent=1))
    return result


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    """``path`` (created, kept), or a temporary folder removed afterwards."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="dft-bench-") as folder:
        yield Path(folder)


if __name__ == "__main__":
    main()
