"""Checks of the DisCO CPU backend that must run in a fresh process (activation is process-wide).

``python tests/cpu_backend_checks.py CHECK [MODEL_DIR]`` runs one check and exits non-zero with an assertion
message on failure; ``tests/test_cpu_backend_on_cpu.py`` runs them with ``DISCO_CPU_BACKEND`` set as each needs.
"""

from __future__ import annotations

import sys


def activated() -> None:
    """With DISCO_CPU_BACKEND=1, ``import verl`` selects the CPU platform, the gloo group and the hf rollout."""
    import os

    import torch.distributed
    import verl  # noqa: F401  (loads the plugin)
    from verl.plugin.platform import get_platform
    from verl.utils.device import get_device_name, get_torch_device
    from verl.utils.distributed import initialize_global_process_group_ray
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from recipe.disco.cpu.platform import CPUPlatform
    from recipe.disco.cpu.rollout import HFReplica, HFServerAdapter

    assert isinstance(get_platform(), CPUPlatform), get_platform()
    assert get_device_name() == "cpu"
    device = get_torch_device()
    assert device.get_device_name() == "CPU" and device.current_device() == "cpu" and device.device_count() == 1
    assert device.memory_allocated() == 0 and device.empty_cache() == 0
    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead
    assert get_rollout_class("hf", "async") is HFServerAdapter
    assert RolloutReplicaRegistry.get("hf") is HFReplica
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    initialize_global_process_group_ray(timeout_second=None)
    assert torch.distributed.get_backend() == "gloo", torch.distributed.get_backend()
    torch.distributed.destroy_process_group()


def not_activated() -> None:
    """Without DISCO_CPU_BACKEND, the plugin leaves verl's platforms and rollouts as shipped."""
    import os

    import verl  # noqa: F401
    from verl.plugin.platform import PlatformRegistry
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from recipe.disco.cpu import ROLLOUT_NAME

    assert "disco" in sys.modules["verl.trainer.ppo.core_algos"].POLICY_LOSS_REGISTRY, "the plugin did not load"
    assert "cpu" not in PlatformRegistry.registered_names()
    assert (ROLLOUT_NAME, "async") not in _ROLLOUT_REGISTRY
    assert ROLLOUT_NAME not in RolloutReplicaRegistry._registry
    assert "VERL_PLATFORM" not in os.environ and "VERL_ENGINE_DEVICE" not in os.environ


def broken_activation() -> None:
    """An activation that fails inside ``import verl`` (which swallows plugin errors) is still visible: an ERROR
    on stderr, and verl's first device lookup raises instead of silently falling back to a GPU platform."""
    sys.modules["verl.workers.rollout.replica"] = None  # makes importing it fail, as a broken install would
    import verl  # noqa: F401
    from verl.utils.device import get_device_name

    try:
        get_device_name()
    except ValueError as error:
        assert "Unknown platform 'cpu'" in str(error), error
        print("device lookup refused:", error)
    else:
        raise AssertionError("the device lookup succeeded after a failed activation")


def rollout(model_dir: str) -> None:
    """The hf rollout through verl's registries, in a local Ray cluster: batched concurrent requests, log-probs
    under the sampling distribution, greedy and top-k semantics, and weight updates reaching the server."""
    import asyncio

    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        asyncio.run(_rollout_checks(model_dir))
    finally:
        ray.shutdown()


