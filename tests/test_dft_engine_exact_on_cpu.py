"""DFT through verl's real SFT trainer equals Algorithm 36, step by step, on 1 and 2 ranks, and resumes exactly.

One process per data-parallel rank (gloo, FSDP2 in float64, the tiny offline model), ``recipe.dft.trainer.DFTTrainer``
(verl's ``SFTTrainer`` with DFT's data, loss, u and checkpoints) fitted for 5 steps over a pool of 6 examples with 4
negatives each, 2 examples per step: 3 steps an epoch, so steps 4 and 5 revisit examples and read their u. The
engine's ``optimizer_step`` is wrapped to record the parameters and accumulated (FSDP-averaged) gradient of every
step, and the worker's ``train_batch`` to record the rows it was given and u on every rank after the step.

The reference is independent: per step, a float64 copy of the model with the recorded parameters scores each row by
a plain forward pass, u is carried from step to step by the test itself (u_i = 1 at first), and the gradient of

    -(1/|B_t|) sum_i s(y_i) + (1/|B_t|) sum_i (1/(u_{i,t} B)) sum_j sg(exp(a_ij)) s(y'_ij)

is taken by autograd. log pi_ref of each negative is the base model's own log-probability minus 3 +- 1, so that the
weights exp(a)/u are of order 1 and u_i is far from 1 (a forgotten u changes the gradient). The rows are checked
against the pool: each example's data output, B distinct pool negatives, a fresh set in epoch 2, every example once an
epoch. Validation after steps 2 and 4 must leave u alone (steps 3 and 5 would read it). Breaking the method breaks the
test: u not updated, u kept per rank (each rank applies its own updates only), a negative split from its example, and
validation scored as training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

TESTS = Path(__file__).resolve().parent
EXAMPLES, POOL, B, BATCH, STEPS, EPOCH_STEPS = 6, 4, 2, 2, 5, 3
TOLERANCE = 1e-9  # relative error of each step's gradient; float64 round-off is ~1e-15
TOKEN_BUDGET = 192  # holds one example's 1 + B sequences (about 120 tokens), not a step's two examples
DEADLINE_S = 900  # nothing may hang: the ranks are killed past this (a run takes about 20 s here)
SABOTAGES = ("u_not_updated", "u_per_rank", "negative_split", "validation_updates_u")


def _messages(a: int, b: int) -> list[dict]:
    from recipe.disco.cpu import tiny

    return [{"role": "user", "content": tiny.question(a, b)}]


def write_pool(model_dir: str, path: Path) -> pd.DataFrame:
    """The pool: tiny-task examples, 4 random negatives each (2 to 6 tokens, EOS-terminated), with log pi_ref the base
    model's float64 log-probability of the negative on the plain prompt, minus 3 +- 1."""
    from transformers import AutoTokenizer

    from recipe.dft.data import prompt_ids
    from recipe.disco.cpu import tiny

    sys.path.insert(0, str(TESTS))
    import actor_update_harness as harness

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = harness._reference_model(model_dir)
    rng = np.random.default_rng(11)
    pairs = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (9, 9)][:EXAMPLES]
    rows = []
    for a, b in pairs:
        messages = _messages(a, b)
        negatives = [
            [int(t) for t in rng.integers(4, len(tokenizer), size=int(rng.integers(1, 6)))] + [tokenizer.eos_token_id]
            for _ in range(POOL)
        ]
        with torch.no_grad():
            base = [float(sequence_log_prob(model, prompt_ids(tokenizer, messages), n, "dft")) for n in negatives]
        rows.append(
            {
                "prompt": messages,
                "response": tiny.answer(a, b),
                "negative_ids": negatives,
                "ref_log_prob": [lp - 3.0 + float(rng.uniform(-1, 1)) for lp in base],
                "ref_prompt": "plain",
            }
        )
    frame = pd.DataFrame(rows)
    frame.to_parquet(path)
    return frame


def sequence_log_prob(model, prompt: list[int], output: list[int], score: str) -> torch.Tensor:
    """s(y): sum (dft) or mean (dft2) over y's tokens of log pi(y_t | prompt, y_<t), by one plain forward pass."""
    ids = torch.tensor([prompt + output])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    token = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(output)[:, None])[:, 0]
    return token.sum() if score == "dft" else token.mean()


