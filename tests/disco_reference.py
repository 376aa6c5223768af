"""Test support: random DisCO batches and an independent, loop-by-loop float64 reference of the step objective.

The reference follows the paper's formulas literally (python loops over questions, log of a mean of exps with
no shifting), sharing no code with recipe.disco.objective.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    log_prob: torch.Tensor  # (B, L) float64 leaf
    old_log_prob: torch.Tensor  # (B, L)
    response_mask: torch.Tensor  # (B, L) bool
    token_level_rewards: torch.Tensor  # (B, L), the 0/1 reward on the last response token
    uids: np.ndarray  # (B,) object, uuid strings and verl padding uids "pad<hex>"

    @property
    def rewards(self) -> torch.Tensor:
        return self.token_level_rewards.sum(-1)

    def rows(self, index) -> Batch:
        index = torch.as_tensor(index, dtype=torch.long)
        return Batch(
            self.log_prob.detach()[index].clone().requires_grad_(True),
            self.old_log_prob[index],
            self.response_mask[index],
            self.token_level_rewards[index],
            self.uids[index.numpy()],
        )


def random_batch(
    rng: np.random.Generator,
    num_questions: int = 6,
    group_sizes: tuple[int, ...] = (1, 2, 3, 5, 8),
    max_len: int = 12,
    num_padding: int = 2,
    kl_scale: float = 0.05,
) -> Batch:
    """Questions with unequal group sizes, 1-token and long responses, all-correct/all-wrong/mixed groups,
    and verl-style padding rows (uid 'pad...', all-zero mask, reward 0), in shuffled order."""
    uids, lengths, rewards = [], [], []
    for _ in range(num_questions):
        uid = str(uuid.UUID(int=int(rng.integers(2**63))))
        n = int(rng.choice(group_sizes))
        p_correct = rng.choice([0.0, 1.0, 0.5, float(rng.uniform())])
        for _ in range(n):
            uids.append(uid)
            lengths.append(int(rng.choice([1, rng.integers(1, max_len + 1)])))
            rewards.append(float(rng.uniform() < p_correct))
    pad_uid = "pad" + uuid.UUID(int=int(rng.integers(2**63))).hex
    for _ in range(num_padding):
        uids.append(pad_uid)
        lengths.append(0)
        rewards.append(0.0)
    order = rng.permutation(len(uids))
    B = len(uids)
    lengths_t = torch.tensor(lengths, dtype=torch.long)[order]
    mask = torch.arange(max_len)[None, :] < lengths_t[:, None]
    log_prob = -torch.from_numpy(rng.exponential(1.0, size=(B, max_len)))
    old_log_prob = log_prob + kl_scale * torch.from_numpy(rng.standard_normal((B, max_len)))
    token_rewards = torch.zeros(B, max_len, dtype=torch.float64)
    last = (lengths_t - 1).clamp(min=0)
    token_rewards[torch.arange(B), last] = torch.tensor(rewards, dtype=torch.float64)[order] * (lengths_t > 0)
    return Batch(log_prob.requires_grad_(True), old_log_prob, mask, token_rewards, np.array(uids, dtype=object)[order])


def reference_objective(
    batch: Batch,
    objective: str,
    score_func: str,
    tau: float,
    delta: float,
    beta: float,
    M: float,
    kl_unit: str = "question",
) -> torch.Tensor:
    """Literally, in float64: kl_unit question: (1/M) sum_q ( -J_q 1[mixed] + beta/2 [KL_q - delta]_+^2 );
    kl_unit step: -(1/M) sum_q J_q 1[mixed] + beta/2 [KL - delta]_+^2 with KL the token mean over all answers."""
    total = batch.log_prob.new_zeros(())
    step_kl_num, step_kl_den = batch.log_prob.new_zeros(()), 0
    real_uids = sorted({u for u, m in zip(batch.uids, batch.response_mask.any(-1)) if m and not u.startswith("pad")})
    for uid in real_uids:
        rows = [i for i, u in enumerate(batch.uids) if u == uid and batch.response_mask[i].any()]
        scores, labels = [], []
        kl_num, kl_den = batch.log_prob.new_zeros(()), 0
        for i in rows:
            m = batch.response_mask[i]
            lp, old = batch.log_prob[i][m], batch.old_log_prob[i][m]
            scores.append(lp.mean() if score_func == "logL" else torch.exp(lp - old).mean())
            labels.append(float(batch.rewards[i]) == 1.0)
            kl_num = kl_num + (old - lp).sum()
            kl_den += int(m.sum())
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        if pos and neg:
            pos_mean = sum(pos) / len(pos)
            if objective == "disco-b":
                J = pos_mean - sum(neg) / len(neg)
            else:
                J = pos_mean - tau * torch.log(sum(torch.exp(s / tau) for s in neg) / len(neg))
            total = total - J
        step_kl_num, step_kl_den = step_kl_num + kl_num, step_kl_den + kl_den
        if kl_unit == "question":
            total = total + beta / 2 * torch.clamp(kl_num / kl_den - delta, min=0) ** 2
    if kl_unit == "question":
        return total / M
    step_kl = step_kl_num / max(step_kl_den, 1)
    return total / M + beta / 2 * torch.clamp(step_kl - delta, min=0) ** 2


def num_real_questions(batch: Batch) -> int:
    return len({u for u, m in zip(batch.uids, batch.response_mask.any(-1)) if m and not u.startswith("pad")})


def reference_auc(scores_pos: list[float], scores_neg: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in scores_pos for n in scores_neg)
    return wins / (len(scores_pos) * len(scores_neg))


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())
