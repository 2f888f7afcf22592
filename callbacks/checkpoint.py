"""DreamerCheckpoint: saves model, optimizers, counters and the replay as one consistent unit.

Layout under `dirpath`:

    step-000012000/model.ckpt         Lightning checkpoint (module, 3 optimizers, callback states)
    step-000012000/replay-rank0/      this rank's replay snapshot, taken at the same moment
    step-000012000/collector-rank0.json   this rank's episode counters and RNG state
    last -> step-000012000            symlink, swapped atomically once both parts are complete

A save writes a new `step-*` folder and only then moves `last`, so a crash or kill at any point
leaves `last` pointing at a complete, matching pair. Older folders beyond `keep` are deleted.
A kill mid-save leaves temporary files (`replay-rank0.tmp-<pid>/`, `model.ckpt.tmp`, `.last-<pid>`);
the next run in the same folder deletes them when it starts (see `clean_leftovers`).
Why not ModelCheckpoint: its cadence counts optimizer steps (3 per training step here), it
writes in place rather than write-then-rename, and it knows nothing of the replay.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_dreamer.callbacks.env_collector import find_collector, run_step_count
from lit_dreamer.checkpoint_files import check_checkpoint_folder, resolve_last  # noqa: F401 - exported by callbacks

log = logging.getLogger(__name__)

# A checkpoint's size is estimated, not known, before it is written: this much more is asked for.
SPACE_MARGIN = 1.1
SPACE_MARGIN_BYTES = 1 << 20
_LEFTOVER = re.compile(r"(?:.+\.tmp-\d+|model\.ckpt\.tmp)$")  # what a killed save leaves in a step-* folder
_LEFTOVER_LINK = re.compile(r"\.last-\d+$")


def free_bytes(path: str) -> int:
    """Free disk space at `path` (a function of its own so that tests can fake a small disk)."""
    return shutil.disk_usage(path).free


def model_checkpoint_nbytes(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """Estimated bytes of model.ckpt: the module's state dict and every optimizer's state.

    An optimizer that has not stepped yet holds no state: it is counted as two moments per
    parameter (LaProp's momentum and nu), what it will hold after its first step. Each tensor also
    costs its zip entry (headers, 64-byte alignment) and its record in the pickle: about 330 bytes
    measured on a size1m checkpoint, counted as 512.
    """
    tensors = [t for t in module.state_dict().values() if torch.is_tensor(t)]
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                state = optimizer.state.get(param)
                tensors += [v for v in state.values() if torch.is_tensor(v)] if state else [param, param]
    payload = sum(t.numel() * t.element_size() for t in tensors)
    # Hyperparameters, the run record (the whole run config), callback states and the zip directory.
    return payload + 512 * len(tensors) + 2 * len(pickle.dumps(dict(module.hparams))) + (64 << 10)


def clean_leftovers(dirpath: str) -> list[str]:
    """Delete what killed saves left under `dirpath`; returns the paths removed.

    Only at start-up, before this run saves anything: one run uses a run dir at a time, so no save
    of any process can be under way there, whatever PID a leftover carries (a PID check would
    also miss saves from other machines of a multi-node run, whose PIDs mean nothing here).
    """
    if not os.path.isdir(dirpath):
        return []
    removed = [os.path.join(dirpath, n) for n in os.listdir(dirpath) if _LEFTOVER_LINK.match(n)]
    for name in os.listdir(dirpath):
        folder = os.path.join(dirpath, name)
        if name.startswith("step-") and os.path.isdir(folder) and not os.path.islink(folder):
            removed += [os.path.join(folder, n) for n in os.listdir(folder) if _LEFTOVER.match(n)]
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    return removed


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DreamerCheckpoint(Callback):
    """Save every `every_env_steps` env steps (all ranks together; 0: never) and at the end of training.

    The save at the end also comes with `every_env_steps=0`: it is what `eval` reads and what a run
    stopped by Ctrl+C or SIGTERM resumes from.
    """

    def __init__(self, dirpath: str, every_env_steps: int = 10_000, keep: int = 2):
        super().__init__()
        if every_env_steps < 0:
            raise ValueError(f"every_env_steps must be >= 0 (0: only at the end), got {every_env_steps}")
        self.dirpath, self.every_env_steps, self.keep = dirpath, every_env_steps, keep
        self.last_saved_at = 0
        self.failures = 0  # failed saves since the last one that worked (the first is printed, the rest counted)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.local_rank == 0:
            for path in clean_leftovers(self.dirpath):
                log.info("removed %s, left by a save that was killed", path)

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Before the collector reads them (on_fit_start): a missing or damaged part stops the resume here.
        if trainer.ckpt_path:
            check_checkpoint_folder(str(trainer.ckpt_path), ranks=[trainer.global_rank])

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        env_steps = run_step_count(trainer)
        if self.every_env_steps > 0 and env_steps - self.last_saved_at >= self.every_env_steps:
            self.try_save(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env_steps = run_step_count(trainer)
        if env_steps != self.last_saved_at:
            self.try_save(trainer)
        if self.failures:
            kept = resolve_last(self.dirpath)
            log.warning("the last %d checkpoint saves failed; %s", self.failures,
                        f"the newest complete checkpoint is {kept}" if kept else "this run saved no checkpoint")

    def try_save(self, trainer: L.Trainer) -> None:
        """Save, but let training go on if the disk is full or unwritable: `last` keeps the previous save.

        A full disk stays full for a while: the first failure is printed, later ones are counted and
        the count is printed when a save works again or training ends.
        """
        try:
            self.save(trainer)
        except OSError as err:
            self.failures += 1
            if self.failures == 1:
                log.warning("checkpoint save failed (%r); training goes on, %s still holds the previous "
                            "checkpoint (further failures are counted, not printed)",
                            err, os.path.join(self.dirpath, "last"))
            return
        if self.failures:
            log.warning("checkpoint saved again after %d failed saves", self.failures)
            self.failures = 0

    def save(self, trainer: L.Trainer) -> str:
        # All ranks must take the same decision, or the ones that go on would wait at a barrier forever.
        if not trainer.strategy.reduce_boolean_decision(self.enough_space(trainer), all=True):
            raise OSError(errno.ENOSPC, f"not enough free disk space for a checkpoint in {self.dirpath}")
        env_steps = run_step_count(trainer)
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

    def needed_bytes(self, trainer: L.Trainer) -> int:
        """Estimated bytes this rank writes in a save: its replay snapshot and (rank 0) model.ckpt."""
        need = trainer.datamodule.replay.snapshot_nbytes
        if trainer.is_global_zero:
            need += model_checkpoint_nbytes(trainer.lightning_module, trainer.optimizers)
        return int(need * SPACE_MARGIN) + SPACE_MARGIN_BYTES

    def enough_space(self, trainer: L.Trainer) -> bool:
        """Room for what this rank is about to write?"""
        os.makedirs(self.dirpath, exist_ok=True)
        return free_bytes(self.dirpath) > self.needed_bytes(trainer)

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