def compose(model_dir: str, pool: Path, out: Path, world: int, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    precision = "{param_dtype:fp64,reduce_dtype:fp64,buffer_dtype:fp64}"
    config_dir = str(TESTS.parent / "recipe" / "dft" / "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose(
            "dft_trainer",
            overrides=[
                f"model.path={model_dir}",
                "model.use_remove_padding=False",
                "+model.override_config.attn_implementation=sdpa",
                "model.enable_gradient_checkpointing=False",
                f"data.train_files={pool}",
                f"data.train_batch_size={BATCH}",
                "data.micro_batch_size_per_gpu=1",
                "data.use_dynamic_bsz=False",
                "data.num_workers=0",
                "data.max_length=64",
                "engine.strategy=fsdp2",
                "engine.model_dtype=fp64",
                f"+engine.mixed_precision={precision}",
                "engine.use_torch_compile=False",
                "optim.lr=1e-2",
                "trainer.device=cpu",
                f"trainer.n_gpus_per_node={world}",
                "trainer.total_epochs=2",
                f"trainer.total_training_steps={STEPS}",
                "trainer.save_freq=2",
                f"trainer.default_local_dir={out / 'checkpoints'}",
                "trainer.resume_mode=disable",
                *overrides,
            ],
        )


def _rank(rank: int, world: int, port: int, model_dir: str, pool: str, out: str, overrides: list, sabotage) -> None:
    """One rank: DFTTrainer fitted with the recorders in place (and the sabotage, if any); writes its records."""
    sys.path.insert(0, str(TESTS))
    import actor_update_harness as harness

    from recipe.disco.cpu import actor

    actor.init_distributed(rank, world, port)
    harness.allow_float64_engine()
    from verl.utils import distributed

    from recipe.dft.trainer import DFTTrainer

    out_dir = Path(out)
    records = {"rows": [], "log_u": [], "micro_batches": [], "error": None}
    recorder = harness.Recorder()
    distributed.initialize_global_process_group()
    trainer = DFTTrainer(config=compose(model_dir, Path(pool), out_dir, world, overrides))
    recorder.wrap(trainer.engine)
    _record_batches(trainer, records)
    _sabotage(trainer, sabotage)
    try:
        trainer.fit()
    except RuntimeError as error:  # raised alike on every rank (each sees the same layout)
        records["error"] = str(error)
    records["params"], records["grads"] = recorder.params, recorder.grads
    torch.save(records, out_dir / f"rank{rank}.pt")


def _record_batches(trainer, records: dict) -> None:
    """The rows of every step on this rank and u (log u_i, every example) on this rank after it."""
    client = trainer.training_client
    train_batch = client.train_batch

    def recording(data):
        records["rows"].append(
            {
                "input_ids": [ids.tolist() for ids in data["input_ids"].unbind()],
                "loss_mask": [mask.tolist() for mask in data["loss_mask"].unbind()],
                "example": data["dft_example"].tolist(),
                "role": data["dft_role"].tolist(),
                "ref_log_prob": data["dft_ref_log_prob"].tolist(),
            }
        )
        calls = []
        loss_fn = client.loss_fn
        client.set_loss_fn(lambda *args, **kwargs: calls.append(1) or loss_fn(*args, **kwargs))
        output = train_batch(data)
        client.set_loss_fn(loss_fn)
        records["micro_batches"].append(len(calls))
        records["log_u"].append(client.table.log_u.clone())
        return output

    client.train_batch = recording


def _sabotage(trainer, sabotage: str | None) -> None:
    client = trainer.training_client
    if sabotage == "u_not_updated":
        client.table.apply = lambda examples, log_u: None
    elif sabotage == "u_per_rank":
        client._gathered = lambda records: records
    elif sabotage == "negative_split":
        client.group_size = 1  # verl's micro-batches of one row then cut every example apart
    elif sabotage == "validation_updates_u":
        from verl.utils import tensordict_utils as tu
        from verl.workers.engine_workers import TrainingWorker

        def infer_batch_as_training(data):
            tu.assign_non_tensor(data, force_group_size=client.group_size)
            return TrainingWorker.infer_batch(client, data)

        client.infer_batch = infer_batch_as_training


def fit(model_dir: str, tmp: Path, world: int, overrides=(), sabotage: str | None = None, pool: Path | None = None):
    """Fit on ``world`` ranks; returns (records of every rank, the pool)."""
    sys.path.insert(0, str(TESTS))
    import actor_update_harness as harness

    tmp.mkdir(parents=True, exist_ok=True)
    if pool is None:
        pool = tmp / "pool.parquet"
        write_pool(model_dir, pool)
    args = (model_dir, str(pool), str(tmp), list(overrides), sabotage)
    harness.run_ranks(_rank, world, args, DEADLINE_S)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)], pd.read_parquet(pool)


