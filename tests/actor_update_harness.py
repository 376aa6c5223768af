"""Test support: verl's real actor update on CPU, one process per rank, checked against float64.

Each rank builds DisCO's actor worker (``recipe.disco.worker.DisCOActorRolloutRefWorker``: verl's hybrid worker,
FSDP2 engine over gloo, the tiny offline Qwen2 of ``recipe.disco.cpu.tiny``) from the recipe's Hydra config, and
feeds it one training step the way verl's v1 trainer does: a step batch of questions x answers in TransferQueue's
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
import os
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

SYNTHETIC_PADDING_LEN = 128  # verl.trainer.ppo.padding_utils.SYNTHETIC_PADDING_SEQ_LEN


@dataclass
class StepBatch:
    """One training step's answers in dispatch order (after the layout), shared by all ranks."""

    prompts: list[list[int]]
    responses: list[list[int]]
    rewards: list[float]
    uids: list[str]
    is_padding: list[bool]

    def __len__(self) -> int:
        return len(self.uids)

    def rows(self, index) -> StepBatch:
        pick = list(index)
        return StepBatch(*([getattr(self, name)[i] for i in pick] for name in vars(self)))


def random_step(
    rng: np.random.Generator, prompts: list[list[int]], vocab: int, group_sizes: list[int], max_response: int
) -> StepBatch:
    """Questions with the given group sizes, random responses of 1..max_response tokens and 0/1 rewards that give
    mixed, all-correct and all-wrong questions, in interleaved (completion-like) order."""
    rows = []
    for q, size in enumerate(group_sizes):
        uid = str(uuid.UUID(int=int(rng.integers(2**63))))
        p_correct = [0.5, 0.0, 1.0, 0.3][q % 4] if q < 4 else float(rng.uniform())
        rewards = (rng.uniform(size=size) < p_correct).astype(float)
        if 0 < p_correct < 1 and size > 1:  # keep it mixed
            rewards[0], rewards[1] = 1.0, 0.0
        for i in range(size):
            length = int(rng.integers(1, max_response + 1))
            response = rng.integers(3, vocab, size=length).tolist()  # no special tokens
            rows.append((prompts[q % len(prompts)], response, float(rewards[i]), uid))
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    return StepBatch(
        prompts=[r[0] for r in rows],
        responses=[r[1] for r in rows],
        rewards=[r[2] for r in rows],
        uids=[r[3] for r in rows],
        is_padding=[False] * len(rows),
    )


def pad_and_lay_out(step: StepBatch, config, eos_id: int) -> StepBatch:
    """The trainer's layout: verl-style padding rows up to :func:`recipe.disco.grouping.padded_rows`, then the
    whole-question order of ``recipe.disco.trainer``'s ``_balance_batch``."""
    from recipe.disco.checks import update_shape
    from recipe.disco.grouping import padded_rows, whole_group_order

    shape = update_shape(config)
    needed = padded_rows(step.uids, step.is_padding, shape)
    pad_uid = "pad" + uuid.uuid4().hex
    extra = needed - len(step)
    padded = StepBatch(
        prompts=step.prompts + [[eos_id] * (SYNTHETIC_PADDING_LEN - 1)] * extra,
        responses=step.responses + [[eos_id]] * extra,
        rewards=step.rewards + [0.0] * extra,
        uids=step.uids + [pad_uid] * extra,
        is_padding=step.is_padding + [True] * extra,
    )
    seq_lens = [len(p) + len(r) for p, r in zip(padded.prompts, padded.responses)]
    return padded.rows(whole_group_order(padded.uids, seq_lens, padded.is_padding, shape))


def to_tensordict(step: StepBatch):
    """TransferQueue's row format (``verl.trainer.ppo.v1.agent_loop_tq``): jagged fields per answer."""
    from tensordict import TensorDict

    def jagged(rows: list[list[int]]) -> torch.Tensor:
        return torch.nested.as_nested_tensor([torch.tensor(row) for row in rows], layout=torch.jagged)

    sequences = [p + r for p, r in zip(step.prompts, step.responses)]
    response_mask = jagged([[0 if padding else 1] * len(r) for r, padding in zip(step.responses, step.is_padding)])
    fields = {
        "prompts": jagged(step.prompts),
        "responses": jagged(step.responses),
        "input_ids": jagged(sequences),
        "attention_mask": jagged([[1] * len(s) for s in sequences]),
        "position_ids": jagged([list(range(len(s))) for s in sequences]),
        "response_mask": response_mask,
        "loss_mask": response_mask,
    }
    return TensorDict(fields, batch_size=[len(step)])


