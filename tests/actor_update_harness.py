"""Test support: verl's real actor update on CPU, one process per rank, checked against float64.

Each rank builds DisCO's actor worker (``recipe.disco.worker.DisCOActorRolloutRefWorker``: verl's hybrid worker,
FSDP2 engine over gloo, the tiny offline Qwen2 of ``recipe.disco.cpu.tiny``) from the recipe's Hydra config, and
feeds it one training step the way verl's v1 trainer does (``recipe.disco.cpu.actor``, shared with the update
benchmark): a step batch of questions x answers in TransferQueue's
row format (jagged prompts/responses, verl's padding rows), laid out by the trainer's whole-question layout
(``recipe.disco.trainer`` / ``grouping``), its contiguous share per data-parallel group (every Ulysses rank of a
group gets the group's share), old log-probs from the worker's own ``compute_log_prob``, answer codes from the
registered ``disco`` estimator, then ``update_actor`` with the trainer's meta-information. The engine's
``optimizer_step`` is wrapped to record, for every optimizer step, the parameters and the accumulated
(FSDP-averaged) gradient before clipping. Ulysses sequence parallelism needs :func:`install_cpu_varlen_attention`
in every rank.

:func:`reference_gradients` recomputes each optimizer step's gradient independently: a float64 copy of the model
with the recorded parameters, log-probs of that mini-batch's answers (all groups' rows) by a plain forward pass,
pi_old from the parameters before the first step, and L from ``tests/disco_reference.py`` (literal loops).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.multiprocessing as mp

from recipe.disco.cpu import actor
from recipe.disco.cpu.actor import StepBatch


@dataclass
class Recorder:
    """Parameters and accumulated gradients (full tensors) at every optimizer step."""

    params: list[dict[str, torch.Tensor]] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    extra_forward_passes: int = 0  # the worker's no-grad passes at the current parameters
    outputs: list = field(default_factory=list)  # what each update_actor call returned

    def wrap(self, engine) -> None:
        step = engine.optimizer_step

        def recording_step():
            self.params.append({k: _full(p.data) for k, p in engine.module.named_parameters()})
            self.grads.append({k: _full(p.grad) for k, p in engine.module.named_parameters()})
            return step()

        engine.optimizer_step = recording_step


def run_ranks(rank_fn, world: int, args: tuple, deadline_s: float) -> None:
    """``rank_fn(rank, world, port, *args)`` in ``world`` spawned processes (``port``: a free one for their process
    group); all are killed past ``deadline_s`` (nothing may hang)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.spawn(rank_fn, args=(world, port, *args), nprocs=world, join=False)
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"{world} ranks ran past {deadline_s} s")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().to(torch.float64).clone()


def compose_config(model_dir: str, world: int, overrides: list[str]):
    """The CPU worker config of ``recipe.disco.cpu.actor`` with the engine in float64."""
    return actor.compose_config(model_dir, world, overrides, dtype="fp64")


def allow_float64_engine() -> None:
    """Let verl's engine run in float64 (its dtype table knows fp16, bf16 and fp32 only), so that the recorded
    gradients can be compared with the float64 reference far below fp32 rounding."""
    from verl.utils.torch_dtypes import PrecisionType

    to_dtype = PrecisionType.to_dtype

    def with_fp64(precision):
        return torch.float64 if precision in ("fp64", torch.float64) else to_dtype(precision)

    PrecisionType.to_dtype = staticmethod(with_fp64)


CPU_VARLEN_ATTENTION = "varlen_sdpa"  # without "flash" in the name, transformers does not look for flash-attn


