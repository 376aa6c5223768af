"""DisCO hyperparameters as a verl ``PolicyLossConfig`` subclass.

Selected in YAML with ``actor_rollout_ref.actor.policy_loss._target_: recipe.disco.config.DisCOPolicyLossConfig``.
verl instantiates it in the driver's ``validate_config`` before Ray starts, so ``__post_init__`` rejects bad
values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from verl.workers.config import PolicyLossConfig

from recipe.disco.objective import DISCO, KL_UNITS, OBJECTIVES, SCORE_FUNCS


@dataclass
class DisCOPolicyLossConfig(PolicyLossConfig):
    """``policy_loss`` section with DisCO's hyperparameters (defaults: the paper's log-L recipe).

    Args:
        objective: ``disco`` (tau-softmax over negatives, L2) or ``disco-b`` (mean difference, L1).
        score_func: ``logL`` (mean token log-prob) or ``Lratio`` (mean token likelihood ratio to pi_old).
        tau: temperature of the softmax over negatives (``disco`` only); the paper uses 10 for logL, 1 for Lratio.
        delta: trust-region radius on KL(pi_old || pi).
        beta: squared-hinge penalty weight, penalty = (beta/2) [KL - delta]_+^2.
        kl_unit: what the trust region bounds: ``step`` (the textbook's single hinge on the token-mean KL of all
            answers of the optimizer step) or ``question`` (one hinge per question, on its answers' KL).
        adv_estimator: a mirror of ``algorithm.adv_estimator`` (filled by interpolation in ``disco_trainer.yaml``)
            so that pairing the DisCO loss with another estimator, or the reverse, fails when the config is built.
    """

    objective: str = DISCO
    score_func: str = "logL"
    tau: float = 10.0
    delta: float = 1e-4
    beta: float = 1e3
    kl_unit: str = "step"
    adv_estimator: str | None = None

    def __post_init__(self) -> None:
        key = "actor_rollout_ref.actor.policy_loss"
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"{key}.objective={self.objective!r} is not one of {list(OBJECTIVES)}")
        if self.score_func not in SCORE_FUNCS:
            problems.append(f"{key}.score_func={self.score_func!r} is not one of {list(SCORE_FUNCS)}")
        if not self.tau > 0:
            problems.append(f"{key}.tau={self.tau!r} must be > 0 (paper: 10 for logL, 1 for Lratio)")
        if not self.delta >= 0:
            problems.append(f"{key}.delta={self.delta!r} must be >= 0 (paper: 1e-4)")
        if not self.beta >= 0:
            problems.append(f"{key}.beta={self.beta!r} must be >= 0 (paper: 1e3)")
        if self.kl_unit not in KL_UNITS:
            problems.append(f"{key}.kl_unit={self.kl_unit!r} is not one of {list(KL_UNITS)} (textbook: step)")
        loss_is_disco = self.loss_mode == DISCO
        if self.adv_estimator is not None and loss_is_disco != (self.adv_estimator == DISCO):
            problems.append(
                f"{key}.loss_mode={self.loss_mode!r} with algorithm.adv_estimator={self.adv_estimator!r}: "
                "the DisCO loss and estimator only work together; set both to 'disco' or neither"
            )
        if problems:
            raise ValueError("Invalid DisCO configuration:\n  - " + "\n  - ".join(problems))
        if loss_is_disco:
            ensure_registered()


def ensure_registered() -> None:
    """Fail loudly if the ``disco`` loss or estimator is missing from verl's registries.

    verl loads ``verl.plugins`` entry points but swallows their errors, so a broken install would otherwise
    surface late as "Unsupported loss mode". Importing the plugin here re-raises the real cause.
    """
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    try:
        import recipe.disco.plugin  # noqa: F401
    except Exception as error:
        raise RuntimeError(
            f"DisCO is selected but its verl plugin recipe.disco.plugin failed to import ({error!r}); "
            "verl hides plugin errors, so check the install with `python -c 'import recipe.disco.plugin'`"
        ) from error
    missing = [
        name
        for name, registry in (("policy loss", POLICY_LOSS_REGISTRY), ("advantage estimator", ADV_ESTIMATOR_REGISTRY))
        if DISCO not in registry
    ]
    if missing:
        raise RuntimeError(f"DisCO is selected but the 'disco' {' and '.join(missing)} is not registered in verl")