def estimator_codes(step: StepBatch, algorithm_config) -> torch.Tensor:
    """The registered ``disco`` estimator's advantages for the whole step (padded (N, L))."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    width = max(len(r) for r in step.responses)
    mask = torch.zeros(len(step), width)
    rewards = torch.zeros(len(step), width)
    for i, (response, reward, padding) in enumerate(zip(step.responses, step.rewards, step.is_padding)):
        if not padding:
            mask[i, : len(response)] = 1
            rewards[i, len(response) - 1] = reward
    advantages, _ = get_adv_estimator_fn("disco")(
        token_level_rewards=rewards,
        response_mask=mask,
        index=np.array(step.uids, dtype=object),
        config=algorithm_config,
    )
    return advantages


@dataclass
class Recorder:
    """Parameters and accumulated gradients (full tensors) at every optimizer step."""

    params: list[dict[str, torch.Tensor]] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    extra_forward_passes: int = 0  # the worker's no-grad passes at the current parameters

    def wrap(self, engine) -> None:
        step = engine.optimizer_step

        def recording_step():
            self.params.append({k: _full(p.data) for k, p in engine.module.named_parameters()})
            self.grads.append({k: _full(p.grad) for k, p in engine.module.named_parameters()})
            return step()

        engine.optimizer_step = recording_step


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().to(torch.float64).clone()


def init_distributed(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DISCO_CPU_BACKEND="1",
        TOKENIZERS_PARALLELISM="false",
    )


def compose_config(model_dir: str, world: int, overrides: list[str]):
    """The recipe's config for the actor worker on CPU (FSDP2 over gloo, fp32, sdpa) plus ``overrides``."""
    from conftest import compose_disco

    return compose_disco(
        [
            f"actor_rollout_ref.model.path={model_dir}",
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
            "actor_rollout_ref.actor.strategy=fsdp2",
            "actor_rollout_ref.actor.fsdp_config.model_dtype=fp64",
            "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp64,reduce_dtype:fp64,buffer_dtype:fp64}",
            "actor_rollout_ref.actor.use_torch_compile=False",
            "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
            f"trainer.n_gpus_per_node={world}",
            *overrides,
        ]
    )


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


def build_worker(config):
    from recipe.disco.worker import DisCOActorRolloutRefWorker

    allow_float64_engine()
    worker = DisCOActorRolloutRefWorker(config=config.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def update_one_step(worker, config, step: StepBatch, rank: int, world: int, temperature: float) -> Recorder:
    """Old log-probs, codes and ``update_actor`` for this rank's share of ``step``, as verl's v1 trainer does.

    The trainer's dispatch splits the step over the data-parallel groups; every rank of a group gets the group's
    share. Under Ulysses a group is ``world / dp`` consecutive ranks (verl's ("dp", "sp") mesh), and only its first
    rank returns outputs, which the trainer then dispatches to all of them: so do the old log-probs here.
    """
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import response_from_nested, response_to_nested

    from recipe.disco.checks import actor_dp_size, coefficients_in_loss
    from recipe.disco.worker import COEFFICIENTS_IN_LOSS

    dp = actor_dp_size(config)
    share = len(step) // dp
    first = rank // (world // dp) * share
    mine = step.rows(range(first, first + share))
    probe = to_tensordict(mine)
    tu.assign_non_tensor(probe, calculate_entropy=False, compute_loss=False, temperature=temperature)
    log_probs = _from_first_rank_of_group(worker.compute_log_prob(probe), worker.actor.engine)["log_probs"]

    batch = to_tensordict(mine)
    batch["old_log_probs"] = response_from_nested(log_probs, batch["response_mask"])
    codes = estimator_codes(step, config.algorithm)[first : first + share]
    batch["advantages"] = response_to_nested(codes, batch["response_mask"])
    rows = config.actor_rollout_ref.actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    tu.assign_non_tensor(
        batch,
        calculate_entropy=False,
        global_batch_size=rows,
        mini_batch_size=rows,
        epochs=1,
        seed=0,
        dataloader_kwargs={"shuffle": False},
        temperature=temperature,
        **{COEFFICIENTS_IN_LOSS: coefficients_in_loss(config)},
    )
    recorder = Recorder()
    recorder.wrap(worker.actor.engine)
    forward = worker.actor._log_probs_at_current_parameters

    def counted(data):
        recorder.extra_forward_passes += 1
        return forward(data)

    worker.actor._log_probs_at_current_parameters = counted
    try:
        worker.update_actor(batch)
    finally:
        worker.actor._log_probs_at_current_parameters = forward
        del worker.actor.engine.optimizer_step  # back to the engine's own method
    return recorder


def _from_first_rank_of_group(output, engine):
    """``output`` of the first rank of this rank's Ulysses group, on every rank of the group."""
    if engine.ulysses_parallel_group is None:
        return output
    box = [output]
    torch.distributed.broadcast_object_list(box, group=engine.ulysses_parallel_group, group_src=0)
    return box[0]


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
    from disco_reference import Batch, reference_objective

    model = _reference_model(model_dir)
    settings = config.actor_rollout_ref.actor.policy_loss
    n = config.actor_rollout_ref.rollout.n
    rows_per_mini_batch = config.actor_rollout_ref.actor.ppo_mini_batch_size * n
    gradients = []
    for j, params in enumerate(recorder.params):
        rows = step.rows(mini_batch_rows(len(step), dp_size, rows_per_mini_batch, j))
        _load(model, recorder.params[0])
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
        gradients.append(dict(zip(params, grads)))
    return gradients


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


def install_loss_config(worker, config) -> None:
    """Bind the worker's loss to ``config``'s actor section, as verl's ``init_model`` does
    (``functools.partial(ppo_loss, config=ActorConfig)``); DisCO's worker reads its settings from there."""
    from functools import partial

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.utils.losses import ppo_loss

    actor_config = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    actor_config.model_config = worker.loss_fn.keywords["config"].model_config
    worker.loss_fn = partial(ppo_loss, config=actor_config)
    worker.actor.set_loss_fn(worker.loss_fn)


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
