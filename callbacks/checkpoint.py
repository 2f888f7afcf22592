"""DreamerCheckpoint: saves model, optimizers, counters and the replay as one consistent unit.

Layout under `dirpath`:

    step-000012000/model.ckpt         Lightning checkpoint (module, 3 optimizers, callback states)
    step-000012000/replay-rank0/      this rank's replay snapshot, taken at the same moment
    step-000012000/collector-rank0.json   this rank's episode counters and RNG state
    last -> step-000012000            symlink, swapped atomically once both parts are complete

A save writes a new `step-*` folder and only then moves `last`, so a crash or kill at any point
leaves `last` pointing at a complete, matching pair. Older folders beyond `keep` are deleted.
Why not ModelCheckpoint: its cadence counts optimizer steps (3 per training step here), it
writes in place rather than write-then-rename, and it knows nothing of the replay.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_dreamer.callbacks.env_collector import find_collector, total_env_steps

log = logging.getLogger(__name__)


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_last(dirpath: str) -> str | None:
    """Path of the newest complete model.ckpt under dirpath, or None."""
    link = os.path.join(dirpath, "last")
    path = os.path.join(link, "model.ckpt")
    return os.path.realpath(path) if os.path.exists(path) else None


class DreamerCheckpoint(Callback):
    """Save every `every_env_steps` env steps (all ranks together) and at the end of training."""

    def __init__(self, dirpath: str, every_env_steps: int = 10_000, keep: int = 2):
        super().__init__()
        self.dirpath, self.every_env_steps, self.keep = dirpath, every_env_steps, keep
        self.last_saved_at = 0
        self.failures = 0

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        env_steps = total_env_steps(trainer)
        if env_steps - self.last_saved_at >= self.every_env_steps:
            self.try_save(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env_steps = total_env_steps(trainer)
        if env_steps != self.last_saved_at:
            self.try_save(trainer)

    def try_save(self, trainer: L.Trainer) -> None:
        """Save, but let training go on if the disk is full or unwritable: `last` keeps the previous save."""
        try:
            self.save(trainer)
        except OSError as err:
            self.failures += 1
            log.warning("checkpoint save failed (%r); training goes on, %s still holds the previous checkpoint",
                        err, os.path.join(self.dirpath, "last"))

    def save(self, trainer: L.Trainer) -> str:
        # All ranks must take the same decision, or the ones that go on would wait at a barrier forever.
        if not trainer.strategy.reduce_boolean_decision(self.enough_space(trainer), all=True):
            raise OSError(errno.ENOSPC, f"not enough free disk space for a checkpoint in {self.dirpath}")
        env_steps = total_env_steps(trainer)
        folder = os.path.join(self.dirpath, f"step-{env_steps:012d}")
        self.last_saved_at = env_steps  # before the save, so the checkpoint carries the new value
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
        trainer.strategy.barrier("dreamer_checkpoint_mkdir")
        rank = trainer.global_rank
        trainer.datamodule.save_replay(os.path.join(folder, f"replay-rank{rank}"))
        write_json_atomic(os.path.join(folder, f"collector-rank{rank}.json"), find_collector(trainer).rank_state())
        tmp = os.path.join(folder, "model.ckpt.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # collective; rank 0 writes the full checkpoint
        trainer.strategy.barrier("dreamer_checkpoint_saved")
        if trainer.is_global_zero:
            with open(tmp, "rb") as f:  # on disk before it takes the final name (power loss, not just kill)
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(folder, "model.ckpt"))
            link_tmp = os.path.join(self.dirpath, f".last-{os.getpid()}")
            if os.path.lexists(link_tmp):
                os.remove(link_tmp)
            os.symlink(os.path.basename(folder), link_tmp)
            os.replace(link_tmp, os.path.join(self.dirpath, "last"))
            self.prune(keep_folder=folder)
        trainer.strategy.barrier("dreamer_checkpoint_done")
        return folder

    def enough_space(self, trainer: L.Trainer) -> bool:
        """Room for this rank's replay snapshot and (rank 0) the model with its optimizer moments?"""
        replay = trainer.datamodule.replay
        need = replay.nbytes * len(replay) / max(replay.capacity, 1) + 2**24
        if trainer.is_global_zero:
            need += 4 * sum(p.numel() * p.element_size() for p in trainer.lightning_module.parameters())
        os.makedirs(self.dirpath, exist_ok=True)
        return shutil.disk_usage(self.dirpath).free > need

    def prune(self, keep_folder: str) -> None:
        folders = sorted(f for f in os.listdir(self.dirpath) if f.startswith("step-"))
        for name in folders[:-self.keep]:
            path = os.path.join(self.dirpath, name)
            if os.path.realpath(path) != os.path.realpath(keep_folder):
                shutil.rmtree(path, ignore_errors=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_at": self.last_saved_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_saved_at = state_dict["last_saved_at"]