async def _rollout_checks(model_dir: str) -> None:
    import asyncio
    import copy
    import os

    import torch
    from hydra import compose, initialize_config_module
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import RolloutMode, RolloutReplicaRegistry

    response_length = 12
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(
            "ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={model_dir}",
                "actor_rollout_ref.rollout.name=hf",
                "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
                f"data.max_response_length={response_length}",
            ],
        )
    replica = RolloutReplicaRegistry.get("hf")(
        replica_rank=0, config=config.actor_rollout_ref.rollout, model_config=config.actor_rollout_ref.model
    )
    replica.rollout_mode = RolloutMode.HYBRID
    await replica.launch_servers()
    server = replica.server_handle

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    questions = ["What is 3+5?", "What is 12+345?", "Hi"]  # different prompt lengths: left padding in a batch
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False)
        for q in questions
    ]
    assert len({len(p) for p in prompts}) == len(prompts)

    async def generate(params: dict, n: int = 1) -> list:
        requests = [
            server.generate.remote(prompt_ids=p, sampling_params=dict(params), request_id=f"{i}")
            for p in prompts
            for i in range(n)
        ]
        return await asyncio.gather(*requests)

    # sampling at temperature 0.7, 8 concurrent requests per prompt
    sampled = await generate(
        {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}, n=8
    )
    for index, output in enumerate(sampled):
        prompt = prompts[index // 8]
        _check_output(output, tokenizer.eos_token_id, response_length, version=0)
        expected = _reference_log_probs(model, prompt, output.token_ids, temperature=0.7)
        assert torch.allclose(torch.tensor(output.log_probs), expected, atol=1e-4), (output.log_probs, expected)
    assert len({tuple(o.token_ids) for o in sampled[:8]}) > 1, "8 samples at temperature 0.7 were all identical"

    # greedy (temperature 0) equals Hugging Face greedy decoding of each prompt alone
    greedy = await generate({"temperature": 0.0, "top_p": 1.0, "top_k": -1})
    for prompt, output in zip(prompts, greedy, strict=True):
        assert output.token_ids == _reference_greedy(model, tokenizer, prompt, response_length), output.token_ids

    # top_k=1 samples the argmax with probability 1: the reported log-probs are those of the sampling distribution
    top1 = await generate({"temperature": 1.0, "top_p": 1.0, "top_k": 1})
    for output, reference in zip(top1, greedy, strict=True):
        assert output.token_ids == reference.token_ids and max(abs(x) for x in output.log_probs) < 1e-6, output

    # a weight update through verl's adapter reaches the server, with its version
    os.environ["RANK"] = "0"
    rollout_config = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model, dataclass_type=HFModelConfig)
    adapter = get_rollout_class("hf", "async")(config=rollout_config, model_config=model_config, device_mesh=None)
    updated = copy.deepcopy(model)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in updated.parameters():
            parameter.add_(0.2 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    await adapter.update_weights(iter(updated.state_dict().items()), global_steps=7)
    after = await generate({"temperature": 0.7, "top_p": 1.0, "top_k": -1})
    for prompt, output in zip(prompts, after, strict=True):
        _check_output(output, tokenizer.eos_token_id, response_length, version=7)
        new = _reference_log_probs(updated, prompt, output.token_ids, temperature=0.7)
        old = _reference_log_probs(model, prompt, output.token_ids, temperature=0.7)
        assert torch.allclose(torch.tensor(output.log_probs), new, atol=1e-4), (output.log_probs, new)
        assert (new - old).abs().max() > 1e-2, "the update did not change the model enough to be detected"
    greedy_after = await generate({"temperature": 0.0})
    for prompt, output in zip(prompts, greedy_after, strict=True):
        assert output.token_ids == _reference_greedy(updated, tokenizer, prompt, response_length)

    # clear errors
    partial = [(name, tensor) for name, tensor in updated.state_dict().items() if "layers.0.mlp" not in name]
    await _expect_error(adapter.update_weights(iter(partial), global_steps=8), "missing")
    await _expect_error(server.generate.remote(prompt_ids=prompts[0], sampling_params={"stop": ["x"]}), "'stop'")
    await _expect_error(
        server.generate.remote(prompt_ids=prompts[0], sampling_params={}, image_data=["img"]), "text prompts only"
    )
    print("rollout checks passed")


def _check_output(output, eos_id: int, response_length: int, version: int) -> None:
    ids = output.token_ids
    assert 1 <= len(ids) <= response_length and len(output.log_probs) == len(ids), output
    assert eos_id not in ids[:-1] and (ids[-1] == eos_id or len(ids) == response_length), ids
    assert output.extra_fields["global_steps"] == version and output.stop_reason == "completed", output


def _reference_log_probs(model, prompt: list[int], response: list[int], temperature: float):
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def _reference_greedy(model, tokenizer, prompt: list[int], response_length: int) -> list[int]:
    import torch

    output = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=response_length,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    response = output[0, len(prompt) :].tolist()
    return response[: response.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in response else response


async def _expect_error(awaitable, fragment: str) -> None:
    try:
        await awaitable
    except Exception as error:  # Ray wraps the server's exception
        assert fragment in str(error), error
    else:
        raise AssertionError(f"expected an error mentioning {fragment!r}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    check = globals()[sys.argv[1]]
    check(*sys.argv[2:])
