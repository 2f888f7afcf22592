"""ReplayDataModule: owns the replay of this rank and streams B x T sequences from it."""

from __future__ import annotations

import os
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lit_dreamer.replay import Replay

ReplaySpec = dict[str, tuple[tuple[int, ...], np.dtype]]


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

    spec: what one replay step holds (see `lit_dreamer.envs.space_spec`). capacity is in steps
    for this rank. With `directory`, the replay lives in memory-mapped files there (rank
    subfolders under DDP), so capacity is not limited by RAM.
    """

    def __init__(self, spec: ReplaySpec, *, num_envs: int = 1, capacity: int = 1_000_000, batch_size: int = 16,
                 batch_length: int = 64, directory: str | None = None, sampling: str = "uniform",
                 recency_half_life: float = 10_000.0, seed: int = 0):
        super().__init__()
        self.spec, self.num_envs, self.capacity = spec, num_envs, capacity
        self.batch_size, self.batch_length = batch_size, batch_length
        self.directory, self.sampling, self.recency_half_life, self.seed = directory, sampling, recency_half_life, seed
        self.replay: Replay | None = None

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def setup(self, stage: str) -> None:
        if self.replay is None:
            self.replay = self.new_replay()

    def new_replay(self) -> Replay:
        directory = None if self.directory is None else os.path.join(self.directory, f"rank{self.rank}")
        return Replay(self.spec, self.capacity, self.num_envs, directory=directory, seed=self.seed + 7919 * self.rank,
                      sampling=self.sampling, recency_half_life=self.recency_half_life)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ReplayStream(self), batch_size=None, num_workers=0)

    def update_context(self, index: torch.Tensor, latents: dict[str, torch.Tensor]) -> None:
        """Write the posterior of each replayed step back, for the next sample that starts after it."""
        self.replay.update_context(index.cpu().numpy(), {k: v.cpu().numpy() for k, v in latents.items()})

    def save_replay(self, path: str) -> None:
        self.replay.save(path)

    def load_replay(self, path: str) -> None:
        directory = None if self.directory is None else os.path.join(self.directory, f"rank{self.rank}")
        self.replay = Replay.load(path, directory=directory)
