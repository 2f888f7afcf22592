"""GracefulStop: Ctrl+C or SIGTERM ends a run at a step boundary, with a checkpoint to resume from.

Without it, Ctrl+C raises wherever the program happens to be (mid optimizer step, mid checkpoint),
and a SIGTERM from a scheduler that preempts the job kills the process: either way everything since
the last periodic checkpoint is lost. With it, the first signal lets the current training step
finish; the run then stops the normal way, so DreamerCheckpoint saves at the end of training, and
the MLflow run is marked KILLED (it did not reach `run.steps`). `ckpt_path=last` continues it.
A second Ctrl+C aborts at once, as before (the last periodic checkpoint is kept).

Under DDP all ranks must stop after the same step (the save is collective): the ranks agree on it
after every step, so a signal that reaches one rank only is enough.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

KILLED = "KILLED"


def mark_killed(trainer: L.Trainer) -> None:
    """Have the logger end its MLflow run as KILLED rather than FINISHED or FAILED."""
    if trainer.logger is not None and hasattr(trainer.logger, "end_status"):
        trainer.logger.end_status = KILLED


class GracefulStop(Callback):
    """Stop after the current training step on the first SIGINT or SIGTERM (see the module doc)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        super().__init__()
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, Any] = {}

    @property
    def stopped_by(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's own SIGTERM handler (set when fit starts), which ours replaces for the run;
        # Lightning puts back the handlers it found when fit ends. Signals reach the main thread only.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue  # e.g. SIGINT under `nohup cmd &`: the user asked for it to be ignored
            self._previous[signum] = previous
            signal.signal(signum, self.handle)
        rank_zero_info("Ctrl+C (or SIGTERM) ends the run after the current step and saves a checkpoint; "
                       "a second Ctrl+C aborts at once.")

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            rank_zero_warn(f"{signal.Signals(signum).name} received: the run ends after this training step, "
                           "with a checkpoint (Ctrl+C again to abort without one).")
        self.received = signum

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True
            mark_killed(trainer)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            mark_killed(trainer)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
