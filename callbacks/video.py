"""VideoCallback: every N env steps, an agent episode and the world model's open-loop prediction as MLflow artifacts."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_dreamer.callbacks.env_collector import EnvStepSchedule, total_env_steps
from lit_dreamer.tracking import ResilientMLFlowLogger
from lit_dreamer.video import open_loop, open_loop_frames, open_loop_plot, record_episode, write_gif


class VideoCallback(Callback):
    """On global rank 0, every `every_env_steps`:

    - `videos/episode-<env steps>.gif`: one episode acted with the policy's mode (env.render() frames);
    - `videos/openloop-<key>-<env steps>.gif` for each image key: `sequences` replayed sequences, the first
      half observed and the second half imagined from the replayed actions, with truth, prediction and
      difference stacked (green border: observed, red: imagined); for vector-only envs
      `videos/openloop-<env steps>.png`, a plot of predicted vs real rewards and observations.
    Files go to `directory` and to the MLflow run's artifacts.
    """

    def __init__(self, env_id: str, directory: str, *, every_env_steps: int = 20_000, sequences: int = 4,
                 max_episode_steps: int = 500, seed: int = 2_000_000, **env_kwargs: Any):
        super().__init__()
        self.env_id, self.directory = env_id, directory
        self.sequences, self.max_episode_steps, self.seed, self.env_kwargs = sequences, max_episode_steps, seed, env_kwargs
        self.schedule = EnvStepSchedule(every_env_steps)
        self.written: list[str] = []

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        steps = total_env_steps(trainer)
        if self.schedule.due(steps) and trainer.is_global_zero:
            self.record(trainer, pl_module, steps)

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule, steps: int) -> list[str]:
        os.makedirs(self.directory, exist_ok=True)
        frames, _ = record_episode(pl_module, self.env_id, seed=self.seed + steps, max_steps=self.max_episode_steps,
                                   **self.env_kwargs)
        paths = [write_gif(frames, os.path.join(self.directory, f"episode-{steps:09d}.gif"))]
        dm = trainer.datamodule
        sample = dm.replay.sample(min(self.sequences, dm.batch_size), dm.batch_length)
        batch = {k: torch.as_tensor(v, device=pl_module.device) for k, v in sample.items()}
        result = open_loop(pl_module, batch, context=dm.batch_length // 2)
        image_keys = pl_module.world_model.image_keys
        for key in image_keys:
            path = os.path.join(self.directory, f"openloop-{key.replace('/', '_')}-{steps:09d}.gif")
            paths.append(write_gif(open_loop_frames(result, key), path, fps=5))
        if not image_keys:
            paths.append(open_loop_plot(result, os.path.join(self.directory, f"openloop-{steps:09d}.png")))
        logger = trainer.logger
        if logger is not None and hasattr(logger, "experiment") and getattr(logger, "run_id", None):
            for path in paths:
                try:
                    logger.experiment.log_artifact(logger.run_id, path, artifact_path="videos")
                except Exception as err:  # noqa: BLE001 - a lost video must not stop training
                    if isinstance(logger, ResilientMLFlowLogger):  # counted and warned about with the others
                        logger.report_failure("log_artifact", err)
        self.written.extend(paths)
        return paths

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"next_at": self.schedule.next_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.next_at = state_dict["next_at"]
