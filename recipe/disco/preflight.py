"""Preflight: what would fail only after Ray, the models and vLLM are up, found before Ray starts.

``python -m recipe.disco.preflight [hydra overrides]`` composes the config of ``recipe.disco.main_disco`` (same YAML,
same overrides; the launch scripts' overrides can be copied as they are) and prints one report: the configuration
checks ``main_disco`` runs, then every item below, each ``ok``, ``PROBLEM`` (with the key, its value and the fix)
or ``not checked`` (with the reason). The exit status is 1 if anything is a problem.

``main_disco`` runs the same items (:func:`enforce_preflight`) after its configuration checks, also under
``DRY_RUN=1``, and stops on a problem unless ``DISCO_IGNORE_PREFLIGHT=1``.

Items: the train/val parquet files (exist, readable, DisCO's columns, enough rows for one step); the GPUs this node
shows against ``trainer.n_gpus_per_node``; a ``DISCO_CPU_BACKEND=1`` left set on a machine with CUDA GPUs; the
rollout engine and the attention kernel import; that the model's tokenizer and chat template give the reward a
``</think>`` to find; wandb credentials when ``trainer.logger`` has wandb; free disk for the checkpoints kept; the
per-GPU memory estimate (:func:`estimate_memory`) against the card. GPU items are ``not checked`` where no GPU is
visible.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import netrc
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from recipe.disco.checks import DEFAULT_ATTENTION, DisCOConfigError, ulysses_size, validate
from recipe.disco.data import PROMPT_SUFFIX, SCHEMA
from recipe.disco.memory import (
    GIB,
    PAPER_MODELS,
    Layout,
    MemoryEstimate,
    ModelShape,
    estimate_memory,
    rollout_engine_memory,
)

OK, PROBLEM, NOT_CHECKED = "ok", "PROBLEM", "not checked"
IGNORE_ENV = "DISCO_IGNORE_PREFLIGHT"
PREPARE_DATA = "bash recipe/disco/prepare_data.sh"
ROLLOUT = "actor_rollout_ref.rollout"
ENGINES = ("vllm", "sglang")  # the rollout engines that reserve gpu_memory_utilization of each GPU
DTYPE_BYTES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2, "float32": 4, "fp32": 4, "float": 4}
ATTN_KEY = "actor_rollout_ref.model.override_config.attn_implementation"
# verl 0.9.1's default when override_config names none (verl/workers/config/model.py:185)
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
CPU_BACKEND_ENV = "DISCO_CPU_BACKEND"  # recipe.disco.cpu.ENV_FLAG, named here without importing the CPU backend
REWARD_MODULE = "pkg://recipe.disco.reward"
REQUIRE_THINK_KEY = "reward.custom_reward_function.reward_kwargs.require_think"


@dataclass(frozen=True)
class Check:
    """One report line: what was checked, ``OK``/``PROBLEM``/``NOT_CHECKED``, and what was found or must change."""

    item: str
    status: str
    detail: str


@dataclass(frozen=True)
class Gpus:
    """The GPUs this node shows: how many, and the memory of the first (bytes; 0 when unknown)."""

    count: int
    memory_bytes: int = 0


# ------------------------------------------------------------------ what the memory estimate reads


def layout_from_config(config: DictConfig) -> Layout:
    """The :class:`Layout` of a composed config (verl's keys; token budgets as verl's engine applies them)."""
    actor, rollout, trainer = config.actor_rollout_ref.actor, config.actor_rollout_ref.rollout, config.trainer
    world = trainer.nnodes * trainer.n_gpus_per_node
    fsdp_size = actor.fsdp_config.get("fsdp_size", -1)
    sequence = config.data.max_prompt_length + config.data.max_response_length
    sp = max(ulysses_size(config), 1)
    # with a dynamic batch size the budget is per GPU after the Ulysses split (verl/workers/engine/utils.py:108-111)
    if actor.use_dynamic_bsz:
        update_tokens = actor.ppo_max_token_len_per_gpu
    else:
        update_tokens = math.ceil((actor.ppo_micro_batch_size_per_gpu or 1) * sequence / sp)
    if rollout.log_prob_use_dynamic_bsz:
        log_prob_tokens = rollout.log_prob_max_token_len_per_gpu
    else:
        micro = rollout.log_prob_micro_batch_size_per_gpu or actor.ppo_micro_batch_size_per_gpu or 1
        log_prob_tokens = math.ceil(micro * sequence / sp)
    return Layout(
        shard_gpus=fsdp_size if 0 < fsdp_size < world else world,
        update_tokens=update_tokens,
        log_prob_tokens=log_prob_tokens,
        rollout_fraction=rollout.gpu_memory_utilization if _colocated_engine(config) else 0.0,
        rollout_sleeps=bool(rollout.free_cache_engine and rollout.get("enable_sleep_mode", True)),
        param_offload=bool(actor.fsdp_config.param_offload),
        optimizer_offload=bool(actor.fsdp_config.optimizer_offload),
        cpu_offload_policy=actor.strategy == "fsdp2" and bool(actor.fsdp_config.get("offload_policy", False)),
        trains=not trainer.get("val_only", False),
        packed_dense_mask=bool(config.actor_rollout_ref.model.use_remove_padding) and "flash" not in _attention(config),
        optimizer_state=not trainer.get("val_only", False)
        or (trainer.resume_mode != "disable" and "optimizer" in actor.checkpoint.load_contents),
    )


def model_shape(path: str) -> ModelShape | None:
    """The shape from ``path/config.json`` if ``path`` is a local folder, else from :data:`PAPER_MODELS`."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return PAPER_MODELS.get(path)
    hf = json.loads(config_file.read_text())
    hf = hf.get("text_config", hf)  # multimodal configs nest the language model's
    return ModelShape(
        hidden=hf["hidden_size"],
        layers=hf["num_hidden_layers"],
        intermediate=hf["intermediate_size"],
        vocab=hf["vocab_size"],
        heads=hf["num_attention_heads"],
        kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        tied=bool(hf.get("tie_word_embeddings", False)),  # untied counts more parameters: the conservative default
        head_dim=hf.get("head_dim"),
    )


