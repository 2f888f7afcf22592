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
from typing import Callable, Optional

import numpy as np


@dataclass
class ReplayConfig:
    """Replay storage."""

    capacity: int = 1_000_000
    """Steps kept per device; the oldest are overwritten."""
    directory: Optional[str] = None
    """Keep the replay in memory-mapped files here instead of RAM."""
    sampling: str = "uniform"
    """uniform, recency (exponentially more weight on recent steps) or reward (a share of each batch around
    steps with a nonzero reward)."""
    recency_half_life: float = 10000.0
    """Half-life in steps of the recency sampling."""
    reward_fraction: float = 0.25
    """With sampling=reward: the share of each batch's sequences drawn to hold a step with a nonzero reward (the
    step at a uniform position in the sequence); the rest are uniform."""
    device: str = "cpu"
    """cpu, or auto: also keep the steps on the accelerator the trainer uses, and sample batches there."""
    task_balance: bool = True
    """Each batch holds as many sequences of each task (env.tasks) as the others; a remainder rotates over the tasks."""


Rewarded = Callable[[], tuple[np.ndarray, np.ndarray]]
"""() -> (offsets from the oldest stored row, streams) of the stored steps with a nonzero reward."""

REPLAY_DEVICES = ("cpu", "auto")
"""The values of replay.device."""


def task_counts(batch_size: int, num_tasks: int, batch_number: int) -> np.ndarray:
    """Sequences of each task in batch number ``batch_number``: equal shares, and the remainder of
    ``batch_size / num_tasks`` one each to the next tasks in turn, so that over batches every task
    gets the same (e.g. 5 over 2 tasks: 3/2, then 2/3)."""
    share, remainder = divmod(batch_size, num_tasks)
    counts = np.full(num_tasks, share, np.int64)
    first = batch_number * remainder % num_tasks
    counts[(first + np.arange(remainder)) % num_tasks] += 1
    return counts


class Sampler:
    """Draws the start row and the env stream of each sequence of a batch.

    Start rows are offsets from the oldest stored row, in [0, num_starts); offset num_starts - 1 is
    the newest start that still fits a whole sequence. All randomness comes from the replay's
    generator ``rng``, so a replay restored with its RNG state draws the same batches.

    The streams of task k are the columns [k * n, (k + 1) * n) with n = num_envs // num_tasks (the
    collector writes the tasks' envs side by side). With ``task_balance`` each task gets its
    ``task_counts`` share of the batch, sorted by task; otherwise streams are uniform over all
    columns. One task draws the same streams either way.
    """

    def __init__(self, settings: ReplayConfig, num_envs: int, num_tasks: int = 1):
        if num_tasks < 1 or num_envs % num_tasks:
            raise ValueError(f"num_envs={num_envs} streams cannot be split evenly over num_tasks={num_tasks}")
        self.settings, self.num_envs, self.num_tasks = settings, num_envs, num_tasks

    def draw(self, rng: np.random.Generator, batch_size: int, num_starts: int, batch_number: int = 0,
             rewarded: Rewarded | None = None, length: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(starts, streams), each (batch_size,) int64; ``batch_number`` turns the rotation of task shares.

        ``rewarded()`` gives the stored steps with a nonzero reward as (offsets from the oldest stored row,
        streams), and ``length`` is the sequences' length; only the samplers that look at rewards use them."""
        starts = self.starts(rng, batch_size, num_starts)
        return starts, self.streams(rng, batch_size, batch_number)

    def streams(self, rng: np.random.Generator, batch_size: int, batch_number: int) -> np.ndarray:
        if not self.settings.task_balance:
            return rng.integers(0, self.num_envs, size=batch_size)
        per_task = self.num_envs // self.num_tasks
        tasks = np.repeat(np.arange(self.num_tasks), task_counts(batch_size, self.num_tasks, batch_number))
        return tasks * per_task + rng.integers(0, per_task, size=batch_size)

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


class RewardSampler(UniformSampler):
    """A share ``reward_fraction`` of each batch (rounded down, at least one while any exists) is drawn around
    steps with a nonzero reward: a rewarded step chosen uniformly among all stored ones, and the sequence
    placed so that the step sits at a uniform position in it (clamped to the stored rows). The rest of the
    batch is uniform. While no rewarded step is stored, the whole batch is uniform.

    Not in DreamerV3's recipe (uniform replay): it is for tasks whose reward is rare, where a uniform batch
    holds a success too seldom for the reward head to learn it (docs/language.md). One task only: the
    rewarded share would upset ``task_balance``.
    """

    def __init__(self, settings: ReplayConfig, num_envs: int, num_tasks: int = 1):
        if num_tasks > 1:
            raise ValueError("replay.sampling=reward draws around rewarded steps of any stream and would unbalance "
                             "the tasks of env.tasks; use it with one task")
        super().__init__(settings, num_envs, num_tasks)

    def draw(self, rng: np.random.Generator, batch_size: int, num_starts: int, batch_number: int = 0,
             rewarded: Rewarded | None = None, length: int = 1) -> tuple[np.ndarray, np.ndarray]:
        starts, streams = super().draw(rng, batch_size, num_starts, batch_number)
        if rewarded is None:
            raise ValueError("replay.sampling=reward needs the replay's rewarded steps")
        offsets, columns = rewarded()
        if len(offsets) == 0 or self.settings.reward_fraction == 0:
            return starts, streams
        count = min(batch_size, max(1, int(batch_size * self.settings.reward_fraction)))
        pick = rng.integers(0, len(offsets), size=count)
        before = rng.integers(0, length, size=count)  # the rewarded step's position in its sequence
        starts[:count] = np.clip(offsets[pick] - before, 0, num_starts - 1)
        streams[:count] = columns[pick]
        return starts, streams


SAMPLERS: dict[str, type[Sampler]] = {"uniform": UniformSampler, "recency": RecencySampler, "reward": RewardSampler}
"""replay.sampling name -> sampler class."""


def make_sampler(settings: ReplayConfig, num_envs: int, num_tasks: int = 1) -> Sampler:
    """The sampler that ``settings.sampling`` names; ValueError listing the table for an unknown name."""
    if settings.sampling not in SAMPLERS:
        raise ValueError(f"unknown replay sampling {settings.sampling!r}; choose one of {', '.join(SAMPLERS)}")
    if settings.device not in REPLAY_DEVICES:
        raise ValueError(f"unknown replay device {settings.device!r}; choose one of {', '.join(REPLAY_DEVICES)}")
    if settings.recency_half_life <= 0:
        raise ValueError(f"recency_half_life must be positive, got {settings.recency_half_life}")
    if not 0 <= settings.reward_fraction <= 1:
        raise ValueError(f"reward_fraction must be within [0, 1], got {settings.reward_fraction}")
    return SAMPLERS[settings.sampling](settings, num_envs, num_tasks)
