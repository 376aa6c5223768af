"""Preflight (``recipe.disco.preflight``): every problem it detects, the memory estimate, the CLI and main_disco.

Configs are composed from the recipe YAML by Hydra; the clean one is the CPU task of ``recipe.disco.cpu`` (tiny
model and data). GPU items take a :class:`Gpus` argument, so a card can be given on a machine without one.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import compose_disco
from e2e_utils import cached_tiny_build, cpu_overrides

from recipe.disco import preflight
from recipe.disco.data import SCHEMA
from recipe.disco.preflight import NOT_CHECKED, OK, PROBLEM, Check, Gpus, Layout, ModelShape

REPO = Path(__file__).resolve().parents[1]
H100 = 81559 * 2**20  # an H100 80GB HBM3 as nvidia-smi shows it
GIB = 2**30
RUNTIME = 4 * GIB
M15, M7 = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
NEEDS_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without GPUs reports")


@pytest.fixture(scope="module")
def tiny():
    return cached_tiny_build()


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No wandb credentials anywhere (an empty netrc file)."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", preflight.IGNORE_ENV):
        monkeypatch.delenv(name, raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("")
    monkeypatch.setenv("NETRC", str(netrc_file))
    return netrc_file


def cpu_config(tiny, *extra: str):
    return compose_disco([*cpu_overrides(tiny, steps=2), *extra])


def paper_config(model: str, *extra: str, micro: int = 4, log_prob_micro: int = 8, response: int = 8192):
    """The keys of run_disco.sh that the estimate reads, with the paper's values (8 x 80 GB, vLLM at 0.85)."""
    return compose_disco(
        [
            f"actor_rollout_ref.model.path={model}",
            "data.max_prompt_length=1024",
            f"data.max_response_length={response}",
            "data.train_batch_size=128",
            "actor_rollout_ref.rollout.n=8",
            "actor_rollout_ref.actor.ppo_mini_batch_size=32",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
            f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={log_prob_micro}",
            "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.rollout.gpu_memory_utilization=0.85",
            "trainer.n_gpus_per_node=8",
            "trainer.nnodes=1",
            *extra,
        ]
    )


def item(checks: list[Check], name: str) -> Check:
    (found,) = [check for check in checks if check.item == name]
    return found