# ------------------------------------------------------------------ the checks


def preflight_checks(config: DictConfig, gpus: Gpus | None = None) -> list[Check]:
    """Every preflight item for a composed config; ``gpus`` defaults to what this node shows."""
    if gpus is None:
        gpus = Gpus(0) if config.trainer.device == "cpu" else visible_gpus()
    shape, shape_error = _model_shape_or_error(config)
    return [
        *_data_checks(config),
        _gpu_count_check(config, gpus),
        _cpu_backend_check(),
        _package_check("rollout engine", *_rollout_package(config)),
        _package_check("attention kernel", *_attention_package(config)),
        _reasoning_format_check(config),
        _wandb_check(config),
        _disk_check(config, shape, shape_error),
        _memory_check(config, gpus, shape, shape_error),
        _rollout_memory_check(config, gpus, shape, shape_error),
    ]


def format_report(checks: Sequence[Check]) -> str:
    width = max(len(check.status) for check in checks) + 2
    lines = ["DisCO preflight:"]
    for check in checks:
        first, *rest = check.detail.split("\n")
        lines.append(f"  {f'[{check.status}]':<{width}} {check.item}: {first}")
        lines += [" " * (width + 3) + line.strip() for line in rest]
    problems = sum(check.status == PROBLEM for check in checks)
    lines.append(f"{problems} problem(s)." if problems else "No problems.")
    return "\n".join(lines)


def enforce_preflight(config: DictConfig) -> None:
    """For ``main_disco``: print the report to stderr and exit on a problem unless ``DISCO_IGNORE_PREFLIGHT=1``."""
    checks = preflight_checks(config)
    print(format_report(checks), file=sys.stderr, flush=True)
    if any(check.status == PROBLEM for check in checks) and os.environ.get(IGNORE_ENV) != "1":
        sys.exit(f"preflight: fix the problems above, or set {IGNORE_ENV}=1 to launch anyway")


def visible_gpus() -> Gpus:
    """GPUs of this node (``torch.cuda.device_count()``, which respects CUDA_VISIBLE_DEVICES) and the card's memory."""
    import torch

    count = torch.cuda.device_count()
    return Gpus(count, _card_memory() if count else 0)


def _card_memory() -> int:
    """Total memory of GPU 0, read in a child process: a CUDA context created in the driver would hold GPU memory
    for the whole run. 0 if the query fails."""
    query = "import torch; print(torch.cuda.get_device_properties(0).total_memory)"
    try:
        done = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True, timeout=180, check=True)
        return int(done.stdout.strip())
    except (subprocess.SubprocessError, ValueError):
        return 0


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else [str(path) for path in value]