def install_cpu_varlen_attention() -> None:
    """Let ``attn_implementation=varlen_sdpa`` run transformers' flash-attention path on CPU, for Ulysses.

    verl inserts Ulysses's all-to-alls only into that path (``apply_monkey_patch`` wraps
    ``transformers.integrations.flash_attention._flash_attention_forward``); sdpa and eager attention never reach
    them, so under Ulysses each rank would attend within its own slice of the packed sequence only. The path itself
    (``flash_attention_forward``, verl's wrapper, transformers' packed-sequence dispatch from position ids) runs
    unchanged; only flash-attn's CUDA kernels are replaced, by causal sdpa per packed sequence, which is where
    ``lazy_import_flash_attention`` would have put them.
    """
    import transformers.modeling_flash_attention_utils as flash_utils
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(CPU_VARLEN_ATTENTION, flash_attention_forward)
    AttentionMaskInterface.register(CPU_VARLEN_ATTENTION, flash_attention_mask)
    flash_utils._loaded_implementation = CPU_VARLEN_ATTENTION
    flash_utils._flash_fn, flash_utils._flash_varlen_fn = _causal_attention, _varlen_causal_attention
    flash_utils._pad_fn, flash_utils._unpad_fn = flash_utils._pad_input, flash_utils._unpad_input
    flash_utils._process_flash_kwargs_fn = flash_utils._lazy_define_process_function(_varlen_causal_attention)


def _causal_attention(q, k, v, causal: bool, softmax_scale: float | None) -> torch.Tensor:
    """flash-attn's ``flash_attn_func``: (batch, seq, heads, dim), fewer key/value heads than query heads allowed."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=softmax_scale, enable_gqa=True
    )
    return out.transpose(1, 2)


def _varlen_causal_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool, softmax_scale: float | None):
    """flash-attn's ``flash_attn_varlen_func`` for packed sequences: (tokens, heads, dim), each sequence alone."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k), "queries and keys are the same packed sequences here"
    bounds = cu_seqlens_q.tolist()
    return torch.cat(
        [
            _causal_attention(q[None, a:b], k[None, a:b], v[None, a:b], causal, softmax_scale)[0]
            for a, b in zip(bounds, bounds[1:])
        ]
    )


def build_worker(config, worker_cls: type | None = None):
    """DisCO's worker (``worker_cls``, the hybrid one if None) with the engine in float64
    (:func:`allow_float64_engine`)."""
    allow_float64_engine()
    return actor.build_worker(config, worker_cls)


def update_one_step(
    worker, config, step: StepBatch, rank: int, world: int, temperature: float, recorder: Recorder | None = None, **kw
) -> Recorder:
    """``recipe.disco.cpu.actor.update`` (old log-probs, advantages, ``update_actor`` for this rank's share, as
    verl's v1 trainer does; ``kw`` are its ``old`` and ``old_at_live_parameters``), recording each optimizer step
    and counting the worker's extra forward passes (into ``recorder``, a new one if None)."""
    recorder = recorder or Recorder()
    recorder.wrap(worker.actor.engine)
    forward = worker.actor._log_probs_at_current_parameters

    def counted(data):
        recorder.extra_forward_passes += 1
        return forward(data)

    worker.actor._log_probs_at_current_parameters = counted
    try:
        recorder.outputs.append(actor.update(worker, config, step, rank, world, temperature, **kw))
    finally:
        worker.actor._log_probs_at_current_parameters = forward
        del worker.actor.engine.optimizer_step  # back to the engine's own method
    return recorder


def mini_batch_rows(step_len: int, dp_size: int, mini_batch_rows: int, index: int) -> list[int]:
    """Positions (in dispatch order) of mini-batch ``index``: each data-parallel group's contiguous slice of its
    share."""
    share, part = step_len // dp_size, mini_batch_rows // dp_size
    return [group * share + index * part + i for group in range(dp_size) for i in range(part)]


def reference_gradients(
    model_dir: str, recorder: Recorder, step: StepBatch, config, dp_size: int, temperature: float
) -> list[dict[str, torch.Tensor]]:
    """For each recorded optimizer step j: the float64 gradient of L over mini-batch j's questions at the recorded
    parameters, pi_old being the parameters before the first step (tests/disco_reference.py computes L)."""
    rows_per_mini_batch = config.actor_rollout_ref.actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    return [
        reference_gradient(
            model_dir,
            params,
            recorder.params[0],
            step.rows(mini_batch_rows(len(step), dp_size, rows_per_mini_batch, j)),
            config,
            temperature,
        )
        for j, params in enumerate(recorder.params)
    ]


