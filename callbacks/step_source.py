"""StepSource: the one callback of a run that fills its replay and counts the steps every cadence is measured in.

An online run's source is `EnvCollector` (env steps, all ranks); an offline run's is `OfflineReplay` (gradient
steps: it steps no env). Checkpoints, evaluation, videos and the progress bar read the count through
`callbacks.env_collector.run_step_count`, so they run unchanged on either axis.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class StepSource(Callback):
    """What the other callbacks and the run summary read of the run's source of data."""

    unit = "env steps"
    """What `run_steps` counts, in words (the progress bar's label)."""

    def __init__(self) -> None:
        super().__init__()
        self.total_steps: int | None = None  # the run ends at this count (None: never)
        self.env_steps = 0  # of this rank
        self.episodes = 0
        self.best_return = -math.inf
        self.last_return = math.nan
        self.return_log: list[tuple[int, float]] = []  # (steps, mean training return), for CollapseWatch

    SHARED_STATE: tuple[str, ...] = ()
    """Attributes every rank holds alike, saved in the checkpoint as the callback's state dict."""

    @override
    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.SHARED_STATE}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in self.SHARED_STATE:
            setattr(self, key, state_dict[key])

    def run_steps(self, world_size: int) -> int:
        """The run's count over all ranks, in `unit`."""
        raise NotImplementedError

    def rank_state(self) -> dict[str, Any]:
        """This rank's counters (JSON-able), saved beside each checkpoint's replay; it must hold `rng`."""
        raise NotImplementedError