def _data_checks(config: DictConfig) -> list[Check]:
    train_rows = None if config.trainer.get("val_only", False) else config.data.train_batch_size
    return [
        _data_check("training data", "data.train_files", _as_list(config.data.train_files), train_rows),
        _data_check("validation data", "data.val_files", _as_list(config.data.val_files), None),
    ]


def _data_check(item: str, key: str, paths: list[str], min_rows: int | None) -> Check:
    """Each file exists, is parquet with DisCO's columns; together they hold at least ``min_rows`` rows."""
    import pyarrow.parquet as pq

    remote = [path for path in paths if "://" in path]
    if remote:
        return Check(item, NOT_CHECKED, f"{key} has remote paths ({remote}); only local files are checked")
    problems, rows = [], 0
    absent = [path for path in paths if not Path(path).is_file()]
    if absent:
        problems.append(
            f"{key}={absent[0] if len(absent) == 1 else absent}: no such file; run `{PREPARE_DATA}` (writes "
            f"$DISCO_DATA_DIR, default ~/data/disco) or point {key} at the parquet file"
        )
    for path in (path for path in paths if path not in absent):
        try:
            metadata = pq.read_metadata(path)
        except Exception as error:  # pyarrow raises several types for a file that is not parquet
            problems.append(f"{key}={path}: not a readable parquet file ({error}); rewrite it with `{PREPARE_DATA}`")
            continue
        missing = [name for name in SCHEMA.names if name not in metadata.schema.to_arrow_schema().names]
        if missing:
            problems.append(
                f"{key}={path}: lacks the column(s) {missing} of DisCO's schema (recipe.disco.data."
                f"SCHEMA); rewrite it with `{PREPARE_DATA}`"
            )
        rows += metadata.num_rows
    if not problems and min_rows is not None and rows < min_rows:
        problems.append(
            f"{key}={paths}: {rows} rows, fewer than data.train_batch_size={min_rows}, so not one "
            "training step; use the whole training set or lower data.train_batch_size"
        )
    if problems:
        return Check(item, PROBLEM, "\n".join(problems))
    return Check(item, OK, f"{len(paths)} file(s), {rows} rows, DisCO's columns")


def _gpu_count_check(config: DictConfig, gpus: Gpus) -> Check:
    """This node's GPUs against the training pool's per node, plus, for separate_async on one node, its standalone
    rollout pool's (on several nodes Ray places the pools; this node is checked for the training pool only)."""
    wanted, nodes = config.trainer.n_gpus_per_node, config.trainer.nnodes
    rollout = config.actor_rollout_ref.rollout
    pools = f"trainer.n_gpus_per_node={wanted}"
    if config.trainer.v1.trainer_mode == "separate_async" and nodes == rollout.nnodes == 1:
        wanted += rollout.n_gpus_per_node
        pools += f" + {ROLLOUT}.n_gpus_per_node={rollout.n_gpus_per_node} (separate_async's rollout pool)"
    if not gpus.count:
        return Check("GPUs", NOT_CHECKED, "no GPU")
    if gpus.count < wanted:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        fix = (
            f"set NGPUS_PER_NODE={gpus.count} (trainer.n_gpus_per_node={gpus.count})"
            if wanted == config.trainer.n_gpus_per_node
            else f"make NGPUS_PER_NODE + ROLLOUT_GPUS_PER_NODE add up to {gpus.count}"
        )
        return Check(
            "GPUs",
            PROBLEM,
            f"{pools}: this node shows {gpus.count} GPU(s) (CUDA_VISIBLE_DEVICES={visible}); {fix} or make "
            f"{wanted} GPUs visible",
        )
    return Check("GPUs", OK, f"{gpus.count} on this node for {pools} x nnodes={nodes}")


def _cpu_backend_check() -> Check:
    """``DISCO_CPU_BACKEND=1`` makes every process of the run take the CPU platform and, by the CPU overrides, the
    ``hf`` stand-in rollout: on a GPU node it is a leftover from the demo or the tests, never what a run wants."""
    import torch

    item = "CPU backend"
    if os.environ.get(CPU_BACKEND_ENV) != "1":
        return Check(item, OK, f"{CPU_BACKEND_ENV} is not set")
    cuda = torch.cuda.device_count()
    if not cuda:
        return Check(item, OK, f"{CPU_BACKEND_ENV}=1 on a machine without CUDA GPUs (tests and the demo)")
    return Check(
        item,
        PROBLEM,
        f"{CPU_BACKEND_ENV}=1 on a machine with {cuda} CUDA GPU(s): every verl process would run on the CPU "
        f"platform meant for tests and the demo; unset it (unset {CPU_BACKEND_ENV}) before launching",
    )