def write_rows(path: Path, rows: int, schema: pa.Schema = SCHEMA) -> Path:
    """A parquet file of ``rows`` rows with ``schema``'s columns (values from a valid row)."""
    row = {
        "data_source": "x",
        "prompt": [{"role": "user", "content": "1+1?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": ["2"]},
        "extra_info": {"split": "train", "index": 0},
    }
    pq.write_table(pa.Table.from_pylist([{k: row[k] for k in schema.names}] * rows, schema=schema), path)
    return path


# ------------------------------------------------------------------ the clean CPU config


@NEEDS_NO_CUDA
def test_the_clean_cpu_config_passes_and_reports_the_gpu_items_as_not_checked(tiny):
    checks = preflight.preflight_checks(cpu_config(tiny))  # the real probe: trainer.device=cpu, no GPU here
    assert [check for check in checks if check.status == PROBLEM] == []
    assert item(checks, "GPUs") == Check("GPUs", NOT_CHECKED, "no GPU")
    assert item(checks, "GPU memory") == Check("GPU memory", NOT_CHECKED, "no GPU")
    assert item(checks, "training data").detail == "1 file(s), 80 rows, DisCO's columns"
    report = preflight.format_report(checks)
    assert "[not checked] GPUs: no GPU" in report and report.endswith("No problems.")


@NEEDS_NO_CUDA
def test_a_cuda_device_on_a_machine_without_gpus_is_not_checked(tiny):
    checks = preflight.preflight_checks(cpu_config(tiny, "trainer.device=cuda"))
    assert preflight.visible_gpus() == Gpus(0, 0)
    assert item(checks, "GPUs").status == item(checks, "GPU memory").status == NOT_CHECKED


# ------------------------------------------------------------------ data


def test_a_missing_training_file_names_the_key_the_path_and_prepare_data(tiny, tmp_path):
    missing = tmp_path / "deepscaler_train.parquet"
    check = item(preflight.preflight_checks(cpu_config(tiny, f"data.train_files={missing}"), Gpus(0)), "training data")
    assert check.status == PROBLEM
    assert check.detail.startswith(f"data.train_files={missing}: no such file; run `bash recipe/disco/prepare_data.sh`")


def test_missing_validation_files_among_several_are_named(tiny, tmp_path):
    one, two = tmp_path / "aime24.parquet", tmp_path / "aime25.parquet"
    config = cpu_config(tiny, f"data.val_files=[{tiny.val_file},{one}]")
    check = item(preflight.preflight_checks(config, Gpus(0)), "validation data")
    assert check.status == PROBLEM and check.detail.startswith(f"data.val_files={one}: no such file; run `bash")
    assert str(tiny.val_file) not in check.detail
    config = cpu_config(tiny, f"data.val_files=[{one},{tiny.val_file},{two}]")
    check = item(preflight.preflight_checks(config, Gpus(0)), "validation data")
    assert check.detail.startswith(f"data.val_files={[str(one), str(two)]}: no such file; run `bash")


def test_a_file_that_is_not_parquet_is_a_problem(tiny, tmp_path):
    broken = tmp_path / "train.parquet"
    broken.write_text("not parquet")
    check = item(preflight.preflight_checks(cpu_config(tiny, f"data.train_files={broken}"), Gpus(0)), "training data")
    assert check.status == PROBLEM
    assert f"data.train_files={broken}: not a readable parquet file" in check.detail
    assert "rewrite it with `bash recipe/disco/prepare_data.sh`" in check.detail


def test_missing_columns_of_the_disco_schema_are_listed(tiny, tmp_path):
    partial = write_rows(tmp_path / "val.parquet", 3, pa.schema([SCHEMA.field("data_source"), SCHEMA.field("prompt")]))
    check = item(preflight.preflight_checks(cpu_config(tiny, f"data.val_files={partial}"), Gpus(0)), "validation data")
    assert check.status == PROBLEM
    assert f"data.val_files={partial}: lacks the column(s) ['ability', 'reward_model', 'extra_info']" in check.detail


def test_fewer_training_rows_than_one_batch_is_a_problem_except_for_validation_only(tiny, tmp_path):
    small = write_rows(tmp_path / "train.parquet", 3)
    config = cpu_config(tiny, f"data.train_files={small}")  # train_batch_size=4
    check = item(preflight.preflight_checks(config, Gpus(0)), "training data")
    assert check.status == PROBLEM
    assert "3 rows, fewer than data.train_batch_size=4, so not one training step" in check.detail
    two_files = cpu_config(tiny, f"data.train_files=[{small},{small}]")  # 6 rows together
    assert item(preflight.preflight_checks(two_files, Gpus(0)), "training data").detail.startswith("2 file(s), 6 rows")
    val_only = cpu_config(tiny, f"data.train_files={small}", "trainer.val_only=True")
    assert item(preflight.preflight_checks(val_only, Gpus(0)), "training data").status == OK


# ------------------------------------------------------------------ GPUs, packages, wandb


def test_fewer_visible_gpus_than_n_gpus_per_node_is_a_problem(tiny):
    config = cpu_config(tiny, "trainer.n_gpus_per_node=8")
    check = item(preflight.preflight_checks(config, Gpus(2, H100)), "GPUs")
    assert check.status == PROBLEM
    assert check.detail.startswith("trainer.n_gpus_per_node=8: this node shows 2 GPU(s)")
    assert "set NGPUS_PER_NODE=2 (trainer.n_gpus_per_node=2) or make 8 GPUs visible" in check.detail
    assert item(preflight.preflight_checks(config, Gpus(8, H100)), "GPUs").status == OK


def test_separate_async_on_one_node_needs_the_gpus_of_both_pools(tiny):
    config = cpu_config(
        tiny,
        "trainer.n_gpus_per_node=8",
        "trainer.v1.trainer_mode=separate_async",
        "actor_rollout_ref.rollout.nnodes=1",
        "actor_rollout_ref.rollout.n_gpus_per_node=4",
    )
    check = item(preflight.preflight_checks(config, Gpus(8, H100)), "GPUs")
    assert check.status == PROBLEM
    assert check.detail.startswith(
        "trainer.n_gpus_per_node=8 + actor_rollout_ref.rollout.n_gpus_per_node=4 (separate_async's rollout pool): "
        "this node shows 8 GPU(s)"
    )
    assert "make NGPUS_PER_NODE + ROLLOUT_GPUS_PER_NODE add up to 8 or make 12 GPUs visible" in check.detail
    assert item(preflight.preflight_checks(config, Gpus(12, H100)), "GPUs").status == OK


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_a_rollout_engine_that_does_not_import_is_a_problem(tiny, monkeypatch, engine):
    monkeypatch.setitem(sys.modules, engine, None)  # `import engine` raises ModuleNotFoundError
    config = cpu_config(tiny, f"actor_rollout_ref.rollout.name={engine}")
    check = item(preflight.preflight_checks(config, Gpus(0)), "rollout engine")
    assert check.status == PROBLEM
    assert check.detail.startswith(f"actor_rollout_ref.rollout.name={engine}: `import {engine}` fails")
    assert f'pip install -e ".[{engine}]"' in check.detail
    monkeypatch.setitem(sys.modules, engine, types.ModuleType(engine))  # now it imports
    assert item(preflight.preflight_checks(config, Gpus(0)), "rollout engine").status == OK


def test_an_unset_rollout_engine_is_a_problem(tiny):
    overrides = [o for o in cpu_overrides(tiny, steps=2) if not o.startswith("actor_rollout_ref.rollout.name=")]
    config = compose_disco(overrides)  # verl's YAML leaves the name mandatory (???)
    check = item(preflight.preflight_checks(config, Gpus(0)), "rollout engine")
    assert check == Check(
        "rollout engine",
        PROBLEM,
        "actor_rollout_ref.rollout.name is not set; set actor_rollout_ref.rollout.name=vllm (or sglang)",
    )


def test_verls_default_attention_needs_flash_attn(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    overrides = [o for o in cpu_overrides(tiny, steps=2) if "attn_implementation" not in o]
    check = item(preflight.preflight_checks(compose_disco(overrides), Gpus(0)), "attention kernel")
    assert check.status == PROBLEM
    assert check.detail.startswith(
        "actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2: `import flash_attn` fails"
    )
    assert check.detail.endswith(
        "or set +actor_rollout_ref.model.override_config.attn_implementation=sdpa "
        "(not with Ulysses sequence parallelism)"
    )
    sdpa = item(preflight.preflight_checks(cpu_config(tiny), Gpus(0)), "attention kernel")
    assert sdpa.status == NOT_CHECKED and "attn_implementation=sdpa" in sdpa.detail


def test_a_leftover_cpu_backend_flag_on_a_machine_with_cuda_gpus_is_a_problem(tiny, monkeypatch):
    monkeypatch.delenv(preflight.CPU_BACKEND_ENV, raising=False)
    assert item(preflight.preflight_checks(cpu_config(tiny)), "CPU backend").status == OK
    monkeypatch.setenv(preflight.CPU_BACKEND_ENV, "1")
    assert item(preflight.preflight_checks(cpu_config(tiny)), "CPU backend").status == OK  # the tests and the demo
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    check = item(preflight.preflight_checks(cpu_config(tiny)), "CPU backend")
    assert check.status == PROBLEM
    assert "DISCO_CPU_BACKEND=1 on a machine with 8 CUDA GPU(s)" in check.detail
    assert "unset DISCO_CPU_BACKEND" in check.detail


def tokenizer_variant(tiny, tmp_path, *, think_special: bool | None, template_opens_think: bool) -> Path:
    """The tiny model's tokenizer saved with ``<think>``/``</think>`` as added tokens (special or not; None: no such
    tokens) and a chat template that opens ``<think>`` in the generation prompt or not."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    if think_special is not None:
        tokenizer.add_tokens(["<think>", "</think>"], special_tokens=think_special)
    if template_opens_think:
        tokenizer.chat_template = tokenizer.chat_template.replace(
            "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'"
        )
        assert "<think>" in tokenizer.chat_template
    folder = tmp_path / f"tok_{think_special}_{template_opens_think}"
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "think_special, template_opens_think, status, text",
    [
        (False, True, OK, "</think> survives decoding (the prompt opens it)"),
        (False, False, OK, "</think> survives decoding (the model opens it)"),
        (True, True, PROBLEM, "the tokenizer treats </think> as a special token"),
        (None, False, PROBLEM, "neither the chat template opens <think> nor has the tokenizer a </think> token"),
    ],
)
def test_the_reward_must_find_think_close_after_verls_decode(
    tiny, tmp_path, think_special, template_opens_think, status, text
):
    folder = tokenizer_variant(tiny, tmp_path, think_special=think_special, template_opens_think=template_opens_think)
    require = "reward.custom_reward_function.reward_kwargs.require_think=True"
    config = cpu_config(tiny, f"actor_rollout_ref.model.tokenizer_path={folder}", require)
    check = item(preflight.preflight_checks(config), "reasoning format")
    assert (check.status, text in check.detail) == (status, True), check.detail
    if status == PROBLEM:
        assert "reward.custom_reward_function.reward_kwargs.require_think=True" in check.detail
        assert "require_think=False" in check.detail  # the fix


def test_the_reasoning_format_is_not_required_without_require_think_and_unchecked_without_a_tokenizer(tiny):
    check = item(preflight.preflight_checks(cpu_config(tiny)), "reasoning format")  # the tiny task: require_think off
    assert check.status == OK and "require_think=False" in check.detail
    check = item(preflight.preflight_checks(paper_config("org/not-downloaded")), "reasoning format")
    assert check.status == NOT_CHECKED and "huggingface-cli download org/not-downloaded" in check.detail


def test_wandb_without_credentials_is_a_problem(tiny, clean_env, monkeypatch):
    config = cpu_config(tiny, "trainer.logger=[console,wandb]")
    check = item(preflight.preflight_checks(config, Gpus(0)), "wandb")
    assert check.status == PROBLEM
    assert check.detail.startswith(
        f"trainer.logger=['console', 'wandb']: wandb has no credentials (no WANDB_API_KEY, "
        f"no api.wandb.ai entry in {clean_env}, WANDB_MODE unset)"
    )
    assert "run `wandb login`" in check.detail and "trainer.logger=[console]" in check.detail

    clean_env.write_text("machine example.com login user password secret\n")  # another host's entry
    assert item(preflight.preflight_checks(config, Gpus(0)), "wandb").status == PROBLEM
    clean_env.write_text("machine api.wandb.ai login user password secret\n")
    assert (
        item(preflight.preflight_checks(config, Gpus(0)), "wandb").detail == f"credentials from {clean_env} "
        "(api.wandb.ai)"
    )
    clean_env.write_text("")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert item(preflight.preflight_checks(config, Gpus(0)), "wandb").status == OK
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert item(preflight.preflight_checks(config, Gpus(0)), "wandb").detail == "credentials from WANDB_API_KEY"


# ------------------------------------------------------------------ checkpoint disk


def test_the_checkpoint_size_is_fp32_weights_and_two_fp32_adam_moments():
    shape = preflight.PAPER_MODELS[M15]
    assert preflight.checkpoint_bytes(shape, ["model", "optimizer", "extra"]) == 1_777_088_000 * (4 + 8)
    assert preflight.checkpoint_bytes(shape, ["model", "optimizer", "extra", "hf_model"]) == 1_777_088_000 * 14


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.total_training_steps=1400", "trainer.save_freq=20"], 70),  # null: all kept
        (["trainer.total_training_steps=1401", "trainer.save_freq=20"], 71),  # and the last step
        (["trainer.total_training_steps=1400", "trainer.save_freq=20", "trainer.max_actor_ckpt_to_keep=5"], 5),
        (["trainer.total_training_steps=1400", "trainer.save_freq=20", "trainer.max_actor_ckpt_to_keep=1"], 2),
        (["trainer.total_training_steps=1400", "trainer.save_freq=20", "trainer.max_actor_ckpt_to_keep=0"], 70),
        (["trainer.total_training_steps=20", "trainer.save_freq=20", "trainer.max_actor_ckpt_to_keep=1"], 1),
        # no total: 40315 rows // 128 = 314 steps per epoch x 30 epochs = 9420 steps, one save per 20
        (["data.train_batch_size=128", "trainer.total_epochs=30", "trainer.save_freq=20"], 471),
    ],
)
def test_checkpoints_on_disk_follow_verls_save_and_rotation(overrides, expected):
    assert preflight.checkpoints_on_disk(compose_disco(overrides), train_rows=40315) == expected


@pytest.mark.parametrize("fit, fix", [(5, "set trainer.max_actor_ckpt_to_keep=5"), (1, "free disk space")])
def test_too_little_disk_for_the_checkpoints_kept_names_the_key_and_a_number_that_fits(
    tiny, tmp_path, monkeypatch, fit, fix
):
    size = 1_777_088_000 * 12  # 21.3 GB per 1.5B checkpoint
    free = int((fit + 0.5) * size)  # controlled, not this machine's disk
    measured = []
    monkeypatch.setattr(
        preflight.shutil, "disk_usage", lambda path: measured.append(Path(path)) or types.SimpleNamespace(free=free)
    )
    out = tmp_path / "run" / "checkpoints"  # not created yet: the free space of its first existing parent counts
    config = cpu_config(
        tiny,
        f"actor_rollout_ref.model.path={M15}",
        "trainer.save_freq=1",
        "trainer.total_training_steps=1000000",  # a million kept checkpoints fit on no disk
        f"trainer.default_local_dir={out}",
    )
    check = item(preflight.preflight_checks(config, Gpus(0)), "checkpoint disk")
    assert check.status == PROBLEM and measured == [tmp_path]
    assert check.detail == (
        f"trainer.max_actor_ckpt_to_keep=None: 1000000 checkpoint(s) of {size / GIB:.1f} GiB = "
        f"{1000000 * size / GIB:.1f} GiB; {free / GIB:.1f} GiB free under trainer.default_local_dir={out}; "
        f"{fix}, or point OUTPUT_DIR (trainer.default_local_dir) to a larger disk"
    )


def test_checkpoints_that_fit_pass_and_unknown_models_are_not_checked(tiny, tmp_path):
    fits = cpu_config(tiny, "trainer.save_freq=1", f"trainer.default_local_dir={tmp_path}")
    check = item(preflight.preflight_checks(fits, Gpus(0)), "checkpoint disk")
    assert check.status == OK and check.detail.startswith("2 checkpoint(s) of 0.0 GiB")
    unknown = cpu_config(tiny, "trainer.save_freq=1", "actor_rollout_ref.model.path=org/unknown-model")
    check = item(preflight.preflight_checks(unknown, Gpus(0)), "checkpoint disk")
    assert check.status == NOT_CHECKED and "org/unknown-model is not a local folder with config.json" in check.detail


# ------------------------------------------------------------------ the memory estimate


def meta_parameters(hf_config) -> int:
    """Parameters of the real HF model built on the meta device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(parameter.numel() for parameter in model.parameters())


def test_parameter_counts_match_the_hf_models(tiny):
    from transformers import AutoConfig, Qwen2Config

    tiny_shape = preflight.model_shape(str(tiny.model_dir))  # read from config.json (tied embeddings)
    assert tiny_shape == ModelShape(64, 2, 128, 320, 4, 2, tied=True)
    assert tiny_shape.params == meta_parameters(AutoConfig.from_pretrained(tiny.model_dir)) == 94_784
    for name, params in ((M15, 1_777_088_000), (M7, 7_615_616_512)):
        shape = preflight.PAPER_MODELS[name]
        assert shape.params == meta_parameters(Qwen2Config(**shape.hf_config())) == params


def test_the_estimate_of_the_tiny_model_term_by_term(tiny):
    """P = 94,784 (tied), S = 2 ranks, T = 8 answers x (64 + 16) tokens = 640, hf rollout (no reservation).

    gathered units U = V h + 2 P_layer = 320*64 + 2*37,120 = 94,720; one recomputed layer per token
    2(10*64 + 2*32 + 7*128) = 3,200; checkpoints per token 2*2*64 = 256; logits per token 4*320 = 1,280.
    """
    layout = preflight.layout_from_config(cpu_config(tiny))
    assert layout == Layout(
        shard_gpus=2,
        update_tokens=640,
        log_prob_tokens=640,
        rollout_fraction=0.0,
        rollout_sleeps=True,
        param_offload=False,
        optimizer_offload=False,
        cpu_offload_policy=False,
        trains=True,
        optimizer_state=True,
    )
    estimate = preflight.estimate_memory(preflight.model_shape(str(tiny.model_dir)), layout, H100)
    assert estimate.phases == {
        "generation": {
            "rollout engine (gpu_memory_utilization x card)": 0,
            "fp32 weights": 4 * 47_392,
            "AdamW moments": 8 * 47_392,
            "runtime": RUNTIME,
        },
        "old_log_prob": {
            "rollout engine": 0,
            "fp32 weights": 4 * 47_392,
            "AdamW moments": 8 * 47_392,
            "gathered FSDP units": 2 * 94_720,
            "activations": 640 * 3_200,
            "logits": 640 * 1_280,
            "attention mask": 0,  # padded micro-batches (use_remove_padding=False)
            "runtime": RUNTIME,
        },
        "update": {
            "rollout engine": 0,
            "fp32 weights, gradients, AdamW moments": 16 * 47_392,
            "gathered FSDP units": 8 * 94_720,
            "activations": 640 * (256 + 3_200),
            "logits": 640 * 1_280,
            "attention mask": 0,
            "runtime": RUNTIME,
        },
    }
    assert estimate.total("update") == 758_272 + 757_760 + 2_211_840 + 819_200 + RUNTIME


def test_the_estimate_of_the_papers_layouts_on_80_gb_cards():
    """Hand-computed totals (bytes / 2^30) for 8 x H100 80 GB, 1024 + 8192 tokens, micro-batch 4, vLLM at 0.85.

    7B: P/8 = 951,952,064; generation 0.85 C + 12 P/8 + 4 GiB = 72,692,688,486 + 11,423,424,768 + R;
    update 16 P/8 = 15,231,233,024, 8 U = 8 (1,089,994,752 + 2 * 233,057,792) = 12,448,882,688,
    36,864 tokens x (2*28*3584 + 2(10*3584 + 2*512 + 7*18944)) = 36,864 x 539,648 = 19,893,583,872,
    logits 36,864 x 4 x 152,064 = 22,422,749,184, + R. 1.5B likewise with its log-prob micro-batch of 8.
    """
    seven = preflight.estimate_memory(
        preflight.PAPER_MODELS[M7], preflight.layout_from_config(paper_config(M7, log_prob_micro=4)), H100
    )
    assert seven.total("generation") == 72_692_688_486 + 11_423_424_768 + RUNTIME
    assert seven.total("update") == 15_231_233_024 + 12_448_882_688 + 19_893_583_872 + 22_422_749_184 + RUNTIME
    assert seven.peak_phase == "generation" and seven.total("generation") > H100  # the 7B default does not fit
    one_five = preflight.estimate_memory(
        preflight.PAPER_MODELS[M15], preflight.layout_from_config(paper_config(M15)), H100
    )
    # P/8 = 222,136,000; U = 466,747,392 + 2 * 46,797,824; per token: layer 157,184, logits 607,744
    assert one_five.total("generation") == 72_692_688_486 + 12 * 222_136_000 + RUNTIME
    assert one_five.total("old_log_prob") == (
        12 * 222_136_000 + 2 * 560_343_040 + 73_728 * (157_184 + 607_744) + RUNTIME
    )
    assert one_five.total("update") == (
        16 * 222_136_000 + 8 * 560_343_040 + 36_864 * (2 * 28 * 1536 + 157_184 + 607_744) + RUNTIME
    )
    assert one_five.peak_phase == "generation" and one_five.total("generation") < H100


@pytest.mark.parametrize(
    ("extra", "update_tokens", "log_prob_tokens"),
    [
        ([], 36_864, 73_728),  # 4 (8) answers x 9216 tokens
        (["actor_rollout_ref.actor.ulysses_sequence_parallel_size=4"], 9_216, 18_432),
        (
            [
                "actor_rollout_ref.actor.use_dynamic_bsz=True",
                "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24576",
                "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=20000",
                "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size=2",
            ],
            24_576,  # the budget is per GPU after the Ulysses split
            20_000,
        ),
    ],
)
def test_tokens_per_gpu_follow_micro_batches_budgets_and_ulysses(extra, update_tokens, log_prob_tokens):
    layout = preflight.layout_from_config(paper_config(M15, *extra))
    assert (layout.update_tokens, layout.log_prob_tokens) == (update_tokens, log_prob_tokens)


def test_offload_sleep_mode_and_validation_only_change_the_terms_they_should():
    shape, base = preflight.PAPER_MODELS[M7], paper_config(M7, log_prob_micro=4)
    plain = preflight.estimate_memory(shape, preflight.layout_from_config(base), H100).phases

    def phases(*extra):
        config = paper_config(M7, *extra, log_prob_micro=4)
        return preflight.estimate_memory(shape, preflight.layout_from_config(config), H100).phases

    fsdp = "actor_rollout_ref.actor.fsdp_config"
    offload = phases(f"{fsdp}.param_offload=True", f"{fsdp}.optimizer_offload=True")
    assert offload["generation"]["fp32 weights"] == offload["generation"]["AdamW moments"] == 0
    assert offload["old_log_prob"]["fp32 weights"] == plain["old_log_prob"]["fp32 weights"] > 0  # loaded back
    assert offload["old_log_prob"]["AdamW moments"] == 0
    assert offload["update"] == plain["update"]  # train mode loads everything back
    policy = phases("actor_rollout_ref.actor.strategy=fsdp2", f"{fsdp}.offload_policy=True")
    assert policy["update"]["fp32 weights, gradients, AdamW moments"] == 0
    awake = phases("actor_rollout_ref.rollout.free_cache_engine=False")
    reservation = plain["generation"]["rollout engine (gpu_memory_utilization x card)"]
    assert awake["update"]["rollout engine"] == awake["old_log_prob"]["rollout engine"] == reservation
    assert plain["update"]["rollout engine"] == 0
    assert list(phases("trainer.val_only=True", "trainer.resume_mode=disable")) == ["generation"]
    assert phases("trainer.val_only=True", "trainer.resume_mode=disable")["generation"]["AdamW moments"] == 0
    checkpoint = phases("trainer.val_only=True", "trainer.resume_mode=resume_path")  # loads the optimizer too
    assert checkpoint["generation"] == plain["generation"]


def test_memory_over_the_card_names_the_key_and_a_value_that_fits(tiny):
    config = paper_config(M7, log_prob_micro=4)
    check = item(preflight.preflight_checks(config, Gpus(8, H100)), "GPU memory")
    assert check.status == PROBLEM
    assert "estimate per GPU (GiB): generation 82.3, old_log_prob 50.1, update 69.2; card 79.6 GiB" in check.detail
    assert (
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.85 does not fit beside the actor's state; set it to "
        "0.80 or offload the actor" in check.detail
    )
    fitted = paper_config(M7, "actor_rollout_ref.rollout.gpu_memory_utilization=0.80", log_prob_micro=4)
    assert item(preflight.preflight_checks(fitted, Gpus(8, H100)), "GPU memory").status == OK
    assert item(preflight.preflight_checks(paper_config(M15), Gpus(8, H100)), "GPU memory").status == OK


def test_an_update_micro_batch_too_large_gets_the_number_of_tokens_that_fit():
    config = paper_config(M7, "actor_rollout_ref.rollout.gpu_memory_utilization=0.5", micro=8, log_prob_micro=4)
    estimate = preflight.estimate_memory(preflight.PAPER_MODELS[M7], preflight.layout_from_config(config), H100)
    check = item(preflight.preflight_checks(config, Gpus(8, H100)), "GPU memory")
    assert check.status == PROBLEM and "update: 73728 tokens per GPU per micro-batch are too many" in check.detail
    fitting = int(re.search(r"at most (\d+) fit", check.detail)[1])
    per_token = (estimate.phases["update"]["activations"] + estimate.phases["update"]["logits"]) / 73_728
    assert estimate.total("update") - (73_728 - fitting) * per_token <= H100  # that many do fit
    assert estimate.total("update") - (73_728 - fitting - 1) * per_token > H100  # one more does not
    assert "lower actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu" in check.detail


SDPA_PACKED = (
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
    "actor_rollout_ref.model.use_remove_padding=True",
    "actor_rollout_ref.actor.use_dynamic_bsz=True",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=36864",
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=36864",
)


def test_packed_micro_batches_without_flash_attention_add_a_token_by_token_mask():
    """The launch scripts' budget of 36,864 packed tokens with sdpa: 3 bytes per token pair (the boolean mask and
    SDPA's bf16 additive copy), 3.8 GiB; nothing with flash-attention or padded micro-batches."""
    shape = preflight.PAPER_MODELS[M15]

    def mask(*extra):
        config = paper_config(M15, *extra)
        phases = preflight.estimate_memory(shape, preflight.layout_from_config(config), H100).phases
        return phases["update"]["attention mask"], phases["old_log_prob"]["attention mask"]

    assert mask(*SDPA_PACKED) == (3 * 36_864**2, 3 * 36_864**2)
    assert round(3 * 36_864**2 / GIB, 1) == 3.8
    flash = [o for o in SDPA_PACKED if "attn_implementation" not in o]
    assert mask(*flash) == (0, 0)
    assert mask(*SDPA_PACKED, "actor_rollout_ref.model.use_remove_padding=False") == (0, 0)


def test_a_packed_sdpa_micro_batch_too_large_gets_the_tokens_that_fit_with_the_quadratic_mask():
    config = paper_config(M15, *SDPA_PACKED, "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=98304")
    estimate = preflight.estimate_memory(preflight.PAPER_MODELS[M15], preflight.layout_from_config(config), H100)
    check = item(preflight.preflight_checks(config, Gpus(8, H100)), "GPU memory")
    assert check.status == PROBLEM and "update: 98304 tokens per GPU per micro-batch are too many" in check.detail
    assert "or use flash-attention" in check.detail
    fitting = int(re.search(r"at most (\d+) fit", check.detail)[1])
    update = estimate.phases["update"]
    linear = (update["activations"] + update["logits"]) / 98_304
    fixed = estimate.total("update") - linear * 98_304 - update["attention mask"]

    def total(tokens: int) -> float:
        return fixed + linear * tokens + 3 * tokens**2

    assert total(fitting) <= H100 < total(fitting + 1)


def test_an_engine_that_does_not_sleep_is_named_in_the_fix():
    config = paper_config(M15, "actor_rollout_ref.rollout.free_cache_engine=False")
    check = item(preflight.preflight_checks(config, Gpus(8, H100)), "GPU memory")
    assert check.status == PROBLEM
    assert (
        "old_log_prob: the rollout engine keeps 67.7 GiB during the actor passes; set "
        "actor_rollout_ref.rollout.free_cache_engine=True" in check.detail
    )


def test_memory_is_not_checked_without_a_gpu_or_a_model_shape(tiny):
    config = paper_config(M7)
    assert item(preflight.preflight_checks(config, Gpus(0)), "GPU memory").detail == "no GPU"
    unknown = paper_config("org/unknown-model")
    check = item(preflight.preflight_checks(unknown, Gpus(8, H100)), "GPU memory")
    assert check.status == NOT_CHECKED and check.detail.startswith("actor_rollout_ref.model.path=org/unknown-model")


ROLLOUT_TP = "actor_rollout_ref.rollout.tensor_model_parallel_size"
ROLLOUT_SHARE = "actor_rollout_ref.rollout.gpu_memory_utilization"


def test_the_rollout_engine_must_hold_its_weights_and_one_full_sequence():
    """7B in bf16 on one GPU per engine: weights 2P = 2 x 7,615,616,512 bytes; one sequence of 1024 + 8192 tokens
    caches a key and a value of 4 heads x 128 in each of 28 layers: 2 x 28 x 4 x 128 x 2 x 9216 bytes."""
    weights, cache = 2 * 7_615_616_512, 2 * 28 * 4 * 128 * 2 * 9216
    small = paper_config(M7, f"{ROLLOUT_TP}=1", f"{ROLLOUT_SHARE}=0.15")
    check = item(preflight.preflight_checks(small, Gpus(8, H100)), "rollout memory")
    assert check.status == PROBLEM
    assert check.detail.startswith(
        f"per GPU of the GPUs (GiB): weights {weights / GIB:.2f}, KV cache of one sequence {cache / GIB:.2f} within "
        f"{ROLLOUT_SHARE}=0.15 x 79.6: the engine would not start"
    )
    least = math.ceil((weights + cache) / H100 * 20) / 20  # 0.20
    assert f"raise {ROLLOUT_SHARE} to {least:.2f} or raise {ROLLOUT_TP}=1" in check.detail
    fitted = paper_config(M7, f"{ROLLOUT_TP}=1", f"{ROLLOUT_SHARE}={least}")
    assert item(preflight.preflight_checks(fitted, Gpus(8, H100)), "rollout memory").status == OK
    split = paper_config(M7, f"{ROLLOUT_TP}=2", f"{ROLLOUT_SHARE}=0.15")  # half the weights and heads per GPU
    assert item(preflight.preflight_checks(split, Gpus(8, H100)), "rollout memory").status == OK


def test_tensor_parallelism_beyond_the_key_value_heads_replicates_them():
    shape = preflight.PAPER_MODELS[M7]  # 4 key/value heads
    per_head = 2 * 28 * 128 * 2 * 100
    assert preflight.rollout_engine_memory(shape, 2, 2, 100)["KV cache of one sequence"] == 2 * per_head
    assert preflight.rollout_engine_memory(shape, 8, 2, 100)["KV cache of one sequence"] == per_head
    assert preflight.rollout_engine_memory(shape, 8, 4, 100)["weights"] == 4 * shape.params // 8


def test_separate_async_checks_its_rollout_pool_and_frees_the_training_gpus_only_without_hybrid_replicas():
    mode = ("trainer.v1.trainer_mode=separate_async", "actor_rollout_ref.rollout.n_gpus_per_node=4")
    reservation = "rollout engine (gpu_memory_utilization x card)"

    def generation(*extra: str) -> int:
        config = paper_config(M15, *mode, *extra)
        layout = preflight.layout_from_config(config)
        return preflight.estimate_memory(preflight.PAPER_MODELS[M15], layout, H100).phases["generation"][reservation]

    assert generation() == pytest.approx(0.85 * H100, abs=1)  # verl's hybrid replicas generate on the training GPUs too
    assert generation("actor_rollout_ref.hybrid_engine=False") == 0
    check = item(preflight.preflight_checks(paper_config(M15, *mode), Gpus(12, H100)), "rollout memory")
    assert check.status == OK and check.detail.startswith("per GPU of separate_async's rollout pool (GiB): weights")


def test_a_local_config_json_wins_over_the_table(tmp_path):
    folder = tmp_path / M7  # a local folder named like the hub id
    folder.mkdir(parents=True)
    hf = {
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "intermediate_size": 16,
        "vocab_size": 10,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "tie_word_embeddings": False,
        "head_dim": 8,
    }
    (folder / "config.json").write_text(json.dumps(hf))
    assert preflight.model_shape(str(folder)) == ModelShape(8, 1, 16, 10, 2, 1, tied=False, head_dim=8)
    assert preflight.model_shape(str(folder)).kv_dim == 8
    assert ModelShape(8, 1, 16, 10, 2, 1, tied=False, head_dim=8).hf_config() == hf  # and back


# ------------------------------------------------------------------ command line and main_disco


def run(module: str, args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", preflight.IGNORE_ENV)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        env={**environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_cli_prints_one_report_and_its_exit_status_says_whether_there_is_a_problem(tiny, tmp_path):
    done = run("recipe.disco.preflight", cpu_overrides(tiny, steps=2), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.startswith("DisCO preflight:\n")
    assert "[ok]          settings: DisCO's and verl's configuration checks pass" in done.stdout
    assert done.stdout.rstrip().endswith("No problems.")

    missing = tmp_path / "nowhere.parquet"
    done = run("recipe.disco.preflight", [*cpu_overrides(tiny, steps=2), f"data.train_files={missing}"], tmp_path)
    assert done.returncode == 1
    assert f"[PROBLEM]     training data: data.train_files={missing}: no such file" in done.stdout
    assert done.stdout.rstrip().endswith("1 problem(s).")


def test_main_disco_stops_on_a_preflight_problem_unless_told_to_ignore_it(tiny, tmp_path):
    missing = tmp_path / "nowhere.parquet"
    args = [*cpu_overrides(tiny, steps=2), f"data.train_files={missing}"]
    done = run("recipe.disco.main_disco", args, tmp_path, DRY_RUN="1", DISCO_CPU_BACKEND="1")
    assert done.returncode != 0
    assert f"training data: data.train_files={missing}: no such file" in done.stderr
    assert "preflight: fix the problems above, or set DISCO_IGNORE_PREFLIGHT=1 to launch anyway" in done.stderr
    assert "DRY_RUN:" not in done.stdout

    done = run(
        "recipe.disco.main_disco", args, tmp_path, DRY_RUN="1", DISCO_CPU_BACKEND="1", DISCO_IGNORE_PREFLIGHT="1"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 problem(s)." in done.stderr and "DRY_RUN: configuration valid for DisCO" in done.stdout