def problems(model_dir: str, records: list[dict], pool: pd.DataFrame, score: str = "dft", tau=1.0, gamma=0.85):
    """Every way the run departs from Algorithm 36 (empty if none): rows against the pool, each step's gradient
    against the float64 reference, u on every rank against the reference's u."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(TESTS))
    import actor_update_harness as harness

    from recipe.dft.data import prompt_ids, response_ids

    if any(r["error"] for r in records):
        return [f"rank {i}: {r['error']}" for i, r in enumerate(records) if r["error"]]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = harness._reference_model(model_dir)
    found, u = [], {}
    seen_negatives: dict[int, set] = {}
    steps = len(records[0]["grads"])
    if steps != STEPS:
        return [f"{steps} optimizer steps recorded, {STEPS} expected"]
    for t in range(steps):
        examples = _step_examples([r["rows"][t] for r in records])
        epoch = t // EPOCH_STEPS
        for i, (output, negatives, refs) in examples.items():
            row = pool.iloc[i]
            prompt = prompt_ids(tokenizer, list(row["prompt"]))
            if output != prompt + response_ids(tokenizer, row["response"]):
                found.append(f"step {t + 1}: example {i}'s first row is not its data output")
            pool_negatives = [prompt + list(n) for n in row["negative_ids"]]
            picks = [pool_negatives.index(n) if n in pool_negatives else -1 for n in negatives]
            if -1 in picks or len(set(picks)) != B:
                found.append(f"step {t + 1}: example {i}'s negatives are not {B} distinct pool negatives")
                continue
            if [float(row["ref_log_prob"][k]) for k in picks] != refs:
                found.append(f"step {t + 1}: example {i}'s log pi_ref is not the pool's")
            if epoch == 1 and seen_negatives.get(i, set()) & set(picks):
                found.append(f"step {t + 1}: example {i} got a negative of epoch 1 again")
            seen_negatives.setdefault(i, set()).update(picks)
        reference, u = _reference_step(model, tokenizer, pool, examples, records[0]["params"][t], u, score, tau, gamma)
        for rank, r in enumerate(records):
            error = harness.relative_error(r["grads"][t], reference)
            if not error < TOLERANCE:
                found.append(f"step {t + 1}, rank {rank}: gradient relative error {error:.2e}")
            log_u = r["log_u"][t]
            expected = torch.tensor([np.log(u.get(i, 1.0)) for i in range(len(pool))], dtype=torch.float64)
            if not torch.allclose(log_u, expected, rtol=0, atol=1e-10):
                found.append(f"step {t + 1}, rank {rank}: log u {log_u.tolist()} != reference {expected.tolist()}")
    visits = [sorted(i for t in range(e * EPOCH_STEPS, (e + 1) * EPOCH_STEPS) for i in _examples_of(records, t))
              for e in range(steps // EPOCH_STEPS)]  # fmt: skip
    if any(v != list(range(EXAMPLES)) for v in visits):
        found.append(f"an epoch does not visit every example once: {visits}")
    return found


def _examples_of(records: list[dict], t: int) -> list[int]:
    return sorted(_step_examples([r["rows"][t] for r in records]))


def _step_examples(rank_rows: list[dict]) -> dict[int, tuple[list[int], list[list[int]], list[float]]]:
    """example -> (its data output row, its negative rows, their log pi_ref), over all ranks' rows of a step."""
    examples: dict[int, tuple] = {}
    for rows in rank_rows:
        for ids, example, role, ref in zip(rows["input_ids"], rows["example"], rows["role"], rows["ref_log_prob"]):
            output, negatives, refs = examples.setdefault(example, ([], [], []))
            if role == 0:
                output.extend(ids)
            else:
                negatives.append(ids)
                refs.append(ref)
    return examples