def _reasoning_format_check(config: DictConfig) -> Check:
    """The reward grades only what follows ``</think>`` (``require_think``, default True). verl decodes each
    response with ``skip_special_tokens=True`` before the reward sees it, so a tokenizer that marks ``</think>``
    special, or a model that never writes it, has every answer scored 0. Checked with the run's tokenizer and chat
    template: a well-formed answer, tokenized and decoded as verl does, must give the reward its boxed answer."""
    from recipe.disco.reward import THINK_CLOSE, THINK_OPEN, extract_answer

    item = "reasoning format"
    reward = config.reward.custom_reward_function
    if reward.get("path") != REWARD_MODULE:
        return Check(item, NOT_CHECKED, f"reward.custom_reward_function.path={reward.get('path')} is not DisCO's")
    require_think = bool((reward.get("reward_kwargs") or {}).get("require_think", True))
    key_value = f"{REQUIRE_THINK_KEY}={require_think}"
    if not require_think:
        return Check(item, OK, f"{key_value}: answers are graded without a reasoning block")
    tokenizer, error = _load_tokenizer(config)
    if tokenizer is None:
        return Check(item, NOT_CHECKED, error)
    messages = [{"role": "user", "content": f"What is 1+1? {PROMPT_SUFFIX}"}]
    template_kwargs = dict(config.data.get("apply_chat_template_kwargs") or {})
    try:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
    except Exception as error:  # no template, or a template error: verl would fail the same way
        return Check(item, PROBLEM, f"the tokenizer's chat template fails ({type(error).__name__}: {error})")
    opens_think = prompt.rstrip().endswith(THINK_OPEN)
    answer = f"{'' if opens_think else THINK_OPEN}1 plus 1 is 2.\n{THINK_CLOSE}\n\nThe answer is \\boxed{{2}}."
    seen = tokenizer.decode(tokenizer.encode(answer, add_special_tokens=False), skip_special_tokens=True)
    if extract_answer(seen, require_think=True) != "2":
        return Check(
            item,
            PROBLEM,
            f"{key_value}: the tokenizer treats {THINK_CLOSE} as a special token, and verl decodes responses with "
            f"skip_special_tokens=True, so the reward never sees it and scores every answer 0 (decoded: {seen!r}); "
            f"use a tokenizer where {THINK_CLOSE} is an ordinary token, or set ++{REQUIRE_THINK_KEY}=False",
        )
    if not opens_think and THINK_CLOSE not in tokenizer.get_vocab():
        return Check(
            item,
            PROBLEM,
            f"{key_value}: neither the chat template opens {THINK_OPEN} nor has the tokenizer a {THINK_CLOSE} "
            f"token, so the model is not a reasoning model that writes {THINK_CLOSE}, and an answer without it "
            f"scores 0; set ++{REQUIRE_THINK_KEY}=False (grades the whole answer) or use a reasoning model",
        )
    where = "the prompt opens it" if opens_think else "the model opens it"
    return Check(item, OK, f"{key_value}: {THINK_CLOSE} survives decoding ({where}) and the reward finds the answer")


def _load_tokenizer(config: DictConfig):
    """The run's tokenizer from a local folder or the Hugging Face cache (no download: the preflight starts nothing
    slow), and the reason when there is none."""
    from transformers import AutoTokenizer

    model = config.actor_rollout_ref.model
    path = str(model.get("tokenizer_path") or model.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=bool(model.get("trust_remote_code", False)), local_files_only=True
        )
    except Exception as error:  # not downloaded yet, or unreadable
        return None, (
            f"actor_rollout_ref.model.path={path}: no tokenizer in a local folder or the Hugging Face cache "
            f"({type(error).__name__}); download it first (huggingface-cli download {path}) to have it checked"
        )
    return tokenizer, ""


def _rollout_name(config: DictConfig) -> str:
    """``rollout.name``, which verl's YAML leaves mandatory (``???``) for the launch to set."""
    return OmegaConf.select(config, f"{ROLLOUT}.name", throw_on_missing=False) or "???"


