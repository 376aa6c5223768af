"""DFT's loss for verl 0.9.1's SFT engine, around :mod:`recipe.dft.objective`, and the u state it reads and
updates.

verl's engine calls the loss once per micro-batch on each data-parallel rank with the micro-batch's rows (verl's
SFT layout: jagged ``input_ids``/``loss_mask``, ``log_probs`` of the next token) and backpropagates the returned
value at once; FSDP then averages gradients over ranks. DFT's step direction z_t is a mean over the step's
examples of per-example terms, each needing only its own rows (its data output and B negatives) and its own
u_{i,t-1}, so a micro-batch that holds whole examples returns its exact share:

    dp_size * sum_{i in micro-batch} [ -s(y_i) + (1/B) sum_j sg(exp(a_ij) / u_{i,t}) s(y'_ij) ] / |B_t|

(|B_t| = verl's ``global_batch_size``, the step's examples over all ranks). The rows carry ``dft_example`` (the
example's index in the training set), ``dft_role`` (0 for the data output, 1..B for the negatives) and
``dft_ref_log_prob`` (log pi_ref of a negative); an example whose rows are not all in the micro-batch is refused.

u lives in :class:`UTable`, one float64 log u_i per training example, the same on every rank: the loss reads
log u_{i,t-1} and records log u_{i,t} for its examples; after the step the worker gathers the records of all
ranks and writes them (:meth:`UTable.apply`). Validation (``training=False``) reads nothing and records
nothing: its loss is the one-batch estimate of F, with g_i estimated from its B negatives alone.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from recipe.dft import objective as obj

ROW_KEYS = ("dft_example", "dft_role", "dft_ref_log_prob")


class UTable:
    """log u_i for every training example (0, i.e. u = 1, before its first visit), and this step's updates."""

    def __init__(self, num_examples: int) -> None:
        self.log_u = torch.zeros(num_examples, dtype=torch.float64)
        self.training = True
        self.pending: list[dict[str, torch.Tensor]] = []

    def record(self, examples: torch.Tensor, log_u: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Keep a micro-batch's log u_{i,t} (and its per-example terms, for the step's metrics) until the step
        ends."""
        values = {"examples": examples, "log_u": log_u, **terms}
        self.pending.append({key: value.detach().cpu() for key, value in values.items()})

    def take(self) -> dict[str, torch.Tensor]:
        """This rank's records of the step, concatenated (empty tensors if it scored no example)."""
        pending, self.pending = self.pending, []
        if not pending:
            return {}
        return {key: torch.cat([record[key] for record in pending]) for key in pending[0]}

    def apply(self, examples: torch.Tensor, log_u: torch.Tensor) -> None:
        """Write a step's log u_{i,t}; each example may appear once (it is in one micro-batch of one rank)."""
        if examples.unique().numel() != examples.numel():
            raise RuntimeError("DFT: an example was scored twice in one step; its u would be updated twice")
        self.log_u[examples] = log_u

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"log_u": self.log_u.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["log_u"].shape != self.log_u.shape:
            raise ValueError(
                f"the checkpoint's u has {state['log_u'].numel()} examples, the training set {self.log_u.numel()}: "
                "resume with the pool the run was started with"
            )
        self.log_u = state["log_u"].to(torch.float64).clone()


def row_scores(log_probs: torch.Tensor, loss_mask: torch.Tensor, score: obj.Score) -> torch.Tensor:
    """s(y) of each row (R,) from verl's jagged next-token ``log_probs`` and ``loss_mask`` (nested, (R, j)).

    Position t's log-prob is that of token t + 1, so each row's mask is read one position ahead, as verl's
    ``sft_loss`` does; the rows are cut from the flat values by the mask's offsets (the two nested tensors may
    pad differently, their values line up).
    """
    lengths = loss_mask.offsets().diff().tolist()
    rows_log_prob = log_probs.values().split(lengths)
    rows_mask = [
        torch.roll(row.bool(), shifts=-1).index_fill(0, torch.tensor([len(row) - 1]), False)
        for row in loss_mask.values().split(lengths)
    ]
    log_prob = torch.nn.utils.rnn.pad_sequence(list(rows_log_prob), batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence(rows_mask, batch_first=True)
    work = log_prob.to(torch.promote_types(log_prob.dtype, torch.float32))
    return obj.sequence_scores(work, mask, score).double()


def group_rows(examples: torch.Tensor, roles: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The order that lays a micro-batch's rows out as (n, 1 + B), data output first, and the n examples.

    Raises unless every example present has exactly its 1 + B rows (roles 0..B) here.
    """
    order = torch.argsort(examples * group_size + roles)
    grouped_examples = examples[order].view(-1, group_size) if examples.numel() % group_size == 0 else None
    expected_roles = torch.arange(group_size, device=roles.device)
    if (
        grouped_examples is None
        or not (grouped_examples == grouped_examples[:, :1]).all()
        or not (roles[order].view(-1, group_size) == expected_roles).all()
    ):
        raise RuntimeError(
            "DFT received an example split from its negatives (a micro-batch must hold each example's data output "
            f"and all {group_size - 1} negatives): launch with python -m recipe.dft.main_dft, which keeps them in "
            "one micro-batch"
        )
    return order, grouped_examples[:, 0]


class DFTLoss:
    """verl's loss-function contract ``(model_output, data, dp_group) -> (loss, metrics)`` for DFT."""

    def __init__(self, settings: obj.DFTSettings, table: UTable) -> None:
        self.settings = settings
        self.table = table

    def __call__(self, model_output, data, dp_group=None) -> tuple[torch.Tensor, dict]:
        settings = self.settings
        group_size = settings.num_negatives + 1
        s = row_scores(model_output["log_probs"], data["loss_mask"], settings.score)
        order, examples = group_rows(data["dft_example"], data["dft_role"], group_size)
        grouped = s[order].view(-1, group_size)
        ref = data["dft_ref_log_prob"][order].view(-1, group_size)[:, 1:].double() if settings.uses_ref else None
        s_pos, s_neg = grouped[:, 0], grouped[:, 1:]
        if self.table.training:
            log_u_prev = self.table.log_u[examples.cpu()].to(s.device)
            global_examples = float(data["global_batch_size"])
            loss, log_u, weights = obj.dft_loss(s_pos, s_neg, log_u_prev, settings, ref, batch_size=global_examples)
            self.table.record(examples, log_u, {"s_pos": s_pos, "s_neg": s_neg, "weights": weights})
            return loss * data["dp_size"], {}
        # validation: g_i from this batch's negatives alone (gamma = 1 from u = 1), u untouched
        _, log_u, _ = obj.dft_loss(s_pos, s_neg, torch.zeros_like(s_pos), replace(settings, gamma=1.0), ref)
        objective = (settings.tau * log_u - s_pos.detach()).sum() / float(data["global_batch_size"])
        return objective * data["dp_size"], {}
