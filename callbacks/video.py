"""VideoCallback: every N env steps, an agent episode and the world model's open-loop prediction as MLflow artifacts."""

from __future__ import annotations

import os
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_dreamer.callbacks.env_collector import EnvStepSchedule, run_step_count
from lit_dreamer.config import task_metric_name
from lit_dreamer.envs import TASK_SEED_STRIDE
from lit_dreamer.tracking import ResilientMLFlowLogger
from lit_dreamer.video import open_loop, open_loop_frames, open_loop_plot, record_episode, write_gif


class VideoCallback(Callback):
    """On global rank 0, every `every_env_steps`:

    - `videos/episode-<env steps>.gif`: one episode acted with the policy's mode (env.render() frames);
      `env_id` may be the task table (a list of ids): then one episode of each task, acted for that task,
      as `videos/episode-<task>-<env steps>.gif` (<task> as in the eval/<task>/return metrics);
    - `videos/openloop-<key>-<env steps>.gif` for each image key: `sequences` replayed sequences, the first
      half observed and the second half imagined from the replayed actions, with truth, prediction and
      difference stacked (green border: observed, red: imagined); for vector-only envs
      `videos/openloop-<env steps>.png`, a plot of predicted vs real rewards and observations.
    Files go to `directory` and to the MLflow run's artifacts. The open loop is one per call, whatever the
    number of tasks: the world model is shared and sees no task.
    """

    def __init__(self, env_id: str | Sequence[str], directory: str, *, every_env_steps: int = 20_000, sequences: int = 4,
                 max_episode_steps: int = 500, seed: int = 2_000_000, **env_kwargs: Any):
        super().__init__()
        self.tasks = [env_id] if isinstance(env_id, str) else list(env_id)
        self.directory = directory
        self.sequences, self.max_episode_steps, self.seed, self.env_kwargs = sequences, max_episode_steps, seed, env_kwargs
        self.schedule = EnvStepSchedule(every_env_steps)
        self.written: list[str] = []

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        steps = run_step_count(trainer)
        if self.schedule.due(steps) and trainer.is_global_zero:
            self.record(trainer, pl_module, steps)

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule, steps: int) -> list[str]:
        """Write this call's episodes (one per task) and open-loop prediction, upload them; returns the paths."""
        os.makedirs(self.directory, exist_ok=True)
        paths = [self.record_task(pl_module, task, steps) for task in range(len(self.tasks))]
        paths.extend(self.record_open_loop(trainer, pl_module, steps))
        self.upload(trainer, paths)
        self.written.extend(paths)
        return paths

    def record_task(self, pl_module: L.LightningModule, task: int, steps: int) -> str:
        """One episode of task number `task`, the policy acting for it, on seeds of its own (task 0: the
        one-task seeds)."""
        frames, _ = record_episode(pl_module, self.tasks[task], seed=self.seed + steps + task * TASK_SEED_STRIDE,
                                   max_steps=self.max_episode_steps, task=task, **self.env_kwargs)
        return write_gif(frames, os.path.join(self.directory, self.episode_name(task, steps)))

    def episode_name(self, task: int, steps: int) -> str:
        """`episode-<env steps>.gif` with one task (the name of before), `episode-<task>-<env steps>.gif` with several."""
        if len(self.tasks) == 1:
            return f"episode-{steps:09d}.gif"
        return f"episode-{task_metric_name(self.tasks[task])}-{steps:09d}.gif"

    def record_open_loop(self, trainer: L.Trainer, pl_module: L.LightningModule, steps: int) -> list[str]:
        """The world model's open-loop prediction of a few replayed sequences: a GIF per image key, or a plot."""
        dm = trainer.datamodule
        sample = dm.replay.sample(min(self.sequences, dm.batch_size), dm.batch_length)
        batch = {k: torch.as_tensor(v, device=pl_module.device) for k, v in sample.items()}
        result = open_loop(pl_module, batch, context=dm.batch_length // 2)
        image_keys = pl_module.world_model.image_keys
        paths = []
        for key in image_keys:
            path = os.path.join(self.directory, f"openloop-{key.replace('/', '_')}-{steps:09d}.gif")
            paths.append(write_gif(open_loop_frames(result, key), path, fps=5))
        if not image_keys:
            paths.append(open_loop_plot(result, os.path.join(self.directory, f"openloop-{steps:09d}.png")))
        return paths

    @staticmethod
    def upload(trainer: L.Trainer, paths: list[str]) -> None:
        logger = trainer.logger
        if logger is None or not hasattr(logger, "experiment") or not getattr(logger, "run_id", None):
            return
        for path in paths:
            try:
                logger.experiment.log_artifact(logger.run_id, path, artifact_path="videos")
            except Exception as err:  # noqa: BLE001 - a lost video must not stop training
                if isinstance(logger, ResilientMLFlowLogger):  # counted and warned about with the others
                    logger.report_failure("log_artifact", err)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"next_at": self.schedule.next_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.next_at = state_dict["next_at"]
