"""ReplayDataModule: owns the replay of this rank and streams B x T sequences from it."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lit_dreamer.config import ConfigError
from lit_dreamer.replay import Replay, ReplayCapacityError
from lit_dreamer.sampling import ReplayConfig
from lit_dreamer.steps import Spec


class ReplayStream(IterableDataset):
    """An endless stream of batches sampled from a replay that keeps growing while it is read.

    Runs in the main process (num_workers=0): a worker process would hold a stale copy of an
    in-memory replay. Sampling is cheap next to a training step, so nothing is lost.
    """

    def __init__(self, datamodule: "ReplayDataModule"):
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        dm = self.datamodule
        while True:
            batch = dm.replay.sample(dm.batch_size, dm.batch_length)
            yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class ReplayDataModule(L.LightningDataModule):
    """Replay storage for one rank plus the dataloader that streams sequences from it.

    spec: what one replay step holds (see `lit_dreamer.envs.space_spec`). settings: the `replay`
    config section, passed whole (default `ReplayConfig()`); its capacity is in steps for this
    rank. With `settings.directory`, the replay lives in memory-mapped files there (rank
    subfolders under DDP), so capacity is not limited by RAM. A replay restored on resume takes
    these settings, not the saved run's.
    """

    def __init__(self, spec: Spec, settings: ReplayConfig | None = None, *, num_envs: int = 1,
                 batch_size: int = 16, batch_length: int = 64, seed: int = 0):
        super().__init__()
        self.spec, self.num_envs, self.seed = spec, num_envs, seed
        self.settings = ReplayConfig() if settings is None else settings
        self.batch_size, self.batch_length = batch_size, batch_length
        self.replay: Replay | None = None

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def setup(self, stage: str) -> None:
        if self.replay is None:
            self.replay = self.new_replay()

    def rank_settings(self) -> ReplayConfig:
        """The settings with this rank's own storage folder."""
        if self.settings.directory is None:
            return self.settings
        return dataclasses.replace(self.settings, directory=os.path.join(self.settings.directory, f"rank{self.rank}"))

    def new_replay(self) -> Replay:
        return Replay(self.spec, self.rank_settings(), self.num_envs, seed=self.seed + 7919 * self.rank)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ReplayStream(self), batch_size=None, num_workers=0)

    def update_context(self, index: torch.Tensor, latents: dict[str, torch.Tensor]) -> None:
        """Write the posterior of each replayed step back, for the next sample that starts after it."""
        self.replay.update_context(index.cpu().numpy(), {k: v.cpu().numpy() for k, v in latents.items()})

    def save_replay(self, path: str) -> None:
        self.replay.save(path)

    def load_replay(self, path: str) -> None:
        """Restore a saved replay under this run's settings (capacity, sampler, storage)."""
        try:
            self.replay = Replay.load(path, self.rank_settings())
        except ReplayCapacityError as err:
            raise ConfigError(f"replay.capacity={err.capacity} is below the {err.stored} steps stored in the replay "
                              f"snapshot {err.snapshot}; resume with replay.capacity={err.stored} or more "
                              "(dropping the oldest steps is not done silently)") from None
