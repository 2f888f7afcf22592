"""ReplayDataModule: owns the replay of this rank and streams B x T sequences from it."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lit_dreamer.config import ConfigError
from lit_dreamer.relabel import is_hindsight_key
from lit_dreamer.replay import Replay, ReplayCapacityError
from lit_dreamer.sampling import ReplayConfig
from lit_dreamer.steps import Spec

_COPY_CHUNK_BYTES = 64 << 20  # host memory a device copy of the replay stages at a time


class ReplayStream(IterableDataset):
    """An endless stream of batches sampled from a replay that keeps growing while it is read.

    Runs in the main process (num_workers=0): a worker process would hold a stale copy of an
    in-memory replay. Sampling is cheap next to a training step, so nothing is lost.
    """

    def __init__(self, datamodule: "ReplayDataModule"):
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.datamodule.sample_batch()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: through pinned memory without waiting when that is CUDA."""
    if device.type != "cuda":
        return tensor.to(device)
    return pin(tensor).to(device, non_blocking=True)


def pin(tensor: torch.Tensor) -> torch.Tensor:
    # Only a page-locked source lets a non_blocking copy run asynchronously; without CUDA pinning fails.
    return tensor.pin_memory() if torch.cuda.is_available() else tensor


class DeviceReplay:
    """Copies of a replay's step buffers on an accelerator, sampled there (``replay.device=auto``).

    Before each batch the copies take the rows added since the last one (a few per training step),
    then the batch is gathered on the device from the same draw the host replay makes, so no
    batch-sized copy crosses to the device. The host replay stays the truth: it is what `add`
    writes, what checkpoints save, and where replay context (small, per sequence) is read and written.
    """

    def __init__(self, replay: Replay, device: torch.device):
        self.replay, self.device = replay, device
        self.storage = {key: torch.zeros(array.shape, dtype=torch.from_numpy(array[:0]).dtype, device=device)
                        for key, array in replay.storage.items()}
        self.rows_added = 0  # the replay's counter when the copies were last brought up to date

    def refresh(self) -> None:
        """Copy the rows added since the last refresh (on the first, every stored row) in bounded chunks."""
        rows = self.replay.rows_since(self.rows_added)
        row_bytes = max(1, sum(array[0].nbytes for array in self.replay.storage.values()))
        step = max(1, _COPY_CHUNK_BYTES // row_bytes)
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            index = to_device(torch.from_numpy(chunk), self.device)
            for key, array in self.replay.storage.items():
                rows_of_key = torch.from_numpy(np.ascontiguousarray(array[chunk]))
                self.storage[key][index] = to_device(rows_of_key, self.device)
        self.rows_added = self.replay.rows_added

    def sample(self, batch_size: int, length: int) -> dict[str, torch.Tensor]:
        """What ``Replay.sample`` returns, the step keys on the device, the small keys on the host."""
        self.refresh()
        draw = self.replay.draw(batch_size, length)
        rows, columns = (to_device(torch.from_numpy(array), self.device) for array in (draw.rows, draw.columns))
        batch = {key: array[rows, columns] for key, array in self.storage.items()}
        batch.update({key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in draw.extras.items()})
        return batch


class ReplayDataModule(L.LightningDataModule):
    """Replay storage for one rank plus the dataloader that streams sequences from it.

    spec: what one replay step holds (see `lit_dreamer.envs.space_spec`). settings: the `replay`
    config section, passed whole (default `ReplayConfig()`); its capacity is in steps for this
    rank. num_envs counts the env streams of all tasks; num_tasks of them lie side by side (see
    `Replay`), and every batch carries each sequence's `task` (B, T) int64. With
    `settings.directory`, the replay lives in memory-mapped files there (rank subfolders under DDP), so capacity is not limited by RAM. A replay restored on resume takes
    these settings, not the saved run's. `hindsight_fraction`: see ``Replay.hindsight_fraction``.
    """

    def __init__(self, spec: Spec, settings: ReplayConfig | None = None, *, num_envs: int = 1,
                 batch_size: int = 16, batch_length: int = 64, seed: int = 0, num_tasks: int = 1,
                 hindsight_fraction: float = 0.0):
        super().__init__()
        self.hindsight_fraction = hindsight_fraction
        self.spec, self.num_envs, self.seed, self.num_tasks = spec, num_envs, seed, num_tasks
        self.settings = ReplayConfig() if settings is None else settings
        self.batch_size, self.batch_length = batch_size, batch_length
        self.replay: Replay | None = None
        self._device_replay: DeviceReplay | None = None

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
        replay = Replay(self.spec, self.rank_settings(), self.num_envs, seed=self.seed + 7919 * self.rank,
                        num_tasks=self.num_tasks)
        replay.hindsight_fraction = self.hindsight_fraction
        return replay

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ReplayStream(self), batch_size=None, num_workers=0)

    def target_device(self) -> torch.device:
        """The device the trainer trains on (the CPU without a trainer)."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def sample_batch(self) -> dict[str, torch.Tensor]:
        """One B x T batch: gathered on the accelerator with replay.device=auto, else on the host."""
        device = self.target_device()
        if self.settings.device == "auto" and device.type != "cpu":
            if self._device_replay is None or self._device_replay.replay is not self.replay:
                self._device_replay = DeviceReplay(self.replay, device)
            return self._device_replay.sample(self.batch_size, self.batch_length)
        batch = self.replay.sample(self.batch_size, self.batch_length)
        batch = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in batch.items()}
        # Pinned here, so that the transfer below runs asynchronously (pinning needs CUDA).
        return {key: pin(value) for key, value in batch.items()} if device.type == "cuda" else batch

    @override
    def transfer_batch_to_device(self, batch: dict[str, torch.Tensor], device: torch.device,
                                 dataloader_idx: int) -> dict[str, torch.Tensor]:
        # index stays on the host, where update_context reads it (a device copy would be read back).
        non_blocking = device.type == "cuda"
        return {key: value if key == "index" else value.to(device, non_blocking=non_blocking)
                for key, value in batch.items()}

    def update_context(self, index: torch.Tensor, latents: dict[str, torch.Tensor]) -> None:
        """Write the posterior of each replayed step back, for the next sample that starts after it."""
        self.replay.update_context(index.cpu().numpy(), {k: v.cpu().numpy() for k, v in latents.items()})

    def save_replay(self, path: str) -> None:
        self.replay.save(path)

    def load_replay(self, path: str, *, context: bool = True, seed: int | None = None) -> None:
        """Restore a saved replay under this run's settings (capacity, sampler, storage); see `Replay.load` for
        `context` (keep the stored latents) and `seed` (restart sampling)."""
        try:
            self.replay = Replay.load(path, self.rank_settings(), context=context, seed=seed)
        except ReplayCapacityError as err:
            raise ConfigError(f"replay.capacity={err.capacity} is below the {err.stored} steps stored in the replay "
                              f"snapshot {err.snapshot}; resume with replay.capacity={err.stored} or more "
                              "(dropping the oldest steps is not done silently)") from None
        if "task" in self.spec and "task" not in self.replay.spec and self.replay.num_tasks == 1:
            # Saved before replays stored the task index: all its steps are of the one task, index 0.
            self.replay.add_step_key("task", *self.spec["task"])
        for key in self.spec.keys() - self.replay.spec.keys():
            if is_hindsight_key(key):  # saved by a run without reward.hindsight: no episode has a label yet
                self.replay.add_step_key(key, *self.spec[key])
        self.replay.hindsight_fraction = self.hindsight_fraction
