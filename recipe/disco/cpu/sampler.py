"""verl's replay buffers with a short poll interval, for the CPU runs (tests and the demo).

verl's v1 trainer waits for a step's rollouts by polling its replay buffer every 2 s, a fixed floor on every step;
a step of the tiny CPU task otherwise takes well under a second. Selected with
``trainer.v1.sampler.custom_sampler.path=pkg://recipe.disco.cpu.sampler`` and
``trainer.v1.sampler.custom_sampler.name=`` the class for the trainer mode (``recipe.disco.cpu.launch.SAMPLERS``):
verl's own choice (the synchronous buffer for ``sync``, the asynchronous one otherwise) is skipped for a custom
sampler. As for any custom sampler, verl then passes no dynamic-sampling (``algorithm.filter_groups``) settings,
which these runs do not use.
"""

from typing import Any

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

POLL_INTERVAL_S = 0.05


class FastPollReplayBuffer(ReplayBuffer):
    """``ReplayBuffer`` polling every ``POLL_INTERVAL_S`` seconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, poll_interval=POLL_INTERVAL_S, **kwargs)


class FastPollReplayBufferAsync(ReplayBufferAsync, FastPollReplayBuffer):
    """``ReplayBufferAsync`` (staleness bound, partial rollouts) polling every ``POLL_INTERVAL_S`` seconds."""
