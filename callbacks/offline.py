"""OfflineReplay: the step source of an offline run. It fills the replay once from a saved snapshot and steps no env.

In place of the EnvCollector: before training it loads the source snapshot (`offline.replay`) into the
datamodule, without the source's replay-context latents and with sampling seeded by the run's seed; on a
resume it loads the run's own copy saved beside the checkpoint instead (with this model's latents). It
counts gradient steps, the axis every cadence of the run (checkpoints, evaluation, the progress bar, the
"step" of logged metrics) is measured in, and stops training after `total_steps` of them.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from typing_extensions import override

from lit_dreamer.callbacks.step_source import StepSource


class OfflineReplay(StepSource):
    """Feeds `trainer.datamodule` from the replay snapshot at `source` (read, never written) for `total_steps`
    gradient steps; `seed` seeds the sampling of a fresh run."""

    unit = "gradient steps"
    SHARED_STATE = ("train_steps_seen",)

    def __init__(self, source: str, *, total_steps: int, seed: int = 0):
        super().__init__()
        self.source, self.total_steps, self.seed = source, total_steps, seed
        self.train_steps_seen = 0  # gradient steps of the run (all sessions), the same on every rank

    def run_steps(self, world_size: int) -> int:
        return self.train_steps_seen

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_train_start: Lightning draws the first batch between the two.
        datamodule = trainer.datamodule
        if trainer.ckpt_path:  # the run's own copy, with the latents this model wrote
            folder = os.path.dirname(os.path.abspath(trainer.ckpt_path))
            datamodule.load_replay(os.path.join(folder, f"replay-rank{trainer.global_rank}"))
        else:
            datamodule.load_replay(self.source, context=False, seed=self.seed + 7919 * trainer.global_rank)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.train_steps_seen += 1
        # "step" is the x-axis Lightning gives to every metric logged in this batch: gradient steps.
        pl_module.log("step", float(self.train_steps_seen), on_step=True, batch_size=1)
        pl_module.log_dict({"replay/steps": float(len(trainer.datamodule.replay))}, on_step=True, batch_size=1)
        pl_module.log_dict({"train_steps": float(pl_module.host_train_steps)}, on_step=True, batch_size=1,
                           prog_bar=True, logger=False)
        if self.train_steps_seen >= self.total_steps:
            trainer.should_stop = True

    def rank_state(self) -> dict[str, Any]:
        # Offline, no env draws random numbers; the key is kept so the file reads as complete (checkpoint_files).
        return {"rng": None, "source": os.path.abspath(self.source)}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the rank file only marks a complete checkpoint."""