def reference_gradient(
    model_dir: str,
    params: dict[str, torch.Tensor],
    old_params: dict[str, torch.Tensor],
    rows: StepBatch,
    config,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """The float64 gradient of L over ``rows`` (whole questions) at ``params``, with pi_old the policy of
    ``old_params`` (tests/disco_reference.py computes L)."""
    from disco_reference import Batch, reference_objective

    model = _reference_model(model_dir)
    settings = config.actor_rollout_ref.actor.policy_loss
    _load(model, old_params)
    with torch.no_grad():
        old = _response_log_probs(model, rows, temperature)
    _load(model, params)
    log_prob = _response_log_probs(model, rows, temperature)
    mask = torch.zeros_like(old, dtype=torch.bool)
    rewards = torch.zeros_like(old)
    for i, (response, reward, padding) in enumerate(zip(rows.responses, rows.rewards, rows.is_padding)):
        if not padding:
            mask[i, : len(response)] = True
            rewards[i, len(response) - 1] = reward
    batch = Batch(log_prob, old, mask, rewards, np.array(rows.uids, dtype=object))
    L = reference_objective(
        batch,
        settings.objective,
        settings.score_func,
        settings.tau,
        settings.delta,
        settings.beta,
        config.actor_rollout_ref.actor.ppo_mini_batch_size,
        settings.kl_unit,
    )
    parameters = dict(model.named_parameters())
    assert set(params) == set(parameters), "the engine's parameters are not the model's"
    grads = torch.autograd.grad(L, [parameters[name] for name in params])
    return dict(zip(params, grads))


def _load(model, params: dict[str, torch.Tensor]) -> None:
    """Load every recorded parameter (the tied lm_head shares the embedding, which is recorded once)."""
    missing, unexpected = model.load_state_dict(params, strict=False)
    assert not unexpected and all(name == "lm_head.weight" for name in missing), (missing, unexpected)


@functools.cache
def _reference_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float64)


def _response_log_probs(model, rows: StepBatch, temperature: float) -> torch.Tensor:
    """(B, L) log pi(y_t | x, y_<t) of each response under ``model`` at ``temperature``, zero-padded."""
    width = max(len(r) for r in rows.responses)
    out = []
    for prompt, response in zip(rows.prompts, rows.responses):
        ids = torch.tensor([prompt + response])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / temperature
        token = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        out.append(torch.nn.functional.pad(token, (0, width - len(response))))
    return torch.stack(out)


def relative_error(recorded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """||recorded - reference|| / ||reference|| over all parameters."""
    assert set(recorded) == set(reference)
    diff = sum(float(((recorded[k] - reference[k]) ** 2).sum()) for k in reference)
    norm = sum(float((reference[k] ** 2).sum()) for k in reference)
    assert norm > 0, "a zero reference gradient cannot tell a right gradient from a wrong one"
    return (diff / norm) ** 0.5


@contextlib.contextmanager
def sabotaged(kind: str | None, worker):
    """Break the method on purpose for one step (the exactness test must then fail), yielding a layout breaker:
    ``stale_coefficients`` (every mini-batch's coefficients at the step's starting parameters, i.e. the first
    mini-batch's), ``negated_coefficients``, ``split_question`` (one answer each of two questions swapped between
    the two mini-batches); None breaks nothing."""
    import recipe.disco.worker as disco_worker

    token_weights = disco_worker.token_weights

    def negated(*args, **kwargs):
        weights, L, metrics = token_weights(*args, **kwargs)
        return -weights, L, metrics

    def split_question(step: StepBatch, config, world: int) -> StepBatch:
        rows = config.actor_rollout_ref.actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
        first, second = (mini_batch_rows(len(step), world, rows, j) for j in (0, 1))
        a = next(i for i in first if not step.is_padding[i])
        b = next(i for i in second if not step.is_padding[i] and step.uids[i] != step.uids[a])
        order = list(range(len(step)))
        order[a], order[b] = b, a
        return step.rows(order)

    def unchanged(step: StepBatch, config, world: int) -> StepBatch:
        return step

    if kind == "stale_coefficients":
        worker.actor._log_probs_at_current_parameters = lambda data: data["old_log_probs"].to_padded_tensor(0.0)
    elif kind == "negated_coefficients":
        disco_worker.token_weights = negated
    try:
        yield split_question if kind == "split_question" else unchanged
    finally:
        vars(worker.actor).pop("_log_probs_at_current_parameters", None)
        disco_worker.token_weights = token_weights
