"""The replay's settings and the table of samplers that pick where each replayed sequence starts.

`ReplayConfig` is the `replay` section of the run config and the one settings object the replay
takes: the config, `train.build`, `ReplayDataModule` and `Replay` all pass it whole. On resume the
run's settings apply to the restored data (a snapshot stores data, not settings).

A sampler is chosen by name from `SAMPLERS`. Adding one (e.g. prioritized replay) is one `Sampler`
subclass plus one entry in the table; config validation reads the table, so the new name is
accepted and listed in the error for an unknown one. A sampler that needs a setting of its own
adds a field to `ReplayConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class ReplayConfig:
    """Replay storage."""

    capacity: int = 1_000_000
    """Steps kept per device; the oldest are overwritten."""
    directory: Optional[str] = None
    """Keep the replay in memory-mapped files here instead of RAM."""
    sampling: str = "uniform"
    """uniform or recency (exponentially more weight on recent steps)."""
    recency_half_life: float = 10000.0
    """Half-life in steps of the recency sampling."""
    device: str = "cpu"
    """cpu, or auto: also keep the steps on the accelerator the trainer uses, and sample batches there."""


REPLAY_DEVICES = ("cpu", "auto")
"""The values of replay.device."""


class Sampler:
    """Draws the start row and the env stream of each sequence of a batch.

    Start rows are offsets from the oldest stored row, in [0, num_starts); offset num_starts - 1 is
    the newest start that still fits a whole sequence. All randomness comes from the replay's
    generator ``rng``, so a replay restored with its RNG state draws the same batches.
    """

    def __init__(self, settings: ReplayConfig, num_envs: int):
        self.settings, self.num_envs = settings, num_envs

    def draw(self, rng: np.random.Generator, batch_size: int, num_starts: int) -> tuple[np.ndarray, np.ndarray]:
        """(starts, streams), each (batch_size,) int64. Streams are uniform unless a subclass says otherwise."""
        starts = self.starts(rng, batch_size, num_starts)
        return starts, rng.integers(0, self.num_envs, size=batch_size)

    def starts(self, rng: np.random.Generator, batch_size: int, num_starts: int) -> np.ndarray:
        raise NotImplementedError


class UniformSampler(Sampler):
    """Every valid start equally likely."""

    def starts(self, rng: np.random.Generator, batch_size: int, num_starts: int) -> np.ndarray:
        return rng.integers(0, num_starts, size=batch_size)


class RecencySampler(Sampler):
    """The age of a start is exponential with half-life ``recency_half_life`` env steps, truncated to the data."""

    def starts(self, rng: np.random.Generator, batch_size: int, num_starts: int) -> np.ndarray:
        # The half-life counts env steps of all streams together; one row holds num_envs of them.
        rate = math.log(2.0) / (self.settings.recency_half_life / self.num_envs)
        # Inverse CDF of an exponential over the age, truncated to [0, num_starts); age 0 is newest.
        mass = -math.expm1(-rate * num_starts)
        ages = np.floor(-np.log1p(-rng.random(batch_size) * mass) / rate).astype(np.int64)
        return num_starts - 1 - np.minimum(ages, num_starts - 1)


SAMPLERS: dict[str, type[Sampler]] = {"uniform": UniformSampler, "recency": RecencySampler}
"""replay.sampling name -> sampler class."""


def make_sampler(settings: ReplayConfig, num_envs: int) -> Sampler:
    """The sampler that ``settings.sampling`` names; ValueError listing the table for an unknown name."""
    if settings.sampling not in SAMPLERS:
        raise ValueError(f"unknown replay sampling {settings.sampling!r}; choose one of {', '.join(SAMPLERS)}")
    if settings.device not in REPLAY_DEVICES:
        raise ValueError(f"unknown replay device {settings.device!r}; choose one of {', '.join(REPLAY_DEVICES)}")
    if settings.recency_half_life <= 0:
        raise ValueError(f"recency_half_life must be positive, got {settings.recency_half_life}")
    return SAMPLERS[settings.sampling](settings, num_envs)
