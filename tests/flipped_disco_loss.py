"""Test-only verl external module: the registered ``disco`` policy loss with its sign flipped.

Loaded in every process of a run by ``VERL_USE_EXTERNAL_MODULES=flipped_disco_loss`` (with this directory on
``PYTHONPATH``): ``import verl`` imports it before verl's entry points. It imports the real plugin first, so the
later entry-point load does not register the real loss again, then registers ``disco`` anew: the same loss and
metrics, negated, plus the metric ``actor/flipped_loss`` = 1 that shows the run used it.
"""

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

import recipe.disco.plugin  # noqa: F401  (the real registration, done first)
from recipe.disco.loss import compute_policy_loss_disco
from recipe.disco.objective import DISCO

FLIPPED_METRIC = "actor/flipped_loss"


@register_policy_loss(DISCO)
def flipped_disco_loss(*args, **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    loss, metrics = compute_policy_loss_disco(*args, **kwargs)
    return -loss, {**metrics, FLIPPED_METRIC: 1.0}
