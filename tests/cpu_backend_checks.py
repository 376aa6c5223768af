"""Checks of the DisCO CPU backend that must run in a fresh process (activation is process-wide).

``python tests/cpu_backend_checks.py CHECK [MODEL_DIR]`` runs one check and exits non-zero with an assertion
message on failure; ``tests/test_cpu_backend_on_cpu.py`` runs them with ``DISCO_CPU_BACKEND`` set as each needs.
"""

from __future__ import annotations

import sys

# the rollout check
RESPONSE_LENGTH = 12
TEMPERATURE = 0.7
SAMPLES_PER_PROMPT = 8
LOG_PROB_ATOL = 1e-4  # float32 rounding: the server's left-padded, batched, cached forward vs an unpadded one


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
    """Each check holds and decides whatever tokens the server samples: sampled tokens are only compared with a
    teacher-forced forward of the same tokens, and the weight update sent has an exact effect (the final norm's
    weight set to zero makes every logit 0, so every next-token distribution is uniform)."""
    import asyncio
    import copy
    import math
    import os

    import torch
    from hydra import compose, initialize_config_module
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import RolloutMode, RolloutReplicaRegistry

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(
            "ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={model_dir}",
                "actor_rollout_ref.rollout.name=hf",
                "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
                f"data.max_response_length={RESPONSE_LENGTH}",
            ],
        )
    replica = RolloutReplicaRegistry.get("hf")(
        replica_rank=0, config=config.actor_rollout_ref.rollout, model_config=config.actor_rollout_ref.model
    )
    replica.rollout_mode = RolloutMode.HYBRID
    await replica.launch_servers()
    server = replica.server_handle

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos_id = tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    questions = ["What is 3+5?", "What is 12+345?", "Hi"]  # different prompt lengths: left padding in a batch
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False)
        for q in questions
    ]
    assert len({len(p) for p in prompts}) == len(prompts)
    for prompt in prompts:
        _check_first_step_tells_apart(model, prompt)

    async def generate(params: dict, n: int = 1) -> list:
        """n concurrent requests per prompt (the server batches them); the outputs grouped by prompt."""
        requests = [
            server.generate.remote(prompt_ids=p, sampling_params=dict(params), request_id=f"{i}")
            for p in prompts
            for i in range(n)
        ]
        return await asyncio.gather(*requests)

    sampling = {"temperature": TEMPERATURE, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    greedy_params = {"temperature": 0.0, "top_p": 1.0, "top_k": -1}
    repeated = [prompt for prompt in prompts for _ in range(SAMPLES_PER_PROMPT)]

    # sampling: the reported log-probs are the tempered distribution's at the sampled tokens
    for prompt, output in zip(repeated, await generate(sampling, n=SAMPLES_PER_PROMPT), strict=True):
        _check_output(output, eos_id, version=0)
        expected, _ = _response_steps(model, prompt, output.token_ids, TEMPERATURE)
        assert torch.allclose(torch.tensor(output.log_probs), expected, atol=LOG_PROB_ATOL), (output, expected)

    # greedy (temperature 0) and top_k=1 (the argmax with probability 1: every log-prob is 0) decode greedily
    greedy = await generate(greedy_params)
    top1 = await generate({"temperature": 1.0, "top_p": 1.0, "top_k": 1})
    for prompt, greedy_output, top1_output in zip(prompts, greedy, top1, strict=True):
        for output in (greedy_output, top1_output):
            _check_output(output, eos_id, version=0)
            _check_greedy(model, prompt, output.token_ids)
        assert max(abs(x) for x in top1_output.log_probs) < 1e-6, top1_output

    # a weight update through verl's adapter reaches the server, with its version: under the uniform model every
    # sampled token has log-prob -log(V) and greedy decoding takes the first of V tied tokens, index 0, every step
    os.environ["RANK"] = "0"
    rollout_config = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model, dataclass_type=HFModelConfig)
    adapter = get_rollout_class("hf", "async")(config=rollout_config, model_config=model_config, device_mesh=None)
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.model.norm.weight.zero_()
    uniform_log_prob = -math.log(model.config.vocab_size)
    premise = _next_token_log_probs(uniform, prompts[0], TEMPERATURE)
    assert torch.allclose(premise, torch.full_like(premise, uniform_log_prob), rtol=0, atol=1e-6), premise
    await adapter.update_weights(iter(uniform.state_dict().items()), global_steps=7)
    after = await generate(sampling, n=SAMPLES_PER_PROMPT)
    for output in after:
        _check_output(output, eos_id, version=7)
        assert all(abs(x - uniform_log_prob) < 1e-6 for x in output.log_probs), output
    for first in range(0, len(after), SAMPLES_PER_PROMPT):
        samples = {tuple(output.token_ids) for output in after[first : first + SAMPLES_PER_PROMPT]}
        # independent uniform samples are all equal with probability below V**-7
        assert len(samples) > 1, f"{SAMPLES_PER_PROMPT} concurrent samples were copies of one: {samples}"
    for output in await generate(greedy_params):
        assert output.token_ids == [0] * RESPONSE_LENGTH and output.extra_fields["global_steps"] == 7, output

    # the next update (the original weights, version 8) replaces it
    await adapter.update_weights(iter(model.state_dict().items()), global_steps=8)
    for prompt, output in zip(prompts, await generate(greedy_params), strict=True):
        _check_output(output, eos_id, version=8)
        _check_greedy(model, prompt, output.token_ids)

    # clear errors
    partial = [(name, tensor) for name, tensor in model.state_dict().items() if "layers.0.mlp" not in name]
    await _expect_error(adapter.update_weights(iter(partial), global_steps=9), "missing")
    await _expect_error(server.generate.remote(prompt_ids=prompts[0], sampling_params={"stop": ["x"]}), "'stop'")
    await _expect_error(
        server.generate.remote(prompt_ids=prompts[0], sampling_params={}, image_data=["img"]), "text prompts only"
    )
    print("rollout checks passed")


