"""EnvStepProgressBar: Lightning's tqdm bar, counting env steps toward run.steps."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from lit_dreamer.callbacks.env_collector import find_collector, run_step_count


def plain_number(value: Any) -> str:
    """A number as a bar shows it, never in tqdm's exponent form: 1530.25 -> '1530', 95.5 -> '95.5'."""
    if isinstance(value, str):
        return value
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


class EnvStepProgressBar(TQDMProgressBar):
    """The training bar counts env steps (all ranks; gradient steps offline) up to the run's end, so tqdm shows
    the run's progress and an ETA; a resumed run starts the bar where it left off (its rate and ETA
    count only this session's steps).

    Lightning's bar counts batches of an endless epoch under "Epoch N" and shows the logger's v_num;
    neither means anything here, so both are left out. Metrics are formatted by `plain_number`.
    """


    @override
    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        # Set up here as well: a run resumed from a checkpoint saved mid-epoch (every periodic one, since
        # the epoch never ends) gets no on_train_epoch_start from Lightning.
        self.count_run_steps(trainer)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        # Replaces Lightning's reset to the epoch's batches (endless here) and its "Epoch N" title.
        self.count_run_steps(trainer)

    def count_run_steps(self, trainer: L.Trainer) -> None:
        """Point the bar at the run's steps: from where it stands now to the run's end."""
        bar, source = self.train_progress_bar, find_collector(trainer)
        bar.reset(total=source.total_steps)
        bar.initial = bar.n = run_step_count(trainer)  # tqdm's rate and ETA count from here
        bar.unit = ""
        bar.set_description(source.unit)  # "env steps"; "gradient steps" in an offline run

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        env_steps = run_step_count(trainer)
        if self.is_enabled and ((batch_idx + 1) % self.refresh_rate == 0 or env_steps >= (bar.total or math.inf)):
            bar.n = env_steps
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {key: plain_number(value) for key, value in metrics.items()}