def _rollout_package(config: DictConfig) -> tuple[str, str, str | None, str]:
    name = _rollout_name(config)
    module = name if name in ENGINES else None
    return (
        f"{ROLLOUT}.name",
        name,
        module,
        f'install it: pip install -e ".[{name}]" (verl[{name}]==0.9.1; docs/install.md)',
    )


def _attention(config: DictConfig) -> str:
    override = config.actor_rollout_ref.model.get("override_config") or {}
    return override.get("attn_implementation", DEFAULT_ATTENTION)


def _attention_package(config: DictConfig) -> tuple[str, str, str | None, str]:
    name = _attention(config)
    plus = "" if "attn_implementation" in (config.actor_rollout_ref.model.get("override_config") or {}) else "+"
    fix = (
        'install flash-attn 2.8.3 after torch (pip install --no-build-isolation "flash-attn==2.8.3", or a prebuilt '
        f"wheel: docs/install.md), or set {plus}{ATTN_KEY}=sdpa (not with Ulysses sequence parallelism)"
    )
    return ATTN_KEY, name, ATTENTION_PACKAGES.get(name), fix


def _package_check(item: str, key: str, value: str, module: str | None, fix: str) -> Check:
    if value == "???":
        return Check(item, PROBLEM, f"{key} is not set; set {key}=vllm (or sglang)")
    if module is None:
        return Check(item, NOT_CHECKED, f"{key}={value} needs no extra package checked here")
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken build raises more than ImportError (OSError, RuntimeError)
        return Check(item, PROBLEM, f"{key}={value}: `import {module}` fails ({type(error).__name__}: {error}); {fix}")
    return Check(item, OK, f"{key}={value}: {module} imports")


def _wandb_check(config: DictConfig) -> Check:
    loggers = _as_list(config.trainer.logger)
    if "wandb" not in loggers:
        return Check("wandb", OK, f"trainer.logger={loggers} does not log to wandb")
    source = _wandb_credentials()
    if source:
        return Check("wandb", OK, f"credentials from {source}")
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    return Check(
        "wandb",
        PROBLEM,
        f"trainer.logger={loggers}: wandb has no credentials (no WANDB_API_KEY, no {host} entry in "
        f"{_netrc_path()}, WANDB_MODE unset); run `wandb login`, export WANDB_API_KEY, set WANDB_MODE=offline, "
        "or log elsewhere: LOGGER=\"['console']\" (trainer.logger=[console])",
    )


def _netrc_path() -> Path:
    return Path(os.environ.get("NETRC") or Path.home() / ".netrc")