def _check_first_step_tells_apart(model, prompt: list[int]) -> None:
    """Facts of the fixed weights (no sampling) that make the rollout checks decisive whatever the server samples.
    At the first response step, for every token: its log-prob at TEMPERATURE differs from its log-prob at
    temperature 1 (the sampled log-probs show which distribution was sampled) and from -log(V) (they show whether
    the uniform update arrived); and token 0 is not the most likely (greedy decoding shows it too)."""
    import math

    tempered = _next_token_log_probs(model, prompt, TEMPERATURE)[-1]
    raw = _next_token_log_probs(model, prompt, 1.0)[-1]
    margin = 10 * LOG_PROB_ATOL
    assert (tempered - raw).abs().min() > margin, "a token's log-prob hardly depends on the temperature"
    assert (tempered + math.log(len(tempered))).abs().min() > margin, "a token's probability is almost 1/V"
    assert raw[0] < raw.max() - margin, "token 0 is (almost) the most likely first token"


def _check_output(output, eos_id: int, version: int) -> None:
    ids = output.token_ids
    assert 1 <= len(ids) <= RESPONSE_LENGTH and len(output.log_probs) == len(ids), output
    assert eos_id not in ids[:-1] and (ids[-1] == eos_id or len(ids) == RESPONSE_LENGTH), ids
    assert output.extra_fields["global_steps"] == version and output.stop_reason == "completed", output


def _check_greedy(model, prompt: list[int], response: list[int]) -> None:
    """Every response token is the model's most likely next token given the tokens before it, up to float rounding
    (a near tie may go either way): greedy decoding, checked by teacher forcing."""
    chosen, best = _response_steps(model, prompt, response, 1.0)
    assert (chosen >= best - LOG_PROB_ATOL).all(), (response, chosen, best)


def _response_steps(model, prompt: list[int], response: list[int], temperature: float):
    """Teacher forcing: per response token, its log-prob under log_softmax(logits / temperature) and the largest
    log-prob of that step."""
    import torch

    steps = _next_token_log_probs(model, prompt + response, temperature)[len(prompt) - 1 : -1]
    return steps.gather(-1, torch.tensor(response)[:, None])[:, 0], steps.max(-1).values


def _next_token_log_probs(model, ids: list[int], temperature: float):
    """log_softmax(logits / temperature) of the token after each prefix of ``ids``: (len(ids), V)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits / temperature, dim=-1)


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