def _reference_step(model, tokenizer, pool, examples, params, u: dict, score: str, tau: float, gamma: float):
    """The float64 gradient of Algorithm 36's step at ``params`` and the u after it (literal loops)."""
    from recipe.dft.data import prompt_ids

    harness_load(model, params)
    model.zero_grad()
    u = dict(u)
    total = 0.0
    for i, (output, negatives, refs) in examples.items():
        prompt = prompt_ids(tokenizer, list(pool.iloc[i]["prompt"]))
        s_pos = sequence_log_prob(model, prompt, output[len(prompt) :], score)
        s_neg = [sequence_log_prob(model, prompt, n[len(prompt) :], score) for n in negatives]
        a = [s.item() / tau - (ref if score == "dft" else 0.0) for s, ref in zip(s_neg, refs)]
        u[i] = (1 - gamma) * u.get(i, 1.0) + gamma * sum(np.exp(x) for x in a) / len(a)
        total = total - s_pos + sum(np.exp(x) / (u[i] * len(a)) * s for x, s in zip(a, s_neg))
    (total / len(examples)).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if name in params}
    return grads, u


def harness_load(model, params: dict) -> None:
    sys.path.insert(0, str(TESTS))
    import actor_update_harness as harness

    harness._load(model, params)


@pytest.fixture(scope="module")
def model_dir() -> str:
    sys.path.insert(0, str(TESTS))
    from e2e_utils import cached_tiny_build

    return str(cached_tiny_build().model_dir)


@pytest.fixture(scope="module")
def two_rank_run(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dft_two_ranks")
    validation = [f"data.val_files={tmp / 'pool.parquet'}", "trainer.test_freq=2"]  # after steps 2 and 4
    return fit(model_dir, tmp, 2, validation), tmp


def test_every_step_on_2_ranks_is_algorithm_36_with_u_identical_on_every_rank_and_validation_apart(
    model_dir, two_rank_run
):
    (records, pool), _ = two_rank_run
    assert problems(model_dir, records, pool) == []


def test_every_step_on_1_rank_in_micro_batches_of_one_example_is_algorithm_36(model_dir, tmp_path):
    records, pool = fit(model_dir, tmp_path, 1)
    assert records[0]["micro_batches"] == [BATCH] * STEPS
    assert problems(model_dir, records, pool) == []


def test_dft2_under_a_token_budget_of_one_example_is_algorithm_36(model_dir, tmp_path):
    overrides = [
        "dft.score=dft2", "dft.tau=0.3", "dft.gamma=0.9", "data.use_dynamic_bsz=True",
        f"data.max_token_len_per_gpu={TOKEN_BUDGET}",
    ]  # fmt: skip
    records, pool = fit(model_dir, tmp_path, 1, overrides)
    assert records[0]["micro_batches"] == [BATCH] * STEPS  # one example per micro-batch
    assert problems(model_dir, records, pool, score="dft2", tau=0.3, gamma=0.9) == []


def test_a_run_resumed_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_run(model_dir, two_rank_run, tmp_path):
    (uninterrupted, pool), first = two_rank_run
    checkpoint = first / "checkpoints" / "global_step_2"
    assert (checkpoint / "dft_u.pt").exists()
    overrides = ["trainer.resume_mode=resume_path", f"trainer.resume_from_path={checkpoint}"]
    resumed, _ = fit(model_dir, tmp_path, 2, overrides, pool=first / "pool.parquet")
    for rank, (a, b) in enumerate(zip(uninterrupted, resumed)):
        assert len(b["grads"]) == STEPS - 2
        for t in range(STEPS - 2):
            assert b["rows"][t] == a["rows"][t + 2], f"rank {rank}, step {t + 3}: other rows"
            for key in ("params", "grads"):
                for name, value in a[key][t + 2].items():
                    torch.testing.assert_close(b[key][t][name], value, rtol=0, atol=1e-12)
            torch.testing.assert_close(b["log_u"][t], a["log_u"][t + 2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("sabotage", SABOTAGES)
def test_a_broken_dft_step_is_detected(model_dir, tmp_path, sabotage):
    validation = [f"data.val_files={tmp_path / 'pool.parquet'}", "trainer.test_freq=2"]
    records, pool = fit(model_dir, tmp_path, 2, validation, sabotage=sabotage)
    found = problems(model_dir, records, pool)
    expected = {
        "u_not_updated": "gradient", "u_per_rank": "log u", "negative_split": "split from its negatives",
        "validation_updates_u": "scored twice",  # the step after a validation would apply its u updates as well
    }  # fmt: skip
    assert any(expected[sabotage] in problem for problem in found), found
