"""The registered ``disco`` advantage estimator: it labels each answer with its question and its reward.

verl's policy-loss hook sees no uid and no reward, only ``advantages``. The estimator (run on the driver over
the whole step batch, where uids are known) therefore writes into every column of row i one float code

    c_i = sign_i * (g_i * GROUP_STRIDE + n_g)

with sign_i = +1 for a correct answer (sequence reward 1) and -1 for a wrong one (reward 0), g_i the question
index within the step and n_g the number of real answers of that question; c_i = 0 marks rows the loss must
ignore (verl's ``pad...`` rows, empty responses). Every column carries the code because verl's v1 trainer
keeps only the first |y_i| columns of each row; the loss reads column 0. The codes are integers below 2**24,
hence exact in float32. ``returns`` holds the sequence reward on the response tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from verl.trainer.ppo.core_algos import register_adv_est

from recipe.disco.objective import DISCO

GROUP_STRIDE = 1024  # n_g < GROUP_STRIDE; g < 2**24 / GROUP_STRIDE keeps codes exact in float32
MAX_QUESTIONS = 2**24 // GROUP_STRIDE - 1
PADDING_UID_PREFIX = "pad"  # verl.trainer.ppo.padding_utils names its padding rows' uid "pad<hex>"


def encode_answers(sequence_rewards: torch.Tensor, uids: np.ndarray, real: torch.Tensor) -> torch.Tensor:
    """Per-row codes sign * (g * GROUP_STRIDE + n_g), 0 where ``real`` is False (shape (B,), float32)."""
    real_np = real.cpu().numpy()
    rewards = sequence_rewards.to(torch.float64)
    bad = real & (rewards != 0) & (rewards != 1)
    if bad.any():
        values = sorted({float(v) for v in rewards[bad].unique().tolist()})[:5]
        raise ValueError(
            f"DisCO needs binary sequence rewards (1 correct, 0 wrong), got {values}. verl's math_dapo scorer returns "
            "+1/-1; use the project's reward (reward.custom_reward_function.path=pkg://recipe.disco.reward) or "
            "another 0/1 scorer, and keep algorithm.use_kl_in_reward=False."
        )
    codes = np.zeros(len(uids), dtype=np.int64)
    if real_np.any():
        _, group, counts = np.unique(uids[real_np].astype(str), return_inverse=True, return_counts=True)
        if len(counts) > MAX_QUESTIONS or counts.max() >= GROUP_STRIDE:
            raise ValueError(
                f"DisCO codes support up to {MAX_QUESTIONS} questions per step and {GROUP_STRIDE - 1} answers per "
                f"question, got {len(counts)} questions and up to {counts.max()} answers"
            )
        group = group.reshape(-1)
        sign = np.where(rewards[real].cpu().numpy() == 1, 1, -1)
        codes[real_np] = sign * (group * GROUP_STRIDE + counts[group])
    return torch.from_numpy(codes).to(torch.float32)


@register_adv_est(DISCO)
def compute_disco_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage-estimator contract: returns (advantages, returns), both (B, L)."""
    if index is None:
        raise ValueError("The disco estimator needs verl's per-prompt uid ('index'); none was passed")
    uids = np.asarray(index, dtype=object)
    is_padding = np.array([str(u).startswith(PADDING_UID_PREFIX) for u in uids], dtype=bool)
    mask = response_mask.bool()
    real = mask.any(-1) & torch.from_numpy(~is_padding).to(mask.device)
    sequence_rewards = (token_level_rewards * mask).sum(-1)
    codes = encode_answers(sequence_rewards, uids, real).to(token_level_rewards.device)
    advantages = codes[:, None].expand_as(token_level_rewards).contiguous()
    returns = sequence_rewards[:, None] * mask
    return advantages, returns


def decode_answers(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_answers`: (question index, positive, group size, real) per row."""
    rounded = torch.round(codes.detach().to(torch.float64))
    if not torch.equal(rounded, codes.detach().to(torch.float64)):
        raise ValueError(
            "advantages are not DisCO answer codes (non-integer values): the disco loss must be paired with "
            "algorithm.adv_estimator=disco"
        )
    code = rounded.to(torch.int64)
    magnitude = code.abs()
    return magnitude // GROUP_STRIDE, code > 0, magnitude % GROUP_STRIDE, code != 0