def _wandb_credentials() -> str | None:
    """Where wandb would find credentials, or None."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={os.environ['WANDB_MODE']} (no login needed)"
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        entry = netrc.netrc(str(_netrc_path())).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return f"{_netrc_path()} ({host})" if entry else None


def _model_shape_or_error(config: DictConfig) -> tuple[ModelShape | None, str]:
    path = str(config.actor_rollout_ref.model.path)
    try:
        shape = model_shape(path)
    except (OSError, ValueError, KeyError) as error:
        return None, f"actor_rollout_ref.model.path={path}: config.json unreadable ({type(error).__name__}: {error})"
    if shape is None:
        return None, f"actor_rollout_ref.model.path={path} is not a local folder with config.json nor a paper model"
    return shape, ""


def checkpoint_bytes(shape: ModelShape, save_contents: Sequence[str]) -> int:
    """One verl FSDP checkpoint: fp32 weights (model), two fp32 AdamW moments (optimizer), bf16 HF weights."""
    per_param = {"model": 4, "optimizer": 8, "hf_model": 2}
    return shape.params * sum(per_param.get(content, 0) for content in save_contents)


def checkpoints_on_disk(config: DictConfig, train_rows: int) -> int:
    """Checkpoints on disk at the peak: verl saves every save_freq steps and at the last one; with
    max_actor_ckpt_to_keep=K >= 2 it deletes down to K - 1 before saving, with K=1 only after (so 2 at once),
    with null (or 0) it keeps all (checkpoint/checkpoint_manager.py:166-191)."""
    trainer = config.trainer
    steps = trainer.total_training_steps or train_rows // config.data.train_batch_size * trainer.total_epochs
    saves = math.ceil(steps / trainer.save_freq)
    keep = trainer.max_actor_ckpt_to_keep
    return saves if not keep or keep < 1 else min(saves, max(keep, 2))


def _disk_check(config: DictConfig, shape: ModelShape | None, shape_error: str) -> Check:
    trainer = config.trainer
    if trainer.get("val_only", False):
        return Check("checkpoint disk", OK, "no checkpoints (trainer.val_only=True)")
    if trainer.save_freq <= 0:
        return Check("checkpoint disk", OK, f"no checkpoints (trainer.save_freq={trainer.save_freq})")
    if shape is None:
        return Check("checkpoint disk", NOT_CHECKED, f"{shape_error}; the checkpoint size needs the model's shape")
    rows = _parquet_rows(_as_list(config.data.train_files))
    if rows is None and not trainer.total_training_steps:
        return Check("checkpoint disk", NOT_CHECKED, "the number of steps needs the training data's row count")
    size = checkpoint_bytes(shape, config.actor_rollout_ref.actor.checkpoint.save_contents)
    kept = checkpoints_on_disk(config, rows or 0)
    folder = Path(trainer.default_local_dir).absolute()
    free = shutil.disk_usage(_existing_ancestor(folder)).free
    detail = f"{kept} checkpoint(s) of {size / GIB:.1f} GiB = {kept * size / GIB:.1f} GiB; {free / GIB:.1f} GiB free"
    if kept * size <= free:
        return Check("checkpoint disk", OK, f"{detail} under {folder}")
    fits = free // size
    fix = f"set trainer.max_actor_ckpt_to_keep={fits}" if fits >= 2 else "free disk space"
    return Check(
        "checkpoint disk",
        PROBLEM,
        f"trainer.max_actor_ckpt_to_keep={trainer.max_actor_ckpt_to_keep}: {detail} under trainer.default_local_dir="
        f"{folder}; {fix}, or point OUTPUT_DIR (trainer.default_local_dir) to a larger disk",
    )


def _parquet_rows(paths: list[str]) -> int | None:
    import pyarrow.parquet as pq

    try:
        return sum(pq.read_metadata(path).num_rows for path in paths)
    except Exception:  # missing or unreadable: the data check reports it
        return None


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _memory_check(config: DictConfig, gpus: Gpus, shape: ModelShape | None, shape_error: str) -> Check:
    if not gpus.count:
        return Check("GPU memory", NOT_CHECKED, "no GPU")
    if not gpus.memory_bytes:
        return Check("GPU memory", NOT_CHECKED, "the card's memory could not be read")
    if shape is None:
        return Check("GPU memory", NOT_CHECKED, shape_error)
    layout = layout_from_config(config)
    estimate = estimate_memory(shape, layout, gpus.memory_bytes)
    summary = ", ".join(f"{phase} {estimate.total(phase) / GIB:.1f}" for phase in estimate.phases)
    detail = f"estimate per GPU (GiB): {summary}; card {gpus.memory_bytes / GIB:.1f} GiB"
    over = [phase for phase in estimate.phases if estimate.total(phase) > gpus.memory_bytes]
    if not over:
        return Check("GPU memory", OK, detail)
    fixes = "; ".join(_memory_fix(phase, estimate, layout, gpus.memory_bytes) for phase in over)
    return Check("GPU memory", PROBLEM, f"{detail}; {fixes}")


def _colocated_engine(config: DictConfig) -> bool:
    """A vLLM/SGLang engine shares the training GPUs: always, except in separate_async without hybrid replicas
    (``actor_rollout_ref.hybrid_engine=False``: the standalone pool alone generates, trainer_base.py:366-379)."""
    standalone_only = config.trainer.v1.trainer_mode == "separate_async" and not config.actor_rollout_ref.get(
        "hybrid_engine", True
    )
    return _rollout_name(config) in ENGINES and not standalone_only


def _rollout_memory_check(config: DictConfig, gpus: Gpus, shape: ModelShape | None, shape_error: str) -> Check:
    """The rollout engine's weights and one full-length sequence's KV cache within its share of each GPU, on the
    training GPUs or on separate_async's rollout pool (taken to have this node's card)."""
    rollout = config.actor_rollout_ref.rollout
    if _rollout_name(config) not in ENGINES:
        return Check("rollout memory", NOT_CHECKED, f"{ROLLOUT}.name={_rollout_name(config)} reserves no share")
    if not gpus.count or not gpus.memory_bytes:
        return Check("rollout memory", NOT_CHECKED, "no GPU" if not gpus.count else "the card's memory is unknown")
    if shape is None:
        return Check("rollout memory", NOT_CHECKED, shape_error)
    tp, fraction = rollout.tensor_model_parallel_size, rollout.gpu_memory_utilization
    max_model_len = rollout.get("max_model_len") or config.data.max_prompt_length + config.data.max_response_length
    terms = rollout_engine_memory(shape, tp, DTYPE_BYTES.get(str(rollout.dtype), 2), max_model_len)
    share, needed = fraction * gpus.memory_bytes, sum(terms.values())
    where = "separate_async's rollout pool" if config.trainer.v1.trainer_mode == "separate_async" else "the GPUs"
    detail = (
        f"per GPU of {where} (GiB): "
        + ", ".join(f"{term} {value / GIB:.2f}" for term, value in terms.items())
        + f" within {ROLLOUT}.gpu_memory_utilization={fraction} x {gpus.memory_bytes / GIB:.1f}"
    )
    if needed <= share:
        return Check("rollout memory", OK, detail)
    least = math.ceil(needed / gpus.memory_bytes * 20) / 20
    raise_fraction = f"raise {ROLLOUT}.gpu_memory_utilization to {least:.2f} or " if least < 1 else ""
    return Check(
        "rollout memory",
        PROBLEM,
        f"{detail}: the engine would not start; {raise_fraction}raise {ROLLOUT}.tensor_model_parallel_size={tp}",
    )


def _memory_fix(phase: str, estimate: MemoryEstimate, layout: Layout, card: int) -> str:
    """The key that sets the phase's largest term, its value, and a value that fits by the estimate."""
    terms, excess = estimate.phases[phase], estimate.total(phase) - card
    if phase == "generation":
        fraction = math.floor((layout.rollout_fraction - excess / card) * 20) / 20
        return (
            f"generation: {ROLLOUT}.gpu_memory_utilization={layout.rollout_fraction} does not fit beside the actor's "
            f"state; set it to {fraction:.2f} or offload the actor: actor_rollout_ref.actor.fsdp_config."
            "param_offload=True optimizer_offload=True"
        )
    if terms["rollout engine"]:
        return (
            f"{phase}: the rollout engine keeps {terms['rollout engine'] / GIB:.1f} GiB during the actor passes; "
            f"set {ROLLOUT}.free_cache_engine=True (and {ROLLOUT}.enable_sleep_mode=True)"
        )
    tokens = layout.update_tokens if phase == "update" else layout.log_prob_tokens
    linear, quadratic = (terms["activations"] + terms["logits"]) / tokens, terms["attention mask"] / tokens**2
    allowed = linear * tokens + quadratic * tokens**2 - excess  # bytes the token-dependent terms may take
    if quadratic:  # the largest t with linear t + quadratic t^2 <= allowed
        fitting = (math.sqrt(linear**2 + 4 * quadratic * max(allowed, 0)) - linear) / (2 * quadratic)
    else:
        fitting = allowed / linear
    mask = ", or use flash-attention (sdpa holds a token-by-token mask of packed micro-batches)" if quadratic else ""
    key = (
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu (or ppo_max_token_len_per_gpu)"
        if phase == "update"
        else f"{ROLLOUT}.log_prob_micro_batch_size_per_gpu (or log_prob_max_token_len_per_gpu)"
    )
    return (
        f"{phase}: {tokens} tokens per GPU per micro-batch are too many; at most {max(int(fitting), 0)} fit: "
        f"lower {key} or raise the Ulysses sequence parallel size{mask}"
    )


# ------------------------------------------------------------------ command line


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The config ``main_disco`` gets for these overrides (``config/disco_trainer.yaml``, Hydra)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).parent / "config"), version_base=None):
        return compose("disco_trainer", overrides=list(overrides))


def _settings_check(config: DictConfig) -> Check:
    """main_disco's configuration checks (DisCO's and verl's), as one report line."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # verl prints a success line
            validate(config)
    except (DisCOConfigError, AssertionError, ValueError) as error:
        return Check("settings", PROBLEM, str(error))
    return Check("settings", OK, "DisCO's and verl's configuration checks pass")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for recipe.disco.main_disco")
    config = compose_config(parser.parse_args(argv).overrides)
    from verl.utils.device import auto_set_device

    auto_set_device(config)  # as main_disco does
    checks = [_settings_check(config), *preflight_checks(config)]
    print(format_report(checks))
    return 1 if any(check.status == PROBLEM for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
