"""Model checkpoints as MLflow run artifacts (`logger.log_checkpoints`), and the policy registered at the end of fit
(`logger.register_as`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_dreamer.callbacks.checkpoint import DreamerCheckpoint
from lit_dreamer.checkpoint_files import resolve_last

log = logging.getLogger(__name__)


class CheckpointArtifacts(Callback):
    """After each checkpoint save, log its model.ckpt (not the replay) to the trainer's MLflow run.

    mode `last`: one artifact, checkpoints/last/model.ckpt, replaced at every save (the end of fit saves too);
    `all`: checkpoints/step-<N>/model.ckpt for every save. Goes after `saver` in the callback list, so that at the
    end of fit it sees the final save. Failures are reported by the logger and never stop training.
    """

    def __init__(self, saver: DreamerCheckpoint, mode: str = "last"):
        super().__init__()
        self.saver, self.mode = saver, mode
        self.logged_at: int | None = None  # the saver's last_saved_at when its checkpoint was last logged

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.logged_at = self.saver.last_saved_at  # a resumed run's starting checkpoint is logged already

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.log_new_checkpoint(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_new_checkpoint(trainer)

    def log_new_checkpoint(self, trainer: L.Trainer) -> None:
        # An int comparison per batch; the file system is read only after a save.
        if self.saver.last_saved_at == self.logged_at or not trainer.is_global_zero or trainer.logger is None:
            return
        self.logged_at = self.saver.last_saved_at
        path = resolve_last(self.saver.dirpath)
        if path is None:  # the save failed (a full disk): nothing new to log
            return
        folder = "last" if self.mode == "last" else os.path.basename(os.path.dirname(path))
        trainer.logger.log_artifact(path, f"checkpoints/{folder}")
